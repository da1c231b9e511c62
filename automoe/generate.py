"""Generate text with a trained model (one process): greedy or sampled (temperature, top-k, top-p), with a KV cache.

    python -m automoe.generate outputs/run --prompt "def fib(n):" --max-new-tokens 64
    python -m automoe.generate outputs/run/checkpoints/step_300 --prompt-file prompt.txt --temperature 0.8 \\
        --top-k 50 --top-p 0.95 --seed 0
    python -m automoe.generate HF_DIR --prompt-ids "1 2 3" --max-new-tokens 16 --print-ids

The model is a run's output_dir (its newest checkpoint), a step_<N> checkpoint of any training layout, a Hugging
Face directory or a cached hub id (`automoe.inference.load_model`); the text is encoded with the tokenizer of the
training data (`--tokenizer` overrides; `--prompt-ids` bypasses it). Generation stops at the tokenizer's EOS
(`--eos-id` overrides, `--eos-id -1` never stops) or after --max-new-tokens; tokens/s go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from automoe.models import KVCache, Transformer


def filter_logits(logits_BV: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Logits with every token outside the top-k and outside the smallest set of probability >= top_p set to
    -inf (the most likely token always stays)."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        cumulative_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass of the tokens before it already reaches top_p
        drop_BV = cumulative_BV - sorted_BV.softmax(dim=-1) >= top_p
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return logits_BV


def next_tokens(
    logits_BV: Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """-> int64 [B]: argmax at temperature 0, else a sample of softmax(filtered logits / temperature)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = filter_logits(logits_BV.float() / temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_BS: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """-> int64 [B, S + n]: the prompts [B, S] (equal lengths) followed by n <= max_new_tokens new tokens.

    Stops when every row has produced `eos_id` (a finished row then repeats it) or after `max_new_tokens`.
    With `use_cache` the prompt is run once and each step feeds only the new token (`KVCache`); without, every
    step reruns the whole sequence (the reference the cache is tested against).
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    B, S = prompt_BS.shape
    if S < 1:
        raise ValueError("the prompt is empty: give at least one token")
    limit = model.cfg.max_seq_len
    if S + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({S} tokens) + max_new_tokens={max_new_tokens} exceeds the model's max_seq_len={limit}"
        )
    tokens_BS = prompt_BS.to(model.output.weight.device)
    cache = KVCache() if use_cache else None
    logits_BSV = model(tokens_BS, kv_cache=cache)
    finished_B = torch.zeros(B, dtype=torch.bool, device=tokens_BS.device)
    for _ in range(max_new_tokens):
        token_B = next_tokens(
            logits_BSV[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if eos_id is not None:
            token_B = token_B.masked_fill(finished_B, eos_id)
            finished_B |= token_B == eos_id
        tokens_BS = torch.cat([tokens_BS, token_B[:, None]], dim=1)
        if bool(finished_B.all()):  # NOTE: host sync once per token
            break
        logits_BSV = model(token_B[:, None], kv_cache=cache) if use_cache else model(tokens_BS)
    return tokens_BS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="output_dir | step_<N> dir | HF dir or cached hub id | converted dir")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="read the prompt text from this file")
    prompt.add_argument("--prompt-ids", help="prompt token ids, space separated (no tokenizer needed)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample within this probability mass")
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling")
    parser.add_argument(
        "--eos-id", type=int, default=None, help="stop token (default: the tokenizer's; -1 = none)"
    )
    parser.add_argument("--tokenizer", default=None, help="override: byte | HF tokenizer dir | cached hub id")
    parser.add_argument("--max-seq-len", type=int, default=None, help="HF models: RoPE table length")
    parser.add_argument("--no-cache", action="store_true", help="recompute every step (slow; for checks)")
    parser.add_argument("--print-ids", action="store_true", help="print the generated ids, not text")
    return parser


def main(argv: list[str] | None = None) -> None:
    from automoe.data.tokenizer import load_tokenizer
    from automoe.inference import load_model

    args = _parser().parse_args(argv)
    try:
        loaded = load_model(args.model, max_seq_len=args.max_seq_len)
        tokenizer = load_tokenizer(args.tokenizer, key="--tokenizer") if args.tokenizer else loaded.tokenizer
        if args.prompt_ids is not None:
            prompt = [int(t) for t in args.prompt_ids.split()]
        else:
            if tokenizer is None:
                raise ValueError(
                    f"no tokenizer is known for {loaded.source}: pass --tokenizer or --prompt-ids"
                )
            text = (
                args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
            )
            bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []
            prompt = bos + tokenizer.encode(text)
        eos_id = args.eos_id if args.eos_id is not None else getattr(tokenizer, "eos_id", None)
        start = time.perf_counter()
        out = generate(
            loaded.model,
            torch.tensor([prompt], dtype=torch.int64),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=None if eos_id is not None and eos_id < 0 else eos_id,
            use_cache=not args.no_cache,
            generator=torch.Generator().manual_seed(args.seed),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    seconds = time.perf_counter() - start
    new = out[0, len(prompt) :].tolist()
    if args.print_ids or tokenizer is None:
        print(" ".join(map(str, out[0].tolist())))
    else:
        print(tokenizer.decode(out[0].tolist()))
    print(
        f"{len(new)} new tokens in {seconds:.2f} s ({len(new) / max(seconds, 1e-9):.1f} tokens/s, "
        f"{'KV cache' if not args.no_cache else 'no cache'}) from {loaded.source}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
