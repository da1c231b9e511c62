"""The family registry and what each family module promises: one module per family found by the registry and no
family named anywhere else; config.json mapped both ways with every unsupported HF field named; the published
shapes as presets with the published parameter counts; both expert layouts read with every tensor overwritten;
export refusing what the family cannot express, naming the automoe setting."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from automoe.config.model import ModelConfig
from automoe.hf import (
    FAMILIES,
    HFCheckpoint,
    config_from_hf,
    config_to_hf,
    family_for_model_type,
    get_family,
    hf_tensors,
    load_hf_checkpoint,
    load_hf_into_model,
    save_hf_checkpoint,
)
from automoe.models import Transformer, num_params
from tests.tolerance import assert_close_rounding, assert_equal
from tests.unit.hf.conftest import CASES, hf_config

REPO = Path(__file__).resolve().parents[3]
PRESETS = REPO / "configs" / "model"

# The published config.json files (abridged to the fields that matter).
QWEN2_HUB = {  # Qwen/Qwen1.5-MoE-A2.7B
    "model_type": "qwen2_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.001,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
}
QWEN2_57B_HUB = {  # Qwen/Qwen2-57B-A14B
    **QWEN2_HUB,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "max_position_embeddings": 32768,
}
OLMOE_HUB = {  # allenai/OLMoE-1B-7B-0924
    "model_type": "olmoe",
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05,
    "clip_qkv": None,
    "norm_topk_prob": False,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.01,
    "attention_bias": False,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
}


def load_preset(name: str) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(PRESETS / f"{name}.yaml")))


def _family_of(case: str) -> str:
    return family_for_model_type(hf_config(case).model_type).name


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------
def test_registry_has_one_module_per_family():
    package = REPO / "automoe" / "hf" / "families"
    modules = {p.stem for p in package.glob("*.py")} - {"__init__", "base"}
    names = {"deepseek_v3", "glm4_moe", "gpt_oss", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"}
    assert set(FAMILIES) == modules == names
    for name, family in FAMILIES.items():
        assert get_family(name) is family and family.name == name
        assert all(family_for_model_type(t) is family for t in family.model_types)
        assert family.architecture.endswith("ForCausalLM") and family.not_supported
    with pytest.raises(
        ValueError, match=r"family='llama' is not one of \['deepseek_v3', 'glm4_moe', 'gpt_oss'"
    ):
        get_family("llama")


def _code_strings(path: Path) -> set[str]:
    """Every string constant of a module except docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    }


def test_no_family_is_named_outside_its_module():
    """Import, export, the converter and the fine-tune recipe go through the registry: no `family == ...` branch."""
    names = set(FAMILIES) | {t for f in FAMILIES.values() for t in f.model_types}
    users = [
        *(REPO / "automoe" / "hf").glob("*.py"),
        REPO / "automoe" / "hf" / "families" / "__init__.py",
        REPO / "automoe" / "hf" / "families" / "base.py",
        REPO / "scripts" / "convert_hf.py",
        REPO / "recipes" / "finetune.py",
        REPO / "automoe" / "train" / "build.py",
    ]
    named = {str(p.relative_to(REPO)): sorted(_code_strings(p) & names) for p in users}
    assert not {p: n for p, n in named.items() if n}, named


# ---------------------------------------------------------------------------------------------------------------
# config mapping of the new families
# ---------------------------------------------------------------------------------------------------------------
def test_qwen2_moe_hub_config_maps_shared_expert_gate_and_qkv_bias():
    cfg, family = config_from_hf(QWEN2_HUB, max_seq_len=512)
    moe = cfg.moe
    assert family == "qwen2_moe" and (cfg.qkv_bias, cfg.attention_bias, cfg.qk_norm) == (True, False, False)
    assert (moe.num_shared_experts, moe.shared_expert_inter_dim, moe.shared_expert_gate) == (1, 5632, True)
    assert (moe.num_experts, moe.num_activated_experts, moe.moe_inter_dim) == (60, 4, 1408)
    assert (moe.softmax_before_topk, moe.norm_topk_prob, moe.aux_loss_coeff) == (True, False, 0.001)
    assert (cfg.num_dense_layers, cfg.dense_layers, cfg.num_moe_layers, cfg.rope_theta) == (0, [], 24, 1e6)
    assert config_from_hf({**QWEN2_HUB, "qkv_bias": False})[0].qkv_bias is False


def test_olmoe_hub_config_maps_projection_wide_qk_norm():
    cfg, family = config_from_hf(OLMOE_HUB, max_seq_len=512)
    assert family == "olmoe" and (cfg.qk_norm, cfg.qk_norm_scope, cfg.head_dim) == (True, "projection", 128)
    assert (cfg.moe.moe_inter_dim, cfg.moe.num_experts, cfg.moe.num_activated_experts) == (1024, 64, 8)
    assert (cfg.moe.norm_topk_prob, cfg.moe.num_shared_experts, cfg.norm_eps) == (False, 0, 1e-5)
    with torch.device("meta"):  # shapes only: the norms span the whole projection
        model = Transformer(dataclasses.replace(cfg, num_layers=1))
    assert model.layers["0"].attention.q_norm.weight.shape == (16 * 128,)


@pytest.mark.parametrize(
    ("layers", "step", "only"),
    [(6, 1, []), (6, 1, [0, 1]), (6, 2, []), (6, 1, [2, 4]), (6, 3, [5]), (6, 2, [0, 3])],
)
def test_qwen2_moe_layer_pattern_is_transformers_rule(layers, step, only):
    """Layer i is MoE iff `i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0` (Qwen2MoeDecoderLayer);
    a dense prefix maps to num_dense_layers, anything else to dense_layers, and export writes it back exactly."""
    hub = {**QWEN2_HUB, "num_hidden_layers": layers, "decoder_sparse_step": step, "mlp_only_layers": only}
    cfg, _ = config_from_hf(hub, max_seq_len=512)
    hf_rule = [i not in only and (i + 1) % step == 0 for i in range(layers)]
    assert [cfg.is_moe_layer(i) for i in range(layers)] == hf_rule
    exported = config_to_hf(cfg, family="qwen2_moe")
    assert exported["decoder_sparse_step"] == 1
    assert exported["mlp_only_layers"] == [i for i in range(layers) if not hf_rule[i]]
    assert config_from_hf(exported)[0] == cfg


@pytest.mark.parametrize(
    ("hub", "change", "message"),
    [
        (QWEN2_HUB, {"use_sliding_window": True}, "use_sliding_window=True"),
        (QWEN2_HUB, {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types="),
        (QWEN2_HUB, {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        (QWEN2_HUB, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        (QWEN2_HUB, {"num_experts": 0}, "num_experts=0"),
        (QWEN2_HUB, {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0"),
        (QWEN2_HUB, {"attention_dropout": 0.1}, "attention_dropout=0.1"),
        (QWEN2_HUB, {"quantization_config": {"quant_method": "gptq"}}, "quantization_config='gptq'"),
        (OLMOE_HUB, {"clip_qkv": 8.0}, "clip_qkv=8.0"),
        (OLMOE_HUB, {"head_dim": 64}, "head_dim=64"),
        (OLMOE_HUB, {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        (
            OLMOE_HUB,
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary",
        ),
        (OLMOE_HUB, {"hidden_act": "relu"}, "hidden_act='relu'"),
        (OLMOE_HUB, {"quantization_config": {"quant_method": "fp8"}}, "quantization_config='fp8'"),
    ],
)
def test_unsupported_settings_of_new_families_raise_naming_key_and_value(hub, change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**hub, **change}, max_seq_len=512)


@pytest.mark.parametrize(
    "hub", [QWEN2_HUB, QWEN2_57B_HUB, OLMOE_HUB], ids=["qwen1.5-a2.7b", "qwen2-57b", "olmoe"]
)
def test_exported_config_of_new_families_maps_back_to_the_same_model_config(hub):
    cfg, family = config_from_hf(hub, max_seq_len=512)
    again, fam = config_from_hf(config_to_hf(cfg, family=family))
    assert fam == family and again == cfg


# ---------------------------------------------------------------------------------------------------------------
# presets of the published shapes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "hub", "total", "active", "rel"),
    [
        ("qwen2_moe_a2_7b", QWEN2_HUB, 14.3e9, 2.7e9, 0.01),  # Qwen1.5-MoE: "14.3B ... 2.7B activated"
        ("qwen2_57b_a14b", QWEN2_57B_HUB, 57e9, 14e9, 0.02),  # Qwen2-57B-A14B: 57.41B / 14.25B
        # OLMoE paper: 6.9B total, 1.3B active (6.92B / 1.28B)
        ("olmoe_1b_7b", OLMOE_HUB, 6.9e9, 1.3e9, 0.02),
    ],
)
def test_presets_are_the_published_configs_with_the_published_parameter_counts(
    preset, hub, total, active, rel
):
    cfg = load_preset(preset)
    assert cfg == config_from_hf(hub)[0]  # the preset is what importing the published config.json gives
    counts = num_params(cfg)  # meta device
    assert abs(counts.total - total) / total < rel, counts.total
    assert abs(counts.active - active) / active < rel, counts.active


# ---------------------------------------------------------------------------------------------------------------
# export constraints
# ---------------------------------------------------------------------------------------------------------------
def _replace(cfg: ModelConfig, **changes) -> ModelConfig:
    moe = {k[4:]: v for k, v in changes.items() if k.startswith("moe_")}
    top = {k: v for k, v in changes.items() if not k.startswith("moe_")}
    return dataclasses.replace(cfg, **top, moe=dataclasses.replace(cfg.moe, **moe))


@pytest.mark.parametrize(
    ("hub", "family", "changes", "message"),
    [
        (
            QWEN2_HUB,
            "qwen2_moe",
            {"moe_shared_expert_gate": False},
            r"moe\.shared_expert_gate=False.*sigmoid",
        ),
        (
            QWEN2_HUB,
            "qwen2_moe",
            {"moe_num_shared_experts": 0, "moe_shared_expert_gate": False},
            r"moe\.num_shared_experts=0",
        ),
        (QWEN2_HUB, "qwen2_moe", {"qkv_bias": False, "attention_bias": True}, r"attention_bias=True"),
        (QWEN2_HUB, "qwen2_moe", {"qk_norm": True}, r"qk_norm=True"),
        (QWEN2_HUB, "qwen2_moe", {"moe_score_func": "sigmoid"}, r"moe\.score_func='sigmoid'"),
        (QWEN2_HUB, "qwen2_moe", {"moe_route_scale": 2.0}, r"moe\.route_scale=2\.0"),
        (OLMOE_HUB, "olmoe", {"qk_norm_scope": "head"}, r"qk_norm_scope='head'.*'projection'"),
        (OLMOE_HUB, "olmoe", {"num_dense_layers": 1}, r"num_dense_layers=1"),
        (OLMOE_HUB, "olmoe", {"moe_num_shared_experts": 1}, r"moe\.num_shared_experts=1"),
        (OLMOE_HUB, "olmoe", {"head_dim": 64}, r"head_dim=64"),
        (OLMOE_HUB, "mixtral", {"qk_norm": False}, r"moe\.norm_topk_prob=False.*always renormalizes"),
        (OLMOE_HUB, "qwen3_moe", {"qk_norm_scope": "projection"}, r"qk_norm_scope='projection'"),
        (QWEN2_HUB, "qwen3_moe", {"qk_norm": True}, r"qkv_bias=True"),
        (QWEN2_HUB, "mixtral", {"qkv_bias": False}, r"moe\.num_shared_experts=1"),
        (
            OLMOE_HUB,
            "qwen3_moe",
            {"qk_norm_scope": "head", "dense_layers": [3]},
            r"dense_layers=\[3\].*cannot list",
        ),
        (QWEN2_HUB, "qwen2_moe", {"moe_expert_activation": "geglu"}, r"moe\.expert_activation='geglu'"),
    ],
)
def test_export_names_the_setting_a_family_cannot_express(hub, family, changes, message):
    cfg = _replace(config_from_hf(hub, max_seq_len=512)[0], **changes)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{message}") as info:
        config_to_hf(cfg, family=family)
    assert f"cannot be expressed as an HF {family} config" in str(info.value)


def test_deepseek_v3_refuses_shared_experts_of_another_width():
    from tests.unit.hf.test_config_map import DSV3_HUB

    cfg = config_from_hf(DSV3_HUB, max_seq_len=512)[0]
    with pytest.raises(ValueError, match=r"ModelConfig\.moe\.shared_expert_inter_dim=4096.*2048 wide"):
        config_to_hf(_replace(cfg, moe_shared_expert_inter_dim=4096), family="deepseek_v3")


def test_tiny_preset_exports_to_qwen2_moe_with_its_shared_expert_gated(tmp_path):
    """The default tiny preset (a dense first layer, a shared expert) is a Qwen2-MoE once its shared expert is
    gated; transformers then computes the same logits. Ungated it is refused, naming the setting to change."""
    tf = pytest.importorskip("transformers")
    tiny = load_preset("tiny")
    with pytest.raises(
        ValueError, match=r"ModelConfig\.moe\.shared_expert_gate=False.*shared_expert_gate=true"
    ):
        config_to_hf(tiny, family="qwen2_moe")
    cfg = _replace(tiny, moe_shared_expert_gate=True, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    model.eval()
    save_hf_checkpoint(model, cfg, tmp_path, family="qwen2_moe")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = model(tokens), hf(tokens).logits
    # reordering error over 4 reductions per layer and the head, each at most the widest contraction
    assert_close_rounding(got, ref, terms=cfg.ffn_inter_dim, depth=4 * cfg.num_layers + 1)


# ---------------------------------------------------------------------------------------------------------------
# both expert layouts, every tensor overwritten
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_fused_layout_imports_the_same_tensors(case, saved, saved_fused):
    if case == "gpt_oss":
        pytest.skip("GPT-OSS checkpoints have one expert layout (fused, gate/up interleaved)")
    _, per_expert = saved(case)
    _, fused = saved_fused(case)
    assert HFCheckpoint(fused).layout == "fused" and HFCheckpoint(per_expert).layout == "per_expert"
    _, a = load_hf_checkpoint(per_expert)
    _, b = load_hf_checkpoint(fused)
    assert a.keys() == b.keys()
    for key in a:
        assert_equal(b[key], a[key], msg=key)  # copies of the same numbers


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("case", CASES)
def test_no_tensor_keeps_its_initial_value_after_import(case, layout, saved, saved_fused):
    """Every parameter and buffer of a freshly initialized model is overwritten by the import, every expert of
    every stacked expert tensor included (dropped experts or experts left at random init fail here)."""
    hf, path = (saved if layout == "per_expert" else saved_fused)(case)
    cfg, _ = load_hf_checkpoint(path, experts=[])
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_hf_into_model(model, path)
    after = model.state_dict()
    kept = []
    for key, init in before.items():
        rows = zip(init, after[key]) if ".experts." in key else [(init, after[key])]
        kept += [f"{key}[{e}]" for e, (x, y) in enumerate(rows) if torch.equal(x, y)]
    assert not kept, kept
    # and what it holds is the HF model's numbers: exporting gives transformers' own (fused) state dict back
    ref = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    out = dict(hf_tensors(model, cfg, family=_family_of(case), expert_layout="fused"))
    assert out.keys() == ref.keys()
    for key in ref:
        assert_equal(out[key], ref[key], msg=key)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "glm4_moe"])
def test_fused_export_reloads_in_transformers_bit_identically(case, saved, tmp_path):
    tf = pytest.importorskip("transformers")
    hf, path = saved(case)
    cfg, ours = load_hf_checkpoint(path, build_model=True)
    save_hf_checkpoint(
        ours, cfg, tmp_path, family=_family_of(case), max_shard_size="60KB", expert_layout="fused"
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in index) and ".experts.0." not in " ".join(index)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for key, value in hf.state_dict().items():
        assert_equal(reloaded.state_dict()[key], value, msg=key)


def test_fused_expert_selection_reads_only_those_rows(saved_fused):
    hf, path = saved_fused("qwen2_moe")
    ckpt = HFCheckpoint(path)
    state = ckpt.state_dict(experts=[1, 2, 6])
    fused_keys = [
        k for k in ckpt.reader.read_keys if k.endswith(("gate_up_proj", "down_proj")) and ".experts." in k
    ]
    assert fused_keys and all(ckpt.reader.read_rows[k] == [1, 2, 6] for k in fused_keys)
    hf_sd = hf.state_dict()
    for layer in (1, 5):  # the MoE layers
        fused_up_EHD = hf_sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        assert_equal(state[f"layers.{layer}.moe.experts.w_up"], fused_up_EHD[[1, 2, 6]].transpose(1, 2))


def _ep2_worker(rank, world_size, path, tokens):
    from torch.distributed.device_mesh import init_device_mesh

    from automoe.hf.safetensors_io import SafetensorsReader
    from automoe.parallel.expert_parallel import apply_ep

    rows_read = []
    get_rows = SafetensorsReader.get_rows

    def spy(self, key, ids):  # every row read of a fused tensor, in this process
        rows_read.append((key, list(ids)))
        return get_rows(self, key, ids)

    SafetensorsReader.get_rows = spy
    cfg, _ = load_hf_checkpoint(path, experts=[])
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_ep(model, init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",)))
    model.to_empty(device="cpu")
    model.init_weights()
    load_hf_into_model(model, path)
    model.eval()
    with torch.no_grad():
        logits = model(tokens)
    return {"logits": logits, "rows": rows_read}


@pytest.mark.distributed
def test_ep2_load_of_a_fused_checkpoint_reads_own_rows_and_matches_transformers(saved_fused):
    from tests.distributed.spawn import run_distributed

    hf, path = saved_fused("qwen2_moe")
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens).logits
    c = hf_config("qwen2_moe")
    for rank, res in enumerate(run_distributed(_ep2_worker, 2, str(path), tokens)):
        # 2 MoE layers x (gate_up_proj, down_proj), nothing else read by rows
        assert len(res["rows"]) == 2 * 2
        assert all(ids == list(range(4 * rank, 4 * rank + 4)) for _, ids in res["rows"])
        # our EP model vs transformers: reordering error over 4 reductions per layer plus the head (as test_parity)
        assert_close_rounding(
            res["logits"],
            ref,
            terms=max(c.hidden_size, c.intermediate_size, 16),
            depth=4 * c.num_hidden_layers + 1,
        )


def test_finetune_export_family_comes_from_the_registry_and_checks_the_model(saved):
    """`hf.family` / `hf.init_from`'s model_type pick the export family; one that cannot express the run's model
    fails when the job is configured, naming the setting, not after training."""
    from automoe.hf.finetune import check_hf_init, export_family, hf_model_config

    _, path = saved("qwen2_moe")
    cfg, family = hf_model_config(path)
    assert family == "qwen2_moe" and check_hf_init(cfg, path) == ("qwen2_moe", [])
    assert export_family(str(path), None, cfg) == "qwen2_moe"
    assert export_family(None, "olmoe") == "olmoe" and export_family(None, None) is None
    with pytest.raises(ValueError, match=r"hf\.family='llama' is not one of \["):
        export_family(str(path), "llama", cfg)
    with pytest.raises(ValueError, match=r"ModelConfig\.qk_norm=False cannot be expressed as an HF olmoe"):
        export_family(str(path), "olmoe", cfg)


def test_docs_table_has_a_row_per_family():
    section = (REPO / "docs" / "hf_interop.md").read_text().split("## Families", 1)[1]
    table = section.strip().split("\n\n", 1)[0]  # header, separator, one row per family
    rows = {line.split("|")[1].strip().strip("`").split("`")[0] for line in table.splitlines()[2:]}
    assert rows == set(FAMILIES)
