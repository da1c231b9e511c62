"""Block-causal (document-masked) attention on CPU: SDPA with a boolean mask vs flex_attention, vs plain causal.

    .venv/bin/python scripts/bench_attention_mask.py --json bench_results/attention_mask.json

Shapes (letters: docs/architecture.md#shape-legend): `large` B=4 S=512 H=4 G=4 A=32, and `tiny` B=4 S=128
H=4 G=2 A=32 (one micro-batch of the main job's model). Each row holds documents of
seeded random lengths (mean --mean-doc-len, capped at S). Rows, timed interleaved (round-robin over backends in
every repeat, so machine noise hits all of them alike), medians and mins over --repeats:
  causal        SDPA is_causal=True, no document mask (what runs without `data.document_masking`)
  sdpa_mask     SDPA with the [B, 1, S, S] boolean block-causal mask built from document ids, K/V expanded to
                H heads (what `automoe.models.attention` runs for packed documents)
  flex          flex_attention with a BlockMask, eager
  flex_compiled torch.compile(flex_attention)
`fwd+bwd` times forward and backward; flex has no CPU backward in this torch (NotImplementedError, recorded),
so it is timed forward only, next to the forward-only times of the SDPA rows. The BlockMask build and the first
compiled call are timed apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe_layer import MachineLoadMeter, machine_info, report_and_save  # noqa: E402

SHAPES = {"large": dict(B=4, S=512, H=4, G=4, A=32), "tiny": dict(B=4, S=128, H=4, G=2, A=32)}


def document_ids(B: int, S: int, mean_len: int, seed: int) -> Tensor:
    """[B, S] int64: document index per position, lengths ~ uniform(1, 2 * mean_len - 1)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lengths = torch.randint(1, 2 * mean_len, (S,), generator=g)
        rows.append(torch.repeat_interleave(torch.arange(S), lengths)[:S])
    return torch.stack(rows)


def block_causal_mask(doc_BS: Tensor) -> Tensor:
    S = doc_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool).tril()
    return (causal_SS & (doc_BS[:, :, None] == doc_BS[:, None, :]))[:, None]


def backends(doc_BS: Tensor, H: int, G: int):
    """name -> fn(q_BHSA, k_BGSA, v_BGSA) -> y_BHSA, plus the time to build the flex BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, S = doc_BS.shape

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def sdpa_mask(q, k, v):  # the mask is rebuilt every call, as the model does per forward
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(doc_BS))

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_BS[b, q_idx] == doc_BS[b, kv_idx])

    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, B, None, S, S, device="cpu")
    mask_s = time.perf_counter() - t0
    # one compiled function per autograd mode: the refused backward attempts would otherwise use up the
    # recompile budget of the forward one, which then silently runs eager
    compiled = {False: torch.compile(flex_attention), True: torch.compile(flex_attention)}

    def flex(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=G != H)

    def flex_compiled(q, k, v):
        return compiled[q.requires_grad](q, k, v, block_mask=block_mask, enable_gqa=G != H)

    return {"causal": causal, "sdpa_mask": sdpa_mask, "flex": flex, "flex_compiled": flex_compiled}, mask_s


def _step(fn, q, k, v, dy, backward: bool) -> None:
    if backward:
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dy)
    else:
        with torch.no_grad():  # detached: flex refuses inputs that require grad on CPU even under no_grad
            fn(q.detach(), k.detach(), v.detach())


def run_shape(name: str, shape: dict, args) -> dict:
    B, S, H, G, A = (shape[c] for c in "BSHGA")
    torch._dynamo.reset()  # a fresh recompile budget per shape (see the probe of the compiled backward below)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, A, generator=g, requires_grad=True)
    k, v = (torch.randn(B, G, S, A, generator=g, requires_grad=True) for _ in range(2))
    dy = torch.randn(B, H, S, A, generator=g)
    doc_BS = document_ids(B, S, min(args.mean_doc_len, S), seed=1)
    fns, mask_s = backends(doc_BS, H, G)
    ref = block_causal_mask(doc_BS)
    compile_ms = 0.0
    with torch.no_grad():  # every document-masked backend computes the same thing
        k_H, v_H = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
        want = F.scaled_dot_product_attention(q, k_H, v_H, attn_mask=ref)
        for key in ("flex", "flex_compiled"):
            t0 = time.perf_counter()
            err = (fns[key](q.detach(), k.detach(), v.detach()) - want).abs().max().item()
            compile_ms = (time.perf_counter() - t0) * 1e3 if key == "flex_compiled" else compile_ms
            assert err < 1e-4, f"{key} differs from the masked SDPA by {err}"
    modes = {"fwd": False, "fwd+bwd": True}
    notes = {}

    def runs(key: str, mode: str, calls: int) -> bool:
        try:
            for _ in range(calls):
                _step(fns[key], q, k, v, dy, modes[mode])
            return True
        except NotImplementedError as e:
            notes[f"{key} {mode}"] = f"NotImplementedError: {str(e).splitlines()[0]}"
            return False

    # The compiled flex backward is probed only after the timings: each refused attempt recompiles the code
    # object of flex_attention, and once dynamo's recompile limit is used up the compiled forward runs eager.
    times: dict[tuple[str, str], list[float]] = {
        (key, mode): []
        for key in fns
        for mode in modes
        if (key, mode) != ("flex_compiled", "fwd+bwd") and runs(key, mode, args.warmup)
    }
    for _ in range(args.repeats):  # interleaved: one call of every backend per repeat
        for key, mode in times:
            t0 = time.perf_counter()
            _step(fns[key], q, k, v, dy, modes[mode])
            times[(key, mode)].append((time.perf_counter() - t0) * 1e3)
    if runs("flex_compiled", "fwd+bwd", 1):
        notes["flex_compiled fwd+bwd"] = "runs (not timed)"
    rows = []
    for (key, mode), ts in times.items():
        rows.append({"backend": key, "mode": mode, "median_ms": statistics.median(ts), "min_ms": min(ts)})
    docs = [int(r.max()) + 1 for r in doc_BS]
    return {
        "shape": name,
        **shape,
        "documents_per_row": docs,
        "block_mask_build_ms": mask_s * 1e3,
        "flex_compile_ms": compile_ms,
        "rows": rows,
        "not_runnable": notes,
    }


def print_table(result: dict) -> None:
    r = result
    print(
        f"\n{r['shape']}: B={r['B']} S={r['S']} H={r['H']} G={r['G']} A={r['A']}, documents per row "
        f"{r['documents_per_row']}; flex BlockMask build {r['block_mask_build_ms']:.1f} ms, first compiled "
        f"call (compile) {r['flex_compile_ms']:.0f} ms"
    )
    base = {row["mode"]: row["median_ms"] for row in r["rows"] if row["backend"] == "causal"}
    print(f"{'backend':<14}{'mode':<9}{'median ms':>11}{'min ms':>9}{'x causal':>10}")
    for row in sorted(r["rows"], key=lambda x: (x["mode"], x["median_ms"])):
        ratio = row["median_ms"] / base[row["mode"]]
        print(
            f"{row['backend']:<14}{row['mode']:<9}{row['median_ms']:>11.2f}{row['min_ms']:>9.2f}"
            f"{ratio:>10.2f}"
        )
    for key, note in r["not_runnable"].items():
        print(f"{key}: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mean-doc-len", type=int, default=96, help="mean document length in tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a main-job rank uses 1)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    report = {"machine": machine_info(), "args": vars(args), "results": []}
    with MachineLoadMeter() as machine:
        for name in args.shapes:
            result = run_shape(name, SHAPES[name], args)
            report["results"].append(result)
            print_table(result)
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()
