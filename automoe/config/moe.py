"""`MoEConfig`: the one typed dataclass that drives an MoE layer (gate, experts, shared experts, losses)."""

from __future__ import annotations

import warnings
from dataclasses import MISSING, dataclass, fields
from typing import Optional

from automoe.config.checks import check_choice
from automoe.config.gates import GATES, gate_spec, gates_with

SCORE_FUNCS = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "geglu", "relu2", "gelu", "relu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
AUX_LOSS_TYPES = ("micro_batch", "sequence", "global")
BIAS_UPDATE_RULES = ("sign", "adaptive")
EXPERT_BACKENDS = ("auto", "loop", "grouped_mm", "bmm")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class MoEConfig:
    """Every knob of one MoE layer. Invalid combinations raise `ValueError` naming the field."""

    # --- shapes ---
    dim: int = 64  # model (hidden) width D the layer reads and writes
    moe_inter_dim: int = 128  # hidden width F of each routed expert's FFN
    num_experts: int = 8  # routed experts E
    num_activated_experts: int = 2  # experts per token K (top-k)
    num_shared_experts: int = 0  # always-on shared experts (fused into one MLP of width n*F_shared)
    shared_expert_inter_dim: Optional[int] = None  # F of one shared expert; None = moe_inter_dim
    shared_expert_gate: bool = False  # scale the shared output by sigmoid(x·w) (Qwen2-MoE style)

    # --- routing ---
    gate: str = "topk"  # topk | fake_balanced | noisy_topk | hybrid
    score_func: str = "softmax"  # softmax | sigmoid: turns router logits into scores
    softmax_before_topk: bool = True  # softmax, top-k (Qwen3, Mixtral+norm_topk_prob); False: GPT-OSS
    num_expert_groups: int = 1  # group-limited routing: experts split into this many groups (1 = off)
    num_limited_groups: int = 1  # groups a token may route to (DeepSeek-V3 topk_group)
    norm_topk_prob: bool = False  # renormalize the K selected weights to sum to 1
    route_scale: float = 1.0  # multiply routing weights by this (DeepSeek-V3 routed_scaling_factor)
    router_bias: bool = False  # learnable bias on the router logits (GPT-OSS)
    router_dtype: Optional[str] = "float32"  # dtype of router math; None = the input's dtype
    correction_bias: bool = (
        False  # keep an fp32 per-expert selection bias (DeepSeek-V3 e_score_correction_bias)
    )
    fake_gate_noise: float = 0.0  # fake_balanced gate: 0 = perfectly balanced, 1 = random experts and weights
    fake_gate_skip_first_n_experts: int = 0  # fake_balanced gate: never route to the first n experts
    train_gate: bool = True  # False freezes the router weights (and disables the bias update)

    # --- load balancing ---
    gate_bias_update_factor: float = 0.0  # gamma of the aux-loss-free bias update; >0 implies correction_bias
    bias_update_mean_center: bool = False  # subtract the mean of each bias update so biases stay centred
    bias_update_rule: str = "sign"  # sign: gamma*sign (DeepSeek-V3) | adaptive: per-expert step, Rprop-style
    bias_update_drift: float = 0.0  # kappa: biases also move by a velocity, kappa * sum of the past updates
    aux_loss_coeff: float = 0.0  # weight of the Switch/GShard balancing loss (noisy_topk: of its cv^2 loss)
    aux_loss_type: str = "micro_batch"  # micro_batch | sequence | global: where f_e and P_e are averaged
    z_loss_coeff: float = 0.0  # weight of the router z-loss mean_t(logsumexp(logits))^2

    # --- experts ---
    expert_activation: str = "swiglu"  # swiglu | geglu | relu2 | gelu | relu
    expert_bias: bool = False  # biases on the expert up/down projections (GPT-OSS)
    swiglu_limit: Optional[float] = (
        None  # clamp gate to <= limit and up to [-limit, limit] (GPT-OSS); None = off
    )
    swiglu_alpha: float = 1.0  # swiglu's gate is g * sigmoid(alpha * g): 1 = SiLU (GPT-OSS: 1.702)
    swiglu_up_shift: float = 0.0  # swiglu multiplies by (up + shift) (GPT-OSS: 1.0)
    expert_dropout: float = 0.0  # dropout on the expert hidden activation, training only
    capacity_factor: Optional[float] = (
        None  # None = dropless; else capacity = ceil(cf * T * K / E) slots per expert
    )
    experts_backend: str = "auto"  # auto | loop | grouped_mm | bmm: how local experts are computed
    dtype: str = "float32"  # parameter dtype of the layer

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived values ----
    @property
    def has_correction_bias(self) -> bool:
        return self.correction_bias or self.gate_bias_update_factor > 0

    @property
    def gated(self) -> bool:
        return self.expert_activation in GATED_ACTIVATIONS

    @property
    def shared_inter_dim(self) -> int:
        """Width of the fused shared-expert MLP (0 when there is none)."""
        per_expert = self.shared_expert_inter_dim or self.moe_inter_dim
        return self.num_shared_experts * per_expert

    def validate(self) -> None:
        check_choice("MoEConfig.gate", self.gate, GATES)
        check_choice("MoEConfig.score_func", self.score_func, SCORE_FUNCS)
        check_choice("MoEConfig.expert_activation", self.expert_activation, ACTIVATIONS)
        check_choice("MoEConfig.aux_loss_type", self.aux_loss_type, AUX_LOSS_TYPES)
        check_choice("MoEConfig.bias_update_rule", self.bias_update_rule, BIAS_UPDATE_RULES)
        check_choice("MoEConfig.experts_backend", self.experts_backend, EXPERT_BACKENDS)
        check_choice("MoEConfig.dtype", self.dtype, DTYPES)
        if self.router_dtype is not None:
            check_choice("MoEConfig.router_dtype", self.router_dtype, DTYPES)
        for name in ("dim", "moe_inter_dim", "num_experts", "num_activated_experts"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEConfig.{name}={getattr(self, name)} must be >= 1")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts={self.num_shared_experts} must be >= 0")
        E, K = self.num_experts, self.num_activated_experts
        if K > E:
            raise ValueError(f"MoEConfig.num_activated_experts={K} exceeds num_experts={E}")
        G, Gk = self.num_expert_groups, self.num_limited_groups
        if G < 1 or E % G:
            raise ValueError(f"MoEConfig.num_expert_groups={G} must be >= 1 and divide num_experts={E}")
        if not 1 <= Gk <= G:
            raise ValueError(f"MoEConfig.num_limited_groups={Gk} must be in [1, num_expert_groups={G}]")
        if G > 1 and Gk * (E // G) < K:
            raise ValueError(
                f"MoEConfig.num_activated_experts={K} exceeds the {Gk * (E // G)} experts in the "
                f"num_limited_groups={Gk} kept groups of {E // G}"
            )
        if G > 1 and self.has_correction_bias and E // G < 2:
            raise ValueError(
                f"MoEConfig.num_expert_groups={G}: group scores sum the top-2, need >= 2 experts per group"
            )
        if self.gate_bias_update_factor < 0:
            raise ValueError(f"MoEConfig.gate_bias_update_factor={self.gate_bias_update_factor} must be >= 0")
        if not 0 <= self.bias_update_drift < 1:
            raise ValueError(f"MoEConfig.bias_update_drift={self.bias_update_drift} must be in [0, 1)")
        if self.gate_bias_update_factor > 0 and not self.train_gate:
            raise ValueError(
                f"MoEConfig.gate_bias_update_factor={self.gate_bias_update_factor} > 0 with train_gate=False: "
                "a frozen gate is never updated"
            )
        if self.gate_bias_update_factor > 0 and not gate_spec(self.gate).selection_bias:
            raise ValueError(
                f"MoEConfig.gate_bias_update_factor > 0 needs a gate with a selection bias "
                f"({gates_with('selection_bias')}), got gate={self.gate!r}"
            )
        if not 0.0 <= self.fake_gate_noise <= 1.0:
            raise ValueError(f"MoEConfig.fake_gate_noise={self.fake_gate_noise} must be in [0, 1]")
        if not 0 <= self.fake_gate_skip_first_n_experts <= E - K:
            raise ValueError(
                f"MoEConfig.fake_gate_skip_first_n_experts={self.fake_gate_skip_first_n_experts} must leave at "
                f"least num_activated_experts={K} of num_experts={E}"
            )
        for name in ("aux_loss_coeff", "z_loss_coeff", "route_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"MoEConfig.expert_dropout={self.expert_dropout} must be in [0, 1)")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(
                f"MoEConfig.capacity_factor={self.capacity_factor} must be > 0 or None (dropless)"
            )
        if self.swiglu_limit is not None:
            if self.swiglu_limit <= 0:
                raise ValueError(f"MoEConfig.swiglu_limit={self.swiglu_limit} must be > 0 or None")
            if self.expert_activation != "swiglu":
                raise ValueError(
                    f"MoEConfig.swiglu_limit={self.swiglu_limit} needs expert_activation='swiglu', "
                    f"got {self.expert_activation!r}"
                )
        if self.swiglu_alpha <= 0:
            raise ValueError(f"MoEConfig.swiglu_alpha={self.swiglu_alpha} must be > 0")
        if (self.swiglu_alpha, self.swiglu_up_shift) != (1.0, 0.0) and self.expert_activation != "swiglu":
            raise ValueError(
                f"MoEConfig.swiglu_alpha={self.swiglu_alpha} / swiglu_up_shift={self.swiglu_up_shift} need "
                f"expert_activation='swiglu', got {self.expert_activation!r}"
            )
        if self.shared_expert_inter_dim is not None and self.shared_expert_inter_dim < 1:
            raise ValueError(f"MoEConfig.shared_expert_inter_dim={self.shared_expert_inter_dim} must be >= 1")
        self._warn_ineffective()

    def _idle_gate_settings(self) -> list[str]:
        """Set fields the chosen gate does not read, from what the registered gates declare."""
        spec = gate_spec(self.gate)
        idle = [
            name
            for name, used in (
                ("aux_loss_coeff", spec.uses_aux_loss_coeff),
                ("z_loss_coeff", spec.router_logits),
            )
            if getattr(self, name) > 0 and not used
        ]
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        others = {f for other in GATES.values() for f in other.own_fields if f not in spec.own_fields}
        return idle + [f for f in sorted(others) if getattr(self, f) != defaults[f]]

    def _warn_ineffective(self) -> None:
        def warn(msg: str) -> None:
            warnings.warn(f"MoEConfig: {msg}", UserWarning, stacklevel=4)

        if self.bias_update_rule != "sign" and self.gate_bias_update_factor == 0:
            warn(f"bias_update_rule={self.bias_update_rule!r} has no effect with gate_bias_update_factor=0")
        if self.bias_update_drift > 0 and self.gate_bias_update_factor == 0:
            warn(f"bias_update_drift={self.bias_update_drift} has no effect with gate_bias_update_factor=0")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            warn("shared_expert_gate=True has no effect with num_shared_experts=0")
        idle = self._idle_gate_settings()
        if idle:
            warn(
                f"{' / '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect with gate={self.gate!r}"
            )
        if self.score_func == "sigmoid" and not self.softmax_before_topk:
            warn("softmax_before_topk=False has no effect with score_func='sigmoid'")
