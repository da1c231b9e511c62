"""Import HF checkpoints into automoe (state dict or live, possibly EP-sharded model) and export them back.

Every tensor is accounted for: before anything is read, the checkpoint's keys and header shapes are checked
against the plan for the config (built by the family, `automoe/hf/families/`), and a missing, unexpected or
misshaped key raises `ValueError` naming it. Expert tensors are read lazily per expert (one tensor per expert, or
the rows of a fused 3-D tensor), so an EP rank reads only its own experts. Block-fp8 weights are dequantized.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from automoe.config.checks import check_choice
from automoe.config.model import ModelConfig
from automoe.hf.adapters import (
    EXPERT_LAYOUTS,
    ExpertTensor,
    TensorPlan,
    expert_to_hf,
    expert_to_ours,
    fused_shape,
    fused_to_ours,
    hf_expert_shapes,
    is_ignored,
    ours_to_fused,
)
from automoe.hf.config_map import read_hf_config
from automoe.hf.families import Family, family_for_model_type, get_family
from automoe.hf.quant import FP8_DTYPES, BlockFP8, scale_key, weight_key
from automoe.hf.safetensors_io import SafetensorsReader, ShardedWriter, parse_size
from automoe.models.transformer import Transformer
from automoe.moe.layer import BIAS_UPDATE_STATE
from automoe.tensors import is_sharded, torch_dtype

ExpertSelection = Union[range, Sequence[int], Callable[[int], bool], None]
# Wrapper segments that torch.compile / activation checkpointing insert into parameter names.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.")
_SHOW = 8  # how many offending keys an error message lists


def expert_ids(selection: ExpertSelection, num_experts: int) -> list[int]:
    """Sorted expert ids chosen by a range, a sequence or a predicate (None = all)."""
    if selection is None:
        return list(range(num_experts))
    ids = [e for e in range(num_experts) if selection(e)] if callable(selection) else sorted(set(selection))
    bad = [e for e in ids if not 0 <= e < num_experts]
    if bad:
        raise ValueError(f"experts={selection!r} names experts {bad} outside [0, {num_experts})")
    return ids


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """automoe state-dict key -> (global shape, dtype), from a model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if not _not_in_hf(cfg, k)}


def _tied_output(cfg: ModelConfig, key: str) -> bool:
    return cfg.tie_embeddings and key == "output.weight"


def _not_in_hf(cfg: ModelConfig, key: str) -> bool:
    """No HF tensor: the tied output head, and the bias update's training state (kept at its init)."""
    return _tied_output(cfg, key) or key.endswith(BIAS_UPDATE_STATE)


def _fmt(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def expert_layout(reader: SafetensorsReader, family: Family, cfg: ModelConfig) -> str:
    """'fused' when the checkpoint holds any fused 3-D expert tensor of the family's plan, else 'per_expert'."""
    fused = family.build_plan(cfg, "fused")
    keys = reader.keys()
    return "fused" if any(spec.fused_key in keys for spec in fused.experts) else "per_expert"


def validate_checkpoint(
    reader: SafetensorsReader, plan: TensorPlan, cfg: ModelConfig, *, quant: BlockFP8 | None = None
) -> None:
    """Raise ValueError unless the checkpoint holds exactly the plan's tensors with the expected shapes (and, for
    a block-fp8 checkpoint, a scale of the right shape for every fp8 tensor)."""
    shapes = {k: s for k, (s, _) in expected_tensors(cfg).items()}
    if plan.ours_keys() != set(shapes):  # internal invariant: the plan covers the model exactly
        raise RuntimeError(f"HF plan and model disagree: {_fmt(list(plan.ours_keys() ^ set(shapes)))}")
    file_keys = reader.keys()
    expected = plan.hf_keys(cfg.moe.num_experts)
    scales = {scale_key(k) for k in expected if scale_key(k) in file_keys} if quant is not None else set()
    missing = expected - file_keys
    if missing:
        raise ValueError(
            f"HF checkpoint {str(reader.path)!r} lacks {len(missing)} tensors: {_fmt(list(missing))}"
        )
    unexpected = [
        k
        for k in file_keys - expected - plan.optional_hf - set(plan.duplicates) - scales
        if not is_ignored(plan, k, cfg.num_layers) and not k.endswith("rotary_emb.inv_freq")
    ]
    if unexpected:
        stray = [k for k in unexpected if weight_key(k) is not None]
        hint = " (fp8 scales, but config.json has no quantization_config)" if stray and quant is None else ""
        raise ValueError(
            f"HF checkpoint {str(reader.path)!r} has {len(unexpected)} tensors with no automoe counterpart"
            f"{hint}: {_fmt(unexpected)}"
        )
    want: dict[str, tuple[int, ...]] = {hf: shapes[ours] for ours, hf in plan.direct.items()}
    for spec in plan.experts:
        if plan.layout == "fused":
            want[spec.fused_key] = fused_shape(spec, shapes[spec.ours])
            continue
        per_expert = hf_expert_shapes(spec, shapes[spec.ours])
        for e in range(cfg.moe.num_experts):
            want.update(zip(spec.hf_keys(e), per_expert))
    wrong = [
        f"{k} {list(reader.shape(k))} (expected {list(s)})" for k, s in want.items() if reader.shape(k) != s
    ]
    for key, shape in want.items():
        if scale_key(key) in scales and reader.shape(scale_key(key)) != quant.scale_shape(shape):
            wrong.append(
                f"{scale_key(key)} {list(reader.shape(scale_key(key)))} "
                f"(expected {list(quant.scale_shape(shape))}: {quant.block[0]}x{quant.block[1]} blocks)"
            )
    unscaled = [k for k in want if scale_key(k) not in scales and reader.dtype(k) in FP8_DTYPES]
    if unscaled:
        raise ValueError(
            f"HF checkpoint {str(reader.path)!r} stores {len(unscaled)} tensors in fp8 without a "
            f"{'weight_scale_inv' if quant is not None else 'quantization_config'}: {_fmt(unscaled)}"
        )
    if wrong:
        raise ValueError(
            f"HF checkpoint {str(reader.path)!r} has {len(wrong)} misshaped tensors: {_fmt(wrong)}"
        )


class HFCheckpoint:
    """An opened, validated HF checkpoint directory: `cfg`, `family` (its name), `plan` (in the checkpoint's
    expert `layout`), `quant` (block fp8 or None) and a lazy `reader`."""

    def __init__(self, path: str | Path, *, max_seq_len: int | None = None, dtype: str = "float32") -> None:
        self.path = Path(path)
        hf_config = read_hf_config(path)
        family = family_for_model_type(hf_config.get("model_type"))
        self.cfg = family.to_model_config(hf_config, max_seq_len=max_seq_len, dtype=dtype)
        self.family = family.name
        self.quant = BlockFP8.from_hf_config(hf_config)
        self.reader = SafetensorsReader(path)
        self.layout = expert_layout(self.reader, family, self.cfg)
        self.plan = family.build_plan(self.cfg, self.layout)
        self.expected = expected_tensors(self.cfg)
        validate_checkpoint(self.reader, self.plan, self.cfg, quant=self.quant)
        self._expert_specs = {spec.ours: spec for spec in self.plan.experts}

    def _scaled(self, key: str) -> bool:
        return self.quant is not None and scale_key(key) in self.reader.weight_map

    def _get(self, key: str) -> Tensor:
        """One whole HF tensor (dequantized when it has an fp8 scale)."""
        t = self.reader.get(key)
        return self.quant.dequantize(t, self.reader.get(scale_key(key))) if self._scaled(key) else t

    def _rows(self, key: str, ids: list[int]) -> Tensor:
        """Rows `ids` of a fused HF expert tensor (and of its fp8 scale)."""
        t = self.reader.get_rows(key, ids)
        return self.quant.dequantize(t, self.reader.get_rows(scale_key(key), ids)) if self._scaled(key) else t

    def _read_experts(self, spec: ExpertTensor, ids: list[int], dtype: torch.dtype) -> Tensor:
        """[len(ids), ...] stacked automoe slices of the chosen experts (only their tensors / rows are read)."""
        if self.plan.layout == "fused":
            return fused_to_ours(spec, self._rows(spec.fused_key, ids)).to(dtype)
        return torch.stack(
            [expert_to_ours(spec, [self._get(k) for k in spec.hf_keys(e)]).to(dtype) for e in ids]
        )

    def read(self, key: str, *, experts: ExpertSelection = None) -> Tensor:
        """The automoe tensor `key`; for stacked expert tensors only the selected experts' rows."""
        dtype = self.expected[key][1]
        if key in self.plan.direct:
            return self._get(self.plan.direct[key]).to(dtype)
        spec = self._expert_specs[key]
        ids = expert_ids(experts, self.cfg.moe.num_experts)
        if not ids:
            shape = self.expected[key][0]
            return torch.empty((0, *shape[1:]), dtype=dtype)
        return self._read_experts(spec, ids, dtype)

    def state_dict(self, *, experts: ExpertSelection = None) -> dict[str, Tensor]:
        return {key: self.read(key, experts=experts) for key in self.expected}


def load_hf_checkpoint(
    path: str | Path,
    *,
    experts: ExpertSelection = None,
    max_seq_len: int | None = None,
    dtype: str = "float32",
    build_model: bool = False,
) -> tuple[ModelConfig, dict[str, Tensor] | Transformer]:
    """-> (ModelConfig, automoe state dict) of an HF directory, or (cfg, Transformer) with `build_model=True`.

    `experts` (range, ids or predicate) limits every stacked expert tensor to those experts' rows, e.g.
    `experts=range(rank * El, (rank + 1) * El)` under expert parallelism; no other expert tensor is read.
    """
    ckpt = HFCheckpoint(path, max_seq_len=max_seq_len, dtype=dtype)
    state = ckpt.state_dict(experts=experts)
    if not build_model:
        return ckpt.cfg, state
    if experts is not None:
        raise ValueError("build_model=True builds the whole model; pass experts=None")
    model = Transformer(ckpt.cfg)  # RoPE tables are built in __init__; every parameter is overwritten below
    if ckpt.cfg.tie_embeddings:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return ckpt.cfg, model


# ---------------------------------------------------------------------------------------------------------------
# Loading into a live (possibly sharded) model
# ---------------------------------------------------------------------------------------------------------------
def _clean_key(key: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    return key


def _local_indices(t: Tensor) -> list[Tensor]:
    """Per dim of a DTensor, the global indices its local shard holds (int64 [local size of that dim]).

    Sharding acts on each tensor dim separately, so distributing `arange(size)` of one dim with only the
    placements that shard that dim (moved to dim 0; every other placement made `Replicate`) yields exactly the
    indices this rank holds, for `Shard`, FSDP's `_StridedShard` and any nesting of them. No communication
    (`src_data_rank=None`: every rank slices its own piece).
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    def on_dim0(p, d: int):
        if isinstance(p, _StridedShard):  # not a Shard subclass in every torch version
            return _StridedShard(0, split_factor=p.split_factor) if p.dim == d else Replicate()
        if isinstance(p, Shard):
            return Shard(0) if p.dim == d else Replicate()
        if isinstance(p, Replicate):
            return p
        raise ValueError(f"load_hf_into_model cannot fill a parameter with placements {t.placements}")

    out = []
    for d, size in enumerate(t.shape):
        placements = [on_dim0(p, d) for p in t.placements]
        ids = torch.arange(size, dtype=torch.int64, device=t.to_local().device)
        out.append(distribute_tensor(ids, t.device_mesh, placements, src_data_rank=None).to_local().cpu())
    return out


def _select(value: Tensor, indices: Sequence[Tensor], *, from_dim: int) -> Tensor:
    """`value` restricted to `indices[d]` along every dim d >= from_dim (dims already selected are skipped)."""
    for d in range(from_dim, value.dim()):
        if not torch.equal(indices[d], torch.arange(value.shape[d])):
            value = value.index_select(d, indices[d])
    return value


@dataclass
class HFLoadReport:
    """What `load_hf_weights` did on this process."""

    read_keys: list[str]  # HF keys read, in order
    not_written: list[str]  # model parameters and persistent buffers the load did not write (should be none)


def load_hf_into_model(model: nn.Module, path: str | Path) -> list[str]:
    """`load_hf_weights`; -> the HF keys this process read (in order)."""
    return load_hf_weights(model, path).read_keys


@torch.no_grad()
def load_hf_weights(model: nn.Module, path: str | Path) -> HFLoadReport:
    """Copy an HF checkpoint into an already built automoe `Transformer` (after `to_empty`/`init_weights`).

    Parameters may be DTensors (expert parallelism, FSDP2 on top of it, i.e. `Shard`, `_StridedShard` and
    `Replicate` placements in any combination): each rank works out which global indices its shard holds and,
    for stacked expert tensors, reads only the safetensors entries of those experts (dense tensors are read
    whole and sliced). Raises ValueError when the checkpoint's shapes do not match the model's config.
    Reports the HF keys this process read and every parameter or persistent buffer whose (local) storage no copy
    wrote, after tying: anything left at its random init is named, whatever the plan claims.
    """
    cfg: ModelConfig = model.cfg
    ckpt = HFCheckpoint(path, max_seq_len=cfg.max_seq_len, dtype=cfg.dtype)
    if {k: v[0] for k, v in ckpt.expected.items()} != {k: v[0] for k, v in expected_tensors(cfg).items()}:
        raise ValueError(f"HF checkpoint {str(path)!r} describes a model of another shape than model.cfg")
    seen, written = set(), set()
    for raw_key, target in model.state_dict().items():
        key = _clean_key(raw_key)
        if _not_in_hf(cfg, key):
            continue
        if key not in ckpt.expected:
            raise ValueError(f"model tensor {raw_key!r} has no counterpart in the HF plan")
        seen.add(key)
        _copy_into(ckpt, key, target)
        written.add(_storage(target))
    if seen != set(ckpt.expected):
        raise ValueError(f"model lacks tensors the checkpoint holds: {_fmt(list(set(ckpt.expected) - seen))}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    persistent = set(model.state_dict())
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in persistent)]
    not_written = [
        _clean_key(n)
        for n, t in tensors
        if _storage(t) not in written and _storage(t) is not None and not n.endswith(BIAS_UPDATE_STATE)
    ]
    return HFLoadReport(list(ckpt.reader.read_keys), not_written)


def _storage(t: Tensor) -> tuple[int, int] | None:
    """(data pointer, size) of the local tensor behind `t` (None for an empty local shard)."""
    local = t.to_local() if is_sharded(t) else t
    return (local.data_ptr(), local.numel()) if local.numel() else None


def _copy_into(ckpt: HFCheckpoint, key: str, target: Tensor) -> None:
    if not is_sharded(target):
        target.copy_(ckpt.read(key))
        return
    local = target.to_local()
    indices = _local_indices(target)
    if key in ckpt.plan.direct:
        local.copy_(_select(ckpt.read(key), indices, from_dim=0))
        return
    # stacked expert tensor: read only the experts (rows) this shard holds, in their local order
    rows = indices[0]
    wanted = sorted(set(rows.tolist()))
    value = ckpt.read(key, experts=wanted)
    if rows.tolist() != wanted:
        value = value[torch.searchsorted(torch.tensor(wanted, dtype=torch.int64), rows)]
    local.copy_(_select(value, indices, from_dim=1))


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------
def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def hf_tensors(
    state: nn.Module | dict[str, Tensor],
    cfg: ModelConfig,
    *,
    family: str,
    dtype: torch.dtype | None = None,
    expert_layout: str = "per_expert",
) -> Iterator[tuple[str, Tensor]]:
    """Yield (HF key, tensor) for every tensor of an automoe model or state dict, one layer tensor at a time.

    DTensors are gathered (`full_tensor()`, a collective: every rank must iterate). `dtype` casts everything
    except the fp32 correction bias. `expert_layout`: one tensor per expert ('per_expert', what transformers 4
    and 5 both load) or one 3-D tensor per projection ('fused', transformers 5's in-memory layout).
    """
    check_choice("expert_layout", expert_layout, EXPERT_LAYOUTS)
    sd = {
        _clean_key(k): v for k, v in (state.state_dict() if isinstance(state, nn.Module) else state).items()
    }
    plan = get_family(family).build_plan(cfg, expert_layout)
    missing = plan.ours_keys() - set(sd)
    if missing:
        raise ValueError(f"state dict lacks tensors of the {family} layout: {_fmt(list(missing))}")
    extra = [k for k in set(sd) - plan.ours_keys() if not _not_in_hf(cfg, k)]
    if extra:
        raise ValueError(f"state dict has tensors the {family} layout cannot hold: {_fmt(extra)}")

    def cast(key: str, t: Tensor) -> Tensor:
        return t if dtype is None or key in plan.fp32_hf else t.to(dtype)

    for ours, hf in plan.direct.items():
        yield hf, cast(hf, _full(sd[ours]).detach())
    for hf, ours in plan.duplicates.items():
        yield (
            hf,
            cast(hf, _full(sd[ours]).detach()).clone(),
        )  # its own storage: safetensors refuses shared ones
    for spec in plan.experts:
        stacked = _full(sd[spec.ours]).detach()
        if plan.layout == "fused":
            yield spec.fused_key, cast(spec.fused_key, ours_to_fused(spec, stacked))
            continue
        for e in range(stacked.shape[0]):
            for hf, t in zip(spec.hf_keys(e), expert_to_hf(spec, stacked[e])):
                yield hf, cast(hf, t)


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_hf_checkpoint(
    state: nn.Module | dict[str, Tensor],
    cfg: ModelConfig,
    path: str | Path,
    *,
    family: str,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    expert_layout: str = "per_expert",
) -> list[str]:
    """Write `config.json` + safetensors shards (+ `model.safetensors.index.json`) loadable by `transformers`.

    Under torch.distributed every rank must call this (sharded tensors are gathered); only rank 0 writes.
    Raises ValueError naming the setting when `family` cannot express `cfg` (before any tensor is gathered).
    `expert_layout`: see `hf_tensors`. Returns the file names written (empty on other ranks).
    """
    hf_config = get_family(family).to_hf_config(cfg)
    if dtype is not None:
        hf_config["torch_dtype"] = dtype
    tensors = hf_tensors(
        state,
        cfg,
        family=family,
        dtype=None if dtype is None else torch_dtype(dtype),
        expert_layout=expert_layout,
    )
    if not _is_writer():
        for _ in tensors:  # take part in the gathers
            pass
        return []
    writer = ShardedWriter(path, max_shard_bytes=parse_size(max_shard_size))
    writer.add_all(tensors)
    names = writer.close()
    (Path(path) / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return ["config.json", *names]
