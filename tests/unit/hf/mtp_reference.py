"""Multi-token prediction written from the DeepSeek-V3 report (arXiv 2412.19437, §2.2, eqs. 21-25) in plain torch
over an HF checkpoint's tensors, to check `automoe/models/mtp.py` against something that shares none of its code;
and the writer of tiny checkpoints with MTP layers in the published layout (DeepSeek-V3, GLM-4.5).

The report, for depth k = 1..D and main position i (0-based here: inputs t_0..t_{S-1}, labels y_i = t_{i+1}):
    h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]             (21)
    h^k_{0:S-k} = TRM_k(h'^k_{0:S-k})                                     (22)  causal over the S - k positions
    P^k_i = OutHead(h^k_i), a distribution over t_{i+k+1} = y_{i+k}       (23)
    L_MTP = lambda / D * sum_k -1/S sum_{i < S-k} log P^k_i[y_{i+k}]      (24, 25)  divided by S, not S - k
Two facts the report leaves to the checkpoint: (a) M_k is `eh_proj` [D, 2D] whose first D input columns act on the
embedding (`enorm`) and the last D on the hidden state (`hnorm`), the reverse of (21)'s notation, as the published
DeepSeek-V3 and GLM-4.5 tensors are laid out (vLLM and transformers read them so); (b) OutHead is the shared linear
head, read after a per-depth RMSNorm (`shared_head.norm`), just as the main model's head reads its final norm's output;
h^0 is that normalized main representation, so h^k is the depth's normalized output (only D > 1 sees the choice).
TRM_k is handed in as a callable (the tests use transformers' decoder layer class holding the checkpoint's block).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def paper_mtp_logits(
    *,
    h0_BSD: Tensor,
    tokens_BS: Tensor,
    tensors: dict[str, Tensor],
    blocks: list[Callable[[Tensor, Tensor], Tensor]],
    num_layers: int,
    eps: float,
) -> list[Tensor]:
    """[logits of depth k, (B, S - k, V)] for k = 1..D by (21)-(23). `tensors`: the HF checkpoint's state dict (main
    `model.embed_tokens.weight`, `lm_head.weight`; depth k's `model.layers.{num_layers + k - 1}.{enorm, hnorm, eh_proj,
    shared_head.norm}.weight`); `blocks[k - 1](x_BSD, positions_BS)` is TRM_k; `h0_BSD` the main model's final
    normalized hidden state."""
    S = tokens_BS.shape[1]
    D = h0_BSD.shape[-1]
    emb, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    positions_BS = torch.arange(S).expand_as(tokens_BS)
    h_BSD, out = h0_BSD, []
    for k, block in enumerate(blocks, start=1):
        p = f"model.layers.{num_layers + k - 1}."
        M = tensors[p + "eh_proj.weight"]
        M_emb, M_hidden = M[:, :D], M[:, D:]
        e_BSD = rms_norm(F.embedding(tokens_BS[:, k:], emb), tensors[p + "enorm.weight"], eps)
        h_BSD = rms_norm(h_BSD[:, : S - k], tensors[p + "hnorm.weight"], eps)
        x_BSD = h_BSD @ M_hidden.T + e_BSD @ M_emb.T  # (21)
        y_BSD = block(x_BSD, positions_BS[:, k:])  # (22)
        h_BSD = rms_norm(y_BSD, tensors[p + "shared_head.norm.weight"], eps)
        out.append(h_BSD @ head.T)  # (23), before the softmax
    return out


def paper_mtp_loss(logits: list[Tensor], labels_BS: Tensor, *, coeff: float) -> Tensor:
    """(24)-(25): lambda / D * sum_k of depth k's mean negative log-likelihood, each over all B * S positions."""
    B, S = labels_BS.shape
    total = torch.zeros((), dtype=torch.float64)
    for k, logits_BSV in enumerate(logits, start=1):
        logp = torch.log_softmax(logits_BSV.double(), dim=-1)
        total = total - logp.gather(-1, labels_BS[:, k:, None]).sum() / (B * S)
    return coeff / len(logits) * total


def hf_block(layer: torch.nn.Module, rotary: torch.nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """TRM_k from a transformers decoder layer: explicit causal mask, the main model's RoPE at `positions_BS`."""

    def run(x_BSD: Tensor, positions_BS: Tensor) -> Tensor:
        S = x_BSD.shape[1]
        mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
        cos_sin = rotary(x_BSD, positions_BS)
        out = layer(x_BSD, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions_BS)
        return out[0] if isinstance(out, tuple) else out

    return run


def randomize(module: torch.nn.Module, *, skip: tuple[str, ...] = (), scale: float = 0.15) -> None:
    """Non-trivial weights: norms 1 + 0.1 N(0, 1), the rest `scale` N(0, 1), correction biases 0.1 N(0, 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(skip):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else scale * torch.randn_like(p))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))


def published_state(main: torch.nn.Module, mtp: torch.nn.Module) -> dict[str, Tensor]:
    """The main model's tensors plus transformers' `MtpModel` layers in the published layout: depth k + 1 under
    `model.layers.{L + k}.` (its block's tensors directly there, `post_norm` as `shared_head.norm`), with the copies
    of the embedding and head that DeepSeek-V3 / GLM-4.5 checkpoints carry."""
    L = main.config.num_hidden_layers
    state = {k: v.clone() for k, v in main.state_dict().items()}
    for key, value in mtp.state_dict().items():
        match = re.match(r"layers\.(\d+)\.(mtp_block\.)?(.*)", key)
        if match is None:  # embed_tokens / shared_head: the main model's
            continue
        rest = match.group(3).replace("post_norm.", "shared_head.norm.")
        state[f"model.layers.{L + int(match.group(1))}.{rest}"] = value.clone()
    for k in range(mtp.num_mtp_layers):
        state[f"model.layers.{L + k}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
        state[f"model.layers.{L + k}.shared_head.head.weight"] = state["lm_head.weight"].clone()
    return state


def write_checkpoint(state: dict[str, Tensor], config, path: Path) -> Path:
    """`state` as sharded safetensors (several files + index) and `config` as config.json in `path`."""
    from automoe.hf.safetensors_io import ShardedWriter

    writer = ShardedWriter(path, max_shard_bytes=100_000)
    writer.add_all(state.items())
    writer.close()
    config.save_pretrained(path)
    return path
