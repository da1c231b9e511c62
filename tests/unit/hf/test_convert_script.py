"""`python -m automoe.convert` round trip: HF -> automoe (DCP and torch.save) -> HF gives back the same tensors."""

import pytest

from tests.tolerance import assert_equal

pytest.importorskip("transformers")


def _script():
    import automoe.convert

    return automoe.convert


@pytest.mark.parametrize("fmt", ["dcp", "torch"])
def test_round_trip_through_an_automoe_checkpoint(saved, tmp_path, fmt):
    from automoe.hf.safetensors_io import SafetensorsReader

    _, src = saved("qwen3_moe")
    convert = _script()
    convert.main(["hf-to-automoe", str(src), str(tmp_path / "ours"), "--format", fmt])
    convert.main(
        [
            "automoe-to-hf",
            str(tmp_path / "ours"),
            str(tmp_path / "hf"),
            "--family",
            "qwen3_moe",
            "--max-shard-size",
            "80KB",
        ]
    )
    before, after = SafetensorsReader(src), SafetensorsReader(tmp_path / "hf")
    assert before.keys() == after.keys()
    for key in sorted(before.keys() | set()):
        assert_equal(after.get(key), before.get(key), msg=key)  # a conversion round trip: bitwise


def test_fused_checkpoint_converts_and_exports_fused(saved_fused, tmp_path):
    """A fused-layout OLMoE goes HF -> automoe -> HF with `--expert-layout fused` and comes back bitwise."""
    from automoe.hf.safetensors_io import SafetensorsReader

    _, src = saved_fused("olmoe")
    convert = _script()
    convert.main(["hf-to-automoe", str(src), str(tmp_path / "ours"), "--format", "torch"])
    convert.main(
        [
            "automoe-to-hf",
            str(tmp_path / "ours"),
            str(tmp_path / "hf"),
            "--family",
            "olmoe",
            "--expert-layout",
            "fused",
        ]
    )
    before, after = SafetensorsReader(src), SafetensorsReader(tmp_path / "hf")
    assert before.keys() == after.keys() and "model.layers.0.mlp.experts.gate_up_proj" in after.weight_map
    for key in sorted(before.keys()):
        assert_equal(after.get(key), before.get(key), msg=key)
