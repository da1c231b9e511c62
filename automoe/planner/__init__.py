"""Layout planner: per-rank memory and per-step communication of (dp_replicate, dp_shard, cp, ep) layouts.

Pure arithmetic over a model config, a training shape and a cluster description; nothing is allocated (the model
is built on the meta device to read parameter shapes) and no process group is touched. Formulas: docs/planning.md.
"""

from automoe.planner.comm import (
    a2a_bytes_per_pair,
    a2a_rows,
    comm_per_step,
    expected_distinct_ranks,
    micro_batches_per_step,
)
from automoe.planner.inputs import (
    AC_MODES,
    DTYPE_BYTES,
    GIB,
    OPTIMIZER_STATE_BYTES,
    STEP_BYTES,
    ClusterSpec,
    TrainingShape,
    load_cluster,
    load_model_config,
)
from automoe.planner.memory import (
    Layout,
    ParamSpec,
    activation_bytes,
    attention_bytes_per_token,
    ffn_bytes_per_token,
    fsdp_unit_numel,
    kv_width,
    local_param_numel,
    param_counts,
    param_inventory,
    shard_numel,
    state_bytes,
)
from automoe.planner.plan import (
    SORT_KEYS,
    Plan,
    candidate_layouts,
    compute_seconds,
    format_table,
    launch_command,
    launch_overrides,
    memory_per_rank,
    plan,
    plan_layout,
)

__all__ = [
    "AC_MODES",
    "ClusterSpec",
    "DTYPE_BYTES",
    "GIB",
    "Layout",
    "OPTIMIZER_STATE_BYTES",
    "ParamSpec",
    "Plan",
    "SORT_KEYS",
    "STEP_BYTES",
    "TrainingShape",
    "a2a_bytes_per_pair",
    "a2a_rows",
    "activation_bytes",
    "attention_bytes_per_token",
    "candidate_layouts",
    "comm_per_step",
    "compute_seconds",
    "expected_distinct_ranks",
    "ffn_bytes_per_token",
    "format_table",
    "launch_command",
    "launch_overrides",
    "fsdp_unit_numel",
    "kv_width",
    "load_cluster",
    "load_model_config",
    "local_param_numel",
    "memory_per_rank",
    "micro_batches_per_step",
    "param_counts",
    "param_inventory",
    "plan",
    "plan_layout",
    "shard_numel",
    "state_bytes",
]
