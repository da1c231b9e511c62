"""`ParallelDims`: the parallel degrees, their validation, and the dense and expert device meshes.

This is the only place that spells mesh axis names. Pipeline parallelism is the outermost axis of both meshes and
tensor parallelism the innermost of the dense one; inside a stage, expert parallelism borrows ranks from
dp_shard x cp x tp: dense mesh = (pp, dp_replicate, dp_shard, cp, tp), expert mesh = (pp, dp_replicate, ep_shard,
ep) over the same world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from automoe.config.checks import check_experts_split

# Axes of the dense mesh (pp, dp_replicate, dp_shard, cp, tp) and of the expert mesh (pp, dp_replicate, ep_shard, ep) ...
PP = "pp"
DP_REPLICATE, DP_SHARD, CP, TP = "dp_replicate", "dp_shard", "cp", "tp"
EP_SHARD, EP = "ep_shard", "ep"
# ... and the flattened axes built from them (each is also its key in `ParallelDims._meshes`)
DP = "dp"  # flattened (dp_replicate, dp_shard): ranks that hold different sequences
DENSE_DATA = "dp_shard_cp"  # flattened (dp_shard, cp): where dense parameters are sharded
DENSE_ALL = "dp_cp_tp"  # flattened (dp_replicate, dp_shard, cp, tp): every rank of this pipeline stage
DENSE_REPLICAS = "dp_cp"  # flattened (dp_replicate, dp_shard, cp): ranks holding the same tp shard
SEQUENCE = "cp_tp"  # flattened (cp, tp): ranks holding pieces of the same sequences
EXPERT_DATA = "expert_data"  # flattened (dp_replicate, ep_shard): ranks that hold the same experts
_DENSE, _EXPERTS = "dense", "experts"  # keys of the two 3-D meshes


@dataclass
class ParallelDims:
    """Degrees of each parallelism for `world_size` ranks. `dp_shard=-1` infers it from the others."""

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    ep: int = 1
    pp: int = 1
    tp: int = 1
    num_experts: int | None = None  # when given, `num_experts % ep` is validated too
    _meshes: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("world_size", "dp_replicate", "cp", "ep", "pp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        pp_names, pp_values = ("pp*", f"{self.pp}*") if self.pp > 1 else ("", "")
        tp_names, tp_values = ("*tp", f"*{self.tp}") if self.tp > 1 else ("", "")
        if self.dp_shard == -1:
            rest = self.pp * self.dp_replicate * self.cp * self.tp
            if self.world_size % rest:
                raise ValueError(
                    f"world size {self.world_size} is not divisible by {pp_names}dp_replicate*cp{tp_names} = "
                    f"{pp_values}{self.dp_replicate}*{self.cp}{tp_values} = {rest}, so dp_shard cannot be inferred"
                )
            self.dp_shard = self.world_size // rest
        if self.dp_shard < 1:
            raise ValueError(f"parallel.dp_shard={self.dp_shard} must be >= 1 or -1 (inferred)")
        product = self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            raise ValueError(
                f"{pp_names}dp_replicate*dp_shard*cp{tp_names} = {pp_values}{self.dp_replicate}*{self.dp_shard}*"
                f"{self.cp}{tp_values} = {product} does not match the world size {self.world_size}"
            )
        borrowed = self.dp_shard * self.cp * self.tp
        if borrowed % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} must divide dp_shard*cp{tp_names} = {self.dp_shard}*{self.cp}{tp_values} = "
                f"{borrowed} (expert parallelism borrows those ranks)"
            )
        if self.ep > 1 and self.ep % self.tp:
            raise ValueError(
                f"parallel.ep={self.ep} must be 1 or a multiple of parallel.tp={self.tp}: experts are not "
                "tensor-parallel, so each expert-parallel group holds whole tensor-parallel groups"
            )
        if self.num_experts is not None:
            check_experts_split(self.num_experts, self.ep)

    # ---- derived degrees ----
    @property
    def ep_shard(self) -> int:
        return self.dp_shard * self.cp * self.tp // self.ep

    @property
    def data_parallel(self) -> int:
        """Ranks that see different sequences (CP ranks share one)."""
        return self.dp_replicate * self.dp_shard

    @property
    def stage_size(self) -> int:
        """Ranks inside one pipeline stage (every rank when pp=1): gradients and statistics reduce over them."""
        return self.world_size // self.pp

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    # ---- meshes ----
    @cached_property
    def device_type(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def build_meshes(self) -> None:
        """Create the dense and expert meshes (collective: call on every rank)."""
        dense = init_device_mesh(
            self.device_type,
            (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp),
            mesh_dim_names=(PP, DP_REPLICATE, DP_SHARD, CP, TP),
        )
        experts = init_device_mesh(
            self.device_type,
            (self.pp, self.dp_replicate, self.ep_shard, self.ep),
            mesh_dim_names=(PP, DP_REPLICATE, EP_SHARD, EP),
        )
        self._meshes = {
            _DENSE: dense,
            _EXPERTS: experts,
            DENSE_DATA: dense[DP_SHARD, CP]._flatten(DENSE_DATA),
            DENSE_ALL: dense[DP_REPLICATE, DP_SHARD, CP, TP]._flatten(DENSE_ALL),
            DENSE_REPLICAS: dense[DP_REPLICATE, DP_SHARD, CP]._flatten(DENSE_REPLICAS),
            SEQUENCE: dense[CP, TP]._flatten(SEQUENCE),
            DP: dense[DP_REPLICATE, DP_SHARD]._flatten(DP),
            EXPERT_DATA: experts[DP_REPLICATE, EP_SHARD]._flatten(EXPERT_DATA),
        }

    def _mesh(self, key: str) -> DeviceMesh:
        if not self._meshes:
            raise RuntimeError("ParallelDims.build_meshes() must run before meshes are used")
        return self._meshes[key]

    @property
    def dense_mesh(self) -> DeviceMesh:
        return self._mesh(_DENSE)

    @property
    def expert_mesh(self) -> DeviceMesh:
        return self._mesh(_EXPERTS)

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self._mesh(_EXPERTS)[EP]

    @property
    def pp_mesh(self) -> DeviceMesh:
        """The ranks holding the other stages of this rank's pipeline (same coordinates on every other axis)."""
        return self._mesh(_DENSE)[PP]

    def pp_coordinate(self) -> tuple[int, int]:
        """(rank, size) of this process along the pipeline axis."""
        if self.world_size == 1:
            return 0, 1
        return self.pp_mesh.get_local_rank(), self.pp

    @property
    def cp_mesh(self) -> DeviceMesh:
        return self._mesh(_DENSE)[CP]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self._mesh(_DENSE)[TP]

    @property
    def sequence_mesh(self) -> DeviceMesh:
        """(cp x tp) flattened: the ranks that hold pieces of the same sequences (one sequence for the MoE
        statistics: under tp each rank routes its own slice of the sequence)."""
        return self._mesh(SEQUENCE)

    @property
    def dense_replica_mesh(self) -> DeviceMesh:
        """(dp_replicate x dp_shard x cp) flattened: the ranks holding the same tensor-parallel shard."""
        return self._mesh(DENSE_REPLICAS)

    @property
    def dp_mesh(self) -> DeviceMesh:
        """(dp_replicate x dp_shard) flattened: ranks holding different sequences; used to shard the data."""
        return self._mesh(DP)

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """2-D (dp_replicate, dp_shard x cp) mesh for dense parameters (HSDP when dp_replicate > 1)."""
        if self.dp_replicate == 1:
            return self._mesh(DENSE_DATA)
        return self._mesh(_DENSE)[DP_REPLICATE, DENSE_DATA]

    @property
    def expert_fsdp_mesh(self) -> DeviceMesh:
        """(dp_replicate, ep_shard) of the expert mesh: where expert parameters are sharded / replicated."""
        experts = self._mesh(_EXPERTS)
        return experts[EP_SHARD] if self.dp_replicate == 1 else experts[DP_REPLICATE, EP_SHARD]

    @property
    def all_data_mesh(self) -> DeviceMesh:
        """Every rank of this pipeline stage (dp_replicate x dp_shard x cp x tp) flattened: sums of per-step
        statistics and gradient averages (the whole world when pp=1)."""
        return self._mesh(DENSE_ALL)

    def dp_coordinate(self) -> tuple[int, int]:
        """(rank, size) of this process among the ranks that see different sequences."""
        if self.world_size == 1:
            return 0, 1
        mesh = self._mesh(DP)
        return mesh.get_local_rank(), mesh.size()

    def describe(self) -> str:
        return (
            f"world={self.world_size} pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} "
            f"cp={self.cp} tp={self.tp} ep={self.ep} ep_shard={self.ep_shard}"
        )
