"""A checkpoint's LoRA gives the trained weight change at strength 1.0 in every loader users have.

Each loader's rule, reproduced with the libraries we depend on (STACK.md 14-15):
- the official ACE-Step pipeline: diffusers ``load_lora_adapter(<file>, adapter_name="ace_step_lora",
  with_alpha=True, prefix=None)`` then ``set_weights_and_activate_adapters(transformer, ["ace_step_lora"], [1.0])``;
- diffusers given the folder + ``weight_name`` (reads lora_adapter_metadata);
- ComfyUI: metadata ignored, delta = strength × (``<module>.alpha`` / r, or 1) × B·A from the file's tensors;
- ours: ``pipeline.lora.load_lora`` (what ``aceturbo generate`` calls).
The trained change of a layer is scale × B·A of the training weights; rel. err = max|Δ − Δ_trained| / max|Δ_trained|.
Also: resume from new and old-format checkpoints, file modes, lora-info, bad input.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import CheckpointError
from pipeline.lora import CLIENTS, LORA_WEIGHTS_NAME, inspect_lora, load_lora, lora_state_dict
from pipeline.models.transformer import ACEStepTransformer2DModel
from pipeline.train import ADAPTER, PRECISION_DTYPES, lora_settings
from pipeline.train_config import from_params, load_preset
from pipeline.train_state import (LORA_FILE, STATE_FILE, LoopState, checkpoint_lora_weights, load_checkpoint,
                                  save_checkpoint)
from test_train import one_thread, tiny_transformer_dir  # noqa: F401 (fixtures)
from test_ui import proj  # noqa: F401 (fixture)

OFFICIAL = "ace_step_lora"
# the three presets as shipped, plus scales that are not powers of two (bf16 → float32 file; fp32 training)
CASES = {
    "conservative": load_preset("conservative"),
    "balanced": load_preset("balanced"),
    "aggressive": load_preset("aggressive"),
    "odd-bf16": {"rank": 12, "alpha": 20.0, "rslora": False},  # scale 5/3
    "odd-fp32": {"rank": 6, "alpha": 7.0, "rslora": True, "precision": "fp32"},  # scale 7/sqrt(6)
}


def trained_run(tiny_dir, params, folder):
    """A training model with 'trained' (random, B non-zero) LoRA weights, checkpointed with save_checkpoint."""
    from pipeline.train import load_transformer_for_training

    config = from_params({"device": "cpu", "seed": 1, **params}).validate()
    model = load_transformer_for_training(tiny_dir, config, "cpu")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    settings = lora_settings(config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ckpt = save_checkpoint(folder, model, settings, optimizer, scheduler, LoopState(step=3, epoch=0))
    return config, model, settings, ckpt


def trained_deltas(model, settings):
    pairs = {}
    for key, t in lora_state_dict(model, ADAPTER).items():
        module, ab = key.rsplit(".lora_", 1)
        pairs.setdefault(module, {})[ab[0]] = t.double().flatten(1)  # a Conv1d LoRA's [r, in, k] as [r, in·k]
    return {m: settings.scale * ab["B"] @ ab["A"] for m, ab in pairs.items()}


def adapter_deltas(model, adapter):
    """The change each wrapped layer applies: scaling × B·A of the adapter as loaded."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight.double().flatten(1), module.lora_B[adapter].weight.double().flatten(1)
            out[name] = module.scaling[adapter] * b @ a
    return out


def comfyui_deltas(file, strength=1.0):
    """ComfyUI's rule on the file's tensors: no metadata; scale = <module>.alpha / r, or 1 without it;
    computed in float32."""
    tensors = load_file(str(file))
    out = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            down, up = tensors[key].float(), tensors[f"{module}.lora_B.weight"].float()
            alpha = tensors.get(f"{module}.alpha")
            scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
            out[module] = (strength * scale * (up @ down)).double()
    return out


def worst(deltas, trained):
    assert deltas.keys() == trained.keys()
    return max(((deltas[m] - trained[m]).abs().max() / trained[m].abs().max()).item() for m in trained)


def official_pipeline_load(model, file, weight=1.0):
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    model.load_lora_adapter(str(file), adapter_name=OFFICIAL, with_alpha=True, prefix=None)
    set_weights_and_activate_adapters(model, [OFFICIAL], [weight])
    return adapter_deltas(model, OFFICIAL)


@pytest.mark.parametrize("case", list(CASES))
def test_every_client_applies_the_trained_change(tiny_transformer_dir, tmp_path, case):
    config, model, settings, ckpt = trained_run(tiny_transformer_dir, CASES[case], tmp_path / "run")
    trained = trained_deltas(model, settings)
    file = ckpt / LORA_FILE

    def fresh():  # the clients' model: float32, as on CPU
        return ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir)

    errors = {"ace-step": worst(official_pipeline_load(fresh(), file), trained)}
    m = fresh()
    m.load_lora_adapter(str(ckpt), weight_name=LORA_WEIGHTS_NAME, prefix=None, adapter_name=OFFICIAL)
    errors["diffusers"] = worst(adapter_deltas(m, OFFICIAL), trained)
    errors["comfyui"] = worst(comfyui_deltas(file), trained)
    named = dict(fresh().named_modules())
    assert all(module in named for module in trained)  # ComfyUI maps these official names to the layers
    for path in (ckpt, file):
        m = fresh()
        load_lora(m, path)
        errors[f"aceturbo:{path.name}"] = worst(adapter_deltas(m, OFFICIAL), trained)
    print(case, f"scale {settings.scale:g}", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= 1e-3 for e in errors.values()), errors  # the bound
    assert all(e <= 1e-5 for e in errors.values()), errors  # what is measured: float32 rounding at most

    info = inspect_lora(ckpt)
    assert info.baked and {info.strength(c) for c in CLIENTS} == {1.0}
    scale_is_power_of_two = settings.scale in (2.0, 4.0, 8.0)
    want_dtype = PRECISION_DTYPES[config.precision] if scale_is_power_of_two else torch.float32
    assert info.dtype == want_dtype and info.trained_dtype == PRECISION_DTYPES[config.precision]

    # resume takes the exact trained factors (training_state.pt), whatever the file holds
    weights = checkpoint_lora_weights(ckpt)
    assert all(torch.equal(weights[k], t) for k, t in lora_state_dict(model, ADAPTER).items())


@pytest.mark.parametrize("case", ["balanced", "odd-bf16"])
def test_official_pipeline_on_a_bf16_model(tiny_transformer_dir, tmp_path, case):
    """The official pipeline runs the transformer in bf16; diffusers then holds the LoRA in bf16 too.
    Power-of-two scales: exact. Others: the float32 file is rounded to bf16 by the loader (documented)."""
    _, model, settings, ckpt = trained_run(tiny_transformer_dir, CASES[case], tmp_path / "run")
    bf16 = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir, torch_dtype=torch.bfloat16)
    err = worst(official_pipeline_load(bf16, ckpt / LORA_FILE), trained_deltas(model, settings))
    ours = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir, torch_dtype=torch.bfloat16)
    load_lora(ours, ckpt)  # keeps a float32 file's precision on a bf16 model
    err_ours = worst(adapter_deltas(ours, OFFICIAL), trained_deltas(model, settings))
    print(case, f"official call on bf16: {err:.1e}, load_lora on bf16: {err_ours:.1e}")
    assert err_ours <= 1e-6
    assert err == 0.0 if case == "balanced" else err <= 2.0 ** -8


def test_strength_scales_linearly_in_each_client(tiny_transformer_dir, tmp_path):
    _, model, settings, ckpt = trained_run(tiny_transformer_dir, CASES["balanced"], tmp_path / "run")
    half = {m: 0.5 * d for m, d in trained_deltas(model, settings).items()}
    m = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir)
    assert worst(official_pipeline_load(m, ckpt / LORA_FILE, weight=0.5), half) <= 1e-6
    assert worst(comfyui_deltas(ckpt / LORA_FILE, strength=0.5), half) <= 1e-6
    m = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir)
    load_lora(m, ckpt, weight=0.5)
    assert worst(adapter_deltas(m, OFFICIAL), half) <= 1e-6


# ------------------------------------------------------------------ resume
def _fresh_training(tiny_dir, config):
    from pipeline.train import load_transformer_for_training

    model = load_transformer_for_training(tiny_dir, config, "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


@pytest.mark.parametrize("case", ["odd-bf16", "odd-fp32"])
def test_resume_restores_the_trained_weights_bit_exactly(tiny_transformer_dir, tmp_path, case):
    config, model, settings, ckpt = trained_run(tiny_transformer_dir, CASES[case], tmp_path / "run")
    fresh, optimizer, scheduler = _fresh_training(tiny_transformer_dir, config)
    loop = load_checkpoint(ckpt, fresh, optimizer, scheduler, settings, adapter_name=ADAPTER)
    assert loop.step == 3
    want, got = lora_state_dict(model, ADAPTER), lora_state_dict(fresh, ADAPTER)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_resume_from_an_old_format_checkpoint(tiny_transformer_dir, tmp_path):
    """Checkpoints written before baking: an unbaked LoRA file (the official trainer's form with our
    aceturbo_lora) and a format-1 training_state.pt without lora_weights."""
    config, model, settings, ckpt = trained_run(tiny_transformer_dir, CASES["odd-bf16"], tmp_path / "run")
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    trained = state.pop("lora_weights")
    state["format"] = 1
    torch.save(state, ckpt / STATE_FILE)
    config_json = json.dumps({"r": settings.r, "lora_alpha": settings.alpha, "use_rslora": settings.use_rslora,
                              "target_modules": sorted(settings.target_modules), "lora_dropout": 0.0}, sort_keys=True)
    ours = json.dumps({"r": settings.r, "alpha": settings.alpha, "use_rslora": settings.use_rslora,
                       "scale": settings.scale, "baked": False, "target_modules": list(settings.target_modules)})
    save_file(trained, str(ckpt / LORA_FILE),
              metadata={"format": "pt", "lora_adapter_metadata": config_json, "aceturbo_lora": ours})

    fresh, optimizer, scheduler = _fresh_training(tiny_transformer_dir, config)
    load_checkpoint(ckpt, fresh, optimizer, scheduler, settings, adapter_name=ADAPTER)
    got = lora_state_dict(fresh, ADAPTER)
    assert all(torch.equal(trained[k], got[k]) for k in trained)
    # the old file still loads at the trained strength, and lora-info says what each loader needs
    m = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir)
    load_lora(m, ckpt)
    assert worst(adapter_deltas(m, OFFICIAL), trained_deltas(model, settings)) <= 1e-6
    info = inspect_lora(ckpt)
    assert not info.baked and info.strength("ace-step") == info.strength("comfyui") == pytest.approx(5 / 3)
    assert info.strength("diffusers") == info.strength("aceturbo") == 1.0


# ------------------------------------------------------------------ other kinds of files
def test_kohya_style_alpha_file_loads_at_alpha_over_r(tiny_transformer_dir, tmp_path):
    _, model, settings, ckpt = trained_run(tiny_transformer_dir, CASES["odd-fp32"], tmp_path / "run")
    weights = checkpoint_lora_weights(ckpt)
    modules = {k[: -len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")}
    alpha = settings.scale * settings.r  # alpha/r = the trained scale, no metadata at all
    kohya = dict(weights, **{f"{m}.alpha": torch.tensor(alpha) for m in modules})
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    m = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir)
    load_lora(m, tmp_path / "kohya.safetensors")
    trained = trained_deltas(model, settings)
    assert worst(adapter_deltas(m, OFFICIAL), trained) <= 1e-6
    assert worst(comfyui_deltas(tmp_path / "kohya.safetensors"), trained) <= 1e-6
    info = inspect_lora(tmp_path / "kohya.safetensors")
    assert info.strength("comfyui") == 1.0 and info.strength("ace-step") == pytest.approx(settings.scale)


def test_export_lora_formats_and_file_modes(tiny_transformer_dir, tmp_path, capsys):
    from stages.cli import main

    old = os.umask(0o022)
    try:
        config, model, settings, ckpt = trained_run(tiny_transformer_dir, CASES["odd-bf16"], tmp_path / "run")
        main(["export-lora", str(ckpt), "--out", str(tmp_path / "official"), "--format", "official"])
        main(["export-lora", str(tmp_path / "official"), "--out", str(tmp_path / "baked")])
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    assert "ACE-Step pipeline (load_lora_adapter on the file; lora_weight): 1.66667" in out  # the official export
    for path in (ckpt / LORA_FILE, ckpt / STATE_FILE, *(tmp_path / f / LORA_FILE for f in ("official", "baked"))):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    official = load_file(tmp_path / "official" / LORA_FILE)
    trained = lora_state_dict(model, ADAPTER)
    assert official.keys() == trained.keys()  # no .alpha, unbaked, the trained bf16 exactly
    assert all(torch.equal(official[k], trained[k]) for k in trained)
    assert load_file(tmp_path / "baked" / LORA_FILE).keys() == load_file(ckpt / LORA_FILE).keys()
    baked, again = load_file(ckpt / LORA_FILE), load_file(tmp_path / "baked" / LORA_FILE)
    assert all(torch.equal(baked[k], again[k]) for k in baked)  # baked → official → baked: the same file


def test_official_export_of_a_checkpoint_is_the_trained_weights_exactly(tiny_transformer_dir, tmp_path):
    """fp32 training with scale 7/sqrt(6): dividing the baked lora_B by the scale again is off in the
    last bit; a checkpoint's official export (from its folder or its LoRA file) takes the weights kept in
    training_state.pt."""
    from stages.cli import main

    _, model, _, ckpt = trained_run(tiny_transformer_dir, CASES["odd-fp32"], tmp_path / "run")
    trained = lora_state_dict(model, ADAPTER)
    for src, out in ((ckpt, "official"), (ckpt / LORA_FILE, "from-file")):  # the folder or its LoRA file
        main(["export-lora", str(src), "--out", str(tmp_path / out), "--format", "official"])
        official = load_file(tmp_path / out / LORA_FILE)
        assert official.keys() == trained.keys()
        assert all(official[k].dtype == torch.float32 and torch.equal(official[k], trained[k]) for k in trained), src


def test_lora_info_cli(tiny_transformer_dir, tmp_path, capsys):
    from stages.cli import main

    _, _, _, ckpt = trained_run(tiny_transformer_dir, CASES["balanced"], tmp_path / "run")
    main(["lora-info", str(ckpt)])
    out = capsys.readouterr().out
    assert "rank: 64" in out and "dtype: bfloat16" in out and "baked: yes" in out
    assert "trained: r=64, alpha=32, rsLoRA=True -> scale 4" in out
    assert all(f"{name}: 1\n" in out for name in CLIENTS.values()), out


def test_ui_lora_download_kinds(proj, tiny_transformer_dir, tmp_path):
    """The checkpoint's own file is baked (strength 1.0 everywhere); the official zip holds the unbaked
    trained weights (`aceturbo export-lora --format official`)."""
    import shutil
    import zipfile

    from pipeline.ui import actions as A

    _, _, _, ckpt = trained_run(tiny_transformer_dir, CASES["odd-bf16"], tmp_path / "t")
    run = Path("workspace/exps/logs/demo")
    shutil.copytree(ckpt, run / "checkpoints" / ckpt.name)
    own = A.lora_download(proj, "demo", ckpt.name, A.DOWNLOAD_KINDS[0])
    assert own.resolve() == (run / "checkpoints" / ckpt.name / LORA_WEIGHTS_NAME).resolve()
    archive = A.lora_download(proj, "demo", ckpt.name, A.DOWNLOAD_KINDS[1])
    assert archive.name == "demo_epoch0-step3_lora_official.zip"
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == [f"demo_epoch0-step3_lora_official/{LORA_WEIGHTS_NAME}"]
    # Every kind is a different LoRA file: none repeats the checkpoint's own (baked) one in a zip.
    files = []
    for kind in A.DOWNLOAD_KINDS:
        got = A.lora_download(proj, "demo", ckpt.name, kind)
        if got.suffix == ".zip":
            with zipfile.ZipFile(got) as zf:
                got = Path(zf.extract(zf.namelist()[0], tmp_path / "unzipped"))
        files.append(load_file(got))
    for i, a in enumerate(files):
        for b in files[i + 1:]:
            assert a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a)


def test_a_conv_target_trains_and_its_checkpoint_loads(tiny_transformer_dir, tmp_path, capsys):
    """target_modules naming ConvLayer convs (peft Conv1d LoRAs): a training step moves their LoRA,
    and the checkpoint loads back at the trained strength and reads in lora-info."""
    from pipeline.train import load_transformer_for_training, train
    from stages.cli import main
    from test_train import SyntheticSource, tiny_config

    config = tiny_config(max_steps=1, save_every=1, warmup_steps=0, alpha=6.0,
                         target_modules=["inverted_conv.conv", "to_q"])
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    conv_b = {n: p for n, p in model.named_parameters() if "inverted_conv.conv.lora_B" in n}
    assert conv_b and all(p.abs().max() == 0 for p in conv_b.values())
    ckpt = Path(train(config, model, SyntheticSource(n=2), tmp_path / "run")["checkpoint"])
    assert all(p.abs().max() > 0 for p in conv_b.values())  # B starts at 0: only a gradient moves it
    fresh = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir)
    load_lora(fresh, ckpt)
    loaded, trained = adapter_deltas(fresh, OFFICIAL), trained_deltas(model, lora_settings(config))
    assert any("inverted_conv" in m for m in loaded) and worst(loaded, trained) <= 1e-6
    main(["lora-info", str(ckpt)])
    assert "inverted_conv.conv" in capsys.readouterr().out


# ------------------------------------------------------------------ bad input
def _one_line_error(capsys, argv):
    from stages.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_lora_files_are_one_line_errors(tiny_transformer_dir, tmp_path, capsys):
    ok = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
          "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    cases = {
        "mixed.safetensors": (dict(ok, **{"transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4,
                                                                                           dtype=torch.bfloat16)}),
                              "mixes dtypes"),
        "rank.safetensors": (dict(ok, **{"transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 3)}),
                             "rank 4 in lora_A but 3 in lora_B"),
        "half.safetensors": ({k: v for k, v in ok.items() if "lora_A" in k}, "no lora_B"),
        "keys.safetensors": ({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, "not a PEFT LoRA weight"),
    }
    for name, (tensors, why) in cases.items():
        save_file(tensors, str(tmp_path / name))
        err = _one_line_error(capsys, ["lora-info", str(tmp_path / name)])
        assert name in err and why in err, err
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    err = _one_line_error(capsys, ["lora-info", str(tmp_path / "junk.safetensors")])
    assert "junk.safetensors" in err and "not a readable safetensors file" in err

    # keys that match no module of the model
    nowhere = {"decoder.blocks.0.proj.lora_A.weight": torch.zeros(4, 32),
               "decoder.blocks.0.proj.lora_B.weight": torch.zeros(32, 4)}
    save_file(nowhere, str(tmp_path / "other.safetensors"))
    model = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir)
    with pytest.raises(CheckpointError, match=r"other\.safetensors.*no module 'decoder\.blocks\.0\.proj'") as exc:
        load_lora(model, tmp_path / "other.safetensors")
    assert "\n" not in str(exc.value)
    assert not getattr(model, "peft_config", None)  # nothing half-loaded



def test_alpha_overrides_only_for_files_without_metadata(tiny_transformer_dir, tmp_path, capsys):
    """--alpha/--rslora on a file that records its own scale (ours baked, official metadata, .alpha
    tensors) would scale it twice: refused; on a bare file they must be a finite alpha > 0."""
    _, _, _, ckpt = trained_run(tiny_transformer_dir, CASES["odd-fp32"], tmp_path / "run")
    weights = checkpoint_lora_weights(ckpt)
    modules = {k[: -len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")}
    save_file(dict(weights, **{f"{m}.alpha": torch.tensor(6.0) for m in modules}), str(tmp_path / "kohya.safetensors"))
    save_file(weights, str(tmp_path / "bare.safetensors"))
    for src in (ckpt, ckpt / LORA_FILE, tmp_path / "kohya.safetensors"):
        for argv in (["export-lora", str(src), "--out", str(tmp_path / "x"), "--alpha", "7", "--rslora"],
                     ["lora-info", str(src), "--no-rslora"]):
            err = _one_line_error(capsys, argv)
            assert src.name in err and "only for files without metadata" in err, err
    assert not (tmp_path / "x").exists()
    for bad in ("0", "-1", "nan", "inf"):
        err = _one_line_error(capsys, ["lora-info", str(tmp_path / "bare.safetensors"), "--alpha", bad])
        assert "--alpha must be a finite number > 0" in err and "bare.safetensors" in err, err
    assert inspect_lora(tmp_path / "bare.safetensors", alpha=7.0, use_rslora=True).trained.scale == pytest.approx(
        7 / 6 ** 0.5)
