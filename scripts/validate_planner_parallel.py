"""Check the planner's pipeline and tensor-parallel terms against small real runs on this machine (gloo, CPU).

    .venv/bin/python scripts/validate_planner_parallel.py --json bench_results/planner_validation_parallel.json

For each layout it spawns that many processes, builds the tiny model with `parallelize` (and `Pipeline` under
pp; fp32, no FSDP), runs one step's micro-batches (through the schedule under pp) and one AdamW step, and
measures on every rank: (a) bytes of the local parameters, gradients and AdamW state, (b) the peak of the bytes
autograd holds saved for backward at once (saved-tensor hooks: a storage counts from its first pack until the
last graph node holding it is freed; parameters excluded), which is where the schedule's micro-batches in flight
show, (c) the bytes the schedule's point-to-point ops receive and send (`torch.distributed.pipelining.schedules.
_batch_p2p`), and (d) under tp the bytes DTensor's collectives move (functional all-gather / reduce-scatter /
all-reduce seen by a dispatch mode; a ring receives (n-1)/n of the gathered or reduced tensor, twice for an
all-reduce). Each is printed next to `automoe.planner`'s prediction for that pipeline rank and their ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode

from automoe import planner
from automoe.config.parallel import ParallelConfig
from automoe.models import Transformer
from automoe.parallel import ParallelDims, Pipeline, finalize_grads, init_weights, parallelize
from automoe.parallel.spawn import run_distributed
from automoe.planner import pipeline as pipe
from automoe.train.loss import forward_backward, micro_batch_ce_sum, pipeline_forward_backward

LAYOUTS = [  # (pp, ep, tp, schedule, virtual stages, micro-batches per step)
    (2, 1, 1, "1F1B", 1, 4),
    (2, 1, 1, "GPipe", 1, 4),
    (2, 1, 1, "Interleaved1F1B", 2, 4),
    (4, 1, 1, "1F1B", 1, 4),
    (2, 2, 1, "1F1B", 1, 4),
    (1, 1, 2, "1F1B", 1, 2),
    (1, 2, 2, "1F1B", 1, 2),
    (2, 1, 2, "1F1B", 1, 2),
]


class _CollectiveBytes(TorchDispatchMode):
    """Bytes a rank receives through the functional collectives DTensor issues (ring algorithms)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = {"all_gather": 0.0, "reduce_scatter": 0.0, "all_reduce": 0.0}
        self.other: set[str] = set()  # collective ops not counted (named in the output)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and name in (
            "all_gather_into_tensor",
            "reduce_scatter_tensor",
            "all_reduce",
        ):
            t = args[0]
            n = _resolve_process_group(args[-1]).size()
            size = t.numel() * t.element_size()
            if name == "all_gather_into_tensor":
                self.bytes["all_gather"] += (n - 1) * size
            elif name == "reduce_scatter_tensor":
                self.bytes["reduce_scatter"] += (n - 1) / n * size
            else:
                self.bytes["all_reduce"] += 2 * (n - 1) / n * size
        elif func.namespace in ("_c10d_functional", "c10d", "_c10d_functional_autograd"):
            self.other.add(str(func))
        return func(*args, **(kwargs or {}))


class _LiveSaved:
    """Bytes of the storages autograd holds saved for backward right now, and their peak (each storage once)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.skip = {_local(p).untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        if t.is_meta:
            return t
        local = _local(t)  # a DTensor (EP) is counted by its local shard
        try:
            ptr, nbytes = local.untyped_storage().data_ptr(), local.untyped_storage().nbytes()
        except (
            RuntimeError
        ):  # a wrapper subclass without storage (an async collective's result): its own bytes
            ptr, nbytes = -id(local), local.numel() * local.element_size()
        if ptr in self.skip:
            return t
        if ptr not in self.refs:
            self.refs[ptr] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[ptr] += 1
        return _Held(self, t, ptr, nbytes)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= nbytes


class _Held:
    """A saved tensor; autograd drops it when the graph node that saved it is freed."""

    def __init__(self, owner: _LiveSaved, tensor: torch.Tensor, ptr: int, nbytes: int) -> None:
        self.owner, self.tensor, self.ptr, self.nbytes = owner, tensor, ptr, nbytes

    def __del__(self) -> None:
        self.owner.release(self.ptr, self.nbytes)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _local_bytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def _measure(rank: int, world: int, job: dict) -> dict:
    import torch.distributed as dist
    import torch.distributed.pipelining.schedules as schedules

    cfg, (pp, ep, tp, schedule, v, M) = job["cfg"], job["layout"]
    B, S = job["micro_batch"], job["seq_len"]
    pcfg = ParallelConfig(pp=pp, ep=ep, tp=tp, pp_schedule=schedule, pp_virtual_stages=v, fsdp=False)
    dims = ParallelDims(world_size=world, pp=pp, ep=ep, tp=tp, num_experts=cfg.moe.num_experts)
    dims.build_meshes()
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, dims, pcfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    init_weights(model, dims)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cpu = torch.device("cpu")
    pipeline = None
    if pp > 1:
        pipeline = Pipeline(model, dims, pcfg, num_micro_batches=M, micro_batch_shape=(B, S), device=cpu)
    dp_rank, dp_size = dims.dp_coordinate()
    g = torch.Generator().manual_seed(1000 + dp_rank)
    tokens = torch.randint(0, cfg.vocab_size, (M * B, S + 1), generator=g)
    micro_batches = [
        {
            "input_ids": tokens[i : i + B, :-1],
            "labels": tokens[i : i + B, 1:],
            "global_num_tokens": M * B * S * dp_size,
        }
        for i in range(0, M * B, B)
    ]
    wire = {"recv": 0, "send": 0}
    batch_p2p = schedules._batch_p2p

    def counting(ops, desc=None):
        for op in ops:
            wire["recv" if op.op is dist.irecv else "send"] += op.tensor.numel() * op.tensor.element_size()
        return batch_p2p(ops, desc)

    schedules._batch_p2p = counting
    saved = _LiveSaved(list(model.parameters()))
    collectives = _CollectiveBytes()
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), collectives:
            if pipeline is not None:
                pipeline_forward_backward(pipeline, micro_batches, dims=dims, device=cpu)
            else:
                forward_backward(
                    model,
                    micro_batches,
                    dims=dims,
                    device=cpu,
                    ce_sum_fn=lambda mb: micro_batch_ce_sum(model, mb, dims=dims, device=cpu),
                )
        with collectives:  # DTensor reduces the tp-replicated norms' partial gradients here, once per step
            finalize_grads(model, dims)
            opt.step()
    finally:
        schedules._batch_p2p = batch_p2p
    params = list({id(p): p for p in model.parameters()}.values())
    states = [s for st in opt.state.values() for s in st.values() if torch.is_tensor(s)]
    return {
        "pp_rank": dims.pp_coordinate()[0],
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(s) for s in states),
        "peak_saved": saved.peak,
        "left_saved": saved.live,
        "p2p_recv": wire["recv"],
        "p2p_send": wire["send"],
        **{f"tp_{k}": v for k, v in collectives.bytes.items()},
        "other_collectives": sorted(collectives.other),
    }


def _row(name: str, measured: float, predicted: float) -> dict:
    ratio = measured / predicted if predicted else float("nan")
    return {"quantity": name, "measured": measured, "predicted": predicted, "ratio": ratio}


def compare(job: dict, results: list[dict]) -> list[dict]:
    """Planner prediction vs measurement per pipeline rank (the first data rank of each stage)."""
    cfg, (pp, ep, tp, schedule, v, M) = job["cfg"], job["layout"]
    world = len(results)
    layout = planner.Layout(1, world // (pp * tp), 1, ep, pp=pp, tp=tp)
    shape = planner.TrainingShape(
        global_batch=M * job["micro_batch"] * layout.data_parallel,
        micro_batch=job["micro_batch"],
        seq_len=job["seq_len"],
        param_dtype="float32",
        compute_dtype="float32",
        fsdp=False,
        pp_schedule=schedule,
        pp_virtual_stages=v,
    )
    split = pipe.stage_blocks(cfg, pp * v)
    message = pipe.p2p_bytes_per_message(cfg, shape, layout)
    cluster = planner.ClusterSpec(gpus_per_node=world)
    rows = []
    for r in range(pp):
        res = results[r * layout.stage_size]
        if res["other_collectives"]:
            print(f"rank{r}: collectives not counted: {res['other_collectives']}")
        assert res["pp_rank"] == r, (res["pp_rank"], r)
        stage = pipe.rank_stage(split, pp, r) if pp > 1 else planner.memory.whole_model(cfg)
        state = planner.state_bytes(cfg, shape, layout, rank=r * layout.stage_size, stage=stage)
        for key in ("params", "grads", "optimizer"):
            rows.append(_row(f"rank{r} {key} bytes", res[key], state[key]))
        chunks = pipe.rank_chunks(split, pp, r) if pp > 1 else [stage]
        per_mb = [sum(planner.activation_bytes(cfg, shape, layout, stage=c).values()) for c in chunks]
        peak = pipe.peak_activation_bytes(schedule, pp, M, per_mb, rank=r) if pp > 1 else per_mb[0]
        label = f"rank{r} peak saved bytes ({peak / sum(per_mb):.3g} in flight)"
        rows.append(_row(label, res["peak_saved"], peak))
        rows[-1]["left_after_step"] = res["left_saved"]
        if pp > 1:
            recv = pipe.p2p_messages(pp, M, virtual_stages=v, rank=r) * message
            rows.append(_row(f"rank{r} p2p bytes received", res["p2p_recv"], recv))
            rows.append(_row(f"rank{r} p2p bytes sent", res["p2p_send"], recv))  # each message is sent once
        if tp > 1:
            comm = planner.comm_per_step(cfg, shape, layout, cluster, stage=stage)
            moved = res["tp_all_gather"] + res["tp_reduce_scatter"]
            rows.append(
                _row(f"rank{r} tp all-gather + reduce-scatter bytes", moved, comm["tp_activations"]["bytes"])
            )
            rows.append(
                _row(f"rank{r} tp all-reduce bytes", res["tp_all_reduce"], comm["tp_grad_allreduce"]["bytes"])
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-world", type=int, default=4)
    parser.add_argument("--only", default="", help="run only the layouts whose name contains this")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cfg = planner.load_model_config(args.model)
    report = []
    for layout in LAYOUTS:
        pp, ep, tp, schedule, v, M = layout
        world = pp * max(ep, tp)
        if world > args.max_world:
            continue
        job = {"layout": layout, "cfg": cfg, "micro_batch": args.micro_batch, "seq_len": args.seq_len}
        name = f"pp{pp}-ep{ep}-tp{tp}" + (f"-{schedule}-v{v}" if pp > 1 else "") + f"-M{M}"
        if args.only not in name:
            continue
        for r in compare(job, run_distributed(_measure, world, job, timeout_s=300)):
            r.update(layout=name)
            report.append(r)
            print(
                f"{name:<28} {r['quantity']:<40} measured {r['measured']:>12.0f} "
                f"predicted {r['predicted']:>12.0f} ratio {r['ratio']:.4f}",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
