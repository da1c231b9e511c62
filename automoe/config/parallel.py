"""`ParallelConfig`: the parallel layout and the memory/speed knobs applied by `automoe.parallel.parallelize`."""

from __future__ import annotations

from dataclasses import dataclass

from automoe.config.checks import check_choice

AC_MODES = ("none", "full", "moe")
PARAM_DTYPES = ("float32", "bfloat16")
PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "GPipe")  # torch.distributed.pipelining schedules
PP_MULTI_STAGE_SCHEDULES = ("Interleaved1F1B",)  # the ones that run more than one stage per rank


@dataclass
class ParallelConfig:
    """Degrees of each parallelism; their product (with dp_shard inferred) must equal the world size."""

    dp_replicate: int = 1  # replicas of the whole model (HSDP outer axis); 1 = pure sharding
    dp_shard: int = -1  # ranks dense parameters are sharded over; -1 = world / (dp_replicate * cp)
    cp: int = 1  # context-parallel ranks splitting each sequence (attention all-gathers K/V over them)
    ep: int = 1  # expert-parallel ranks (borrowed from dp_shard*cp*tp); divides num_experts; 1 or k*tp
    tp: int = 1  # tensor-parallel ranks (innermost axis): heads, dense MLP, embedding, head sharded
    pp: int = 1  # pipeline stages over ranks (outermost axis); pp * pp_virtual_stages stages of blocks
    pp_schedule: str = "1F1B"  # 1F1B | Interleaved1F1B | GPipe (torch.distributed.pipelining schedules)
    pp_virtual_stages: int = 1  # stages per pipeline rank; > 1 needs pp_schedule=Interleaved1F1B
    pp_layers_per_stage: list[int] | None = None  # blocks per stage in order; null = even split by parameters
    fsdp: bool = True  # shard dense params over dp_shard*cp and expert params over ep_shard with FSDP2
    fsdp_param_dtype: str = "float32"  # FSDP2 mixed precision: dtype params are gathered and computed in
    activation_checkpointing: str = "none"  # none | full (every block) | moe (only the MoE FFNs)
    compile: bool = False  # torch.compile each block (first step pays the compile time)
    cp_load_balance: bool = True  # zigzag chunks (rank r holds chunks r and 2cp-1-r) so causal work is even
    collective_timeout_s: float = 300.0  # process-group timeout: a dead peer fails the job after this long

    def __post_init__(self) -> None:
        check_choice("parallel.activation_checkpointing", self.activation_checkpointing, AC_MODES)
        check_choice("parallel.fsdp_param_dtype", self.fsdp_param_dtype, PARAM_DTYPES)
        check_choice("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        for name in ("pp", "pp_virtual_stages", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.pp_virtual_stages > 1 and self.pp_schedule not in PP_MULTI_STAGE_SCHEDULES:
            raise ValueError(
                f"parallel.pp_virtual_stages={self.pp_virtual_stages} needs a schedule that runs several stages "
                f"per rank ({' | '.join(PP_MULTI_STAGE_SCHEDULES)}), not parallel.pp_schedule={self.pp_schedule}"
            )
        if self.compile and self.tp > 1:  # measured: the backward crosses compiled blocks with plain tensors
            raise ValueError(
                f"parallel.compile=true with parallel.tp={self.tp} is not supported yet; use one of them"
            )
        if self.collective_timeout_s <= 0:
            raise ValueError(f"parallel.collective_timeout_s={self.collective_timeout_s} must be > 0")
