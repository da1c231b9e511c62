"""Benchmark one MoE layer (forward + backward) against the GEMM floor and against peer implementations.

    .venv/bin/python scripts/bench_moe_layer.py --quick --json bench_results/moe_layer_quick.json   # a few minutes
    .venv/bin/python scripts/bench_moe_layer.py --json bench_results/moe_layer.json                 # every shape
    .venv/bin/python scripts/bench_moe_layer.py --shapes fine --noise 0 --dtype bf16 --repeats 7

Shapes (T=4096 tokens, d=512; same active FLOPs for the first two): `default` E=8 k=2 F=1024, `fine` E=64 k=8
F=256, `e128` E=128 k=8 F=128; each with balanced (`--noise 0`) and skewed (`--noise 1`, fake_gate_noise=1) routing.
Rows, timed interleaved in one process (every round runs each row once, from a rotating start), so their ratios
are fair on a shared machine:
  floor          the six GEMMs of the routed work as single dense products over all T*k rows into preallocated
                 outputs (forward X.W13, A.W2; backward dY.W2^T, A^T.dY, dH.W13^T, X^T.dH): no routing, no
                 activation, no autograd. The denominator of every efficiency.
  dense          a dense SwiGLU MLP on [T*k, d] with autograd (the former `ideal` row)
  loop           automoe `MoE` with experts_backend=loop (the oracle)
  fast           automoe `MoE` with --backend (default auto: the autotuned engine)
  grouped        automoe `MoE` with experts_backend=grouped_mm (what `auto` ran on CPU before the padded-bmm
                 engine became a candidate: the before/after row of issue 17, in the same rounds)
  experts        the fast layer's GroupedExperts alone on rows already sorted expert-major (optional row)
  peer_loop      a per-expert loop written here: index_select, nn.Linear SwiGLU (gate, up, down), index_add
  hf_grouped_mm  transformers Qwen3MoeSparseMoeBlock, experts_implementation=grouped_mm
  hf_eager       the same block, eager (its per-expert loop)
Every MoE row routes with the same fake gate (same seed per round) and holds the same expert weights; a parity
check of the outputs runs before timing. With skewed routing the timed rounds reuse the warm-up rounds' draws
(`--routing-draws`): on the CPU a bf16 GEMM's first call at a new row count pays oneDNN's kernel build
(scripts/bench_gemm_row_counts.py: 200 products at new counts took 2.96x as long as at one count, 1.1x when the
same counts came again; fp32 1.00x), which a training run pays once per count and a round with a fresh draw pays
on every expert. Columns: median/min ms, tokens/s, efficiency = median over rounds of
floor_ms / row_ms, `vs peer` = median over rounds of (fastest peer row's ms / row ms) (> 1: faster than every peer),
and the bytes autograd saves for backward (storages deduplicated, parameters excluded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe.bench import (
    DTYPES,
    MOE_LAYER_SHAPES,
    LoadMeter,
    MachineLoadMeter,
    add_host_allocator_flag,
    fake_gate_moe,
    machine_info,
    report_and_save,
)
from automoe.host_memory import apply_host_allocator
from automoe.moe.layer import MoE

SHAPES = MOE_LAYER_SHAPES
PEERS = ("peer_loop", "hf_grouped_mm", "hf_eager")
ALL_ROWS = ("floor", "dense", "loop", "fast", "grouped", "experts", *PEERS)
DEFAULT_ROWS = ("floor", "dense", "loop", "fast", *PEERS)
QUICK_ROWS = ("floor", "dense", "fast", *PEERS)


class Floor(nn.Module):
    """The six dense GEMMs of the routed work into preallocated outputs (`bench_step` replaces forward+backward)."""

    def __init__(self, rows: int, dim: int, inter_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        N, D, Fd = rows, dim, inter_dim
        new = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
        self.w13, self.w2 = new(D, 2 * Fd) * D**-0.5, new(Fd, D) * Fd**-0.5
        self.h, self.a, self.y = new(N, 2 * Fd), new(N, Fd), new(N, D)
        self.da, self.dh, self.dx = new(N, Fd), new(N, 2 * Fd), new(N, D)
        self.dw13, self.dw2 = new(D, 2 * Fd), new(Fd, D)

    def bench_step(self, x: Tensor, dy: Tensor) -> None:
        torch.mm(x, self.w13, out=self.h)
        torch.mm(self.a, self.w2, out=self.y)
        torch.mm(dy, self.w2.t(), out=self.da)
        torch.mm(self.a.t(), dy, out=self.dw2)
        torch.mm(self.dh, self.w13.t(), out=self.dx)
        torch.mm(x.t(), self.dh, out=self.dw13)


class DenseSwiGLU(nn.Module):
    """The `dense` row: one SwiGLU MLP over all T*k routed rows, fused [D, 2F] up weight like the experts."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.w_up = nn.Parameter(torch.randn(dim, 2 * inter_dim, dtype=dtype) * dim**-0.5)
        self.w_down = nn.Parameter(torch.randn(inter_dim, dim, dtype=dtype) * inter_dim**-0.5)

    def forward(self, x_ND: Tensor) -> Tensor:
        g_NF, u_NF = (x_ND @ self.w_up).chunk(2, dim=-1)
        return (F.silu(g_NF) * u_NF) @ self.w_down


class ExpertsOnly(nn.Module):
    """The `experts` row: the fast layer's GroupedExperts on rows already sorted expert-major."""

    def __init__(self, layer: MoE, counts_E: Tensor) -> None:
        super().__init__()
        self.experts, self.counts_E = layer.experts, counts_E

    def forward(self, x_ND: Tensor) -> Tensor:
        return self.experts(x_ND, self.counts_E)


class PeerLoop(nn.Module):
    """A tutorial MoE: per expert, index_select its tokens, nn.Linear SwiGLU, weight, index_add into the output."""

    def __init__(self, layer: MoE) -> None:
        super().__init__()
        self.gate = layer.gate  # shared: same routing as the automoe rows
        w_up, w_down = layer.experts.w_up.detach(), layer.experts.w_down.detach()
        Fd = w_down.shape[1]
        self.num_experts = w_up.shape[0]
        self.gate_proj, self.up_proj, self.down_proj = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for e in range(self.num_experts):
            for mods, w in (
                (self.gate_proj, w_up[e, :, :Fd]),
                (self.up_proj, w_up[e, :, Fd:]),
                (self.down_proj, w_down[e]),
            ):
                lin = nn.Linear(w.shape[0], w.shape[1], bias=False, dtype=w.dtype)
                lin.weight.data.copy_(w.t())
                mods.append(lin)

    def forward(self, x_BSD: Tensor) -> Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        route = self.gate(x_TD, None)
        idx_TK, w_TK = route.indices_TK, route.weights_TK.to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            tok, slot = torch.where(idx_TK == e)
            xe = x_TD.index_select(0, tok)
            ye = self.down_proj[e](F.silu(self.gate_proj[e](xe)) * self.up_proj[e](xe))
            out_TD = out_TD.index_add(0, tok, ye * w_TK[tok, slot, None])
        return out_TD.view_as(x_BSD)


class _FixedRouter(nn.Module):
    """Stands in for Qwen3MoeTopKRouter: the automoe fake gate's routing in HF's (logits, weights, indices) form."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x_TD: Tensor):
        route = self.gate(x_TD, None)
        return None, route.weights_TK.to(x_TD.dtype), route.indices_TK


def hf_block(layer: MoE, implementation: str) -> nn.Module | None:
    """transformers' Qwen3MoeSparseMoeBlock holding the layer's expert weights; None if transformers is absent."""
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return None
    cfg = layer.cfg
    hf_cfg = Qwen3MoeConfig(
        hidden_size=cfg.dim,
        moe_intermediate_size=cfg.moe_inter_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_activated_experts,
        hidden_act="silu",
    )
    hf_cfg._experts_implementation = implementation
    w_up = layer.experts.w_up.detach()
    block = Qwen3MoeSparseMoeBlock(hf_cfg).to(w_up.dtype)
    with torch.no_grad():  # HF stores [E, out, in]: gate_up [E, 2F, D] (gate rows first), down [E, D, F]
        block.experts.gate_up_proj.copy_(w_up.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.w_down.detach().transpose(1, 2))
    block.gate = _FixedRouter(layer.gate)
    return block


def saved_activation_bytes(step_forward, params: list[Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward during `step_forward()`, parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step_forward()
    del out
    return sum(storages.values())


def moe_layer(args, dtype: torch.dtype, backend: str) -> MoE:
    return fake_gate_moe(
        args.experts, args.topk, args.inter_dim, dim=args.dim, dtype=dtype, noise=args.noise, backend=backend
    )


def build_rows(args, dtype: torch.dtype, names: tuple[str, ...]) -> dict:
    """name -> (module, input, grad of output) for every row in `names` that can be built here."""
    T, D, Fd, E, K = args.tokens, args.dim, args.inter_dim, args.experts, args.topk
    g = torch.Generator().manual_seed(0)
    x_BSD = torch.randn(1, T, D, generator=g).to(dtype)
    dy_BSD = torch.randn(1, T, D, generator=g).to(dtype)
    x_ND = torch.randn(T * K, D, generator=g).to(dtype)
    dy_ND = torch.randn(T * K, D, generator=g).to(dtype)
    fast = moe_layer(args, dtype, args.backend)
    rows = {}
    for name in names:
        if name == "floor":
            rows[name] = (Floor(T * K, D, Fd, dtype), x_ND, dy_ND)
        elif name == "dense":
            rows[name] = (DenseSwiGLU(D, Fd, dtype), x_ND, dy_ND)
        elif name == "loop":
            rows[name] = (moe_layer(args, dtype, "loop"), x_BSD, dy_BSD)
        elif name == "fast":
            rows[name] = (fast, x_BSD, dy_BSD)
        elif name == "grouped":
            rows[name] = (moe_layer(args, dtype, "grouped_mm"), x_BSD, dy_BSD)
        elif name == "experts":
            torch.manual_seed(0)
            counts_E = torch.bincount(fast.gate(x_BSD.reshape(-1, D), None).indices_TK.flatten(), minlength=E)
            rows[name] = (ExpertsOnly(fast, counts_E), x_ND, dy_ND)
        elif name == "peer_loop":
            rows[name] = (PeerLoop(fast), x_BSD, dy_BSD)
        elif name in ("hf_grouped_mm", "hf_eager"):
            block = hf_block(fast, name.removeprefix("hf_"))
            if block is not None:
                rows[name] = (block, x_BSD, dy_BSD)
    return rows


def parity(rows: dict) -> dict[str, float]:
    """Relative error of each MoE row's output against the fast row's, on the same routing draw."""
    fast, x, _ = rows["fast"]
    out = {}
    with torch.no_grad():
        torch.manual_seed(123)
        ref = fast(x).float()
        for name in ("loop", "grouped", *PEERS):
            if name in rows:
                torch.manual_seed(123)
                y = rows[name][0](x).float()
                out[name] = float((y - ref).norm() / ref.norm())
    return out


def step(module: nn.Module, x: Tensor, dy: Tensor) -> None:
    if isinstance(module, Floor):
        module.bench_step(x, dy)
        return
    x = x.detach().requires_grad_()
    for p in module.parameters():
        p.grad = None
    module(x).backward(dy)


def time_rows(rows: dict, *, repeats: int, warmup: int, draws: int) -> dict[str, list[float]]:
    """Per-row step times in ms. Every round runs each row once, starting from a rotating row. Round r routes with
    draw r mod `draws` of the fake gate's noise (0: a new draw every round), the same draw for every MoE row."""
    names = list(rows)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            module, x, dy = rows[name]
            torch.manual_seed(r % draws if draws > 0 else r)
            t0 = time.perf_counter()
            step(module, x, dy)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def stage_times(layer: MoE, x_BSD: Tensor, dy_BSD: Tensor, *, repeats: int) -> dict[str, float]:
    """Median ms of each stage of the layer, forward and backward (backward split with gradient hooks)."""
    acc: dict[str, list[float]] = {}
    for _ in range(repeats + 1):
        marks: list[tuple[str, float]] = [("start", time.perf_counter())]
        x_TD = x_BSD.detach().reshape(-1, x_BSD.shape[-1]).requires_grad_()
        route = layer.gate(x_TD, None)
        marks.append(("gate", time.perf_counter()))
        x_ND, counts_E, ctx = layer.dispatcher.dispatch(x_TD, route.indices_TK, route.weights_TK, None)
        marks.append(("dispatch", time.perf_counter()))
        y_ND = layer.experts(x_ND, counts_E)
        marks.append(("experts", time.perf_counter()))
        y_TD = layer.dispatcher.combine(y_ND, ctx)
        marks.append(("combine", time.perf_counter()))
        bwd: list[tuple[str, float]] = []
        y_ND.register_hook(lambda g, bwd=bwd: bwd.append(("combine_bwd", time.perf_counter())))
        x_ND.register_hook(lambda g, bwd=bwd: bwd.append(("experts_bwd", time.perf_counter())))
        for p in layer.parameters():
            p.grad = None
        t_bwd = time.perf_counter()
        y_TD.backward(dy_BSD.reshape(y_TD.shape))
        bwd.append(("dispatch_bwd", time.perf_counter()))
        ms = {name: (t - marks[i][1]) * 1e3 for i, (name, t) in enumerate(marks[1:])}
        prev = t_bwd
        for name, t in bwd:
            ms[name], prev = (t - prev) * 1e3, t
        for name, v in ms.items():
            acc.setdefault(name, []).append(v)
    return {name: statistics.median(v[1:]) for name, v in acc.items()}


def routed_load_skew(layer: MoE, x_BSD: Tensor, *, seed: int = 0) -> float:
    """max / mean of the per-expert routed load for one draw of the gate (1.0 = perfectly balanced)."""
    torch.manual_seed(seed)
    idx_TK = layer.gate(x_BSD.reshape(-1, x_BSD.shape[-1]), None).indices_TK
    load_E = torch.bincount(idx_TK.flatten(), minlength=layer.cfg.num_experts).float()
    return float(load_E.max() / load_E.mean())


def per_round(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def run_config(args, dtype_name: str, shape: str, names: tuple[str, ...]) -> dict:
    dtype = DTYPES[dtype_name]
    rows = build_rows(args, dtype, names)
    errors = parity(rows)
    loadavg_before = os.getloadavg()[0]
    with LoadMeter() as load:
        times = time_rows(rows, repeats=args.repeats, warmup=args.warmup, draws=args.routing_draws)
    peers = [p for p in PEERS if p in times]
    best_peer = [min(ts) for ts in zip(*(times[p] for p in peers))] if peers else None
    fast_layer = rows["fast"][0]
    result = {
        "shape": shape,
        "dtype": dtype_name,
        "tokens": args.tokens,
        "dim": args.dim,
        "experts": args.experts,
        "topk": args.topk,
        "inter_dim": args.inter_dim,
        "noise": args.noise,
        "loadavg_1m": [loadavg_before, os.getloadavg()[0]],
        "uptime": _uptime(),
        "other_cpu_load": round(load.other_load, 3),
        "total_cpu_load": round(load.total_load, 3),
        "load_max_over_mean": round(routed_load_skew(fast_layer, rows["fast"][1]), 3),
        "parity_rel_err_vs_fast": {k: float(f"{v:.3g}") for k, v in errors.items()},
        "engine_choices": {str(k): v for k, v in _engine_choices().items()},
        "rows": {},
    }
    for name, (module, x, _dy) in rows.items():
        med = statistics.median(times[name])
        row = {
            "median_ms": round(med, 2),
            "min_ms": round(min(times[name]), 2),
            "tokens_per_s": round(args.tokens / med * 1e3),
        }
        if "floor" in times:
            row["efficiency"] = round(per_round(times["floor"], times[name]), 3)
        if best_peer is not None:
            row["vs_best_peer"] = round(per_round(best_peer, times[name]), 3)
        if name != "floor":
            saved = saved_activation_bytes(
                lambda m=module, x=x: m(x.detach().requires_grad_()), list(module.parameters())
            )
            row["saved_MB"] = round(saved / 2**20, 1)
        result["rows"][name] = row
    if args.stages:
        fast, x, dy = rows["fast"]
        result["fast_stages_ms"] = {k: round(v, 2) for k, v in stage_times(fast, x, dy, repeats=3).items()}
    return result


def _uptime() -> str:
    """`uptime`'s line (load averages over 1, 5, 15 minutes) as the shell prints it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _engine_choices() -> dict:
    try:
        from automoe.moe.autotune import tuned_choices
    except ImportError:
        return {}
    return tuned_choices()


def print_result(args, res: dict) -> None:
    print(
        f"\n{res['shape']} {res['dtype']}: T={res['tokens']} d={res['dim']} F={res['inter_dim']} E={res['experts']} "
        f"k={res['topk']} noise={res['noise']} (max/mean load {res['load_max_over_mean']:.2f}) backend={args.backend} "
        f"repeats={args.repeats}; other CPU load {res['other_cpu_load']:.0%}, loadavg {res['loadavg_1m'][0]:.1f}"
    )
    print(
        f"{'row':<14} {'median ms':>10} {'min ms':>9} {'tokens/s':>9} {'efficiency':>10} {'vs peer':>8} {'saved MB':>9}"
    )
    for name, r in res["rows"].items():
        print(
            f"{name:<14} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {r['tokens_per_s']:>9} "
            f"{r.get('efficiency', float('nan')):>10.3f} {r.get('vs_best_peer', float('nan')):>8.3f} "
            f"{r.get('saved_MB', 0.0):>9.1f}"
        )
    print(
        "parity (rel. error vs fast): "
        + ", ".join(f"{k} {v:.2g}" for k, v in res["parity_rel_err_vs_fast"].items())
    )
    if "fast_stages_ms" in res:
        print("fast stages (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in res["fast_stages_ms"].items()))


def print_summary(results: list[dict]) -> None:
    print(
        f"\n{'shape':<8} {'dtype':<5} {'noise':>5} {'fast eff':>8} {'best peer':>14} {'peer eff':>8} {'fast vs peer':>12}"
    )
    for r in results:
        rows = r["rows"]
        peers = [p for p in PEERS if p in rows]
        best = min(peers, key=lambda p: rows[p]["median_ms"]) if peers else "-"
        print(
            f"{r['shape']:<8} {r['dtype']:<5} {r['noise']:>5} {rows['fast'].get('efficiency', float('nan')):>8.3f} "
            f"{best:>14} {rows[best].get('efficiency', float('nan')) if peers else float('nan'):>8.3f} "
            f"{rows['fast'].get('vs_best_peer', float('nan')):>12.3f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens T per step")
    p.add_argument("--dim", type=int, default=512, help="model dim D")
    p.add_argument("--shapes", default="default,fine,e128", help=f"comma-separated of {list(SHAPES)}")
    p.add_argument("--noise", default="0,1", help="comma-separated fake gate noise: 0 balanced, 1 skewed")
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument(
        "--repeats", "--rounds", type=int, default=5, help="timed rounds (every row once per round)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument(
        "--routing-draws",
        type=int,
        default=None,
        help="skewed routing: the rounds cycle through this many draws (default: --warmup, so every timed round "
        "reuses a draw its warm-up saw, as a long run has met its row counts before); 0: a new draw every round",
    )
    p.add_argument("--backend", default="auto", help="experts_backend of the `fast` row")
    p.add_argument("--rows", default=None, help=f"comma-separated of {list(ALL_ROWS)} (fast is always run)")
    p.add_argument("--stages", action="store_true", help="also time the fast layer's stages")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes: no loop row, --tokens 2048 --repeats 3 --warmup 1 unless given",
    )
    add_host_allocator_flag(p)  # every row alike
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        args.repeats = args.repeats if "--repeats" in given else 3
        args.warmup = args.warmup if "--warmup" in given else 1
        args.tokens = args.tokens if "--tokens" in given else 2048
    if args.routing_draws is None:
        args.routing_draws = args.warmup
    names = tuple(args.rows.split(",")) if args.rows else (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    unknown = set(names) - set(ALL_ROWS)
    if unknown:
        raise ValueError(f"--rows {sorted(unknown)} not in {list(ALL_ROWS)}")
    args.names = names if "fast" in names else (*names, "fast")
    for s in args.shapes.split(","):
        if s not in SHAPES:
            raise ValueError(f"--shapes {s!r} is not one of {list(SHAPES)}")
    for d in args.dtype.split(","):
        if d not in DTYPES:
            raise ValueError(f"--dtype {d!r} is not one of {list(DTYPES)}")
    return args


def main() -> None:
    args = parse_args()
    print(apply_host_allocator(args.host_allocator))
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "uptime_start": _uptime(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": {k: v for k, v in vars(args).items() if k != "names"},
        "results": [],
    }
    noises = [float(n) for n in args.noise.split(",")]
    with MachineLoadMeter() as machine:
        for dtype_name in args.dtype.split(","):
            for shape in args.shapes.split(","):
                for noise in noises:
                    args.experts, args.topk, args.inter_dim = SHAPES[shape]
                    args.noise = noise
                    res = run_config(args, dtype_name, shape, args.names)
                    print_result(args, res)
                    report["results"].append(res)
                    if args.json:  # after every configuration: a run cut short keeps what it measured
                        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                        Path(args.json).write_text(json.dumps(report, indent=2))
    print_summary(report["results"])
    report["uptime_end"] = _uptime()
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()
