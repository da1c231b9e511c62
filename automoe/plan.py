"""Layout planner command: memory per rank and communication per step for every (pp, dp_replicate, dp_shard, cp, tp,
ep).

    python -m automoe.plan --model mixtral_8x7b --cluster h100x8 --nodes 4 \
        --global-batch 256 --seq-len 4096 --ac full --json plan.json

Prints one row per valid layout (fitting ones first, then by --sort) and the layouts rejected with the reason.
Formulas and their validation against real runs: docs/planning.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from automoe import planner
from automoe.config.parallel import PP_SCHEDULES


def _degrees(text: str) -> tuple[int, ...]:
    values = tuple(int(x) for x in text.split(",") if x.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated degrees >= 1 expected")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", required=True, help="preset in configs/model (tiny, mixtral_8x7b, ...) or a YAML path"
    )
    p.add_argument(
        "--cluster",
        default=None,
        help="preset in automoe/planner/clusters (h100x8, h200x8, cpu2) or a YAML path",
    )
    cl = p.add_argument_group("cluster overrides")
    cl.add_argument("--gpus-per-node", type=int)
    cl.add_argument("--nodes", type=int, dest="num_nodes")
    cl.add_argument("--memory-gib", type=float)
    cl.add_argument("--intra-gbps", type=float, dest="intra_node_gbps")
    cl.add_argument("--inter-gbps", type=float, dest="inter_node_gbps")
    cl.add_argument("--peak-tflops", type=float)
    cl.add_argument("--mfu", type=float)
    cl.add_argument("--overhead-gib", type=float)
    tr = p.add_argument_group("training shape")
    tr.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    tr.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per forward/backward")
    tr.add_argument("--seq-len", type=int, default=4096)
    tr.add_argument("--param-dtype", default="float32")
    tr.add_argument("--compute-dtype", default="bfloat16")
    tr.add_argument("--ac", default="none", choices=planner.AC_MODES, help="activation checkpointing")
    tr.add_argument(
        "--no-fsdp", action="store_true", help="replicate dense params (all-reduce) instead of FSDP2"
    )
    tr.add_argument("--routing-imbalance", type=float, default=1.0, help="max/mean expert load on a rank")
    tr.add_argument(
        "--pp-schedule", default="1F1B", choices=PP_SCHEDULES, help="schedule of layouts with pp > 1"
    )
    tr.add_argument(
        "--pp-virtual-stages", type=int, default=1, help="stages per pipeline rank (Interleaved1F1B)"
    )
    p.add_argument("--max-cp", type=int, default=8)
    p.add_argument(
        "--pp", type=_degrees, default=(1,), help="pipeline degrees to consider, comma-separated (e.g. 1,2,4)"
    )
    p.add_argument(
        "--tp",
        type=_degrees,
        default=(1,),
        help="tensor-parallel degrees to consider, comma-separated (e.g. 1,2,4,8); only those dividing "
        "--gpus-per-node are enumerated (tp stays inside a node)",
    )
    p.add_argument("--sort", default="step", choices=sorted(planner.SORT_KEYS))
    p.add_argument("--top", type=int, default=0, help="print only the first N layouts (0 = all)")
    p.add_argument("--json", type=Path, default=None, help="write every plan and rejection here")
    return p.parse_args(argv)


def verdict(plans: list, shape, cluster, *, model: str) -> str:
    """The chosen layout and the command that launches it, or why nothing fits and what to change."""
    per_rank = f"{cluster.memory_gib:g} GiB per rank"
    if not plans:
        return (
            f"NO VALID LAYOUT for {cluster.world_size} ranks: every candidate was rejected (see above); change "
            "--global-batch/--micro-batch so the batch splits over the data-parallel ranks, or the number of ranks"
        )
    best = plans[0]
    if not best.fits:
        smallest = min(plans, key=lambda p: p.memory_total)
        need = smallest.memory_total / planner.GIB
        hints = []
        if shape.activation_checkpointing != "full":
            hints.append("--ac full")
        if shape.micro_batch > 1:
            hints.append("a smaller --micro-batch")
        hints += ["more --nodes", "a cluster with more memory per rank"]
        return (
            f"NO LAYOUT FITS in {per_rank}: the smallest, {smallest.layout.name()}, needs {need:.1f} GiB "
            f"({smallest.memory_total / planner.GIB - cluster.memory_gib:.1f} GiB too much). Try "
            + ", ".join(hints)
        )
    note = f" (first copy {model} into configs/model/)" if model.endswith(".yaml") or "/" in model else ""
    pipeline = ""
    if best.pipeline:
        pp = best.pipeline
        pipeline = (
            f"; {pp['schedule']} stages {[len(b) for b in pp['stage_blocks']]} blocks, bubble "
            f"{pp['bubble_fraction']:.1%}, fullest pipeline rank {pp['memory_rank']}"
        )
    return (
        f"chosen: {best.layout.name()} ({best.memory_total / planner.GIB:.1f} of {per_rank}, ~{best.step_s:.2f} "
        f"s per step{pipeline}); launch it with{note}:\n  "
        + planner.launch_command(best, shape, cluster, model=model)
        + "\n  (DATA.bin: a token file from `python -m automoe.prepare_data`; OUT: a directory every node sees)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = planner.load_model_config(args.model)
    overrides = {
        k: getattr(args, k)
        for k in (
            "gpus_per_node",
            "num_nodes",
            "memory_gib",
            "intra_node_gbps",
            "inter_node_gbps",
            "peak_tflops",
            "mfu",
            "overhead_gib",
        )
    }
    cluster = planner.load_cluster(args.cluster, **overrides)
    shape = planner.TrainingShape(
        global_batch=args.global_batch,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        param_dtype=args.param_dtype,
        compute_dtype=args.compute_dtype,
        activation_checkpointing=args.ac,
        fsdp=not args.no_fsdp,
        routing_imbalance=args.routing_imbalance,
        pp_schedule=args.pp_schedule,
        pp_virtual_stages=args.pp_virtual_stages,
    )
    plans, rejected = planner.plan(
        cfg,
        shape,
        cluster,
        max_cp=args.max_cp,
        pp_degrees=args.pp,
        tp_degrees=tuple(t for t in args.tp if cluster.gpus_per_node % t == 0),
        sort_by=args.sort,
    )
    counts = planner.param_counts(cfg)
    print(
        f"model {args.model}: {counts.total / 1e6:,.1f}M params ({counts.active / 1e6:,.1f}M active); "
        f"cluster {cluster.name}: {cluster.num_nodes} x {cluster.gpus_per_node} ranks, {cluster.memory_gib} GiB each"
    )
    print(f"shape: {shape}")
    shown = plans[: args.top] if args.top else plans
    print(planner.format_table(shown))
    fitting = [p for p in plans if p.fits]
    print(f"{len(fitting)} of {len(plans)} valid layouts fit; {len(rejected)} rejected")
    for layout, reason in rejected:
        print(f"  rejected {layout.name()}: {reason}")
    print(verdict(plans, shape, cluster, model=args.model))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": args.model,
            "cluster": vars(cluster),
            "shape": vars(shape),
            "plans": [p.to_dict() for p in plans],
            "rejected": [{"layout": vars(layout), "reason": reason} for layout, reason in rejected],
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
