"""Check the layout planner against small real runs on this machine (gloo, CPU).

    .venv/bin/python scripts/validate_planner.py --json bench_results/planner_validation.json

For each layout it spawns that many processes, builds the tiny model with `parallelize`, runs one AdamW step
and measures on every rank: (a) bytes of the local shards of parameters, gradients and AdamW state, (b) rows the
all-to-all dispatcher sent per MoE layer (`WireStats`), and at world 1 (c) bytes autograd saved for backward.
It prints each measurement next to `automoe.planner`'s prediction and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from automoe import planner
from automoe.config.parallel import ParallelConfig
from automoe.models import Transformer
from automoe.moe.layer import collect_aux_loss, moe_layers
from automoe.parallel import ParallelDims, cp_shard_batch, finalize_grads, loss_scale, parallelize
from automoe.parallel.spawn import run_distributed

LAYOUTS = [  # (dp_replicate, dp_shard, cp, ep)
    (1, 1, 1, 1),
    (1, 2, 1, 1),
    (1, 2, 1, 2),
    (1, 1, 2, 1),
    (1, 4, 1, 4),
    (1, 4, 1, 2),
    (2, 2, 1, 2),
    (1, 2, 2, 2),
]


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


class _SavedBytes:
    """Sums the storages autograd saves for backward (each storage once; parameters excluded)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.skip and ptr not in self.seen and not t.is_meta:
            self.seen.add(ptr)
            self.total += storage.nbytes()
        return t


def _measure(rank: int, world: int, job: dict) -> dict:
    R, dp_shard, cp, ep = job["layout"]
    cfg = job["cfg"]
    dims = ParallelDims(
        world_size=world, dp_replicate=R, dp_shard=dp_shard, cp=cp, ep=ep, num_experts=cfg.moe.num_experts
    )
    if world > 1:
        dims.build_meshes()
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, dims, ParallelConfig(dp_replicate=R, dp_shard=dp_shard, cp=cp, ep=ep, fsdp=True))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    dp_rank, _ = dims.dp_coordinate()
    g = torch.Generator().manual_seed(1000 + dp_rank)
    B, S = job["micro_batch"], job["seq_len"]
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=g)
    mb = cp_shard_batch({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}, dims)
    saved = _SavedBytes(list(model.parameters()) if world == 1 else [])
    # saved tensors are measured on one process only (FSDP's gathered parameters would blur the count)
    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if world == 1 else nullcontext()
    with hooks:
        logits = model(mb["input_ids"], positions_BS=mb["positions"])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), reduction="sum")
    aux = collect_aux_loss(model)
    loss = ce / (B * S * dims.data_parallel) + (0.0 if aux is None else aux / world)
    (loss * loss_scale(dims)).backward()
    finalize_grads(model, dims)
    opt.step()

    params = list({id(p): p for p in model.parameters()}.values())
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    wire = [layer.dispatcher.wire for _, layer in moe_layers(model) if hasattr(layer.dispatcher, "wire")]
    return {
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(v) for v in states),
        "saved_activations": saved.total,
        "rows_sent": sum(w.rows_sent for w in wire),
        "rows_remote": sum(w.rows_remote for w in wire),
        "local_tokens": mb["input_ids"].numel(),
    }


def run_layout(job: dict) -> list[dict]:
    world = planner.Layout(*job["layout"]).world_size
    if world == 1:  # in this process, without a process group
        torch.set_num_threads(1)
        return [_measure(0, 1, job)]
    return run_distributed(_measure, world, job)


def _row(name: str, measured: float, predicted: float) -> dict:
    return {
        "quantity": name,
        "measured": measured,
        "predicted": predicted,
        "ratio": measured / predicted if predicted else float("nan"),
    }


def compare(job: dict, results: list[dict]) -> list[dict]:
    """Planner prediction vs measurement per quantity: state bytes summed and checked on every rank."""
    layout, cfg = planner.Layout(*job["layout"]), job["cfg"]
    shape = planner.TrainingShape(
        global_batch=job["micro_batch"] * layout.data_parallel,
        micro_batch=job["micro_batch"],
        seq_len=job["seq_len"],
        param_dtype="float32",
        compute_dtype="float32",
    )
    rows = []
    for key in ("params", "grads", "optimizer"):
        predicted = [planner.state_bytes(cfg, shape, layout, rank=r)[key] for r in range(layout.world_size)]
        measured = [res[key] for res in results]
        rows.append(_row(f"{key} bytes rank0", measured[0], predicted[0]))
        rows[-1]["all_ranks_equal"] = measured == predicted
    if layout.ep > 1:
        T = job["micro_batch"] * job["seq_len"] / layout.cp
        expect = planner.a2a_rows(cfg, T, layout.ep)
        L = cfg.num_moe_layers
        for key in ("sent", "remote"):
            measured = sum(res[f"rows_{key}"] for res in results) / len(results)
            rows.append(_row(f"a2a rows {key}/layer/rank", measured / L, expect[key]))
        pair = planner.a2a_bytes_per_pair(cfg, 4)
        measured_bytes = (
            sum(res["rows_remote"] for res in results) / len(results) * (pair["forward"] + pair["backward"])
        )
        rows.append(
            _row(
                "a2a bytes fwd+bwd/rank",
                measured_bytes,
                expect["remote"] * L * (pair["forward"] + pair["backward"]),
            )
        )
    if layout.world_size == 1:
        act = planner.activation_bytes(cfg, shape, layout)
        rows.append(
            _row("saved activation bytes", results[0]["saved_activations"], act["blocks"] + act["head"])
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-world", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base = planner.load_model_config(args.model)
    gates = {
        "topk": base,
        "uniform": dataclasses.replace(
            base,
            moe=dataclasses.replace(base.moe, gate="fake_balanced", fake_gate_noise=1.0, aux_loss_coeff=0.0),
        ),
    }
    report = []
    for layout in LAYOUTS:
        if planner.Layout(*layout).world_size > args.max_world:
            continue
        for gate, cfg in gates.items():
            if gate == "uniform" and layout[3] == 1:
                continue  # routing only matters to the all-to-all
            job = {"layout": layout, "cfg": cfg, "micro_batch": args.micro_batch, "seq_len": args.seq_len}
            rows = compare(job, run_layout(job))
            name = planner.Layout(*layout).name()
            for r in rows:
                if gate == "uniform" and not r["quantity"].startswith("a2a"):
                    continue
                r.update(layout=name, gate=gate)
                report.append(r)
                flag = f" all ranks exact={r['all_ranks_equal']}" if "all_ranks_equal" in r else ""
                print(
                    f"{name:<24} {gate:<8} {r['quantity']:<28} measured {r['measured']:>12.1f} "
                    f"predicted {r['predicted']:>12.1f} ratio {r['ratio']:.4f}{flag}",
                    flush=True,
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
