"""The first-loss guard: a run that starts from imported weights must be better than random at step 1.

NeMo Automodel once read fp8 expert weights as if they were random: training started at a loss of ~15 instead of
~3 and nothing complained. A model that predicts uniformly over V tokens has a cross-entropy of exactly ln(V) on
any data; a freshly initialized one (small init, near-zero logits) is within a few hundredths of it, and weights
that are random at a larger scale (mis-read, unscaled or unfilled tensors) predict confidently and wrongly, above
it. A correctly loaded language model is far below: a pretrained LM scores a few nats on natural text, where ln(V)
is 10.3-11.9 for a 30k-150k vocabulary.

Rule: after `hf.init_from` or `checkpoint.init_from`, the trainer logs step 1's loss next to ln(V) and stops with
`FirstLossError` when loss >= ln(V) - `MARGIN_NATS` (a model no better than e times the uniform probability on the
right token, on average), unless `train.first_loss_guard=false`. One nat is loose enough for a working model on
out-of-domain data and tight enough that no random model passes; data that is itself near-uniform (random token
ids) cannot pass it and needs the override. Resumed runs are not checked: their step-N loss continues a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MARGIN_NATS = 1.0
_SHOW = 8  # tensors named in the message (then '+N more')


class FirstLossError(ValueError):
    """The first loss after loading weights is no better than a random model's (see the module docstring)."""


def imported_weights(cfg) -> str | None:
    """`key=value` of the setting the run's weights were imported from (None: not imported)."""
    for key, value in (
        ("hf.init_from", cfg.hf.init_from),
        ("checkpoint.init_from", getattr(cfg.checkpoint, "init_from", None)),
    ):
        if value is not None:
            return f"{key}={value}"
    return None


def check_first_loss(
    loss: float, vocab_size: int, *, source: str, enabled: bool, not_loaded: Sequence[str] = ()
) -> str:
    """-> the line to log for the first step's `loss` after loading from `source`; raises FirstLossError when
    the guard is `enabled` and the loss is no better than random. `not_loaded`: tensors the load did not write."""
    uniform = math.log(vocab_size)
    limit = uniform - MARGIN_NATS
    unwritten = ""
    if not_loaded:
        more = f" (+{len(not_loaded) - _SHOW} more)" if len(not_loaded) > _SHOW else ""
        unwritten = (
            f"; the load did not write {len(not_loaded)} tensors: {', '.join(list(not_loaded)[:_SHOW])}{more}"
        )
    line = (
        f"first step after loading {source}: loss {loss:.4f}, ln(vocab_size={vocab_size}) = {uniform:.4f} "
        f"(a uniform guess); better than random below {limit:.4f}{unwritten}"
    )
    if not loss >= limit:  # NaN is left to train.nan_policy
        return line
    if not enabled:
        return line + ": NOT better than random; training anyway (train.first_loss_guard=false)"
    raise FirstLossError(
        f"{line}: the loaded model is no better than random (loss >= ln(V) - {MARGIN_NATS:g}). The weights were "
        "probably not loaded as intended (missing, mis-mapped, quantized or uninitialized tensors). Nothing was "
        "updated or saved. If the data itself is near-random, set train.first_loss_guard=false to train anyway."
    )
