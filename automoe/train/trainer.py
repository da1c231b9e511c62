"""The training loop (the only one): micro-batches -> forward/backward -> clip -> AdamW -> gate biases -> log.

Every rank runs the same code; the distributed parts are the `automoe.parallel` calls, which are identities on
one process. Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from automoe import parallel
from automoe.config.job import JobConfig
from automoe.data import StatefulLoader, TokenDataset, val_batches
from automoe.moe import moe_layers, step_expert_loads, update_gate_biases
from automoe.parallel import flight_recorder
from automoe.tensors import local_view
from automoe.train import loss
from automoe.train.checkpoint import Checkpointer, latest_checkpoint
from automoe.train.faults import NO_FAULTS, FaultHooks
from automoe.train.first_loss import check_first_loss, imported_weights
from automoe.train.metrics import (
    HEATMAP_FILE,
    LOSS_CURVE_FILE,
    MetricsLogger,
    expert_load_stats,
    save_expert_load_heatmap,
    save_loss_curve,
)

logger = logging.getLogger(__name__)
# Fragments of the errors gloo/NCCL raise when a peer is stuck (timeout) or gone (closed connection).
_PEER_FAILURE = (
    "timed out",
    "timeout",
    "connection closed",
    "connection reset",
    "pair closure",
    "broken pipe",
)


class CollectiveError(RuntimeError):
    """A collective failed because another rank hung past `parallel.collective_timeout_s` or died."""


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm was NaN/inf and `train.nan_policy` says stop (or too many steps were skipped)."""


class Trainer:
    """Runs steps `start_step + 1 ..` of a job whose pieces are already built (see `automoe.train.build`).

    `fit()` trains until `train.stop_at_step` or `train.steps`, validating every `train.val_interval` steps and
    checkpointing every `checkpoint.interval` steps and at the end. Returns the last step's metrics record.
    `faults`: the reliability tests' kill/hang/NaN hooks (the default does nothing). `init_from_weights`: the
    model's weights were loaded (resume, `checkpoint.init_from`, `hf.init_from`), not drawn by `init_weights()`;
    imported ones (not a resume) must beat a random model at step 1 (`automoe.train.first_loss`), and
    `not_loaded` names the tensors their load did not write. A failed collective leaves `hang_rank<r>.json`
    (`automoe.parallel.flight_recorder`).
    """

    def __init__(
        self,
        cfg: JobConfig,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loader: StatefulLoader,
        val_dataset: TokenDataset | None,
        dims: parallel.ParallelDims,
        device: torch.device,
        checkpointer: Checkpointer,
        metrics: MetricsLogger,
        start_step: int = 0,
        faults: FaultHooks = NO_FAULTS,
        init_from_weights: bool = False,
        not_loaded: tuple[str, ...] = (),
        pipeline: parallel.Pipeline | None = None,
    ) -> None:
        self.cfg = cfg
        # pipeline parallelism: `model` holds this rank's stages, which `pipeline` runs (None: no PP)
        self.pipeline = pipeline
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loader, self.val_dataset = loader, val_dataset
        self.dims, self.device = dims, device
        self.checkpointer, self.metrics = checkpointer, metrics
        self.faults = faults
        self.step = start_step
        # True when the weights were loaded (checkpoint.resume, checkpoint.init_from or hf.init_from) rather than
        # drawn by init_weights(): the first step's loss then says nothing about the initialization.
        self.init_from_weights = init_from_weights
        # imported weights (not a resume): step 1's loss must beat a random model's (`automoe.train.first_loss`);
        # `not_loaded`: tensors the load did not write, named if it does not
        self.weights_source = imported_weights(cfg) if init_from_weights and start_step == 0 else None
        self.not_loaded = not_loaded
        self.consecutive_skips = 0
        self.output_dir = Path(cfg.output_dir)
        self.phase = "start-up"  # what the loop is doing (named if a collective fails)

    # ---- the loop ----
    def fit(self) -> dict[str, Any]:
        """Train to `train.stop_at_step` (or `train.steps`); validate, log and checkpoint on schedule."""
        train, ckpt = self.cfg.train, self.cfg.checkpoint
        last_step = train.stop_at_step or train.steps
        record: dict[str, Any] = {}
        try:
            with self.metrics.console(), self._name_collective_failures():
                while self.step < last_step:
                    record = self.train_step()
                    if self._due(train.val_interval, final=train.steps) and self.val_dataset is not None:
                        self.phase = "validation (loss all-reduce)"
                        record["val_loss"] = self.validate()
                    self.metrics.log(record)
                    if self._due(ckpt.interval, final=last_step):
                        self.phase = "checkpoint save (DCP plan/metadata collectives, barriers)"
                        self.save_checkpoint()
                self.phase = "final checkpoint wait"
                self.checkpointer.wait()
        finally:
            self.metrics.close()
        if self.cfg.logging.heatmap and self.metrics.is_main:
            save_expert_load_heatmap(self.metrics.path, self.output_dir / HEATMAP_FILE)
        if self.cfg.logging.loss_curve and self.metrics.is_main:
            save_loss_curve(self.metrics.path, self.output_dir / LOSS_CURVE_FILE)
        return record

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the loader's next global batch; -> its metrics record (see `metrics.STEP_KEYS`)."""
        self.step += 1
        self.faults.at_step(self.step)
        start = time.perf_counter()
        micro_batches = self.loader.next_step()
        self.phase = "forward/backward (expert all-to-all, FSDP all-gather/reduce-scatter)"
        ce_sum, aux_sum, dropped_per_layer = self.forward_backward(micro_batches)
        self.phase = "gradient reduction and clipping (grad-norm all-reduce)"
        parallel.finalize_grads(self.model, self.dims)
        grad_norm = parallel.clip_grad_norm_(self.model, self.cfg.optim.max_grad_norm, dims=self.dims).item()
        # One all-reduce for every logged sum; the loss is the global mean CE of the step. Under PP the CE and the
        # aux losses are summed over every stage, the per-layer counts over the ranks of this stage (its layers).
        self.phase = "loss/metrics all-reduce"
        local = torch.cat([ce_sum.view(1), aux_sum.view(1), dropped_per_layer])
        if self.dims.pp_enabled:
            sums = parallel.sum_over_ranks(local[:2], self.dims)
            dropped = parallel.sum_over_stage(local[2:], self.dims)
        else:
            sums = parallel.sum_over_ranks(local, self.dims)
            dropped = sums[2:]
        num_tokens = micro_batches[0]["global_num_tokens"]
        loss = sums[0].item() / num_tokens
        aux_loss = sums[1].item() / (len(micro_batches) * self.dims.stage_size)
        if (
            self.weights_source is not None and self.step == 1
        ):  # every rank: the same global loss, one verdict
            self.metrics.info(
                check_first_loss(
                    loss,
                    self.cfg.model.vocab_size,
                    source=self.weights_source,
                    enabled=self.cfg.train.first_loss_guard,
                    not_loaded=self.not_loaded,
                )
            )
        lr = self.optimizer.param_groups[0]["lr"]
        healthy = self._check_finite(loss, grad_norm)  # the same verdict on every rank
        if healthy:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.phase = "gate-bias load all-reduce"
        loads = self._update_gate_biases() if healthy else self._discard_moe_statistics()
        moe = {
            name: expert_load_stats(load_E, dropped=dropped[i].item())
            for i, (name, load_E) in enumerate(loads.items())
        }
        if self.dims.pp_enabled:  # every stage's layers reach rank 0's metrics
            moe = parallel.gather_over_stages(moe, self.dims)
        step_time = time.perf_counter() - start
        return {
            "step": self.step,
            "loss": loss,
            "aux_loss": aux_loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": num_tokens,
            "tokens_per_s": num_tokens / step_time,
            "step_time_s": step_time,
            "skipped": not healthy,
            "moe": moe,
        }

    def forward_backward(self, micro_batches: list[dict[str, Any]]) -> tuple[Tensor, Tensor, Tensor]:
        """Accumulate the gradients of one step (`loss.forward_backward`); -> (CE sum, aux-loss sum, dropped slots
        per MoE layer) on this rank."""
        if self.pipeline is not None:
            ce_sum, aux_sum = loss.pipeline_forward_backward(
                self.pipeline,
                micro_batches,
                dims=self.dims,
                device=self.device,
                dtype=self.cfg.train.dtype,
                cp_load_balance=self.cfg.parallel.cp_load_balance,
            )
        else:
            ce_sum, aux_sum = self._forward_backward(micro_batches)
        # float64: the counts stay exact (to 2^53) through the all-reduce they share with the loss sums
        dropped = [layer.dropped_slots.double().reshape(1) for _, layer in moe_layers(self.model)]
        dropped_per_layer = torch.cat(dropped) if dropped else torch.zeros(0, dtype=torch.float64)
        return ce_sum, aux_sum, dropped_per_layer.to(self.device)

    def _forward_backward(self, micro_batches: list[dict[str, Any]]) -> tuple[Tensor, Tensor]:
        ce_sum, aux_sum = loss.forward_backward(
            self.model,
            micro_batches,
            dims=self.dims,
            device=self.device,
            ce_sum_fn=lambda mb: self.faults.poison_loss(self._ce_sum(mb), self.step),
        )
        return ce_sum, aux_sum

    def _ce_sum(self, mb: dict[str, Any]) -> Tensor:
        """Cross-entropy summed over this rank's (CP-local) labels != IGNORE_INDEX, in fp32."""
        return loss.micro_batch_ce_sum(
            self.model,
            mb,
            dims=self.dims,
            device=self.device,
            dtype=self.cfg.train.dtype,
            cp_load_balance=self.cfg.parallel.cp_load_balance,
        )

    # ---- after the optimizer step ----
    def _update_gate_biases(self) -> dict[str, Tensor]:
        # reliability tests: this rank leaves the all-reduce out (after its peers timed out on it) and runs on
        if self.faults.skips_collective(self.step, wait_s=self.cfg.parallel.collective_timeout_s + 5):
            return update_gate_biases(self.model)
        return update_gate_biases(self.model, sum_fn=lambda t: parallel.sum_over_stage(t, self.dims))

    def _discard_moe_statistics(self) -> dict[str, Tensor]:
        """A skipped step: report its loads but leave the gate biases alone."""
        loads = step_expert_loads(self.model, sum_fn=lambda t: parallel.sum_over_stage(t, self.dims))
        for _, layer in moe_layers(self.model):
            layer.reset_statistics()
        return loads

    def _check_finite(self, loss: float, grad_norm: float) -> bool:
        """True when the step may update the weights. Every rank sees the same global loss and norm, so all agree."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive_skips = 0
            return True
        what = f"step {self.step}: non-finite loss={loss} or grad_norm={grad_norm}"
        policy = self.cfg.train.nan_policy
        if policy == "skip" and self.consecutive_skips < self.cfg.train.nan_max_skips:
            self.consecutive_skips += 1
            message = f"{what}; update skipped (train.nan_policy=skip, {self.consecutive_skips} in a row)"
            self.metrics.info(message)
            if not self.metrics.is_main:  # every rank says what it decided (they must agree)
                logger.warning(message)
            return False
        self.checkpointer.wait()  # a pending save holds the last healthy state: let it complete
        latest = latest_checkpoint(self.checkpointer.root)
        reason = (
            "train.nan_policy=stop"
            if policy == "stop"
            else f"train.nan_max_skips={self.cfg.train.nan_max_skips} consecutive steps skipped"
        )
        message = (
            f"{what}: stopping ({reason}). Nothing was saved from this state; the last complete checkpoint "
            f"is {latest or 'none'}. Lower optim.lr, use train.dtype=float32 or tighten optim.max_grad_norm."
        )
        logger.error(message)  # on every rank, before the first one to exit gets the others terminated
        raise NonFiniteError(message)

    @contextlib.contextmanager
    def _name_collective_failures(self):
        """Re-raise a peer's timeout or death as `CollectiveError` naming the step, phase and timeout setting."""
        try:
            yield
        except RuntimeError as e:
            text = str(e).lower()
            if self.dims.world_size == 1 or not any(frag in text for frag in _PEER_FAILURE):
                raise
            timeout = self.cfg.parallel.collective_timeout_s
            rank = dist.get_rank() if dist.is_initialized() else 0
            try:
                report = flight_recorder.write_hang_report(
                    self.output_dir,
                    rank=rank,
                    world_size=self.dims.world_size,
                    step=self.step,
                    phase=self.phase,
                    error=e,
                    timeout_s=timeout,
                )
            except OSError as write_error:  # the collective's failure is the news, not this
                report = f"(not written: {write_error})"
            raise CollectiveError(
                f"step {self.step}: a collective in {self.phase} failed on rank {rank}: another "
                f"rank hung longer than parallel.collective_timeout_s={timeout} or died. This rank's recent "
                f"collectives: {report} (compare the ranks: python -m automoe.parallel.flight_recorder "
                f"{self.output_dir}). Original error: {e}"
            ) from e

    @property
    def phase(self) -> str:
        """What the loop is doing (named if a collective fails; recorded with each collective, with the step)."""
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase = value
        flight_recorder.RECORDER.step, flight_recorder.RECORDER.phase = self.step, value

    def _due(self, interval: int, *, final: int) -> bool:
        return interval > 0 and (self.step % interval == 0 or self.step == final)

    # ---- validation and checkpoints ----
    @torch.no_grad()
    def validate(self) -> float:
        """Mean CE over the validation split (at most `train.val_max_batches` global batches), all ranks."""
        train = self.cfg.train
        dp_rank, dp_size = self.dims.dp_coordinate()
        self.model.eval()
        ce_sum = torch.zeros((), device=self.device)
        num_tokens = 0
        for micro_batches in val_batches(
            self.val_dataset,
            global_batch_size=train.global_batch_size,
            micro_batch_size=train.micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            max_steps=train.val_max_batches,
        ):
            num_tokens += micro_batches[0]["global_num_tokens"]
            if self.pipeline is not None:  # forward-only schedule; the CE is on the last stage
                inputs = loss.pipeline_inputs(
                    micro_batches, dims=self.dims, cp_load_balance=self.cfg.parallel.cp_load_balance
                )
                with loss.autocast(self.device, train.dtype):
                    ce_sum += self.pipeline.run(inputs, num_tokens=1, train=False)[0].float()
                continue
            for mb in micro_batches:
                ce_sum += self._ce_sum(mb).float()
        self.model.train()
        # tp ranks compute the same whole-sequence CE: count it once
        return parallel.sum_over_ranks(ce_sum, self.dims).item() / (num_tokens * self.dims.tp)

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step, refusing to save weights that are no longer finite."""
        local_ok = all(bool(torch.isfinite(local_view(p)).all()) for p in self.model.parameters())
        num_bad = parallel.sum_over_ranks(
            torch.tensor(float(not local_ok), device=self.device), self.dims
        ).item()
        if num_bad:
            raise NonFiniteError(
                f"step {self.step}: parameters are not finite on {int(num_bad)} rank(s); not writing a checkpoint"
            )
        return self.checkpointer.save(
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            loader=self.loader,
        )
