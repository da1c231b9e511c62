"""Per-step metrics: expert-load statistics, `metrics.jsonl`, console progress bar and summary, wandb, heatmap.

Only rank 0 writes. One JSON object per step in `output_dir/metrics.jsonl` (see `MetricsLogger.log`), mirrored
to wandb; at the end `save_expert_load_heatmap` draws layers x experts over steps from that same file, so a
resumed run's heatmap covers the whole history.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from automoe.config.job import LoggingConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
HEATMAP_FILE = "expert_load_heatmap.png"
LOSS_CURVE_FILE = "loss_curve.png"
WANDB_ID_FILE = "wandb_run_id"  # in output_dir: the wandb run a resumed run continues
# Keys every step record carries (`val_loss` only on validation steps, `moe` empty for dense models).
STEP_KEYS = (
    "step",
    "loss",
    "aux_loss",
    "grad_norm",
    "lr",
    "tokens",
    "tokens_per_s",
    "step_time_s",
    "skipped",
    "moe",
)
LAYER_KEYS = ("load", "max_vio", "cv", "dead_experts", "dropped_tokens")


def expert_load_stats(load_E: Tensor, *, dropped: float = 0.0) -> dict[str, Any]:
    """Balance statistics of one layer's step load [E] (token-slots per expert, summed over ranks; int64 counts).

    max_vio = max(L) / mean(L) - 1 (0 when perfectly balanced); cv = std(L) / mean(L) (population std);
    dead_experts = experts that got no slot; dropped_tokens = token-slots removed by the capacity limit.
    """
    load = load_E.double()
    mean = load.mean().item()
    balanced = mean > 0
    return {
        "load": [int(x) for x in (load_E if not load_E.is_floating_point() else load_E.round()).tolist()],
        "max_vio": load.max().item() / mean - 1.0 if balanced else 0.0,
        "cv": load.std(unbiased=False).item() / mean if balanced else 0.0,
        "dead_experts": int((load == 0).sum().item()),
        "dropped_tokens": int(round(dropped)),
    }


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl file ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, *, last_step: int) -> None:
    """Drop records after `last_step` (a resumed run rewrites the steps after its checkpoint)."""
    path = Path(path)
    if path.is_file():
        kept = [r for r in read_metrics(path) if r["step"] <= last_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricsLogger:
    """Rank 0: appends step records to metrics.jsonl, feeds wandb and the console. Other ranks: no-ops."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        cfg: LoggingConfig,
        is_main: bool,
        total_steps: int,
        start_step: int = 0,
        run_config: dict | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.cfg = cfg
        self.is_main = is_main
        self.total_steps = total_steps
        self.start_step = start_step
        self.path = self.output_dir / METRICS_FILE
        self._first: tuple[int, float] | None = None  # (step, time) of the first record: ETA skips warm-up
        self._bar = self._wandb = None
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, last_step=start_step)
        self._file = None  # opened on the first record, reopened if logging resumes after close()
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", mininterval=1.0
            )
        if cfg.wandb.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                mode=cfg.wandb.mode,
                project=cfg.wandb.project,
                name=cfg.wandb.name or self.output_dir.resolve().name,
                dir=str(self.output_dir),
                config=run_config,
                id=wandb_run_id(self.output_dir, resumed=start_step > 0),
                resume="allow",
                settings=wandb.Settings(quiet=True),
            )

    def log(self, record: dict[str, Any]) -> None:
        """Write one step record (keys `STEP_KEYS`, plus `val_loss` on validation steps)."""
        if not self.is_main:
            return
        if self._first is None:
            self._first = (record["step"], time.perf_counter())
        if self._file is None:
            self._file = self.path.open("a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(flatten(record), step=record["step"])
        step = record["step"]
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if (
            step % self.cfg.log_interval == 0
            or step in (self.start_step + 1, self.total_steps)
            or "val_loss" in record
        ):
            self._print(self.summary(record))

    def summary(self, record: dict[str, Any]) -> str:
        """One console line: step, losses, lr, grad norm, throughput, mean MaxVio, ETA."""
        step = record["step"]
        first_step, first_time = self._first or (step, time.perf_counter())
        rate = (time.perf_counter() - first_time) / (step - first_step) if step > first_step else None
        vios = [layer["max_vio"] for layer in record["moe"].values()]
        parts = [
            f"step {step}/{self.total_steps}",
            f"loss {record['loss']:.4f}",
            f"aux {record['aux_loss']:.4f}",
            f"lr {record['lr']:.2e}",
            f"gnorm {record['grad_norm']:.3f}",
            f"{record['tokens_per_s']:.0f} tok/s",
        ]
        if vios:
            parts.append(f"maxvio {sum(vios) / len(vios):.2f}")
        if "val_loss" in record:
            parts.append(f"val_loss {record['val_loss']:.4f}")
        if record["skipped"]:
            parts.append("SKIPPED (non-finite)")
        parts.append(f"eta {_format_seconds(rate * (self.total_steps - step))}" if rate else "eta ?")
        return " | ".join(parts)

    def console(self):
        """Context in which log lines go through the progress bar instead of breaking it."""
        if self._bar is None:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    def info(self, message: str) -> None:
        """A console line from rank 0 that does not break the progress bar."""
        if self.is_main:
            self._print(message)

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            logger.info(line)

    def close(self) -> None:
        if not self.is_main:
            return
        if self._file is not None:
            self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._bar = self._wandb = None


def wandb_run_id(output_dir: str | Path, *, resumed: bool) -> str:
    """The wandb run id of this output_dir's run: a resumed run reuses the id saved at its fresh start (so wandb
    continues that run); a fresh start draws a new one and saves it in `output_dir/wandb_run_id`."""
    path = Path(output_dir) / WANDB_ID_FILE
    if resumed and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def flatten(record: dict[str, Any]) -> dict[str, float]:
    """Scalars of a step record for wandb: `moe/<layer>/<stat>` per layer (load vectors left out)."""
    flat = {k: v for k, v in record.items() if k != "moe" and isinstance(v, (int, float))}
    for layer, stats in record["moe"].items():
        for key, value in stats.items():
            if key != "load":
                flat[f"moe/{layer}/{key}"] = value
    return flat


def _format_seconds(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def save_expert_load_heatmap(metrics_path: str | Path, png_path: str | Path) -> bool:
    """Draw each MoE layer's load share per expert (rows) over steps (columns); -> False if no MoE data."""
    records = [r for r in read_metrics(metrics_path) if r.get("moe") and not r.get("skipped")]
    if not records:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(records[0]["moe"])
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(
        len(layers), 1, figsize=(10, 1.2 + 1.6 * len(layers)), squeeze=False, sharex=True
    )
    for ax, layer in zip(axes[:, 0], layers):
        step_loads = torch.tensor(
            [r["moe"][layer]["load"] for r in records], dtype=torch.float64
        )  # (steps, E)
        shares = (step_loads / step_loads.sum(1, keepdim=True).clamp_min(1)).T  # (E, steps)
        num_experts = shares.shape[0]
        image = ax.imshow(
            shares.numpy(),
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, num_experts - 0.5, -0.5),
        )
        ax.set_ylabel(f"{layer}\nexpert")
        fig.colorbar(image, ax=ax, label="load share")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"expert load share per step (uniform = {1 / num_experts:.3f})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


def save_loss_curve(metrics_path: str | Path, png_path: str | Path) -> bool:
    """Train loss per step and validation loss (top), learning rate (bottom); -> False if there is no record."""
    records = [r for r in read_metrics(metrics_path) if not r.get("skipped")]
    if not records:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(
        2, 1, figsize=(8, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    steps = [r["step"] for r in records]
    ax_loss.plot(steps, [r["loss"] for r in records], lw=1, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax_loss.plot(*zip(*val), "o-", ms=4, label="validation loss")
    ax_loss.set_ylabel("cross-entropy (nats / token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in records], lw=1, color="tab:green")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle("loss and learning rate per step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
