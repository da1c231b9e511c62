"""Block-fp8 checkpoints (DeepSeek-V3's published format): `weight_scale_inv` blocks dequantize exactly as a
block-by-block reference does, a tiny fp8 DeepSeek-V3 made here imports as its dequantized self (both expert
layouts, fp32 and bf16) and reproduces transformers' logits, and scales that are missing, misshaped or unexpected
are named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from automoe.hf import HFCheckpoint, load_hf_checkpoint
from automoe.hf.quant import BlockFP8, quantize_block_fp8, scale_key
from automoe.hf.safetensors_io import SafetensorsReader, ShardedWriter
from tests.tolerance import assert_close_rounding, assert_equal
from tests.unit.hf.conftest import hf_config

pytest.importorskip("transformers")

FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}


def _reference_dequant(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block by block, as DeepSeek's `weight_dequant` kernel does it."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[-2]):
        for j in range(s.shape[-1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[..., rows, cols] = q[..., rows, cols].float() * s[..., i, j, None, None]
    return out


@pytest.mark.parametrize(
    ("shape", "blocks"), [((300, 260), (3, 3)), ((3, 200, 130), (3, 2, 2))], ids=["2d", "fused-3d"]
)
def test_dequantize_is_the_blockwise_product(shape, blocks):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q, s = quantize_block_fp8(w)
    # ceil(R / 128) x ceil(C / 128) blocks, the edge ones partial
    assert q.dtype == torch.float8_e4m3fn and s.shape == blocks
    got = BlockFP8((128, 128)).dequantize(q, s)
    assert_equal(got, _reference_dequant(q, s, (128, 128)))  # one multiplication per element either way
    # and it is w up to e4m3 rounding: 3 mantissa bits (rel 2^-4), subnormal step 2^-9 of the block scale
    scale = s.repeat_interleave(128, -2)[..., : shape[-2], :].repeat_interleave(128, -1)[..., : shape[-1]]
    assert ((got - w).abs() <= w.abs() * 2**-4 + scale * 2**-10).all()
    with pytest.raises(ValueError, match=r"does not tile a weight of shape \[300, 260\]"):
        BlockFP8((128, 128)).dequantize(torch.zeros(300, 260), torch.ones(2, 2))


def _quantizable(key: str) -> bool:
    """The tensors DeepSeek stores in fp8: every linear weight but embeddings, head and routers."""
    return (
        key.endswith(("proj.weight", "proj_with_mqa.weight", "gate_up_proj", "down_proj"))
        and "embed" not in key
    )


def _fp8_copy(src, dst, block, *, drop_scale: str | None = None, bad_scale: str | None = None, config=True):
    """`src` with every quantizable tensor stored in fp8 + scales; also writes the dequantized twin to `dst`-ref."""
    reader = SafetensorsReader(src)
    quant, ref = {}, {}
    for key in sorted(reader.keys()):
        t = reader.get(key)
        if _quantizable(key) and t.dim() >= 2:
            q, s = quantize_block_fp8(t, block)
            quant[key], quant[scale_key(key)] = q, s
            ref[key] = _reference_dequant(q, s, block)
        else:
            quant[key] = ref[key] = t
    if drop_scale:
        del quant[scale_key(drop_scale)]
    if bad_scale:
        quant[scale_key(bad_scale)] = torch.ones(7, 7)
    hf = json.loads((src / "config.json").read_text())
    for path, tensors, extra in (
        (dst, quant, {"quantization_config": {**FP8, "weight_block_size": list(block)}} if config else {}),
        (dst.with_name(dst.name + "-ref"), ref, {}),
    ):
        writer = ShardedWriter(path, max_shard_bytes=60_000)
        writer.add_all(tensors.items())
        writer.close()
        (path / "config.json").write_text(json.dumps({**hf, **extra}))
    return dst, dst.with_name(dst.name + "-ref")


@pytest.mark.parametrize("block", [(128, 128), (16, 16)], ids=["128x128", "16x16"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_tiny_fp8_deepseek_v3_imports_as_its_dequantized_self(block, layout, saved, saved_fused, tmp_path):
    tf = pytest.importorskip("transformers")
    _, src = (saved if layout == "per_expert" else saved_fused)("deepseek_v3")
    fp8, ref = _fp8_copy(src, tmp_path / "fp8", block)
    ckpt = HFCheckpoint(fp8)
    assert ckpt.quant == BlockFP8(block) and ckpt.layout == layout
    scales = sorted(k for k in SafetensorsReader(fp8).weight_map if k.endswith("_scale_inv"))
    assert any(".experts." in k for k in scales) and any("kv_a_proj_with_mqa" in k for k in scales)
    assert {SafetensorsReader(fp8).dtype(k[: -len("_scale_inv")]) for k in scales} == {"F8_E4M3"}
    _, got = load_hf_checkpoint(fp8)
    _, want = load_hf_checkpoint(ref)
    for key in want:
        assert_equal(got[key], want[key], msg=key)  # the import dequantizes exactly as the reference does
    _, got_bf16 = load_hf_checkpoint(fp8, dtype="bfloat16")
    for key in want:
        assert_equal(got_bf16[key], want[key].to(got_bf16[key].dtype), msg=key)
    # transformers on the dequantized weights computes what our model imported from fp8 computes
    hf = tf.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    _, ours = load_hf_checkpoint(fp8, build_model=True)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        c = hf_config("deepseek_v3")
        assert_close_rounding(
            ours.eval()(tokens),
            hf(tokens).logits,
            terms=max(c.hidden_size, c.intermediate_size, 24),
            depth=4 * c.num_hidden_layers + 1,
        )


def test_fp8_expert_rows_are_read_with_their_scale_rows(saved_fused, tmp_path):
    _, src = saved_fused("deepseek_v3")
    fp8, ref = _fp8_copy(src, tmp_path / "fp8", (16, 16))
    ckpt = HFCheckpoint(fp8)
    got = ckpt.read("layers.1.moe.experts.w_up", experts=[2, 5])
    assert ckpt.reader.read_rows == {
        "model.layers.1.mlp.experts.gate_up_proj": [2, 5],
        "model.layers.1.mlp.experts.gate_up_proj_scale_inv": [2, 5],
    }
    assert_equal(got, HFCheckpoint(ref).read("layers.1.moe.experts.w_up")[[2, 5]])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"drop_scale": "model.layers.1.self_attn.o_proj.weight"},
            r"stores 1 tensors in fp8 without a weight_scale_inv: model\.layers\.1\.self_attn\.o_proj\.weight",
        ),
        (
            {"bad_scale": "model.layers.0.mlp.down_proj.weight"},
            r"mlp\.down_proj\.weight_scale_inv \[7, 7\] \(expected \[1, 1\]: 128x128 blocks\)",
        ),
        (
            {"config": False},
            r"no automoe counterpart \(fp8 scales, but config.json has no quantization_config\)",
        ),
    ],
    ids=["missing-scale", "misshaped-scale", "no-quantization-config"],
)
def test_scales_that_do_not_fit_are_named(edit, message, saved, tmp_path):
    _, src = saved("deepseek_v3")
    fp8, _ = _fp8_copy(src, tmp_path / "fp8", (128, 128), **edit)
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(fp8)


def test_quantizations_other_than_block_fp8_are_refused(saved, tmp_path):
    _, src = saved("deepseek_v3")
    dst = tmp_path / "q"
    shutil.copytree(src, dst)
    hf = json.loads((dst / "config.json").read_text())
    for qc, message in (
        ({"quant_method": "fp8"}, r"quantization_config='fp8' .*weight_block_size=None"),
        (
            {**FP8, "weight_block_size": [128, 128], "activation_scheme": "static"},
            "activation_scheme='static'",
        ),
        ({"quant_method": "gptq", "bits": 4}, r"quantization_config='gptq' is not supported: dequantize"),
    ):
        (dst / "config.json").write_text(json.dumps({**hf, "quantization_config": qc}))
        with pytest.raises(ValueError, match=message):
            load_hf_checkpoint(dst)
