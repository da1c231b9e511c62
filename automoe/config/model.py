"""`ModelConfig`: the shape of the decoder-only transformer, with the `MoEConfig` of its MoE blocks nested.

Derived values are computed here, never duplicated in YAML: `moe.dim` and `moe.dtype` always follow `dim` and
`dtype`, and `head_dim=None` resolves to `dim // num_heads`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, fields
from typing import Optional

from automoe.config.checks import check_choice
from automoe.config.moe import DTYPES, MoEConfig

ATTENTIONS = ("gqa", "mla")  # grouped-query attention | DeepSeek multi-head latent attention
ROPE_SCALINGS = (None, "yarn")
QK_NORM_SCOPES = ("head", "projection")
_MOE_DIM_DEFAULT = next(f.default for f in fields(MoEConfig) if f.name == "dim")


@dataclass
class ModelConfig:
    """Every knob of the transformer. Invalid values raise `ValueError` naming the field and its value.

    Layer `i` has an MoE FFN iff `i >= num_dense_layers and i % moe_layer_freq == 0` (the DeepSeek
    `first_k_dense_replace` / `moe_layer_freq` convention) and `i not in dense_layers` (Qwen `mlp_only_layers`);
    every other layer has a dense SwiGLU FFN.
    `head_dim` is resolved once, in `__post_init__`: `dataclasses.replace(cfg, dim=...)` keeps the old value
    unless `head_dim=None` is passed as well.
    """

    # --- sizes ---
    vocab_size: int = 259  # token ids [0, vocab_size); embedding rows and output logits V
    dim: int = 128  # model (residual stream) width D; also sets moe.dim
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # query heads H
    num_kv_heads: int = 2  # key/value heads (GQA); must divide num_heads; = num_heads is plain MHA
    head_dim: Optional[int] = None  # width of one attention head; None = dim // num_heads (Qwen3: 128)
    ffn_inter_dim: int = 512  # hidden width of the dense SwiGLU FFN (dense layers only)

    # --- which blocks are MoE ---
    num_dense_layers: int = 1  # the first N blocks use a dense FFN (DeepSeek first_k_dense_replace)
    moe_layer_freq: int = 1  # after those, every n-th layer index (i % n == 0) is MoE, the rest dense
    dense_layers: list[int] = field(
        default_factory=list
    )  # further dense blocks by index (Qwen mlp_only_layers)

    # --- numerics ---
    norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    rope_theta: float = 10000.0  # RoPE base: larger = slower-rotating frequencies (longer context)
    max_seq_len: int = 256  # largest position + 1 the RoPE tables cover (positions index them directly)
    tie_embeddings: bool = False  # output head reuses the token-embedding matrix (one parameter)
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head before RoPE (Qwen3)
    qk_norm_scope: str = (
        "head"  # head: per head over head_dim (Qwen3) | projection: over all of q / k (OLMoE)
    )
    attention_bias: bool = False  # biases on the q/k/v/o projections (Llama/Qwen3 attention_bias)
    qkv_bias: bool = (
        False  # biases on q/k/v only, none on o (Qwen2 / Qwen2-MoE); exclusive with attention_bias
    )
    init_std: float = 0.02  # truncated-normal init std; o_proj and down projections: / sqrt(2 * num_layers)
    dtype: str = "float32"  # parameter dtype of every module (mixed precision is the parallel code's job)

    # --- attention choice; the MLA fields are used only with attention="mla" (DeepSeek-V2/V3), YaRN by both ---
    attention: str = "gqa"  # gqa (num_kv_heads, head_dim, qk_norm) | mla (the MLA fields below)
    q_lora_rank: Optional[int] = (
        None  # MLA: rank of the compressed query latent; None = full-rank q projection
    )
    kv_lora_rank: int = 512  # MLA: width of the compressed key/value latent (what a KV cache would hold)
    qk_nope_head_dim: int = 128  # MLA: per-head query/key width without position information
    qk_rope_head_dim: int = 64  # MLA: per-head query/key width that carries RoPE (the key part is shared)
    v_head_dim: int = 128  # MLA: per-head value width
    rope_interleave: bool = True  # MLA: RoPE rotates pairs (2i, 2i+1) (DeepSeek) instead of (i, i + D/2)
    rope_scaling: Optional[str] = None  # None | yarn: YaRN context extension of the RoPE frequencies
    yarn_factor: float = 1.0  # YaRN: context extension factor s (interpolate the low frequencies by 1/s)
    yarn_original_max_seq_len: int = 4096  # YaRN: context length of pre-training (sets the ramp's band)
    yarn_beta_fast: float = 32.0  # YaRN: rotations above which a frequency is kept (extrapolated)
    yarn_beta_slow: float = 1.0  # YaRN: rotations below which a frequency is fully interpolated
    yarn_mscale: float = 1.0  # YaRN: cos/sin gain is mscale(s, yarn_mscale) / mscale(s, yarn_mscale_all_dim)
    yarn_mscale_all_dim: float = 0.0  # YaRN: MLA softmax scale *= mscale(s, this)^2 (DeepSeek-V3: 1); 0 = off
    yarn_truncate: bool = True  # YaRN: round the ramp's band edges to whole dims (DeepSeek); False: GPT-OSS

    # --- GQA extras (GPT-OSS, GLM-4.5) ---
    rope_dim: Optional[int] = (
        None  # GQA: leading dims of a head that RoPE rotates; None = head_dim (GLM: A/2)
    )
    attention_sinks: bool = False  # GQA: a learned per-head logit joins every softmax denominator (GPT-OSS)
    sliding_window: Optional[int] = None  # GQA: keys a query sees, itself included, in sliding_window_layers
    sliding_window_layers: list[int] = field(
        default_factory=list
    )  # blocks that attend within sliding_window (GPT-OSS: the even ones); the rest attend to all

    # --- multi-token prediction (DeepSeek-V3) ---
    mtp_layers: int = 0  # MTP depths D after the main stack (DeepSeek-V3: 1); 0 = off
    mtp_loss_coeff: float = 0.3  # training loss += coeff / D * sum_k CE_k (DeepSeek-V3: 0.3, later 0.1)

    # --- MoE blocks ---
    moe: MoEConfig = field(default_factory=MoEConfig)  # the MoE FFN; its dim and dtype are derived from ours

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # plain YAML loaded without the structured schema
            self.moe = MoEConfig(**self.moe)
        if self.head_dim is None and self.num_heads > 0 and self.dim % self.num_heads == 0:
            self.head_dim = self.dim // self.num_heads
        self.validate()
        self.moe = self._derived_moe()

    # ---- derived values ----
    def is_moe_layer(self, layer_id: int) -> bool:
        """True when block `layer_id` has an MoE FFN."""
        return (
            layer_id >= self.num_dense_layers
            and layer_id % self.moe_layer_freq == 0
            and layer_id not in self.dense_layers
        )

    def window_of(self, layer_id: int) -> Optional[int]:
        """The sliding window of block `layer_id` (None: full causal attention)."""
        return self.sliding_window if layer_id in self.sliding_window_layers else None

    @property
    def rotary_width(self) -> int:
        """Width of the rotated part of each head: MLA qk_rope_head_dim, GQA rope_dim (default head_dim)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return self.rope_dim or self.head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def _derived_moe(self) -> MoEConfig:
        """A copy of `moe` whose dim and dtype follow the model's (the caller's object is never mutated)."""
        if self.moe.dim not in (self.dim, _MOE_DIM_DEFAULT):
            warnings.warn(
                f"ModelConfig: moe.dim={self.moe.dim} is ignored; it is derived from dim={self.dim}",
                UserWarning,
                stacklevel=3,
            )
        moe = copy.copy(self.moe)
        moe.dim, moe.dtype = self.dim, self.dtype
        return moe

    def validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be > 0")

        sizes = (
            "vocab_size",
            "dim",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "ffn_inter_dim",
            "max_seq_len",
        )
        for name in (*sizes, "moe_layer_freq", "norm_eps", "rope_theta", "init_std"):
            positive(name)
        check_choice("ModelConfig.dtype", self.dtype, DTYPES)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None:
            raise ValueError(
                f"ModelConfig.head_dim=None needs dim={self.dim} divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be positive and even (RoPE pairs)")
        self._validate_attention()
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ValueError(
                f"ModelConfig.num_dense_layers={self.num_dense_layers} must be in [0, num_layers={self.num_layers}]"
            )
        if self.mtp_layers < 0 or self.mtp_loss_coeff < 0:
            raise ValueError(
                f"ModelConfig.mtp_layers={self.mtp_layers} / mtp_loss_coeff={self.mtp_loss_coeff} must be >= 0"
            )
        if any(not 0 <= i < self.num_layers for i in self.dense_layers):
            raise ValueError(
                f"ModelConfig.dense_layers={list(self.dense_layers)} must index layers in [0, {self.num_layers})"
            )

    def _validate_attention(self) -> None:
        check_choice("ModelConfig.attention", self.attention, ATTENTIONS)
        check_choice("ModelConfig.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        check_choice("ModelConfig.qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES)
        if self.qkv_bias and (self.attention_bias or self.attention == "mla"):
            raise ValueError(
                "ModelConfig.qkv_bias=True (q/k/v biases only) needs attention='gqa' and attention_bias=False "
                f"(which already puts biases on q/k/v/o), got attention={self.attention!r}, "
                f"attention_bias={self.attention_bias}"
            )
        if self.rope_scaling == "yarn":
            for name in ("yarn_factor", "yarn_original_max_seq_len", "yarn_beta_fast", "yarn_beta_slow"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be > 0")
        self._validate_gqa_extras()
        if self.attention != "mla":
            return
        if self.qk_norm:
            raise ValueError("ModelConfig.qk_norm=True is not supported with attention='mla'")
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be > 0")
        if self.qk_nope_head_dim < 0:
            raise ValueError(f"ModelConfig.qk_nope_head_dim={self.qk_nope_head_dim} must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"ModelConfig.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE pairs)"
            )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"ModelConfig.q_lora_rank={self.q_lora_rank} must be > 0 or None (full rank)")

    def _validate_gqa_extras(self) -> None:
        """rope_dim, attention sinks and sliding windows: GQA only, in range."""
        if self.attention == "mla":
            for name in ("rope_dim", "sliding_window"):
                if getattr(self, name) is not None:
                    raise ValueError(f"ModelConfig.{name}={getattr(self, name)} needs attention='gqa'")
            if self.attention_sinks:
                raise ValueError("ModelConfig.attention_sinks=True needs attention='gqa'")
        if self.rope_dim is not None and not (0 < self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0):
            raise ValueError(
                f"ModelConfig.rope_dim={self.rope_dim} must be even and in (0, head_dim={self.head_dim}]"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window={self.sliding_window} must be >= 1 or None")
        if bool(self.sliding_window_layers) != (self.sliding_window is not None):
            raise ValueError(
                f"ModelConfig.sliding_window={self.sliding_window} and sliding_window_layers="
                f"{list(self.sliding_window_layers)} must be set together"
            )
        if any(not 0 <= i < self.num_layers for i in self.sliding_window_layers):
            raise ValueError(
                f"ModelConfig.sliding_window_layers={list(self.sliding_window_layers)} must index layers in "
                f"[0, {self.num_layers})"
            )
