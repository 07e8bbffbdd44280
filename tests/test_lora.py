"""LoRA settings, official file layout, round trips, alpha baking, the scale trap, export-lora.
(Each client's rule on baked checkpoints, resume, bad input: tests/test_lora_clients.py.)"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.errors import CheckpointError, ConfigError
from pipeline.lora import (
    DEFAULT_TARGETS,
    LORA_WEIGHTS_NAME,
    LoraSettings,
    apply_lora,
    bake_alpha,
    load_lora,
    lora_parameters,
    lora_state_dict,
    read_lora_file,
    save_lora,
)
from pipeline.models.transformer import ACEStepTransformer2DModel
from pipeline.tiny.transformer import save_tiny_transformer

GOLDEN = Path(os.environ.get("ACETURBO_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "golden" / "acestep_tiny"


def max_rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_transformer(tmp_path_factory.mktemp("tiny") / "ace_step_transformer", seed=0)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = 2, 10
    return dict(
        hidden_states=torch.randn(b, 8, 16, t, generator=g),
        attention_mask=torch.ones(b, t),
        encoder_text_hidden_states=torch.randn(b, 5, 12, generator=g),
        text_attention_mask=torch.ones(b, 5),
        speaker_embeds=torch.randn(b, 8, generator=g),
        lyric_token_idx=torch.randint(0, 40, (b, 6), generator=g),
        lyric_mask=torch.ones(b, 6, dtype=torch.long),
        timestep=torch.tensor([300.0, 800.0]),
    )


def _run(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).sample


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A tiny model with a 'trained' adapter (random non-zero B) and its saved folders."""
    settings = LoraSettings(r=4, alpha=32.0, use_rslora=True)
    model = ACEStepTransformer2DModel.from_pretrained(tiny)
    apply_lora(model, settings)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("lora")
    plain = save_lora(model, root / "epoch=0-step=5_lora", settings, baked=False)  # the official trainer's form
    baked = save_lora(model, root / "baked", settings)
    return model, settings, plain, baked


def test_settings_scale_and_defaults():
    s = LoraSettings()
    assert (s.r, s.alpha, s.use_rslora, s.dropout) == (64, 32.0, True, 0.0)
    assert s.target_modules == DEFAULT_TARGETS and s.target_modules is not DEFAULT_TARGETS
    assert s.scale == pytest.approx(4.0)
    assert LoraSettings(r=256, alpha=32).scale == pytest.approx(2.0)  # zh_rap recipe, spec §6.7
    assert LoraSettings(r=16, alpha=32, use_rslora=False).scale == pytest.approx(2.0)
    for bad in (dict(r=0), dict(alpha=0), dict(dropout=1.5), dict(target_modules=[])):
        with pytest.raises(ConfigError):
            LoraSettings(**bad)


def test_apply_freezes_everything_but_lora(tiny):
    model = ACEStepTransformer2DModel.from_pretrained(tiny)
    apply_lora(model, LoraSettings(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    # 2 blocks × 8 attention projections + 2 lyric layers × 3 + speaker_embedder (spec §7 at tiny depth)
    assert len(trainable) == 2 * (2 * 8 + 2 * 3 + 1)
    with pytest.raises(ConfigError):
        apply_lora(model, LoraSettings(r=4))  # same adapter name twice
    with pytest.raises(ConfigError):
        apply_lora(ACEStepTransformer2DModel.from_pretrained(tiny), LoraSettings(target_modules=["nope"]), "x")


def test_conv_targets_train_and_apply(tiny):
    """A conv target (peft wraps ConvLayer.conv): a training step gives its LoRA gradients, and the
    model's output carries the LoRA (ConvLayer calls the wrapper, not its own fast path)."""
    model = ACEStepTransformer2DModel.from_pretrained(tiny)
    inputs = _inputs(3)
    plain = _run(model, inputs)
    apply_lora(model, LoraSettings(r=4, alpha=4.0, use_rslora=False, target_modules=["inverted_conv.conv", "to_q"]))
    assert max_rel(_run(model, inputs), plain) <= 1e-5  # B = 0: the base conv alone, as in the fast path
    model.train()
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(**inputs).sample.square().mean().backward()
    conv_b = {n: p for n, p in model.named_parameters() if "inverted_conv.conv.lora_B" in n}
    assert conv_b and all(p.grad is not None and p.grad.abs().max() > 0 for p in conv_b.values())
    optimizer.step()
    assert all(p.abs().max() > 0 for p in conv_b.values())
    with torch.no_grad():  # only the conv LoRA differs from the base model now
        for n, p in model.named_parameters():
            if ".lora_B." in n and "inverted_conv" not in n:
                p.zero_()
    assert max_rel(_run(model, inputs), plain) > 1e-4


def test_state_dict_keys_are_the_official_ones(trained):
    model, _, plain, _ = trained
    keys = set(lora_state_dict(model))
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer_blocks.1.cross_attn.to_out.0.lora_B.weight" in keys
    assert "lyric_encoder.encoders.0.self_attn.linear_q.lora_A.weight" in keys
    assert "speaker_embedder.lora_B.weight" in keys
    assert set(load_file(plain)) == keys
    if GOLDEN.exists():  # same names as the reference trainer's file
        golden_file = next((GOLDEN / "lora").glob("*_lora")) / LORA_WEIGHTS_NAME
        assert set(load_file(golden_file)) == keys


def test_file_metadata(trained):
    _, settings, plain, baked = trained
    assert plain.name == LORA_WEIGHTS_NAME and plain.parent.name == "epoch=0-step=5_lora"
    assert not [p for p in plain.parent.iterdir() if p.name != LORA_WEIGHTS_NAME]  # no temp files left
    with safe_open(str(plain), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    config = json.loads(meta["lora_adapter_metadata"])
    assert list(config) == sorted(config)
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 32.0, True)
    assert config["target_modules"] == sorted(DEFAULT_TARGETS)
    assert json.loads(meta["aceturbo_lora"])["scale"] == pytest.approx(settings.scale)
    with safe_open(str(baked), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["lora_adapter_metadata"])
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 4.0, False)
    ours = json.loads(meta["aceturbo_lora"])
    assert ours["baked"] is True and ours["scale"] == pytest.approx(16.0) and ours["dtype"] == "float32"
    alphas = {k: v for k, v in load_file(baked).items() if k.endswith(".alpha")}
    assert len(alphas) == len(lora_state_dict(trained[0])) // 2 and all(v.item() == 4.0 for v in alphas.values())


def test_round_trip_folder_file_and_baked(trained, tiny):
    model, settings, plain, baked = trained
    inputs = _inputs()
    expected = _run(model, inputs)
    fresh = ACEStepTransformer2DModel.from_pretrained(tiny)
    base = _run(fresh, inputs)
    assert max_rel(expected, base) > 1e-3  # the adapter acts
    for path in (plain.parent, plain, baked.parent):
        loaded = load_lora(fresh, path)
        assert max_rel(_run(fresh, inputs), expected) <= 1e-5, path
        assert all(not p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)
    assert loaded.scale == pytest.approx(16.0)  # the trained settings, for the baked file too
    # weight 0 = no adapter; weight 2 doubles the scale
    load_lora(fresh, plain, weight=0.0)
    assert max_rel(_run(fresh, inputs), base) <= 1e-6
    load_lora(fresh, plain, weight=2.0)
    assert max_rel(_run(fresh, inputs), expected) > 1e-3


def test_bake_alpha_puts_the_whole_scale_into_lora_b(trained):
    _, settings, plain, _ = trained
    sd = load_file(plain)
    baked = bake_alpha(sd, settings.scale)
    key = "transformer_blocks.0.attn.to_q"
    assert torch.equal(baked[f"{key}.lora_A.weight"], sd[f"{key}.lora_A.weight"])
    assert torch.equal(baked[f"{key}.lora_B.weight"], 16.0 * sd[f"{key}.lora_B.weight"])  # power of two: exact
    half = {k: v.bfloat16() for k, v in sd.items()}
    assert {t.dtype for t in bake_alpha(half, 4.0).values()} == {torch.bfloat16}
    odd = bake_alpha(half, 5 / 3)  # not a power of two: float32, one rounding of the product
    assert {t.dtype for t in odd.values()} == {torch.float32}
    torch.testing.assert_close(odd[f"{key}.lora_B.weight"], half[f"{key}.lora_B.weight"].double().mul(5 / 3).float())


def test_diffusers_loader_reads_our_files(trained, tiny):
    """Compatibility: diffusers' own loader with folder + weight_name restores alpha and rsLoRA from
    our metadata; a baked file is right even where alpha is ignored (file path → alpha = r)."""
    model, _, plain, baked = trained
    inputs = _inputs(1)
    expected = _run(model, inputs)
    fresh = ACEStepTransformer2DModel.from_pretrained(tiny)
    fresh.load_lora_adapter(str(plain.parent), weight_name=LORA_WEIGHTS_NAME, prefix=None, adapter_name="a")
    assert max_rel(_run(fresh, inputs), expected) <= 1e-5
    fresh = ACEStepTransformer2DModel.from_pretrained(tiny)
    fresh.load_lora_adapter(load_file(baked), prefix=None, adapter_name="b")  # no metadata at all
    assert max_rel(_run(fresh, inputs), expected) <= 1e-5


def test_file_without_metadata(trained, tmp_path):
    _, _, plain, _ = trained
    bare = tmp_path / LORA_WEIGHTS_NAME
    save_file(load_file(plain), str(bare), metadata={"format": "pt"})  # as diffusers 0.33 writes it
    sd, info = read_lora_file(tmp_path)
    settings = info.trained
    assert (settings.r, settings.alpha, settings.use_rslora, settings.scale) == (4, 4.0, False, 1.0)
    assert set(settings.target_modules) == set(DEFAULT_TARGETS)
    assert set(info.scales.values()) == {1.0} and not info.baked
    _, told = read_lora_file(bare, alpha=32, use_rslora=True)
    assert told.trained.scale == pytest.approx(16.0)
    assert list(told.scales.values()) == pytest.approx([16.0] * len(told.scales))


def test_errors(tiny, tmp_path, trained):
    model = ACEStepTransformer2DModel.from_pretrained(tiny)
    with pytest.raises(CheckpointError, match="not found"):
        load_lora(model, tmp_path / "missing")
    with pytest.raises(CheckpointError, match=LORA_WEIGHTS_NAME):
        load_lora(model, tmp_path)
    bad = tmp_path / "bad.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(CheckpointError, match="not a PEFT LoRA weight"):
        read_lora_file(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="readable"):
        read_lora_file(tmp_path / "junk.safetensors")
    other = save_tiny_transformer(tmp_path / "wide", seed=1, num_attention_heads=3)
    with pytest.raises(CheckpointError, match="another model"):
        load_lora(ACEStepTransformer2DModel.from_pretrained(other), trained[2])
    with pytest.raises(ConfigError):
        save_lora(model, tmp_path / "x", LoraSettings(r=4))  # no adapter to save


def test_golden_lora_scale_trap():
    if not GOLDEN.exists():
        pytest.skip(f"reference data {GOLDEN} is absent (../shared is only beside a developer checkout)")
    folder = next((GOLDEN / "lora").glob("*_lora"))
    for path in (folder, folder / LORA_WEIGHTS_NAME):
        _, info = read_lora_file(path)
        assert info.trained.scale == pytest.approx(16.0)
        assert list(info.scales.values()) == pytest.approx([16.0] * len(info.scales))
        assert (info.strength("ace-step"), info.strength("comfyui"), info.strength("diffusers")) == (16.0, 16.0, 1.0)


def test_export_lora_cli(tmp_path):
    if not GOLDEN.exists():
        pytest.skip(f"reference data {GOLDEN} is absent (../shared is only beside a developer checkout)")
    from stages.cli import main

    src = next((GOLDEN / "lora").glob("*_lora"))
    main(["export-lora", str(src / LORA_WEIGHTS_NAME), "--out", str(tmp_path / "plain"), "--format", "official"])
    main(["export-lora", str(src), "--out", str(tmp_path / "baked")])
    main(["export-lora", str(src), "--out", str(tmp_path / "flag"), "--bake-alpha"])  # the old flag still works
    flag, baked = (load_file(tmp_path / name / LORA_WEIGHTS_NAME) for name in ("flag", "baked"))
    assert all(torch.equal(flag[k], baked[k]) for k in baked) and flag.keys() == baked.keys()
    inputs = load_file(GOLDEN / "transformer_inputs.safetensors")
    inputs = {k: v for k, v in inputs.items() if not k.startswith("ssl_")}
    expected = load_file(GOLDEN / "transformer_outputs_with_lora.safetensors")["sample"]
    model = ACEStepTransformer2DModel.from_pretrained(GOLDEN / "ace_step_transformer")
    for name in ("plain", "baked"):
        load_lora(model, tmp_path / name)
        assert max_rel(_run(model, inputs), expected) <= 1e-5, name
    baked = read_lora_file(tmp_path / "baked")[1]
    assert baked.baked and set(baked.scales.values()) == {1.0} and baked.trained.scale == pytest.approx(16.0)
    key = "transformer_blocks.0.attn.to_q.lora_B.weight"  # the official export of an unbaked file: as it was
    assert torch.equal(load_file(tmp_path / "plain" / LORA_WEIGHTS_NAME)[key], load_file(src / LORA_WEIGHTS_NAME)[key])
    with pytest.raises(SystemExit) as exc:
        main(["export-lora", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 1
