"""Validation loss, best checkpoint, early stop and the per-step LoRA signals (tiny transformer, fp32, CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from cache.schema import SongFeatures
from pipeline.errors import ConfigError
from pipeline.metrics import read_metrics
from pipeline.objective import sigma_grid, training_sigmas
from pipeline.train import EARLY_STOP, load_transformer_for_training, train, validation_loss
from pipeline.train_state import BEST_FILE, find_checkpoints, list_checkpoints, read_best
from pipeline.validation import BestTracker, build_validation_set, split_songs
from test_train import (  # noqa: F401 (fixtures)
    SPEAKER_DIM,
    SyntheticSource,
    lora_weights,
    one_thread,
    project,
    tiny_config,
    tiny_transformer_dir,
)

CPU = torch.device("cpu")


def _features(batch: dict, key: str) -> SongFeatures:
    """The song behind sample 0 of a SyntheticSource batch (one prompt variant)."""
    return SongFeatures(key=key, latents=batch["latents"][0], mert=batch["mert"][0], mhubert=batch["mhubert"][0],
                        lyric_ids=batch["lyric_ids"][0], text_states=batch["text_states"][:1],
                        text_masks=batch["text_mask"][:1])


def _validation(config, source=None, n=2, held_out=True):
    """Validation songs from `source`'s batches: held out under val/ (beside a training song), or
    (held_out False) the training songs themselves."""
    source = source or SyntheticSource(seed=99)
    prefix = "val/" if held_out else "song"
    songs = {f"{prefix}{i}": _features(source.make_batch(0, i), f"{prefix}{i}") for i in range(n)}
    split = split_songs([*songs, "train/a"] if held_out else list(songs), ["val/*"], config.val_max_songs)
    return build_validation_set(songs.__getitem__, split, config, SPEAKER_DIM)


# ------------------------------------------------------------------ the set and the number
def test_sigma_grid_covers_the_logit_normal_distribution():
    grid = sigma_grid(8, training_sigmas())
    assert grid.shape == (8,) and torch.all(grid[:-1] > grid[1:])  # one per quantile, high noise first
    assert 0.35 < float(grid.min()) and float(grid.max()) < 0.95
    assert float(grid.mean()) == pytest.approx(0.714, abs=0.01)  # ≈ the mean σ training draws


def test_validation_loss_is_deterministic_and_leaves_the_training_state_alone(tiny_transformer_dir):
    config = tiny_config()
    vset = _validation(config)
    assert [i.key for i in vset.items] == ["val/0", "val/1"] and vset.held_out
    values = []
    for _ in range(2):  # two fresh models of the same checkpoint, as two runs would load them
        model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
        rng = torch.get_rng_state()
        values += [validation_loss(model, vset, config, CPU, torch.float32) for _ in range(2)]
        assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(v == values[0] for v in values), values
    assert set(values[0]) == {"val_loss", "val_denoise_loss"} and values[0]["val_loss"] > values[0]["val_denoise_loss"]


def test_validation_hands_forward_loss_the_cpu_batch_as_training_does(tiny_transformer_dir, monkeypatch):
    """forward_loss reads the masks on the CPU (no device sync) to skip the ones with nothing padded
    (flash kernels on a GPU); a batch moved to the GPU first would always take the masked path. So
    validation repeats the song over its σ grid on the CPU and lets forward_loss move it, each
    distinct tensor once (the SSL features are the same song n times)."""
    from pipeline import train as train_module

    config = tiny_config()
    vset = _validation(config, n=1)
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    inside, outside, moved = [False], [], []
    forward_loss, batch_to_device, to_device = (train_module.forward_loss, train_module.batch_to_device,
                                                train_module._to_device)

    def spy_forward_loss(*args, **kwargs):
        inside[0] = True
        try:
            return forward_loss(*args, **kwargs)
        finally:
            inside[0] = False

    def spy_batch_to_device(*args, **kwargs):
        outside.append(not inside[0])
        return batch_to_device(*args, **kwargs)

    def spy_to_device(x, device):
        moved.append(x)
        return to_device(x, device)

    monkeypatch.setattr(train_module, "forward_loss", spy_forward_loss)
    monkeypatch.setattr(train_module, "batch_to_device", spy_batch_to_device)
    monkeypatch.setattr(train_module, "_to_device", spy_to_device)
    validation_loss(model, vset, config, CPU, torch.float32)
    assert outside == [False]  # moved only inside forward_loss
    assert len({id(x) for x in moved}) == len(moved)  # each tensor moved once


def test_validation_of_a_compile_run_skips_the_unpadded_masks(tiny_transformer_dir):
    """Validation runs eagerly even in a compile run, so it follows the uncompiled rule: masks with
    nothing padded are not passed (flash kernels), as an uncompiled run's validation does."""
    import dataclasses

    config = tiny_config()
    vset = _validation(config, n=1)
    item = vset.items[0].batch
    assert bool(item["text_mask"].all()) and bool(item["lyric_mask"].all())  # batch 1: nothing padded
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")  # not compiled: Inductor is slow here
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["text_attention_mask"], kwargs["lyric_mask"], kwargs["attention_mask"]))
        return forward(*args, **kwargs)

    model.forward = spy
    eager = validation_loss(model, vset, config, CPU, torch.float32)
    compiled = validation_loss(model, vset, dataclasses.replace(config, compile=True), CPU, torch.float32)
    assert seen and all(masks == (None, None, None) for masks in seen)
    assert compiled == eager


def test_validation_is_independent_of_the_training_rng_and_resume_redraws_the_same_curve(tiny_transformer_dir, tmp_path):
    config = tiny_config(max_steps=8, save_every=0, val_every=2, keep_last=0, log_plot_every=0)
    vset = _validation(config)

    def run(folder, on_batch=None, resume=None, validation=vset):
        model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
        return train(config, model, SyntheticSource(n=3, on_batch=on_batch), tmp_path / folder, resume=resume,
                     validation=validation)

    plain = run("plain", validation=None)
    whole = run("whole")

    def interrupt(i, batch):
        if i == 5:
            raise KeyboardInterrupt

    assert run("split", on_batch=interrupt)["step"] == 5
    resumed = run("split", resume="latest")
    # validating changes nothing about training: same weights, same training losses
    a, b = (lora_weights(list_checkpoints(tmp_path / f)[-1]) for f in ("plain", "whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = {f: [r["loss"] for r in read_metrics(tmp_path / f / "metrics.jsonl")] for f in ("plain", "whole", "split")}
    assert losses["plain"] == losses["whole"] == losses["split"]
    curves = {f: [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / f / "metrics.jsonl") if "val_loss" in r]
              for f in ("whole", "split")}
    assert [s for s, _ in curves["whole"]] == [2, 4, 6, 8] and curves["whole"] == curves["split"]
    assert resumed["best_step"] == whole["best_step"] and resumed["best_val_loss"] == whole["best_val_loss"]
    assert plain["best_step"] is None and whole["val_seconds"] > 0


def test_validation_loss_falls_when_overfitting_its_training_song(tiny_transformer_dir, tmp_path):
    """No song held out: the validation measures fit, so overfitting one song lowers it."""
    class Loud(SyntheticSource):
        def make_batch(self, epoch, index):
            batch = super().make_batch(epoch, index)
            batch["latents"] = batch["latents"] * 3
            return batch

    config = tiny_config(max_steps=40, warmup_steps=0, learning_rate=3e-2, rank=8, logit_std=1e-4, save_every=0,
                         val_every=10, gradient_checkpointing=False, log_plot_every=0, val_sigmas=2,
                         target_modules=list(tiny_config().target_modules) + ["final_layer.linear"])
    source = Loud(fixed=True)
    vset = _validation(config, source, n=1, held_out=False)
    assert not vset.held_out and [i.key for i in vset.items] == ["song0"]
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    before = validation_loss(model, vset, config, CPU, torch.float32)["val_loss"]
    summary = train(config, model, source, tmp_path / "fit", validation=vset)
    curve = [r["val_loss"] for r in read_metrics(tmp_path / "fit" / "metrics.jsonl") if "val_loss" in r]
    assert len(curve) == 4 and curve[-1] < 0.85 * before, (before, curve)
    assert summary["best_step"] == 40 and summary["best_val_loss"] == curve[-1] == summary["val_loss"]


# ------------------------------------------------------------------ best checkpoint and early stop
def test_early_stop_on_a_plateau_keeps_the_best_checkpoint(tiny_transformer_dir, tmp_path, monkeypatch):
    import pipeline.train as train_module

    plateau = iter([1.0, 0.8, 0.9, 0.85, 0.95, 0.7])  # best at step 2, then 3 validations without a new best
    monkeypatch.setattr(train_module, "validation_loss",
                        lambda *a: {"val_loss": (v := next(plateau)), "val_denoise_loss": v / 2})
    config = tiny_config(max_steps=20, save_every=2, val_every=1, keep_last=1, early_stop_patience=3)
    run = tmp_path / "plateau"
    summary = train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"), SyntheticSource(),
                    run, validation=_validation(config))
    assert summary["stopped"] == EARLY_STOP and summary["step"] == 5
    assert (summary["best_step"], summary["best_val_loss"]) == (2, 0.8)
    # the final checkpoint (step 5) and the best one (step 2, kept although keep_last is 1)
    assert [p.name for p in list_checkpoints(run)] == ["epoch=0-step=2_lora", "epoch=1-step=5_lora"]
    best = json.loads((run / BEST_FILE).read_text())
    assert best["checkpoint"] == "checkpoints/epoch=0-step=2_lora" and best["val_loss"] == 0.8 and best["held_out"]
    assert summary["best_checkpoint"] == str(run / best["checkpoint"])
    records = read_metrics(run / "metrics.jsonl")
    assert [r["val_loss"] for r in records] == [1.0, 0.8, 0.9, 0.85, 0.95]
    assert [r["best_step"] for r in records] == [1, 2, 2, 2, 2]
    assert find_checkpoints(run, ["best", "5"]) == [run / best["checkpoint"], list_checkpoints(run)[-1]]


def test_a_new_best_between_checkpoints_is_saved_and_survives_pruning(tiny_transformer_dir, tmp_path, monkeypatch):
    import pipeline.train as train_module

    curve = iter([1.0, 0.5, 0.9, 0.8, 0.7, 0.6])  # validations at steps 1..6; the best (step 2) is no save step
    monkeypatch.setattr(train_module, "validation_loss", lambda *a: {"val_loss": next(curve), "val_denoise_loss": 0.0})
    config = tiny_config(max_steps=6, save_every=3, val_every=1, keep_last=1)
    run = tmp_path / "between"
    train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"), SyntheticSource(), run,
          validation=_validation(config))
    assert [p.name for p in list_checkpoints(run)] == ["epoch=0-step=2_lora", "epoch=1-step=6_lora"]
    assert read_best(run)["step"] == 2


def test_best_tracker_counts_patience_and_rebuilds_from_records():
    tracker = BestTracker(patience=2)
    assert tracker.update(1, 1.0) and not tracker.update(2, float("nan")) and not tracker.should_stop
    assert not tracker.update(3, 1.0) and tracker.should_stop  # equal is no improvement
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "val_loss": 0.5}, {"step": 4, "val_loss": 0.6}]
    again = BestTracker.from_records(records, patience=3)
    assert (again.best_step, again.best_loss, again.since_best, again.should_stop) == (2, 0.5, 1, False)
    assert not BestTracker().should_stop  # patience 0: never


# ------------------------------------------------------------------ which songs
def test_split_songs_holds_out_and_refuses_bad_lists():
    keys = ["a", "b", "val/x", "val/y"]
    split = split_songs(keys, ["val/*"], max_songs=4)
    assert (split.train, split.val, split.held_out, split.warnings) == (["a", "b"], ["val/x", "val/y"], True, [])
    fit = split_songs(["a", "b", "c"], ["val/*"], max_songs=2)  # nothing in val/: training songs, first N
    assert (fit.train, fit.val, fit.held_out) == (["a", "b", "c"], ["a", "b"], False)
    assert split_songs(keys, ["val/*"], max_songs=0).val == []
    twin = split_songs(keys, ["b"], 4, content_hashes={"a": "h1", "b": "h1", "val/x": "h2", "val/y": "h3"})
    assert twin.val == ["b"] and "held-out song 'b' has the same audio as training song 'a'" in twin.warnings[0]
    with pytest.raises(ConfigError, match="none are left to train on") as exc:
        split_songs(keys, ["*"], 4)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="val_songs names nope, which is not among the 4 songs"):
        split_songs(keys, ["nope", "val/*"], 4)


# ------------------------------------------------------------------ per-step signals
def test_lora_norm_and_update_ratio_are_logged_every_step(tiny_transformer_dir, tmp_path):
    config = tiny_config(max_steps=3, save_every=0, warmup_steps=1)
    train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"), SyntheticSource(), tmp_path / "s")
    records = read_metrics(tmp_path / "s" / "metrics.jsonl")
    assert records[0]["lr"] == 0.0 and records[0]["update_ratio"] == 0.0  # nothing moved at lr 0
    assert all(r["lora_norm"] > 0 for r in records) and 1e-5 < records[1]["update_ratio"] < 1
    assert records[2]["lora_norm"] != records[0]["lora_norm"]


# ------------------------------------------------------------------ the stage
def test_cli_holds_out_songs_and_reports_the_best(project, capsys):
    from stages.cli import main

    root, params = project
    main(["train", "--params", str(params), "--max-steps", "2", "--val-songs", "s2", "--no-gradient-checkpointing"])
    out, err = capsys.readouterr()
    run = root / "workspace" / "exps" / "logs" / "cli"
    assert "validation: 1 held-out song(s) × 8 noise levels, every 2 steps and at the end" in out
    assert "best: val_loss" in out and "at step 2" in out
    # the tiny cache gives every song the same content hash: s2 looks like a copy of a training song
    assert "Warning: held-out song 's2' has the same audio as training song" in err
    assert read_best(run)["held_out"] is True
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r] == [2]
    with pytest.raises(SystemExit) as exc:
        main(["train", "--params", str(params), "--max-steps", "1", "--val-songs", "s*"])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("Error")]
    assert exc.value.code == 1 and "val_songs (s*) holds out all 3 songs: none are left to train on" in line
    assert not list(run.parent.glob("cli.previous-*"))  # refused before the last run was moved aside
