"""Load-balancing study: the tiny presets trained on the stdlib corpus under several balancing settings and seeds;
MaxVio_global and loss on the whole validation split, hyperparameters chosen on a held-out slice of train.

    .venv/bin/python scripts/study_load_balance.py [--presets tiny,tiny_dsv3] [--settings none,sign0.001,...]
        [--seeds 0,1,2] [--steps 1000] [--batch-size 4] [--micro-batch-size 2] [--jobs 2]
        [--floor-settings sign0.001,adaptive] [--img-dir docs/img]

Settings (names encode their values): `none`; `sign<g>` (DeepSeek-V3 sign rule, gamma g); `adaptive` /
`adaptive<g>` (`bias_update_rule=adaptive`, first step g, default 0.001); `aux<c>` / `auxg<c>` (aux loss, coefficient
c, micro-batch / global scope); `both<c>_<g>` (micro-batch aux loss + sign rule); a bias-rule setting with
`+drift<kappa>` appended (`adaptive+drift0.02`) also sets `bias_update_drift` (its own family). Each run is the
real recipe (`python recipes/pretrain.py`, one process, `parallel=single`) in `<out>/<preset>/<setting>_s<seed>/`;
a run whose directory holds `DONE` is kept, so an interrupted study resumes. `train.seed` (the initialization)
is the seed; the data order (`data.seed`) is the same in every run.

Splits: every run trains with `data.val_fraction=0.1`, so the last 10% of the token stream is never trained on.
Its second half is the validation split the docs report (exactly the default 5% split); its first half is the
held-out slice of train on which gamma and the aux coefficient are chosen (`choose`). After training, the final
checkpoint is loaded into one process (`--eval-run DIR`, written to DIR/eval.json) and run over both, and over a
sample of the training stream (`StridedWindows`), in eval mode: loss and each MoE layer's `eval_expert_load` give
MaxVio_global = max_e L_e / mean_e L_e - 1. For the `--floor-settings` runs, `--floor-run DIR` fits the biases that
balance the training distribution with the router fixed and measures what they leave on validation (the floor of
any bias rule; DIR/bias_floor.json).
Writes `<out>/results.json`, a summary table, and PNGs into `--img-dir` (default `<out>/img`; `--img-dir
docs/img` updates the figures the README and docs/load_balancing.md show). `--skip-train` evaluates and plots
the finished runs only. Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from automoe.bench import machine_info
from automoe.config import DataConfig, ModelConfig
from automoe.data import build_datasets
from automoe.models import Transformer
from automoe.moe import moe_layers
from automoe.train.checkpoint import SafeFileSystemReader, latest_checkpoint
from automoe.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("tiny", "tiny_dsv3")
# The study's run list, in the order the runs are started (the most informative first).
SETTINGS = ("none", "sign0.001", "adaptive", "aux0.01", "auxg0.01", "both0.01_0.001")
VAL_FRACTION = 0.05  # the reported validation split: the last 5% of the token stream (the default split)
BATCH_SEQUENCES = 4  # sequences per optimizer step in the study (`--batch-size` default)
TRAINED_SAMPLE = "strided"  # eval.json's `trained` split (`eval_splits`); older files used the stream's end
HELD_OUT_FRACTION = 0.05  # the slice of train before it, excluded from training, for choosing hyperparameters
FAMILIES = {  # family -> (label, color)
    "none": ("no balancing", "tab:red"),
    "sign": ("bias update, sign rule", "tab:green"),
    "adaptive": ("bias update, adaptive rule", "tab:orange"),
    "sign+drift": ("sign rule + drift term", "tab:olive"),
    "adaptive+drift": ("adaptive rule + drift term", "tab:brown"),
    "aux": ("aux loss (micro-batch)", "tab:blue"),
    "auxg": ("aux loss (global)", "tab:cyan"),
    "both": ("aux loss + sign rule", "tab:purple"),
}


def parse_setting(name: str) -> dict:
    """`sign0.003` -> {family: sign, aux: 0, aux_type: micro_batch, gamma: 0.003, rule: sign}; see the docstring."""
    num = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"
    if m := re.fullmatch(rf"((?:sign|adaptive).*)\+drift{num}", name):
        out = parse_setting(m[1])
        return dict(out, family=out["family"] + "+drift", drift=float(m[2]))
    out = {"family": None, "aux": 0.0, "aux_type": "micro_batch", "gamma": 0.0, "rule": "sign", "drift": 0.0}
    if name == "none":
        out["family"] = "none"
    elif m := re.fullmatch(rf"sign{num}", name):
        out.update(family="sign", gamma=float(m[1]))
    elif m := re.fullmatch(rf"adaptive{num}?", name):
        out.update(family="adaptive", gamma=float(m[1] or 0.001), rule="adaptive")
    elif m := re.fullmatch(rf"aux{num}", name):
        out.update(family="aux", aux=float(m[1]))
    elif m := re.fullmatch(rf"auxg{num}", name):
        out.update(family="auxg", aux=float(m[1]), aux_type="global")
    elif m := re.fullmatch(rf"both{num}_{num}", name):
        out.update(family="both", aux=float(m[1]), gamma=float(m[2]))
    else:
        raise ValueError(f"unknown setting {name!r} (see the docstring of {Path(__file__).name})")
    return out


def run_overrides(preset: str, setting: str, seed: int, *, args: argparse.Namespace) -> list[str]:
    """Hydra overrides of one run: the preset, its balancing settings, seed, steps, batch, splits and outputs."""
    s = parse_setting(setting)
    return [
        "parallel=single",
        f"model={preset}",
        f"model.moe.aux_loss_coeff={s['aux']}",
        f"model.moe.aux_loss_type={s['aux_type']}",
        f"model.moe.gate_bias_update_factor={s['gamma']}",
        f"model.moe.bias_update_rule={s['rule']}",
        f"model.moe.bias_update_drift={s['drift']}",
        f"train.seed={seed}",
        f"train.steps={args.steps}",
        f"train.global_batch_size={args.batch_size}",
        f"train.micro_batch_size={args.micro_batch_size}",
        "train.val_interval=250",
        f"data.val_fraction={VAL_FRACTION + HELD_OUT_FRACTION}",
        f"checkpoint.interval={args.steps}",  # only the final checkpoint: the evaluation loads it
        "checkpoint.keep_last_n=1",
        "logging.wandb.mode=disabled",
        "logging.progress_bar=false",
        "logging.heatmap=false",
        "logging.log_interval=100",
    ]


def run_dir(out: Path, preset: str, setting: str, seed: int) -> Path:
    return out / preset / f"{setting}_s{seed}"


def train_and_evaluate(preset: str, setting: str, seed: int, *, args: argparse.Namespace) -> None:
    """One fresh recipe run in a subprocess (skipped when DONE exists), then `--eval-run` in another."""
    d = run_dir(args.out, preset, setting, seed)
    if not (d / "DONE").is_file():
        subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir(parents=True)
        cmd = [sys.executable, "recipes/pretrain.py", *run_overrides(preset, setting, seed, args=args)]
        cmd.append(f"output_dir={d}")
        print("$", " ".join(cmd), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(d / "train.log", "w") as log:
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        (d / "DONE").touch()
    if not (d / "eval.json").is_file():
        subprocess.run([sys.executable, __file__, "--eval-run", str(d)], cwd=ROOT, check=True)


def load_final_model(directory: Path) -> tuple[ModelConfig, DataConfig, Transformer, int]:
    """The run's model and data configs and its final checkpoint's model on one process (DCP reshards any EP)."""
    import torch.distributed.checkpoint as dcp

    saved = OmegaConf.load(directory / "config.yaml")
    model_cfg, data_cfg = (
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), saved[key]))
        for schema, key in ((ModelConfig, "model"), (DataConfig, "data"))
    )
    ckpt = latest_checkpoint(directory / "checkpoints")
    if ckpt is None:
        raise ValueError(f"{directory}/checkpoints holds no complete checkpoint")
    model = Transformer(model_cfg)
    model.init_weights()
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)))
    model.load_state_dict(state["model"])
    return model_cfg, data_cfg, model, int(ckpt.name.split("_")[1])


class StridedWindows:
    """`count` windows of `base` (a TokenDataset) spread evenly over its whole stream (window i is base window
    floor((i + offset) * len(base) / count)): a sample of the training distribution that touches every part of
    it, where a contiguous slice of the same size holds only a few dozen documents."""

    def __init__(self, base, count: int, offset: float = 0.0) -> None:
        self.base, self.count, self.offset = base, count, offset

    def __len__(self) -> int:
        return self.count

    def windows(self, indices) -> np.ndarray:
        stride = len(self.base) / self.count
        return self.base.windows([int((i + self.offset) * stride) for i in indices])


def eval_splits(data_cfg: DataConfig):
    """-> (held-out slice of train, validation split, trained-on sample, fitting sample): the two halves of the
    run's never-trained-on tail, and two disjoint samples of the training stream as large as the validation split,
    windows spread over all of it (`StridedWindows`): MaxVio there is how well the training distribution itself is
    balanced; the second sample is what `fit_balancing_biases` fits on."""
    train, tail = build_datasets(data_cfg)
    _, val = build_datasets(dataclasses.replace(data_cfg, val_fraction=VAL_FRACTION))
    held_out = dataclasses.replace(tail, tokens=tail.tokens[: len(tail.tokens) - len(val.tokens)])
    assert np.array_equal(tail.tokens[len(held_out.tokens) :], val.tokens)
    trained, fitting = (StridedWindows(train, len(val), offset) for offset in (0.0, 0.5))
    return held_out, val, trained, fitting


@torch.no_grad()
def evaluate_split(model: Transformer, dataset, *, batch_size: int = 64) -> dict:
    """Mean loss and per-layer expert load of `model` over every window of `dataset`, in eval mode."""
    model.eval()
    for _, layer in moe_layers(model):
        layer.eval_expert_load.zero_()
    ce_sum, num_tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        windows = torch.from_numpy(dataset.windows(range(start, min(start + batch_size, len(dataset)))))
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
        }
        bias = getattr(layer.gate, "correction_bias", None)
        if bias is not None:  # the bias update's final state: its spread, and the adaptive rule's step sizes
            layers[name]["correction_bias"] = bias.tolist()
        if hasattr(layer, "bias_step_exponent"):
            layers[name]["adaptive_step"] = (
                layer.cfg.gate_bias_update_factor * torch.exp2(layer.bias_step_exponent.double() / 4)
            ).tolist()
    vios = [v["max_vio"] for v in layers.values()]
    return {
        "tokens": num_tokens,
        "loss": ce_sum / num_tokens,
        "max_vio_global": float(np.mean(vios)),  # mean over MoE layers
        "max_vio_global_max": float(np.max(vios)),
        "layers": layers,
    }


def evaluate(directory: Path) -> dict:
    """Validation, held-out slice and trained-on sample for the run's final checkpoint; cached in
    <run>/eval.json (a file without the current trained-on sample gets only that added)."""
    start = time.perf_counter()
    _, data_cfg, model, step = load_final_model(directory)
    held_out, val, trained, _ = eval_splits(data_cfg)
    cached = directory / "eval.json"
    result = json.loads(cached.read_text()) if cached.is_file() else {}  # an older file: add what it lacks
    if result.get("step") != step:
        result = {
            "step": step,
            "val": evaluate_split(model, val),
            "held_out": evaluate_split(model, held_out),
        }
    result["trained"] = evaluate_split(model, trained)
    result["trained_sample"] = TRAINED_SAMPLE
    result["eval_s"] = time.perf_counter() - start
    (directory / "eval.json").write_text(json.dumps(result, indent=1))
    return result


@torch.no_grad()
def fit_balancing_biases(model: Transformer, dataset, *, iters: int = 300) -> dict[str, Tensor]:
    """For each MoE layer, the selection bias that balances `dataset` as well as any bias can, the router fixed.

    One forward pass records every layer's selection scores (the gate's `_select` input); then, per layer, the
    bias is fitted on those cached scores with the gate's own selection (top-k, group limit): `iters` proportional
    steps b += eta * (mean - L) / mean with eta falling geometrically from 0.02 to 1e-5, keeping the most balanced
    bias seen. Later layers' inputs are those of the run's own biases (a second-order effect the caller checks
    by a full evaluation with the fitted biases)."""
    layers = dict(moe_layers(model))
    scores: dict[str, list[Tensor]] = {name: [] for name in layers}
    originals = {name: layer.gate._select for name, layer in layers.items()}
    for name, layer in layers.items():

        def record(scores_TE, _name=name):
            scores[_name].append(scores_TE.detach().clone())
            return originals[_name](scores_TE)

        layer.gate._select = record
    try:
        evaluate_split(model, dataset)
    finally:
        for layer in layers.values():
            del layer.gate._select  # the instance attribute: back to the class's method
    fitted = {}
    for name, layer in layers.items():
        gate, scores_TE = layer.gate, torch.cat(scores[name])
        E = layer.num_experts
        bias = gate.correction_bias.clone()
        best, best_vio = bias.clone(), float("inf")
        for eta in np.geomspace(0.02, 1e-5, iters):
            gate.correction_bias.copy_(bias)
            load_E = torch.bincount(originals[name](scores_TE).flatten(), minlength=E).double()
            vio = (load_E.max() / load_E.mean()).item() - 1.0
            if vio < best_vio:
                best, best_vio = bias.clone(), vio
            bias += float(eta) * ((load_E.mean() - load_E) / load_E.mean()).float()
        gate.correction_bias.copy_(best)
        fitted[name] = best
    return fitted


@torch.no_grad()
def batch_max_vio(model: Transformer, dataset, *, batch_size: int, batches: int = 100) -> float:
    """Mean over `batches` batches of `batch_size` windows drawn at random (seeded; as the training loader draws
    them) of MaxVio (mean over MoE layers) of each batch alone, in eval mode: with the fitted biases, how
    unbalanced a training-sized batch still is because of what is in it (the floor under the training curves'
    MaxVio_batch)."""
    model.eval()
    order = np.random.default_rng(0).permutation(len(dataset))
    vios = []
    for b in range(min(batches, len(dataset) // batch_size)):
        for _, layer in moe_layers(model):
            layer.eval_expert_load.zero_()
        model(torch.from_numpy(dataset.windows(order[b * batch_size : (b + 1) * batch_size]))[:, :-1])
        loads = [layer.eval_expert_load.double() for _, layer in moe_layers(model)]
        vios.append(float(np.mean([(x.max() / x.mean()).item() - 1.0 for x in loads])))
    return float(np.mean(vios))


def bias_floor(directory: Path) -> dict:
    """How balanced the run's router could be made on validation by the best bias for the trained-on stream.

    The biases are fitted on a sample of the training stream (`fit_balancing_biases`), then the model with them is
    evaluated on a disjoint sample of it (how well the fit worked, all layers together) and on the validation
    split: its MaxVio_global there is the floor a bias rule faces with this router (the validation documents route
    differently from the training distribution, and no bias fitted to training can know how).
    Cached in <run>/bias_floor.json; runs without a correction bias -> {}."""
    _, data_cfg, model, step = load_final_model(directory)
    if not any(getattr(m.gate, "correction_bias", None) is not None for _, m in moe_layers(model)):
        return {}
    _, val, trained, fitting = eval_splits(data_cfg)
    start = time.perf_counter()
    fit_balancing_biases(model, fitting)
    result = {"step": step, "trained": evaluate_split(model, trained), "val": evaluate_split(model, val)}
    result["max_vio_batch"] = batch_max_vio(model, trained, batch_size=BATCH_SEQUENCES)
    result["fit_s"] = time.perf_counter() - start
    (directory / "bias_floor.json").write_text(json.dumps(result, indent=1))
    return result


def training_curves(directory: Path) -> dict:
    """Per-step MaxVio_batch (mean over MoE layers) and loss from metrics.jsonl."""
    records = read_metrics(directory / "metrics.jsonl")
    return {
        "steps": [r["step"] for r in records],
        "max_vio_batch": [float(np.mean([m["max_vio"] for m in r["moe"].values()])) for r in records],
        "loss": [r["loss"] for r in records],
        "train_loop_s": sum(r["step_time_s"] for r in records),
        "batch_tokens": records[0]["tokens"] if records else None,
    }


def collect(out: Path) -> dict:
    """Every finished, evaluated run under `out`: {preset: {setting: {seed: run}}}."""
    runs: dict = {}
    for ev in sorted(out.glob("*/*_s*/eval.json")):
        directory = ev.parent
        preset = directory.parent.name
        setting, seed = directory.name.rsplit("_s", 1)
        run = {"eval": json.loads(ev.read_text()), "curves": training_curves(directory)}
        if (directory / "bias_floor.json").is_file():
            run["bias_floor"] = json.loads((directory / "bias_floor.json").read_text())
        runs.setdefault(preset, {}).setdefault(setting, {})[int(seed)] = run
    return runs


def first_below(curves: dict, level: float, *, window: int = 25) -> int | None:
    """First step at which the `window`-step mean MaxVio_batch is <= level (None: never)."""
    mean = smooth(curves["max_vio_batch"], window=window)
    hits = np.nonzero(mean <= level)[0]
    return int(curves["steps"][hits[0] + window - 1]) if len(hits) else None


def balanced_max_vio_batch(tokens: int, experts: int, k: int, *, draws: int = 2000) -> float:
    """Mean MaxVio of one batch when every token picks k distinct experts uniformly: the noise floor of
    MaxVio_batch at this batch size (perfect balance in expectation still shows this much)."""
    rng = np.random.default_rng(0)
    picks = np.argsort(rng.random((draws, tokens, experts)), axis=-1)[..., :k].reshape(draws, -1)
    load = np.stack([np.bincount(p, minlength=experts) for p in picks])
    return float((load.max(1) / load.mean(1) - 1).mean())


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): the band every seed lies in. Half-range 0 for one seed."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float((a.max() - a.min()) / 2)


def choose(settings: dict, family: str) -> str | None:
    """The setting of `family` picked on the held-out slice, from means over the seeds every candidate of the family
    ran (a setting with extra seeds is compared on the shared ones): the lowest held-out loss among those with
    held-out MaxVio_global <= 0.10; if none is that balanced, the one with the lowest held-out MaxVio_global."""
    family_runs = {n: r for n, r in settings.items() if parse_setting(n)["family"] == family and r}
    if not family_runs:
        return None
    shared = set.intersection(*(set(r) for r in family_runs.values()))
    cands = {
        n: {
            k: float(np.mean([r[s]["eval"]["held_out"][k] for s in shared]))
            for k in ("loss", "max_vio_global")
        }
        for n, r in family_runs.items()
    }
    balanced = {n: e for n, e in cands.items() if e["max_vio_global"] <= 0.10}
    if balanced:
        return min(balanced, key=lambda n: balanced[n]["loss"])
    return min(cands, key=lambda n: cands[n]["max_vio_global"])


def summarize(runs: dict) -> dict:
    """Per preset and setting: seeds, mean +- half-range of val loss, MaxVio_global, MaxVio_batch (last 100)."""
    table = {}
    for preset, settings in runs.items():
        rows = {}
        for name, seeds in settings.items():
            ev = [seeds[s]["eval"] for s in sorted(seeds)]
            tail = [float(np.mean(seeds[s]["curves"]["max_vio_batch"][-100:])) for s in sorted(seeds)]
            rows[name] = {
                "seeds": sorted(seeds),
                "val_loss": spread([e["val"]["loss"] for e in ev]),
                "max_vio_global": spread([e["val"]["max_vio_global"] for e in ev]),
                "max_vio_global_per_seed": [e["val"]["max_vio_global"] for e in ev],
                "max_vio_global_max_layer": max(e["val"]["max_vio_global_max"] for e in ev),
                "max_vio_batch_last100": spread(tail),
                "steps_to_max_vio_batch_0.5": [first_below(seeds[s]["curves"], 0.5) for s in sorted(seeds)],
                "held_out_loss": spread([e["held_out"]["loss"] for e in ev]),
                "held_out_max_vio_global": spread([e["held_out"]["max_vio_global"] for e in ev]),
                # the same on the trained-on sample (None for runs evaluated before it was added)
                "trained_max_vio_global": spread([e["trained"]["max_vio_global"] for e in ev])
                if all("trained" in e for e in ev)
                else None,
                "train_loop_s": float(np.mean([seeds[s]["curves"]["train_loop_s"] for s in seeds])),
                # MaxVio_global on validation with the biases fitted to the training distribution (`bias_floor`)
                "bias_floor_val": spread([seeds[s]["bias_floor"]["val"]["max_vio_global"] for s in seeds])
                if all("bias_floor" in seeds[s] for s in seeds)
                else None,
            }
        chosen = {f: choose(settings, f) for f in FAMILIES if f != "none"}
        chosen = {f: n for f, n in chosen.items() if n is not None}
        table[preset] = {"rows": rows, "chosen_on_held_out": chosen}
    return table


def summary_table(summary: dict) -> str:
    lines = []
    for preset, s in summary.items():
        lines += [
            f"\n{preset} (chosen on the held-out slice: {s['chosen_on_held_out']})\n",
            "| setting | seeds | val loss | MaxVio_global (val) | worst layer | MaxVio_global (trained-on) | "
            "MaxVio_batch, last 100 steps | first step MaxVio_batch <= 0.5 | held-out loss / MaxVio_global | "
            "bias floor (val) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in sorted(s["rows"].items(), key=lambda kv: _order(kv[0])):
            pm = functools.partial(_pm, one_seed=len(r["seeds"]) == 1)
            trained = "-" if r["trained_max_vio_global"] is None else pm(r["trained_max_vio_global"], 3)
            first = ", ".join("never" if x is None else str(x) for x in r["steps_to_max_vio_batch_0.5"])
            lines.append(
                f"| {name} | {','.join(map(str, r['seeds']))} | {pm(r['val_loss'], 4)} | "
                f"{pm(r['max_vio_global'], 3)} | {r['max_vio_global_max_layer']:.3f} | {trained} | "
                f"{pm(r['max_vio_batch_last100'], 3)} | {first} | "
                f"{pm(r['held_out_loss'], 4)} / {pm(r['held_out_max_vio_global'], 3)} | "
                f"{'-' if r['bias_floor_val'] is None else pm(r['bias_floor_val'], 3)} |"
            )
        for name, r in sorted(s["rows"].items(), key=lambda kv: _order(kv[0])):
            vios = np.asarray(r["max_vio_global_per_seed"])
            if len(vios) > 3:  # a setting run with extra seeds: its standard error, and every seed
                lines.append(
                    f"{name}: MaxVio_global (val) {vios.mean():.3f}, standard error "
                    f"{vios.std(ddof=1) / np.sqrt(len(vios)):.3f} over {len(vios)} seeds; per seed "
                    + ", ".join(f"{v:.3f}" for v in vios)
                )
    return "\n".join(lines)


def _pm(pair: tuple[float, float], digits: int, *, one_seed: bool) -> str:
    """mean ± half-range (one seed: no spread)."""
    return f"{pair[0]:.{digits}f}" + ("" if one_seed else f" ± {pair[1]:.{digits}f}")


def _order(name: str) -> tuple:
    fam = parse_setting(name)["family"]
    return (list(FAMILIES).index(fam), name)


def smooth(values: list[float], *, window: int) -> np.ndarray:
    return np.convolve(np.asarray(values, dtype=float), np.ones(window) / window, mode="valid")


def plot(runs: dict, summary: dict, *, img_dir: Path, window: int = 25) -> list[Path]:
    """load_balance_maxvio.png: MaxVio_batch over training (mean over seeds, band = min..max over seeds), one panel
    per preset; load_balance_tradeoff.png: val loss vs MaxVio_global per setting (error bars = seed range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    presets = [p for p in PRESETS if p in runs]
    paths = []
    styles = ["-", "--", ":", "-."]

    fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.5), squeeze=False, sharey=True)
    for ax, preset in zip(axes[0], presets):
        seen: dict[str, int] = {}
        for name in sorted(runs[preset], key=_order):
            seeds = runs[preset][name]
            fam = parse_setting(name)["family"]
            label, color = FAMILIES[fam]
            style = styles[seen.setdefault(fam, 0) % len(styles)]
            seen[fam] += 1
            n = min(len(r["curves"]["max_vio_batch"]) for r in seeds.values())
            curves = np.stack(
                [smooth(r["curves"]["max_vio_batch"][:n], window=window) for r in seeds.values()]
            )
            steps = np.asarray(next(iter(seeds.values()))["curves"]["steps"][window - 1 : n])
            extra = name if fam in ("none",) else name.replace(fam, f"{fam} ")
            ax.plot(
                steps, curves.mean(0), color=color, ls=style, lw=1.4, label=f"{label}: {extra} ({len(seeds)})"
            )
            if len(seeds) > 1:
                ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.15, lw=0)
        ax.axhline(0.10, color="gray", ls="--", lw=1, label="MaxVio = 0.10")
        moe = OmegaConf.load(ROOT / "configs/model" / f"{preset}.yaml").moe
        tokens = next(iter(next(iter(runs[preset].values())).values()))["curves"].get("batch_tokens", 512)
        floor = balanced_max_vio_batch(tokens, moe.num_experts, moe.num_activated_experts)
        ax.axhline(
            floor, color="black", ls=":", lw=1, label=f"noise floor of a balanced router ({floor:.2f})"
        )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{preset}: training-time imbalance")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title="setting (seeds)", title_fontsize=7)
    axes[0][0].set_ylabel(f"MaxVio_batch (mean over MoE layers, {window}-step mean)")
    paths.append(img_dir / "load_balance_maxvio.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.5), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        rows = summary[preset]["rows"]
        seen: dict[str, int] = {}
        for name in sorted(rows, key=_order):
            r = rows[name]
            fam = parse_setting(name)["family"]
            marker = "osD^v"[seen.setdefault(fam, 0) % 5]  # a family's second setting gets another marker
            seen[fam] += 1
            (lm, ls), (vm, vs) = r["val_loss"], r["max_vio_global"]
            ax.errorbar(
                vm, lm, xerr=vs, yerr=ls, fmt=marker, color=FAMILIES[fam][1], capsize=3, ms=5,
                label=f"{name} ({len(r['seeds'])})",
            )  # fmt: skip
        ax.legend(fontsize=7, title="setting (seeds)", title_fontsize=7)
        ax.axvline(0.10, color="gray", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("MaxVio_global on the validation split (mean over layers)")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{preset}: final checkpoint (bars: seed range)")
        ax.grid(alpha=0.3, which="both")
    paths.append(img_dir / "load_balance_tradeoff.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="model presets (configs/model/)")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help="balancing settings (see the docstring)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values (the initialization)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SEQUENCES, help="sequences of 128 tokens per optimizer step"
    )
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=2,
        help="sequences per forward (2 micro-batches a step by default: the aux loss's micro-batch and global "
        "scopes differ only when a step has more than one)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at the same time (one process each)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/load_balance")
    parser.add_argument(
        "--img-dir",
        type=Path,
        default=None,
        help="where the PNGs go (default <out>/img; --img-dir docs/img replaces the README's tracked figures)",
    )
    parser.add_argument("--skip-train", action="store_true", help="evaluate and plot finished runs only")
    parser.add_argument("--eval-run", type=Path, default=None, help="evaluate one run directory (internal)")
    parser.add_argument(
        "--floor-settings",
        default="sign0.001,adaptive",
        help="settings whose runs get the bias floor (`bias_floor`: about a minute per run)",
    )
    parser.add_argument(
        "--floor-run", type=Path, default=None, help="the bias floor of one run directory (internal)"
    )
    args = parser.parse_args(argv)
    if args.img_dir is None:
        args.img_dir = args.out / "img"
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.floor_run is not None:
        fl = bias_floor(args.floor_run)
        if fl:
            print(
                f"{args.floor_run}: fitted biases give MaxVio_global {fl['trained']['max_vio_global']:.3f} on the "
                f"trained-on stream, {fl['val']['max_vio_global']:.3f} on validation ({fl['fit_s']:.0f} s)",
                flush=True,
            )
        return
    if args.eval_run is not None:
        ev = evaluate(args.eval_run)
        print(
            f"{args.eval_run}: val loss {ev['val']['loss']:.4f}, MaxVio_global {ev['val']['max_vio_global']:.3f} "
            f"(held-out {ev['held_out']['loss']:.4f} / {ev['held_out']['max_vio_global']:.3f}; {ev['eval_s']:.0f} s)",
            flush=True,
        )
        return
    presets = [p for p in args.presets.split(",") if p]
    settings = [s for s in args.settings.split(",") if s]
    for s in settings:
        parse_setting(s)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.skip_train:
        plan = [(p, s, seed) for seed in seeds for s in settings for p in presets]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for future in [pool.submit(train_and_evaluate, *job, args=args) for job in plan]:
                future.result()
    for d in args.out.glob("*/*_s*/"):
        if not (d / "DONE").is_file():
            continue
        ev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else {}
        if ev.get("trained_sample") != TRAINED_SAMPLE:
            evaluate(d)
    floor_settings = {s for s in args.floor_settings.split(",") if s}
    todo = [
        d
        for d in sorted(args.out.glob("*/*_s*/"))
        if d.name.rsplit("_s", 1)[0] in floor_settings
        and (d / "DONE").is_file()
        and not (d / "bias_floor.json").is_file()
    ]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        cmds = [[sys.executable, __file__, "--floor-run", str(d)] for d in todo]
        for future in [pool.submit(subprocess.run, c, cwd=ROOT, check=True) for c in cmds]:
            future.result()
    runs = collect(args.out)
    summary = summarize(runs)
    results = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "summary": summary,
        "runs": runs,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    paths = plot(runs, summary, img_dir=args.img_dir)
    print(summary_table(summary))
    print("wrote", args.out / "results.json", *paths)


if __name__ == "__main__":
    main()
