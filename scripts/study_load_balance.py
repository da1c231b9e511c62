"""Load-balancing study: the same tiny MoE trained on the stdlib corpus with no balancing, the aux loss, the
aux-loss-free gate-bias update (Wang et al. 2024) and both; validation loss and MaxVio_global per run.

    .venv/bin/python scripts/study_load_balance.py [--steps 200] [--nproc 1] [--gamma 0.003] [--aux 0.01] [--seed 0]

Each run is the real recipe (`torchrun recipes/pretrain.py` with overrides, its own output_dir, only the final
checkpoint saved). Afterwards the final checkpoint is loaded into one process and run over the whole validation
split in eval mode: the validation loss and each MoE layer's `eval_expert_load` (token-slots per expert, the
whole split on one process = the sum over ranks) give MaxVio_global = max_e L_e / mean_e L_e - 1.
Writes `<out>/results.json` and three PNGs into `--img-dir` (default `<out>/img`; `--img-dir docs/img` updates the
figures the README and docs/load_balancing.md show). `--skip-train` re-evaluates
and re-plots existing runs. Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from automoe.config import DataConfig, ModelConfig
from automoe.data import build_datasets
from automoe.models import Transformer
from automoe.moe import moe_layers
from automoe.torchrun import torchrun_command
from automoe.train.checkpoint import SafeFileSystemReader, latest_checkpoint
from automoe.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]

RUNS = ("none", "aux", "bias", "both")
LABELS = {
    "none": "no balancing",
    "aux": "aux loss",
    "bias": "gate-bias update",
    "both": "aux loss + bias update",
}
COLORS = {"none": "tab:red", "aux": "tab:blue", "bias": "tab:green", "both": "tab:purple"}


def run_overrides(name: str, *, args: argparse.Namespace) -> list[str]:
    """Hydra overrides of one run: balancing settings plus the shared model, data, steps and outputs."""
    aux = args.aux if name in ("aux", "both") else 0.0
    gamma = args.gamma if name in ("bias", "both") else 0.0
    return [
        f"parallel={'single' if args.nproc == 1 else 'ep2'}",
        f"model.moe.aux_loss_coeff={aux}",
        f"model.moe.gate_bias_update_factor={gamma}",
        f"train.steps={args.steps}",
        f"train.seed={args.seed}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.val_interval={args.val_interval}",
        f"checkpoint.interval={args.steps}",  # only the final checkpoint: the evaluation below loads it
        "checkpoint.keep_last_n=1",
        "logging.wandb.mode=disabled",
        "logging.progress_bar=false",
        "logging.heatmap=false",
        f"logging.log_interval={max(args.steps // 4, 1)}",
        f"output_dir={args.out / name}",
    ]


def train(name: str, *, args: argparse.Namespace) -> float:
    """One fresh recipe run in a subprocess (its old output_dir is deleted first); -> wall seconds."""
    shutil.rmtree(args.out / name, ignore_errors=True)
    cmd = torchrun_command(args.nproc, ROOT / "recipes/pretrain.py", *run_overrides(name, args=args))
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def load_final_model(run_dir: Path) -> tuple[ModelConfig, DataConfig, Transformer, int]:
    """The run's model and data configs and its final checkpoint's model on one process (DCP reshards any EP)."""
    import torch.distributed.checkpoint as dcp

    saved = OmegaConf.load(run_dir / "config.yaml")
    model_cfg, data_cfg = (
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), saved[key]))
        for schema, key in ((ModelConfig, "model"), (DataConfig, "data"))
    )
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise ValueError(f"{run_dir}/checkpoints holds no complete checkpoint")
    model = Transformer(model_cfg)
    model.init_weights()
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)))
    model.load_state_dict(state["model"])
    return model_cfg, data_cfg, model, int(ckpt.name.split("_")[1])


@torch.no_grad()
def evaluate(run_dir: Path, *, batch_size: int) -> dict:
    """Validation loss and per-layer expert load of the final checkpoint over the whole validation split."""
    _, data_cfg, model, step = load_final_model(run_dir)
    _, val = build_datasets(data_cfg)
    model.eval()
    for _, layer in moe_layers(model):
        layer.eval_expert_load.zero_()
    ce_sum, num_tokens = 0.0, 0
    for start in range(0, len(val), batch_size):
        windows = torch.from_numpy(val.windows(range(start, min(start + batch_size, len(val)))))  # (B, S+1)
        logits_BSV = model(windows[:, :-1])
        labels = windows[:, 1:].flatten()
        ce_sum += F.cross_entropy(logits_BSV.float().flatten(0, 1), labels, reduction="sum").item()
        num_tokens += labels.numel()
    layers = {}
    for name, layer in moe_layers(model):
        load_E = layer.eval_expert_load.double()
        layers[name] = {
            "load": [int(x) for x in load_E.tolist()],
            "max_vio": load_E.max().item() / load_E.mean().item() - 1.0,
            "cv": load_E.std(unbiased=False).item() / load_E.mean().item(),
            "min_share": load_E.min().item() / load_E.mean().item(),
        }
    vios = [v["max_vio"] for v in layers.values()]
    return {
        "step": step,
        "val_tokens": num_tokens,
        "val_loss": ce_sum / num_tokens,
        "max_vio_global_mean": float(np.mean(vios)),
        "max_vio_global_max": float(np.max(vios)),
        "layers": layers,
    }


def training_curves(run_dir: Path) -> dict:
    """Per-step MaxVio_batch (mean over MoE layers) and the trainer's periodic val_loss from metrics.jsonl."""
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    max_vio = [float(np.mean([m["max_vio"] for m in r["moe"].values()])) for r in records]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    last = records[-1] if records else {}
    return {
        "steps": steps,
        "max_vio_batch": max_vio,
        "loss": [r["loss"] for r in records],
        "val_curve": val,
        "final_train_loss": last.get("loss"),
        "train_loop_s": sum(r["step_time_s"] for r in records),
        "dead_experts_last_step": sum(m["dead_experts"] for m in last.get("moe", {}).values()),
    }


def smooth(values: list[float], *, window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot(results: dict, *, img_dir: Path) -> list[Path]:
    """Three PNGs: training MaxVio per run, validation loss per run, final per-expert validation load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    window = min(10, *(len(r["curves"]["steps"]) for r in runs.values()))
    for name, r in runs.items():
        c = r["curves"]
        ax.plot(
            c["steps"][window - 1 :],
            smooth(c["max_vio_batch"], window=window),
            label=LABELS[name],
            color=COLORS[name],
        )
    ax.axhline(0.10, color="gray", ls="--", lw=1, label="MaxVio = 0.10")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"MaxVio_batch (mean over MoE layers, {window}-step mean)")
    ax.set_title("Training-time load imbalance")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    paths.append(img_dir / "load_balance_maxvio.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in runs.items():
        steps, vals = zip(*r["curves"]["val_curve"]) if r["curves"]["val_curve"] else ((), ())
        ax.plot(steps, vals, marker="o", ms=3, label=LABELS[name], color=COLORS[name])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (trainer, first val batches)")
    ax.set_title("Validation loss during training")
    ax.legend()
    ax.grid(alpha=0.3)
    names = list(runs)
    bx.bar(range(len(names)), [runs[n]["eval"]["val_loss"] for n in names], color=[COLORS[n] for n in names])
    for i, n in enumerate(names):
        e = runs[n]["eval"]
        bx.text(
            i,
            e["val_loss"],
            f"{e['val_loss']:.3f}\nMaxVio {e['max_vio_global_mean']:.2f}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    bx.set_xticks(range(len(names)), [LABELS[n].replace(" + ", "\n+ ") for n in names], fontsize=8)
    lows = [runs[n]["eval"]["val_loss"] for n in names]
    bx.set_ylim(min(lows) - 0.05, max(lows) + 0.06)
    bx.set_ylabel("final validation loss (whole split)")
    bx.set_title("Final checkpoint, whole validation split")
    paths.append(img_dir / "load_balance_val_loss.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    layer_names = list(next(iter(runs.values()))["eval"]["layers"])
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    width = 0.8 / len(layer_names)
    for ax, (name, r) in zip(axes, runs.items()):
        for j, layer in enumerate(layer_names):
            load_E = np.asarray(r["eval"]["layers"][layer]["load"], dtype=float)
            ax.bar(
                np.arange(len(load_E)) + (j - (len(layer_names) - 1) / 2) * width,
                load_E / load_E.mean(),
                width=width,
                label=layer.replace("layers.", "layer ").replace(".moe", ""),
            )
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_title(f"{LABELS[name]}\nMaxVio_global {r['eval']['max_vio_global_mean']:.2f}", fontsize=9)
        ax.set_xlabel("expert")
    axes[0].set_ylabel("validation load / mean load")
    axes[0].legend(fontsize=7)
    paths.append(img_dir / "load_balance_expert_load.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def summary_table(results: dict) -> str:
    lines = [
        "| run | aux_loss_coeff | gamma | final val loss | MaxVio_global (mean / max over layers) | "
        "MaxVio_batch (last 20 steps) | time in train steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        e, c = r["eval"], r["curves"]
        tail = float(np.mean(c["max_vio_batch"][-20:]))
        wall = f"{c['train_loop_s']:.0f} s"
        lines.append(
            f"| {LABELS[name]} | {r['aux_loss_coeff']} | {r['gamma']} | {e['val_loss']:.4f} | "
            f"{e['max_vio_global_mean']:.3f} / {e['max_vio_global_max']:.3f} | {tail:.3f} | {wall} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--nproc", type=int, default=1, choices=(1, 2), help="1: parallel=single, 2: EP=2")
    parser.add_argument("--aux", type=float, default=0.01, help="aux_loss_coeff of the aux-loss runs")
    parser.add_argument("--gamma", type=float, default=0.003, help="gate_bias_update_factor of the bias runs")
    parser.add_argument(
        "--seed", type=int, default=0, help="train.seed (weight init); data order stays fixed"
    )
    parser.add_argument("--micro-batch-size", type=int, default=16, help="per rank; 16 = no accumulation")
    parser.add_argument("--val-interval", type=int, default=25, help="trainer validation every n steps")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/load_balance")
    parser.add_argument(
        "--img-dir",
        type=Path,
        default=None,
        help="where the PNGs go (default <out>/img; --img-dir docs/img replaces the README's tracked figures)",
    )
    parser.add_argument("--skip-train", action="store_true", help="evaluate and plot existing runs only")
    args = parser.parse_args(argv)
    if args.img_dir is None:
        args.img_dir = args.out / "img"
    return args


def main() -> None:
    args = parse_args()
    names = [n for n in args.runs.split(",") if n]
    for n in names:
        if n not in RUNS:
            raise ValueError(f"--runs: {n!r} is not one of {list(RUNS)}")
    torch.set_num_threads(1)

    results_path = args.out / "results.json"
    previous = json.loads(results_path.read_text())["runs"] if results_path.is_file() else {}
    # Runs not named in --runs keep their earlier results, so a subset can be redone (e.g. another gamma).
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": dict(previous)}
    for name in names:
        wall = None if args.skip_train else train(name, args=args)
        run_dir = args.out / name
        start = time.perf_counter()
        ev = evaluate(run_dir, batch_size=args.eval_batch_size)
        print(
            f"{name}: val loss {ev['val_loss']:.4f}, MaxVio_global {ev['max_vio_global_mean']:.3f} "
            f"(eval {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        results["runs"][name] = {
            "aux_loss_coeff": args.aux if name in ("aux", "both") else 0.0,
            "gamma": args.gamma if name in ("bias", "both") else 0.0,
            "overrides": run_overrides(name, args=args),
            "train_wall_s": wall if wall is not None else previous.get(name, {}).get("train_wall_s"),
            "eval": ev,
            "curves": training_curves(run_dir),
        }
    results["runs"] = {n: results["runs"][n] for n in RUNS if n in results["runs"]}
    # Kept runs: re-read their metrics too (curves written by an older version of this script lack fields).
    for name, run in results["runs"].items():
        run["curves"] = training_curves(args.out / name)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1))
    paths = plot(results, img_dir=args.img_dir)
    print(summary_table(results))
    print("wrote", results_path, *paths)


if __name__ == "__main__":
    main()
