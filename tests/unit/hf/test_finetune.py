"""check_hf_init: what a fine-tune may change is derived from the tensor shapes (no hand-kept list of fields)."""

import dataclasses

import pytest

from automoe.hf.finetune import check_hf_init, hf_model_config


def test_same_shape_changes_are_kept_as_notes(saved):
    _, path = saved("mixtral")
    cfg, _ = hf_model_config(path)
    moe = dataclasses.replace(cfg.moe, aux_loss_coeff=0.5, num_activated_experts=1, capacity_factor=1.5)
    family, notes = check_hf_init(dataclasses.replace(cfg, moe=moe), path)
    assert family == "mixtral"
    assert notes == [
        f"model.moe.aux_loss_coeff=0.5 (config.json gives {cfg.moe.aux_loss_coeff})",
        "model.moe.capacity_factor=1.5 (config.json gives None)",
        f"model.moe.num_activated_experts=1 (config.json gives {cfg.moe.num_activated_experts})",
    ]
    assert check_hf_init(cfg, path) == ("mixtral", [])


def test_shape_changes_name_the_fields_and_the_tensors(saved):
    _, path = saved("mixtral")
    cfg, _ = hf_model_config(path)
    wider = dataclasses.replace(cfg.moe, moe_inter_dim=cfg.moe.moe_inter_dim * 2)
    with pytest.raises(ValueError, match="holds a model of another shape") as info:
        check_hf_init(dataclasses.replace(cfg, moe=wider), path)
    text = str(info.value)
    assert f"model.moe.moe_inter_dim={cfg.moe.moe_inter_dim * 2}" in text
    assert "tensors: " in text and ".moe.experts.w_up: this model has shape" in text
