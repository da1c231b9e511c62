"""Benchmark one MoE layer (forward + backward) against a dense MLP doing the same active FLOPs.

    .venv/bin/python scripts/bench_moe_layer.py                     # T=4096, d=512, F=1024, E=8, k=2; fp32 + bf16
    .venv/bin/python scripts/bench_moe_layer.py --dtype bf16 --noise 0.5 --json /tmp/moe.json
    .venv/bin/python scripts/bench_moe_layer.py --sweep --json bench_results/moe_layer_sweep.json  # E x k x noise

Rows, timed interleaved in one run so their ratio is fair on a shared machine:
  ideal  a dense SwiGLU MLP on [T*k, d] (same active FLOPs, no routing), plain autograd
  loop   automoe.moe.layer.MoE with experts_backend=loop (the per-expert oracle)
  fast   the same layer with --backend (default auto)
Columns: median and min ms over --repeats after warm-up, tokens/s (from the median), efficiency = median over
rounds of ideal_ms / row_ms within the round, eff(min) = min ideal_ms / min row_ms, and the bytes autograd saves for
backward (storages deduplicated, parameters excluded). A stage breakdown of the fast layer follows
(shape suffixes: docs/architecture.md#shape-legend; N = T*k routed rows).
`--sweep` times only the ideal and fast rows (`--rows` to change) for every E in --sweep-experts, k in
--sweep-topk and noise in --sweep-noise, and reports the routed load's max/mean over experts.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe.bench import DTYPES, LoadMeter, MachineLoadMeter, machine_info, report_and_save
from automoe.config.moe import MoEConfig
from automoe.moe.layer import MoE


class ExpertsOnly(nn.Module):
    """The `experts` row: the fast layer's GroupedExperts on rows already sorted expert-major (no gate, dispatch
    or combine), so ideal -> experts -> fast separates the GEMM engine's cost from the routing's."""

    def __init__(self, layer: MoE, counts_E: Tensor) -> None:
        super().__init__()
        self.experts, self.counts_E = layer.experts, counts_E

    def forward(self, x_ND: Tensor) -> Tensor:
        return self.experts(x_ND, self.counts_E)


class DenseSwiGLU(nn.Module):
    """The `ideal` row: one SwiGLU MLP over all T*k routed rows, fused [D, 2F] up weight like the experts."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.w_up = nn.Parameter(torch.randn(dim, 2 * inter_dim, dtype=dtype) * dim**-0.5)
        self.w_down = nn.Parameter(torch.randn(inter_dim, dim, dtype=dtype) * inter_dim**-0.5)

    def forward(self, x_ND: Tensor) -> Tensor:
        g_NF, u_NF = (x_ND @ self.w_up).chunk(2, dim=-1)
        return (F.silu(g_NF) * u_NF) @ self.w_down


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


def build_rows(args, dtype: torch.dtype, *, names: tuple[str, ...] = ("ideal", "loop", "fast")) -> dict:
    """name -> (module, input, grad of output) for the ideal MLP and the MoE layers named in `names`."""
    T, D, Fd, E, K = args.tokens, args.dim, args.inter_dim, args.experts, args.topk
    g = torch.Generator().manual_seed(0)
    x_BSD = torch.randn(1, T, D, generator=g).to(dtype)
    dy_BSD = torch.randn(1, T, D, generator=g).to(dtype)
    x_ND = torch.randn(T * K, D, generator=g).to(dtype)
    dy_ND = torch.randn(T * K, D, generator=g).to(dtype)
    rows = {"ideal": (DenseSwiGLU(D, Fd, dtype), x_ND, dy_ND)}
    for name, backend in (("loop", "loop"), ("fast", args.backend)):
        if name not in names and not (name == "fast" and "experts" in names):
            continue
        cfg = MoEConfig(
            dim=D,
            moe_inter_dim=Fd,
            num_experts=E,
            num_activated_experts=K,
            gate="fake_balanced",
            fake_gate_noise=args.noise,
            expert_activation="swiglu",
            experts_backend=backend,
            dtype="float32" if dtype == torch.float32 else "bfloat16",
        )
        layer = MoE(cfg)
        torch.manual_seed(0)
        layer.init_weights(std=D**-0.5)
        rows[name] = (layer, x_BSD, dy_BSD)
    if "experts" in names:
        fast = rows["fast"][0]
        torch.manual_seed(0)
        idx_TK = fast.gate(x_BSD.reshape(-1, D), None).indices_TK
        counts_E = torch.bincount(idx_TK.flatten(), minlength=E)
        rows["experts"] = (ExpertsOnly(fast, counts_E), x_ND, dy_ND)
    return rows


def step(module: nn.Module, x: Tensor, dy: Tensor) -> None:
    x = x.detach().requires_grad_()
    for p in module.parameters():
        p.grad = None
    module(x).backward(dy)


def time_rows(rows: dict, *, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Per-row step times in ms. Every round runs each row once, starting from a rotating row."""
    names = list(rows)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            module, x, dy = rows[name]
            torch.manual_seed(r)  # the fake gate's noise draws the same routing for loop and fast
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


def run_dtype(args, dtype_name: str, *, names: tuple[str, ...] = ("ideal", "loop", "fast")) -> dict:
    dtype = DTYPES[dtype_name]
    rows = build_rows(args, dtype, names=names)
    with LoadMeter() as load:
        times = time_rows(rows, repeats=args.repeats, warmup=args.warmup)
    ideal = times["ideal"]
    result = {
        "dtype": dtype_name,
        "experts": args.experts,
        "topk": args.topk,
        "noise": args.noise,
        "other_cpu_load": round(load.other_load, 3),
        "total_cpu_load": round(load.total_load, 3),
        "load_max_over_mean": round(routed_load_skew(rows["fast"][0], rows["fast"][1]), 3),
        "rows": {},
    }
    for name, (module, x, _dy) in rows.items():
        med = statistics.median(times[name])
        # efficiency: median over rounds of ideal/row within the round (load bursts hit both), and min/min
        per_round = statistics.median(i / t for i, t in zip(ideal, times[name]))
        saved = saved_activation_bytes(
            lambda m=module, x=x: m(x.detach().requires_grad_()), list(module.parameters())
        )
        result["rows"][name] = {
            "median_ms": round(med, 2),
            "min_ms": round(min(times[name]), 2),
            "tokens_per_s": round(args.tokens / med * 1e3),
            "efficiency": round(per_round, 3),
            "efficiency_min": round(min(ideal) / min(times[name]), 3),
            "saved_MB": round(saved / 2**20, 1),
        }
    if not args.no_stages and not args.sweep:
        fast, x, dy = rows["fast"]
        result["fast_stages_ms"] = {k: round(v, 2) for k, v in stage_times(fast, x, dy, repeats=3).items()}
    return result


def print_result(args, res: dict) -> None:
    print(
        f"\n{res['dtype']}: T={args.tokens} d={args.dim} F={args.inter_dim} E={args.experts} k={args.topk} "
        f"noise={args.noise} backend={args.backend} repeats={args.repeats} "
        f"(other CPU load during the run: {res['other_cpu_load']:.0%})"
    )
    print(
        f"{'row':<7} {'median ms':>10} {'min ms':>8} {'tokens/s':>9} {'efficiency':>10} {'eff(min)':>9} {'saved MB':>9}"
    )
    for name, r in res["rows"].items():
        print(
            f"{name:<7} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f} {r['tokens_per_s']:>9} "
            f"{r['efficiency']:>10.3f} {r['efficiency_min']:>9.3f} {r['saved_MB']:>9.1f}"
        )
    if "fast_stages_ms" in res:
        print("fast stages (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in res["fast_stages_ms"].items()))


def print_sweep(results: list[dict]) -> None:
    print(
        f"\n{'dtype':<5} {'E':>3} {'k':>2} {'noise':>5} {'max/mean':>8} {'ideal ms':>9} {'fast ms':>8} "
        f"{'efficiency':>10} {'eff(min)':>9} {'saved MB':>9} {'other load':>10}"
    )
    for r in results:
        ideal, fast = r["rows"]["ideal"], r["rows"]["fast"]
        print(
            f"{r['dtype']:<5} {r['experts']:>3} {r['topk']:>2} {r['noise']:>5} {r['load_max_over_mean']:>8.2f} "
            f"{ideal['median_ms']:>9.1f} {fast['median_ms']:>8.1f} {fast['efficiency']:>10.3f} "
            f"{fast['efficiency_min']:>9.3f} {fast['saved_MB']:>9.1f} {r['other_cpu_load']:>10.0%}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens T per step")
    p.add_argument("--dim", type=int, default=512, help="model dim D")
    p.add_argument("--inter-dim", type=int, default=1024, help="expert hidden width F")
    p.add_argument("--experts", type=int, default=8, help="routed experts E")
    p.add_argument("--topk", type=int, default=2, help="experts per token k")
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument(
        "--noise", type=float, default=0.0, help="fake gate noise: 0 balanced, 1 random (skewed) routing"
    )
    p.add_argument("--backend", default="auto", help="experts_backend of the `fast` row")
    p.add_argument("--no-stages", action="store_true", help="skip the stage breakdown")
    p.add_argument("--sweep", action="store_true", help="sweep E x k x noise (see --sweep-*)")
    p.add_argument("--sweep-experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--sweep-topk", type=int, nargs="+", default=[2, 8])
    p.add_argument("--sweep-noise", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument(
        "--rows",
        default=None,
        help="comma-separated rows: ideal,loop,experts,fast (sweep default: ideal,fast)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    names = tuple((args.rows or ("ideal,fast" if args.sweep else "ideal,loop,fast")).split(","))
    if "ideal" not in names or "fast" not in names:
        raise ValueError(f"--rows {args.rows!r} must include ideal and fast")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "results": [],
    }
    for name in args.dtype.split(","):
        if name not in DTYPES:
            raise ValueError(f"--dtype {name!r} is not one of {list(DTYPES)}")
    configs = [(args.experts, args.topk, args.noise)]
    if args.sweep:
        configs = [(e, k, n) for e in args.sweep_experts for k in args.sweep_topk for n in args.sweep_noise]
    with MachineLoadMeter() as machine:
        for name in args.dtype.split(","):
            for experts, topk, noise in configs:
                args.experts, args.topk, args.noise = experts, topk, noise
                res = run_dtype(args, name, names=names)
                if not args.sweep:
                    print_result(args, res)
                report["results"].append(res)
    if args.sweep:
        print_sweep(report["results"])
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()
