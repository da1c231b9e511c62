"""Sparse upcycling: a dense HF Llama / Qwen2 / Qwen3 directory -> an HF MoE directory ready for fine-tuning.

    python scripts/upcycle.py DENSE_HF_DIR OUT_DIR --experts 8 --top-k 2 --family mixtral [--shared-expert]
        [--noise 0.0] [--router-std STD] [--dense-layers 0] [--seed 0] [--dtype bfloat16]
    torchrun --nproc-per-node 2 recipes/finetune.py hf.init_from=OUT_DIR ...

Experts are copies of each layer's dense MLP, the router is new (see automoe/hf/upcycle.py for the recipe and its
sources); `--family` must be able to express the result (Llama -> mixtral, Qwen3 -> qwen3_moe; a shared expert
needs a family with one, e.g. qwen2_moe once gated, which the upcycled model is not: export then names the setting).
"""

from __future__ import annotations

import argparse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dense_dir", help="HF directory of a dense Llama / Qwen2 / Qwen3 model")
    p.add_argument("out_dir", help="where the HF MoE checkpoint is written")
    p.add_argument("--experts", type=int, required=True, help="routed experts E per MoE layer")
    p.add_argument("--top-k", type=int, required=True, help="experts per token K")
    p.add_argument("--family", required=True, help="HF family written (automoe.hf.FAMILIES)")
    p.add_argument("--shared-expert", action="store_true", help="keep the dense MLP as a shared expert")
    p.add_argument("--noise", type=float, default=0.0, help="relative Gaussian noise on each expert copy")
    p.add_argument("--router-std", type=float, default=None, help="router init std (default: init_std)")
    p.add_argument("--dense-layers", type=int, default=0, help="the first N layers stay dense")
    p.add_argument("--seed", type=int, default=0, help="seed of the router init and the noise")
    p.add_argument("--dtype", default=None, help="dtype written (default: float32)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from automoe.hf import save_hf_checkpoint
    from automoe.hf.upcycle import load_dense_hf, upcycle

    args = parse_args(argv)
    dense_cfg, dense_state = load_dense_hf(args.dense_dir)
    model = upcycle(
        dense_cfg,
        dense_state,
        num_experts=args.experts,
        top_k=args.top_k,
        shared_expert=args.shared_expert,
        num_dense_layers=args.dense_layers,
        noise=args.noise,
        router_std=args.router_std,
        seed=args.seed,
    )
    files = save_hf_checkpoint(model, model.cfg, args.out_dir, family=args.family, dtype=args.dtype)
    print(f"upcycled {args.dense_dir} -> {args.out_dir} ({args.family}, {len(files)} files)")


if __name__ == "__main__":
    main()
