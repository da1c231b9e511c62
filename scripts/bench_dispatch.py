"""Expert-parallel dispatch benchmark: wire bytes vs the minimum, and dispatch+combine time vs the local layer.

    .venv/bin/python scripts/bench_dispatch.py --ep 2 4 --json bench_results/dispatch.json

For each EP size it spawns that many gloo processes on this machine. Per rank: T tokens routed top-k over E
experts by a learned top-k gate. Rows that leave a rank are counted three ways: what automoe sends (one row per
(token, destination rank) pair), the minimum (unique token x remote-rank pairs, computed independently), and one
copy per expert slot (what a dispatcher without dedup sends). Times are medians of forward+backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from automoe.bench import MachineLoadMeter, machine_info
from automoe.config.moe import MoEConfig
from automoe.moe.layer import MoE
from automoe.parallel.dims import EP
from automoe.parallel.expert_parallel import apply_ep
from automoe.parallel.spawn import run_distributed


class _Identity(torch.nn.Module):
    def forward(self, x_ND, counts_E):
        return x_ND * 1.0

    def init_weights(self, **_):
        pass


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _fwd_bwd(layer, x):
    def run():
        x.grad = None
        layer(x).sum().backward()

    return run


def _worker(rank: int, world: int, args) -> dict:
    """One rank's row; counts summed and times maxed over ranks, so every rank returns the same row."""
    cfg = MoEConfig(
        dim=args.dim, moe_inter_dim=args.inter_dim, num_experts=args.experts, num_activated_experts=args.topk
    )
    torch.manual_seed(0)
    local, ep_layer = MoE(cfg), MoE(cfg)
    local.init_weights(std=0.5)
    ep_layer.load_state_dict(local.state_dict())
    local_id, ep_id = MoE(cfg, experts=_Identity()), MoE(cfg, experts=_Identity())
    local_id.load_state_dict(local.state_dict(), strict=False)
    ep_id.load_state_dict(local.state_dict(), strict=False)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=(EP,))
    apply_ep(ep_layer, mesh[EP])
    apply_ep(ep_id, mesh[EP])
    g = torch.Generator().manual_seed(rank + 1)
    x = torch.randn(1, args.tokens, args.dim, generator=g).requires_grad_()

    ep_id(x)
    wire = ep_id.dispatcher.wire
    idx = local.gate(x.detach().reshape(-1, args.dim), None).indices_TK
    per_rank = args.experts // world
    dest = idx // per_rank
    minimum = sum(int((dest == r).any(dim=1).sum()) for r in range(world) if r != rank)
    slots = int((dest != rank).sum())
    row = {
        "rows_sent_remote": wire.rows_remote,
        "rows_minimum": minimum,
        "rows_per_expert_copy": slots,
        "dispatch_combine_ms": _median_ms(_fwd_bwd(ep_id, x), args.repeats),
        "local_dispatch_combine_ms": _median_ms(_fwd_bwd(local_id, x), args.repeats),
        "ep_layer_ms": _median_ms(_fwd_bwd(ep_layer, x), args.repeats),
        "local_layer_ms": _median_ms(_fwd_bwd(local, x), args.repeats),
    }
    totals = {k: torch.tensor(float(v)) for k, v in row.items()}
    for k, t in totals.items():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if k.startswith("rows") else dist.ReduceOp.MAX)
        row[k] = t.item()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--inter-dim", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    rows = []
    for ep in args.ep:
        with MachineLoadMeter() as load:
            row = {"ep": ep, **run_distributed(_worker, ep, args, timeout_s=120)[0]}
        row["machine_busy"] = round(load.busy, 3)
        row["loadavg_before_after"] = [load.loadavg_before, load.loadavg_after]
        bytes_per_row = args.dim * 4
        row["wire_bytes_mib"] = row["rows_sent_remote"] * bytes_per_row / 2**20
        row["ratio_to_minimum"] = row["rows_sent_remote"] / max(row["rows_minimum"], 1)
        row["ratio_per_expert_copy"] = row["rows_per_expert_copy"] / max(row["rows_minimum"], 1)
        rows.append(row)
    print(
        f"tokens/rank={args.tokens} d={args.dim} F={args.inter_dim} E={args.experts} k={args.topk} fp32, "
        f"fwd+bwd medians of {args.repeats}, 1 thread per rank"
    )
    header = (
        "ep",
        "wire MiB",
        "sent/min",
        "per-expert/min",
        "a2a d+c ms",
        "local d+c ms",
        "EP layer ms",
        "local layer ms",
    )
    print(" | ".join(f"{h:>14}" for h in header))
    for r in rows:
        vals = (
            r["ep"],
            r["wire_bytes_mib"],
            r["ratio_to_minimum"],
            r["ratio_per_expert_copy"],
            r["dispatch_combine_ms"],
            r["local_dispatch_combine_ms"],
            r["ep_layer_ms"],
            r["local_layer_ms"],
        )
        print(" | ".join(f"{v:>14.2f}" if isinstance(v, float) else f"{v:>14}" for v in vals))
    for r in rows:
        lo, hi = r["loadavg_before_after"]
        print(f"ep {r['ep']}: machine busy {r['machine_busy']:.0%}, loadavg {lo:.2f} -> {hi:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        report = {"machine": machine_info(), "args": vars(args), "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
