"""TrainConfig: defaults, presets, params/CLI layering, validation messages."""
from __future__ import annotations

import json

import pytest

from pipeline.errors import ConfigError
from pipeline.train_config import (
    OFFICIAL_TARGETS,
    TrainConfig,
    available_presets,
    build_config,
    fields_help,
    from_params,
    load_preset,
    read_params_train,
)


def test_defaults_are_the_official_recipe():
    c = TrainConfig()
    assert (c.rank, c.alpha, c.rslora) == (64, 32.0, True)
    assert tuple(c.target_modules) == OFFICIAL_TARGETS and len(OFFICIAL_TARGETS) == 8
    assert (c.learning_rate, c.weight_decay, tuple(c.betas)) == (1e-4, 0.01, (0.8, 0.9))
    assert (c.warmup_steps, c.grad_clip, c.shift, c.ssl_coeff) == (10, 0.5, 3.0, 1.0)
    assert (c.text_dropout, c.speaker_dropout, c.lyric_dropout) == (0.15, 0.5, 0.15)
    assert c.precision == "bf16-true" and c.plot_every == 0 and c.keep_last == 5
    c.validate()


def test_every_field_has_help():
    rows = fields_help()
    assert {r["name"] for r in rows} >= {"rank", "learning_rate", "precision", "live", "device"}
    assert all(r["help"] for r in rows)


def test_presets():
    assert set(available_presets()) >= {"conservative", "balanced", "aggressive"}
    assert build_config(preset="conservative").rank == 16
    assert build_config(preset="balanced").rank == 64
    assert build_config().preset == "balanced" and build_config().rank == 64
    assert build_config(preset="aggressive").rank == 256
    assert "description" not in load_preset("aggressive")
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*balanced"):
        load_preset("huge")


def test_layering_params_then_cli():
    params = {"rank": 8, "learning_rate": "1e-3", "preset": "aggressive"}  # YAML reads 1e-3 as str
    c = build_config(params=params, overrides={"learning_rate": 2e-4, "rank": None})
    assert c.preset == "aggressive"
    assert c.rank == 8  # params beats the preset
    assert c.learning_rate == 2e-4  # CLI beats params; None means "not given"
    assert c.run_name == "aggressive"
    assert build_config(overrides={"experiment": "mine"}).run_name == "mine"


def test_coercion_and_unknown_names():
    c = from_params({"betas": "0.9, 0.99", "target_modules": "to_q,to_k", "live": "yes", "max_steps": "2e3"})
    assert c.betas == (0.9, 0.99) and c.target_modules == ["to_q", "to_k"] and c.live is True
    assert c.max_steps == 2000
    with pytest.raises(ConfigError, match="unknown train setting.*lerning_rate"):
        from_params({"lerning_rate": 1e-4})
    with pytest.raises(ConfigError, match="'rank'.*not a valid int"):
        from_params({"rank": "many"})


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"precision": "bf16-mixed"}, "bf16-mixed.*bf16-true"),
        ({"precision": "fp16"}, "precision"),
        ({"rank": 0}, "rank"),
        ({"text_dropout": 1.5}, "text_dropout"),
        ({"device": "tpu"}, "device"),
        ({"experiment": "../evil"}, "experiment"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"target_modules": []}, "target_modules"),
        # inf passes "> 0" and used to reach the LoRA scale / the sigma table
        ({"alpha": float("inf")}, "'alpha' must be a finite number, not inf"),
        ({"shift": float("inf")}, "'shift' must be a finite number"),
        ({"shift": float("nan")}, "'shift' must be a finite number"),
        ({"logit_mean": float("-inf")}, "'logit_mean' must be a finite number"),
        ({"betas": "0.8 inf"}, "'betas' must be a finite number"),
    ],
)
def test_validation_names_the_setting(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_params(changes).validate()


def test_advice_about_costly_or_odd_settings():
    assert TrainConfig().advice() == []
    assert any("60-step" in note for note in from_params({"plot_every": 100}).validate().advice())
    assert any("warmup_steps" in note for note in from_params({"max_steps": 5}).validate().advice())


def test_to_json_roundtrip():
    c = build_config(preset="conservative", overrides={"seed": 7})
    data = json.loads(c.to_json())
    assert data["rank"] == 16 and data["seed"] == 7 and data["betas"] == [0.8, 0.9]
    assert from_params(data) == c
    assert c.lora_config()["r"] == 16 and c.lora_config()["lora_alpha"] == 32.0


def test_read_params_train(tmp_path):
    p = tmp_path / "params.yaml"
    assert read_params_train(p) == {}
    p.write_text("models:\n  acestep: x\ntrain:\n  rank: 4\n")
    assert read_params_train(p) == {"rank": 4}
    p.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="params.yaml"):
        read_params_train(p)


def test_targets_match_lora_module():
    lora = pytest.importorskip("pipeline.lora")
    assert tuple(lora.DEFAULT_TARGETS) == OFFICIAL_TARGETS
