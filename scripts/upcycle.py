"""Sparse upcycling: a dense model -> an MoE whose experts start as copies of its MLPs, ready for fine-tuning.

    python scripts/upcycle.py DENSE_DIR OUT_DIR --experts 8 --top-k 2 [--family mixtral] [--shared-expert]
        [--noise 0.0] [--router-std STD] [--dense-layers 0] [--seed 0] [--dtype bfloat16]
    torchrun --nproc-per-node 2 recipes/finetune.py hf.init_from=OUT_DIR [key=value ...]

DENSE_DIR: an HF Llama / Qwen2 / Qwen3 directory, or an automoe checkpoint directory (`model_config.yaml` +
`model.pt` or DCP `model/`, as `python -m automoe.convert hf-to-automoe` writes) of an all-dense model. With
`--family` OUT_DIR is an HF directory of that family, which must express the result (Llama -> mixtral, Qwen3 ->
qwen3_moe; no HF family has an ungated shared expert with softmax routing, so `--shared-expert` results are
refused there, naming the setting); without it, an automoe directory (`model_config.yaml` + `model.pt`).
The recipe and its sources: automoe/hf/upcycle.py.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "dense_dir", help="HF dense Llama / Qwen2 / Qwen3 directory, or an automoe checkpoint directory"
    )
    p.add_argument("out_dir", help="where the MoE checkpoint is written")
    p.add_argument("--experts", type=int, required=True, help="routed experts E per MoE layer")
    p.add_argument("--top-k", type=int, required=True, help="experts per token K")
    p.add_argument("--family", default=None, help="HF family written (automoe.hf.FAMILIES); none: automoe")
    p.add_argument("--shared-expert", action="store_true", help="keep the dense MLP as a shared expert")
    p.add_argument("--noise", type=float, default=0.0, help="relative Gaussian noise on each expert copy")
    p.add_argument("--router-std", type=float, default=None, help="router init std (default: init_std)")
    p.add_argument("--dense-layers", type=int, default=0, help="the first N layers stay dense")
    p.add_argument("--seed", type=int, default=0, help="seed of the router init and the noise")
    p.add_argument("--dtype", default=None, help="dtype written (default: float32)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from pathlib import Path

    import torch
    from omegaconf import OmegaConf

    from automoe.convert import CONFIG_NAME
    from automoe.hf import save_hf_checkpoint, upcycle_from

    args = parse_args(argv)
    src, out = Path(args.dense_dir), Path(args.out_dir)
    model = upcycle_from(
        src,
        num_experts=args.experts,
        top_k=args.top_k,
        shared_expert=args.shared_expert,
        num_dense_layers=args.dense_layers,
        noise=args.noise,
        router_std=args.router_std,
        seed=args.seed,
    )
    if args.family is not None:
        save_hf_checkpoint(model, model.cfg, out, family=args.family, dtype=args.dtype)
    else:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(model.cfg), out / CONFIG_NAME)
        torch.save(model.state_dict(), out / "model.pt")
    print(
        f"upcycled {src} -> {out} ({args.family or 'automoe'}: {model.cfg.moe.num_experts} experts, top-{args.top_k})"
    )


if __name__ == "__main__":
    main()
