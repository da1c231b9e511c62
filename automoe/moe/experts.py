"""Routed experts: grouped FFN weights for the local experts and the compute backends that run them.

Shape suffixes: docs/architecture.md#shape-legend (N rows sorted expert-major, E local experts).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe import init
from automoe.config.moe import MoEConfig
from automoe.moe import autotune
from automoe.moe.activations import FusedActivation, reference_activation
from automoe.moe.index import expert_offsets
from automoe.tensors import local_view, torch_dtype

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# ---------------------------------------------------------------------------------------------------------------
# GEMM engines: per-expert products over expert-major rows. `mm` gives y_e = x_e @ w_e for every expert e;
# `mm_weight` gives g_e = a_e^T @ b_e (a weight gradient), zeros for experts without rows.
# Shapes (in, out: the two widths of one GEMM): mm(x (N, in), w [E, in, out]) -> (N, out);
# mm_weight(a (N, in), b (N, out)) -> [E, in, out].
# ---------------------------------------------------------------------------------------------------------------
class _GroupedMMEngine:
    """torch grouped GEMM with int32 end offsets; no host sync."""

    def __init__(self, counts_E: Tensor) -> None:
        self.offs_E = expert_offsets(counts_E)

    def mm(self, x: Tensor, w: Tensor) -> Tensor:
        return _grouped_mm(x, w, offs=self.offs_E)

    def mm_weight(self, a: Tensor, b: Tensor) -> Tensor:
        return _grouped_mm(a.t(), b, offs=self.offs_E)


class _SplitEngine:
    """One torch.mm per expert written into slices of one output (no concatenation copy)."""

    def __init__(self, counts_E: Tensor) -> None:
        # NOTE: host sync: the per-expert row ranges are Python ints.
        ends = torch.cumsum(counts_E, dim=0).tolist()
        self.ranges = list(zip([0, *ends[:-1]], ends))

    def mm(self, x: Tensor, w: Tensor) -> Tensor:
        y = x.new_empty(x.shape[0], w.shape[-1])
        for e, (lo, hi) in enumerate(self.ranges):
            if hi > lo:
                torch.mm(x[lo:hi], w[e], out=y[lo:hi])
        return y

    def mm_weight(self, a: Tensor, b: Tensor) -> Tensor:
        g = a.new_empty(len(self.ranges), a.shape[-1], b.shape[-1])
        for e, (lo, hi) in enumerate(self.ranges):
            if hi > lo:
                torch.mm(a[lo:hi].t(), b[lo:hi], out=g[e])
            else:
                g[e].zero_()
        return g


class _PaddedEngine:
    """Pads every expert to the largest count (the capacity) and runs one bmm over [E, capacity, *]; padding
    rows are zeros. When every expert has the same count (balanced routing) the rows already are [E, capacity, *]
    and no padding copy is made. One batched GEMM per product: on a CPU whose cores are shared it avoids the
    per-expert thread barriers of the split engine (measured up to 3x on the 64-expert shape under load)."""

    def __init__(self, counts_E: Tensor) -> None:
        self.num_experts = counts_E.shape[0]
        # NOTE: host sync: the padded capacity is a Python int.
        counts = counts_E.tolist()
        self.capacity = max(counts, default=0)
        self.uniform = all(c == self.capacity for c in counts)
        if not self.uniform:
            starts_E = torch.cumsum(counts_E, dim=0) - counts_E
            expert_N = torch.repeat_interleave(
                torch.arange(self.num_experts, device=counts_E.device), counts_E
            )
            row_N = torch.arange(expert_N.shape[0], device=counts_E.device)
            self.slot_N = expert_N * self.capacity + (row_N - starts_E[expert_N])
        self._padded: list[tuple[Tensor, Tensor]] = []  # (rows, padded copy): backward pads dy and dh once

    def _pad(self, x: Tensor) -> Tensor:
        """(N, width) -> [E, capacity, width] (a view when the counts are uniform)."""
        if self.uniform:
            return x.reshape(self.num_experts, self.capacity, x.shape[-1])
        for rows, padded in self._padded:
            if rows is x:
                return padded
        padded = x.new_zeros(self.num_experts * self.capacity, x.shape[-1])
        padded = padded.index_copy_(0, self.slot_N, x).view(self.num_experts, self.capacity, x.shape[-1])
        self._padded.append((x, padded))
        return padded

    def release(self) -> None:
        """Drop the padded copies (end of forward and of backward: nothing padded outlives its pass)."""
        self._padded.clear()

    def mm(self, x: Tensor, w: Tensor) -> Tensor:
        y_padded = torch.bmm(self._pad(x), w)  # [E, capacity, out]
        if self.uniform:
            return y_padded.view(-1, w.shape[-1])
        return y_padded.view(-1, w.shape[-1]).index_select(0, self.slot_N)

    def mm_weight(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.bmm(self._pad(a).transpose(1, 2), self._pad(b))


class _TransposedWeights:
    """An engine whose forward-direction products read each weight in the other memory layout ([E, out, in]
    contiguous, used transposed): CPU GEMM kernels differ by operand layout (up to 1.6x measured), so the
    autotuner tries both. Costs one weight-sized copy per product; weight gradients are unchanged."""

    def __init__(self, base) -> None:
        self.base = base

    def mm(self, x: Tensor, w: Tensor) -> Tensor:
        return self.base.mm(x, w.transpose(1, 2).contiguous().transpose(1, 2))

    def mm_weight(self, a: Tensor, b: Tensor) -> Tensor:
        return self.base.mm_weight(a, b)

    def release(self) -> None:
        getattr(self.base, "release", lambda: None)()


_ENGINES = {
    "grouped_mm": _GroupedMMEngine,
    "split": _SplitEngine,
    "bmm": _PaddedEngine,
    "grouped_mm_t": lambda counts_E: _TransposedWeights(_GroupedMMEngine(counts_E)),
    "split_t": lambda counts_E: _TransposedWeights(_SplitEngine(counts_E)),
    "bmm_t": lambda counts_E: _TransposedWeights(_PaddedEngine(counts_E)),
}
# multiply-adds of one up projection (N * D * U) below which `auto` does not time engines
TUNE_MIN_WORK = 2**26
# CPU, equal counts per expert: `auto` takes bmm when its timed FFN is within this fraction of the fastest (_tuned)
PREFER_BMM_WITHIN = 0.05


@functools.cache
def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs here (probed once per device type and dtype on a tiny problem)."""
    if _grouped_mm is None:
        return False
    try:
        x = torch.zeros(8, 16, device=device_type, dtype=dtype)
        w = torch.zeros(2, 16, 16, device=device_type, dtype=dtype)
        offs = torch.tensor([4, 8], device=device_type, dtype=torch.int32)
        _grouped_mm(x, w, offs=offs)
        _grouped_mm(x.t(), x, offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _tunable(x_ND: Tensor, w_up: Tensor) -> bool:
    """Whether `auto` may time engines: eager, not in deterministic mode (a choice that could differ between runs
    would change the rounding), and a problem large enough for the timing to mean something."""
    return (
        not torch.compiler.is_compiling()
        and not torch.are_deterministic_algorithms_enabled()
        and x_ND.shape[0] * w_up.shape[1] * w_up.shape[2] >= TUNE_MIN_WORK
    )


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *, dim: int, hidden: int) -> bool:
    """torch grouped GEMM needs the kernel for (device, dtype) and every row stride a multiple of 16 bytes."""
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        # Traced, the op runs its fake (meta) kernel, which takes only bf16 (fp32 fails at compile time, though
        # CPU eager runs it); the probe below would be traced too. fp32 under torch.compile: one GEMM per expert.
        return False
    align = 16 // torch.empty((), dtype=dtype).element_size()
    return dim % align == 0 and hidden % align == 0 and _grouped_mm_runs(device.type, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Fused expert FFN: one autograd node that saves only x_ND and the pre-activation h_NU.
# ---------------------------------------------------------------------------------------------------------------
def _rows_expert(counts_E: Tensor, num_rows: int) -> Tensor:
    """Local expert index of every row, int64 [N]."""
    return torch.repeat_interleave(
        torch.arange(counts_E.shape[0], device=counts_E.device), counts_E, output_size=num_rows
    )


def _dropout(a_NF: Tensor, keep_NF: Tensor | None, p: float) -> Tensor:
    return a_NF if keep_NF is None else a_NF.mul_(keep_NF).mul_(1.0 / (1.0 - p))


class _ExpertFFN(torch.autograd.Function):
    """y_ND = (drop(act(x_ND @ w_up[e] + b_up[e])) @ w_down[e] + b_down[e]) for the expert e that owns each row."""

    @staticmethod
    def forward(ctx, x_ND, counts_E, w_up_EDU, w_down_EFD, b_up_EU, b_down_ED, keep_NF, engine_name, act, p):
        engine = _ENGINES[engine_name](counts_E)
        expert_N = _rows_expert(counts_E, x_ND.shape[0]) if b_up_EU is not None else None
        h_NU = engine.mm(x_ND, w_up_EDU)
        if b_up_EU is not None:
            h_NU += b_up_EU.index_select(0, expert_N)
        a_NF = _dropout(act.forward(h_NU), keep_NF, p)
        y_ND = engine.mm(a_NF, w_down_EFD)
        if b_down_ED is not None:
            y_ND += b_down_ED.index_select(0, expert_N)
        ctx.save_for_backward(x_ND, h_NU, w_up_EDU, w_down_EFD, keep_NF, expert_N)
        getattr(engine, "release", lambda: None)()
        ctx.engine, ctx.act, ctx.p = engine, act, p
        ctx.has_bias = (b_up_EU is not None, b_down_ED is not None)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, h_NU, w_up_EDU, w_down_EFD, keep_NF, expert_N = ctx.saved_tensors
        engine, (has_b_up, has_b_down) = ctx.engine, ctx.has_bias
        num_experts = w_up_EDU.shape[0]
        dy_ND = dy_ND.contiguous()
        da_NF = engine.mm(dy_ND, w_down_EFD.transpose(1, 2))
        da_NF = _dropout(da_NF, keep_NF, ctx.p)
        dh_NU, a_NF = ctx.act.backward(h_NU, da_NF)
        del da_NF
        need = ctx.needs_input_grad
        d_w_down = engine.mm_weight(_dropout(a_NF, keep_NF, ctx.p), dy_ND) if need[3] else None
        del a_NF
        getattr(engine, "release", lambda: None)()  # padded dy and a are not needed again
        d_w_up = engine.mm_weight(x_ND, dh_NU) if need[2] else None
        dx_ND = engine.mm(dh_NU, w_up_EDU.transpose(1, 2)) if need[0] else None
        d_b_up = d_b_down = None
        if has_b_up:
            d_b_up = dh_NU.new_zeros(num_experts, dh_NU.shape[-1]).index_add_(0, expert_N, dh_NU)
        if has_b_down:
            d_b_down = dy_ND.new_zeros(num_experts, dy_ND.shape[-1]).index_add_(0, expert_N, dy_ND)
        getattr(engine, "release", lambda: None)()
        return dx_ND, None, d_w_up, d_w_down, d_b_up, d_b_down, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------------
class GroupedExperts(nn.Module):
    """E routed experts with stacked weights. `forward(x_ND, counts_E) -> y_ND`.

    Parameters: `w_up` [E, D, U] (gated activations: first F columns gate, last F up), `w_down` [E, F, D],
    and with `cfg.expert_bias` also `b_up` [E, U], `b_down` [E, D]. Under expert parallelism the parameters
    may be DTensors sharded on dim 0; forward computes on the local shard.

    Backends (`cfg.experts_backend`): `loop` (one expert at a time with plain autograd ops: the oracle),
    `grouped_mm` (torch grouped GEMM), `bmm` (pad every expert to the largest count, one batched GEMM) and
    `auto` (grouped_mm where it runs for the device, dtype and shapes, else one GEMM per expert). All but
    `loop` share one fused autograd node that saves only x_ND and the pre-activation for backward.
    """

    def __init__(self, cfg: MoEConfig, *, num_experts: int | None = None) -> None:
        super().__init__()
        E = cfg.num_experts if num_experts is None else num_experts
        if E < 0:
            raise ValueError(f"GroupedExperts num_experts={E} must be >= 0")
        D, Fd = cfg.dim, cfg.moe_inter_dim
        U = 2 * Fd if cfg.gated else Fd
        dtype = torch_dtype(cfg.dtype)
        self.num_experts, self.dim, self.inter_dim = E, D, Fd
        self.backend = cfg.experts_backend
        self.activation = cfg.expert_activation
        self.swiglu_limit = cfg.swiglu_limit
        self.dropout = cfg.expert_dropout
        self.w_up = nn.Parameter(torch.empty(E, D, U, dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(E, Fd, D, dtype=dtype))
        if cfg.expert_bias:
            self.b_up = nn.Parameter(torch.empty(E, U, dtype=dtype))
            self.b_down = nn.Parameter(torch.empty(E, D, dtype=dtype))
        else:
            self.register_parameter("b_up", None)
            self.register_parameter("b_down", None)
        self._fused_act = FusedActivation(
            cfg.expert_activation, cfg.swiglu_limit, cfg.swiglu_alpha, cfg.swiglu_up_shift
        )

    def init_weights(self, *, std: float = 0.02, out_std: float | None = None) -> None:
        """Truncated normal (±3 std) up weights, `out_std` (default `std`) down weights, zero biases."""
        out_std = std if out_std is None else out_std
        # layout-invariant: the full [E, ...] tensor is drawn, each EP rank keeps its experts' slice
        init.trunc_normal_(self.w_up, std=std)
        init.trunc_normal_(self.w_down, std=out_std)
        for b in (self.b_up, self.b_down):
            if b is not None:
                init.zeros_(b)

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """x_ND: rows sorted expert-major (the first counts_E[0] rows go to local expert 0, ...);
        counts_E: int64 [E_local] on x's device with sum N. Returns y_ND in the same row order."""
        w_up, w_down, b_up, b_down = (local_view(w) for w in (self.w_up, self.w_down, self.b_up, self.b_down))
        if counts_E.shape[0] != w_up.shape[0]:
            raise ValueError(f"counts_E has {counts_E.shape[0]} entries for {w_up.shape[0]} local experts")
        if w_up.shape[0] == 0:  # an EP rank that owns no experts receives no rows
            return x_ND * 0
        keep_NF = None
        if self.training and self.dropout > 0:
            keep_NF = torch.rand(x_ND.shape[0], self.inter_dim, device=x_ND.device) >= self.dropout
        engine = self._engine(x_ND, counts_E, w_up, w_down)
        if engine == "loop":
            return self._loop(x_ND, counts_E, w_up, w_down, b_up, b_down, keep_NF)
        return _ExpertFFN.apply(
            x_ND, counts_E, w_up, w_down, b_up, b_down, keep_NF, engine, self._fused_act, self.dropout
        )

    def _engine(self, x_ND: Tensor, counts_E: Tensor, w_up: Tensor, w_down: Tensor) -> str:
        """The GEMM engine for this call: loop | bmm | one of `_ENGINES` (auto: the autotuner's choice)."""
        if self.backend in ("loop", "bmm"):
            return self.backend
        if (
            self.backend == "auto"
            and x_ND.device.type == "cuda"
            and torch.are_deterministic_algorithms_enabled()
        ):
            return "split"  # train.deterministic: cuBLAS GEMMs repeat bit for bit; torch does not say grouped GEMM does
        ok = grouped_mm_supported(x_ND.device, x_ND.dtype, dim=self.dim, hidden=self.inter_dim)
        if self.backend == "grouped_mm" and not ok:
            raise ValueError(
                f"MoEConfig.experts_backend='grouped_mm' does not run for device={x_ND.device.type}, "
                f"dtype={x_ND.dtype}, dim={self.dim}, moe_inter_dim={self.inter_dim} (torch grouped GEMM needs "
                "its kernel for that device/dtype and row strides that are multiples of 16 bytes); use 'auto'"
            )
        if self.backend == "auto" and _tunable(x_ND, w_up):
            return self._tuned(x_ND, counts_E, w_up, w_down, grouped=ok)
        return "grouped_mm" if ok else "split"

    def _tuned(self, x_ND: Tensor, counts_E: Tensor, w_up: Tensor, w_down: Tensor, *, grouped: bool) -> str:
        """The fastest engine measured for this (device, dtype, shape bucket): timed once per process on this
        call's rows (fwd + bwd, no biases or dropout), then cached (`automoe.moe.autotune`)."""
        E, D, U = w_up.shape
        rows_per_expert = max(x_ND.shape[0] // max(E, 1), 1)
        key = (
            "experts", x_ND.device.type, str(x_ND.dtype), E, D, U, self.activation,
            rows_per_expert.bit_length(),  # bucket: mean rows per expert within a factor of 2
        )  # fmt: skip
        names = ["grouped_mm", "grouped_mm_t", "split", "split_t"] if grouped else ["split", "split_t"]
        prefer_within = 0.0
        if x_ND.device.type == "cpu":  # padded bmm: its cost grows with the padding, so the key records it
            # NOTE: host sync (CPU only, where it is free): the largest count sets the padded work.
            padded = int(counts_E.max()) * E / max(x_ND.shape[0], 1)
            key = (*key, "pad", 0 if padded <= 1.0 else 1 + int(4 * math.log2(padded)))
            # Equal counts: bmm runs copy-free, one OpenMP region per product where the others run E. Timed on the
            # FFN alone it ties them within 5%; in the layer it did better (bench_moe_layer, default shape bf16:
            # eff 0.76-0.85 in three runs that picked it, 0.73-0.75 in two that picked split or grouped_mm), so it
            # is listed first and taken whenever it is within 5% of the fastest.
            names = ["bmm", "bmm_t", *names] if padded <= 1.0 else [*names, "bmm", "bmm_t"]
            prefer_within = PREFER_BMM_WITHIN if padded <= 1.0 else 0.0
        # activation-checkpoint recompute runs inside backward: never time there
        if torch._C._current_graph_task_id() != -1:
            return autotune.cached(key) or names[0]

        def run(name: str) -> None:
            with torch.enable_grad():
                x, wu, wd = (t.detach().requires_grad_() for t in (x_ND, w_up, w_down))
                y = _ExpertFFN.apply(x, counts_E, wu, wd, None, None, None, name, self._fused_act, 0.0)
                torch.autograd.grad(y, (x, wu, wd), y)

        return autotune.choose(key, names, run, prefer_within=prefer_within)

    def _loop(self, x_ND, counts_E, w_up, w_down, b_up, b_down, keep_NF) -> Tensor:
        """The oracle: one expert at a time, plain differentiable ops."""
        # NOTE: host sync: split sizes are Python ints.
        rows = torch.split(x_ND, counts_E.tolist())
        keeps = torch.split(keep_NF, counts_E.tolist()) if keep_NF is not None else [None] * len(rows)
        outs = []
        for e, (x_nD, keep_nF) in enumerate(zip(rows, keeps)):
            h = x_nD @ w_up[e]
            if b_up is not None:
                h = h + b_up[e]
            act = self._fused_act
            a = reference_activation(
                h, name=act.name, limit=act.limit, alpha=act.alpha, up_shift=act.up_shift
            )
            if keep_nF is not None:
                a = a * keep_nF / (1.0 - self.dropout)
            y = a @ w_down[e]
            if b_down is not None:
                y = y + b_down[e]
            outs.append(y)
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, inter_dim={self.inter_dim}, "
            f"activation={self.activation}, backend={self.backend}"
        )
