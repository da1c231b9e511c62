"""Planner inputs: the training shape, the cluster description, and loading presets by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from automoe.config.model import ModelConfig
from automoe.config.parallel import AC_MODES, PP_MULTI_STAGE_SCHEDULES, PP_SCHEDULES

# The config tree inside the package (package data; in a checkout, a link to the repo's configs/)
PRESETS = Path(__file__).resolve().parents[1] / "configs"
# Cluster descriptions: planner inputs, not job config groups, so they live outside Hydra's configs/ tree
CLUSTERS = Path(__file__).resolve().parent / "clusters"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30
OPTIMIZER_STATE_BYTES = 8  # AdamW exp_avg + exp_avg_sq, fp32, per parameter element
STEP_BYTES = 4  # AdamW's fp32 `step` scalar, one per parameter tensor


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingShape:
    """What one optimizer step processes, and the numerics that size activations and messages."""

    global_batch: int  # sequences per optimizer step (over all data-parallel ranks and micro-batches)
    micro_batch: int = 1  # sequences per rank per forward/backward
    seq_len: int = 4096  # tokens per sequence (split over cp ranks)
    param_dtype: str = "float32"  # master parameters and gradients
    compute_dtype: str = (
        "bfloat16"  # activations, FSDP all-gathers and all-to-all rows (FSDP reduces in fp32)
    )
    activation_checkpointing: str = "none"  # none | full (every block recomputed) | moe (only the MoE FFNs)
    fsdp: bool = (
        True  # FSDP2 on dense (dp_shard*cp) and expert (ep_shard) axes; False = replicate + all-reduce
    )
    routing_imbalance: float = (
        1.0  # max/mean expert-slot load per rank: scales routed activations (1 = uniform)
    )
    pp_schedule: str = "1F1B"  # pipeline schedule of layouts with pp > 1: 1F1B | Interleaved1F1B | GPipe
    pp_virtual_stages: int = 1  # stages per pipeline rank (> 1 needs Interleaved1F1B)

    def __post_init__(self) -> None:
        for name in ("global_batch", "micro_batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainingShape.{name}={getattr(self, name)} must be >= 1")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(
                    f"TrainingShape.{name}={getattr(self, name)!r} is not one of {list(DTYPE_BYTES)}"
                )
        if self.activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"TrainingShape.activation_checkpointing={self.activation_checkpointing!r} is not one of "
                f"{list(AC_MODES)}"
            )
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(
                f"TrainingShape.pp_schedule={self.pp_schedule!r} is not one of {list(PP_SCHEDULES)}"
            )
        if self.pp_virtual_stages < 1 or (
            self.pp_virtual_stages > 1 and self.pp_schedule not in PP_MULTI_STAGE_SCHEDULES
        ):
            raise ValueError(
                f"TrainingShape.pp_virtual_stages={self.pp_virtual_stages} must be >= 1, and 1 unless pp_schedule is "
                f"one of {list(PP_MULTI_STAGE_SCHEDULES)} (got {self.pp_schedule!r})"
            )
        if self.routing_imbalance < 1.0:
            raise ValueError(f"TrainingShape.routing_imbalance={self.routing_imbalance} must be >= 1")


@dataclass
class ClusterSpec:
    """The machines: identical nodes of identical accelerators (bandwidths are per accelerator, one direction)."""

    name: str = "custom"  # label printed in reports
    gpus_per_node: int = 8  # accelerators (ranks) per node
    num_nodes: int = 1  # nodes; world = gpus_per_node * num_nodes
    memory_gib: float = 80.0  # memory per accelerator, GiB
    intra_node_gbps: float = 450.0  # GB/s per rank to peers in the same node (NVLink)
    inter_node_gbps: float = 50.0  # GB/s per rank to other nodes (one 400 Gb/s NIC per GPU)
    peak_tflops: float = 989.0  # dense matmul peak per rank in the compute dtype, TFLOP/s
    mfu: float = 0.4  # fraction of peak the model's matmuls reach (compute-time estimate only)
    overhead_gib: float = 4.0  # fixed per-rank memory: runtime context, allocator fragmentation, workspaces

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "num_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClusterSpec.{name}={getattr(self, name)} must be >= 1")
        for name in ("memory_gib", "intra_node_gbps", "inter_node_gbps", "peak_tflops", "mfu"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClusterSpec.{name}={getattr(self, name)} must be > 0")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.num_nodes


def load_model_config(name_or_path: str) -> ModelConfig:
    """A preset from configs/model (`tiny`, `mixtral_8x7b`, ...) or a YAML path, merged over the typed schema."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS / "model" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"model={name_or_path!r}: no such preset or file ({path})")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def load_cluster(name_or_path: str | None = None, **overrides) -> ClusterSpec:
    """A cluster from automoe/planner/clusters (`h100x8`, `cpu2`) or a YAML path, then non-None keyword overrides."""
    values = {}
    if name_or_path is not None:
        path = Path(name_or_path)
        if not path.suffix:
            path = CLUSTERS / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"cluster={name_or_path!r}: no such preset or file ({path})")
        values = OmegaConf.to_container(
            OmegaConf.merge(OmegaConf.structured(ClusterSpec), OmegaConf.load(path))
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ClusterSpec(**values)
