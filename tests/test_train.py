"""The training loop on the tiny transformer with a synthetic batch source (no cache, no encoders)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch
from safetensors import safe_open

from pipeline.errors import ConfigError
from pipeline.metrics import FIELDS, read_metrics
from pipeline.train import TrainingDiverged, load_transformer_for_training, lr_factor, train
from pipeline.train_config import from_params
from pipeline.train_state import LORA_FILE, STATE_FILE, list_checkpoints

# Widths of save_tiny_transformer's defaults (the batch must match them).
TEXT_DIM, MERT_DIM, MHUBERT_DIM, VOCAB, SPEAKER_DIM = 12, 24, 20, 40, 8


class SyntheticSource:
    """The batch layout of cache/collate.py with random tensors: `n` batches per epoch, each
    derived from (seed, epoch, index) so a resumed source yields the same batches as an unbroken
    one. Has the loader's state_dict()/load_state_dict(). Hooks: `fixed` (repeat batch 0),
    `on_batch(global_index, batch)` (may raise or send signals, may edit the batch)."""

    def __init__(self, n: int = 4, seed: int = 0, frames: int = 12, batch_size: int = 1, fixed: bool = False,
                 on_batch=None):
        self.n, self.seed, self.frames, self.batch_size, self.fixed = n, seed, frames, batch_size, fixed
        self.on_batch = on_batch
        self.epoch, self.batches_consumed = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state):
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])

    def make_batch(self, epoch: int, index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100_003 + (0 if self.fixed else epoch * 1009 + index))
        B, T, L, Y = self.batch_size, self.frames, 5, 7
        return {
            "keys": [f"song{index}_{i}" for i in range(B)],
            "latents": torch.randn(B, 8, 16, T, generator=g),
            "latent_mask": torch.ones(B, T),
            "text_states": torch.randn(B, L, TEXT_DIM, generator=g),
            "text_mask": torch.ones(B, L, dtype=torch.long),
            "speaker": torch.zeros(B, SPEAKER_DIM),
            "lyric_ids": torch.randint(1, VOCAB, (B, Y), generator=g),
            "lyric_mask": torch.ones(B, Y, dtype=torch.long),
            "mert": [torch.randn(T * 7, MERT_DIM, generator=g) for _ in range(B)],
            "mhubert": [torch.randn(T * 5, MHUBERT_DIM, generator=g) for _ in range(B)],
        }

    def __iter__(self):
        while True:  # endless like the cache loader (epochs=None)
            while self.batches_consumed < self.n:
                batch = self.make_batch(self.epoch, self.batches_consumed)
                if self.on_batch is not None:
                    batch = self.on_batch(self.epoch * self.n + self.batches_consumed, batch) or batch
                self.batches_consumed += 1
                yield batch
            self.epoch, self.batches_consumed = self.epoch + 1, 0


def tiny_config(**changes):
    base = {"precision": "fp32", "device": "cpu", "rank": 4, "max_steps": 6, "warmup_steps": 2,
            "save_every": 3, "keep_last": 5, "learning_rate": 1e-3, "log_plot_every": 2, "seed": 3}
    base.update(changes)
    return from_params(base).validate()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny model's ops are microseconds: on 2 busy cores, intra-op threads only spin (50x slower).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_transformer_dir(tmp_path_factory):
    from pipeline.tiny.transformer import save_tiny_transformer

    return save_tiny_transformer(tmp_path_factory.mktemp("tiny") / "ace_step_transformer", seed=0)


def lora_weights(path):
    with safe_open(str(path / LORA_FILE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ---------------------------------------------------------------------------------------------
def test_lr_schedule_is_official():
    assert [lr_factor(s, 10, 110) for s in (0, 5, 10, 60, 110, 200)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert lr_factor(0, 0, 10) == 1.0


def test_load_transformer_for_training(tiny_transformer_dir):
    model = load_transformer_for_training(tiny_transformer_dir, tiny_config(), "cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert model.training
    assert model.checkpointed_blocks == []  # auto: a tiny model's activations fit anywhere
    assert load_transformer_for_training(tiny_transformer_dir, tiny_config(gradient_checkpointing="all"),
                                         "cpu").checkpointed_blocks == [0, 1]
    bf16 = load_transformer_for_training(tiny_transformer_dir, tiny_config(precision="bf16-true"), "cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # LoRA too (autocast_adapter_dtype off)


def test_overfit_one_batch(tiny_transformer_dir, tmp_path):
    """Fixed batch, fixed sigma, no CFG dropout, fp32, high lr: the loss on that batch must fall.
    (The tiny random model changes slowly through attention LoRAs alone, so the output layer gets a
    LoRA too and the target has a strong learnable part.)"""
    from pipeline.objective import training_sigmas
    from pipeline.train import compute_loss

    class Loud(SyntheticSource):
        def make_batch(self, epoch, index):
            batch = super().make_batch(epoch, index)
            batch["latents"] = batch["latents"] * 3
            return batch

    config = tiny_config(max_steps=60, warmup_steps=0, learning_rate=3e-2, rank=8, logit_std=1e-4,
                         text_dropout=0.0, speaker_dropout=0.0, lyric_dropout=0.0, save_every=0,
                         gradient_checkpointing=False, log_plot_every=0,
                         target_modules=list(tiny_config().target_modules) + ["final_layer.linear"])
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    source = Loud(fixed=True)

    def batch_loss():  # same noise and sigma before and after
        model.eval()
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            _, parts = compute_loss(model, source.make_batch(0, 0), generator, training_sigmas(), config,
                                    torch.device("cpu"), torch.float32)
        model.train()
        return parts["denoise_loss"]

    before = batch_loss()
    summary = train(config, model, source, tmp_path / "run")
    after = batch_loss()
    losses = [r["denoise_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 60 and summary["stopped"] == "completed"
    assert after < 0.85 * before, (before, after)
    assert sum(losses[-10:]) < 0.85 * sum(losses[:10]), losses


def test_outputs_layout(tiny_transformer_dir, tmp_path):
    config = tiny_config(max_steps=7, save_every=2, keep_last=2)
    run = tmp_path / "exp"
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    summary = train(config, model, SyntheticSource(n=4), run)

    names = [p.name for p in list_checkpoints(run)]
    assert names == ["epoch=1-step=6_lora", "epoch=1-step=7_lora"]  # keep_last=2, final always written
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names  # no temp folders left
    assert summary["checkpoint"] == str(run / "checkpoints" / names[-1])
    for name in names:
        assert sorted(p.name for p in (run / "checkpoints" / name).iterdir()) == sorted([LORA_FILE, STATE_FILE])
    saved = lora_weights(run / "checkpoints" / names[-1])
    weights = {k: v for k, v in saved.items() if not k.endswith(".alpha")}  # .alpha = r: scale baked in
    assert weights and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in weights)
    assert len(saved) - len(weights) == len(weights) // 2
    assert not any(".default." in k for k in weights)  # official layout: no adapter name, no prefix
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in weights
    assert weights["transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 4
    state = torch.load(run / "checkpoints" / names[-1] / STATE_FILE, weights_only=True)
    assert state["step"] == 7 and state["epoch"] == 1 and state["loader"] == [{"epoch": 1, "batches_consumed": 3}]
    # optimizer state covers the LoRA weights only (never the base weights); the unbaked weights for resume
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(weights) == len(state["lora_weights"])
    assert set(state["rng"][0]) >= {"generator", "torch", "python", "numpy"}

    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 8))
    assert all(set(FIELDS) <= set(r) for r in records)
    assert records[0]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(1e-3)  # warm-up 2 steps
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "train_config.json").read_text()) == config.to_dict()


def test_checkpoint_loads_for_generation(tiny_transformer_dir, tmp_path):
    """pipeline.lora.load_lora on a fresh transformer reproduces the trained model's output."""
    from pipeline.lora import load_lora
    from pipeline.models.transformer import ACEStepTransformer2DModel

    config = tiny_config(max_steps=3, save_every=0, warmup_steps=0, learning_rate=1e-2)
    trained = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    summary = train(config, trained, SyntheticSource(), tmp_path / "g")
    fresh = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir)
    load_lora(fresh, summary["checkpoint"])
    batch = SyntheticSource().make_batch(5, 5)
    inputs = dict(hidden_states=batch["latents"], attention_mask=batch["latent_mask"],
                  encoder_text_hidden_states=batch["text_states"], text_attention_mask=batch["text_mask"],
                  speaker_embeds=batch["speaker"], lyric_token_idx=batch["lyric_ids"],
                  lyric_mask=batch["lyric_mask"], timestep=torch.tensor([500.0]))
    with torch.no_grad():
        a = trained.eval()(**inputs).sample
        b = fresh.eval()(**inputs).sample
        base = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir).eval()(**inputs).sample
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, base, atol=1e-4)  # the LoRA did learn something


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    from pipeline import metrics

    logger = metrics.MetricsLogger(tmp_path, plot_every=0)  # tensorboard absent here: still works
    logger.log({"step": 1, "loss": 1.0, "lr": 0.1})
    logger.close()
    calls = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(metrics, "_tensorboard_writer", lambda folder: FakeWriter())
    logger = metrics.MetricsLogger(tmp_path / "tb", plot_every=0)
    logger.log({"step": 3, "loss": 0.5, "denoise_loss": 0.4, "mhubert_loss": 0.2, "lr": 1e-4})
    logger.close()
    assert ("train/loss", 0.5, 3) in calls and ("train/m-hubert_loss", 0.2, 3) in calls
    assert ("train/learning_rate", 1e-4, 3) in calls


def test_bf16_true_runs_on_cpu(tiny_transformer_dir, tmp_path):
    config = tiny_config(precision="bf16-true", max_steps=3, save_every=0)
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    summary = train(config, model, SyntheticSource(), tmp_path / "bf16")
    weights = lora_weights(tmp_path / "bf16" / "checkpoints" / "epoch=0-step=3_lora")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}  # scale 16 is baked exactly in bf16
    assert summary["last_loss"] is not None and summary["last_loss"] == summary["last_loss"]


def test_bf16_mixed_is_refused(tiny_transformer_dir, tmp_path):
    config = tiny_config()
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    with pytest.raises(ConfigError, match="bf16-true"):
        train(dataclasses.replace(config, precision="bf16-mixed"), model, SyntheticSource(), tmp_path / "x")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_transformer_dir, tmp_path):
    def poison(i, batch):
        if i == 4:  # the 5th step
            batch["latents"] = torch.full_like(batch["latents"], float("nan"))

    config = tiny_config(max_steps=10, save_every=2)
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    with pytest.raises(TrainingDiverged, match=r"step 5.*NaN.*epoch=0-step=4_lora"):
        train(config, model, SyntheticSource(on_batch=poison), tmp_path / "nan")
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == ["epoch=0-step=2_lora", "epoch=0-step=4_lora"]


def test_keyboard_interrupt_saves_checkpoint(tiny_transformer_dir, tmp_path):
    def interrupt(i, batch):
        if i == 3:
            raise KeyboardInterrupt

    config = tiny_config(max_steps=10, save_every=0)
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    summary = train(config, model, SyntheticSource(on_batch=interrupt), tmp_path / "int")
    assert summary["stopped"].startswith("interrupted") and summary["step"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "int")] == ["epoch=0-step=3_lora"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_sigterm_saves_checkpoint_and_stops(tiny_transformer_dir, tmp_path):
    def term(i, batch):
        if i == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag: step 3 completes

    config = tiny_config(max_steps=10, save_every=0)
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    summary = train(config, model, SyntheticSource(on_batch=term), tmp_path / "term")
    assert summary["stopped"] == "SIGTERM" and summary["step"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "term")] == ["epoch=0-step=3_lora"]
    assert len(read_metrics(tmp_path / "term" / "metrics.jsonl")) == 3


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_once_finishes_the_step_twice_stops_at_once(tiny_transformer_dir, tmp_path, presses):
    def ctrl_c(i, batch):
        if i == 2:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)

    config = tiny_config(max_steps=10, save_every=2)
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    summary = train(config, model, SyntheticSource(on_batch=ctrl_c), tmp_path / "c")
    assert summary["stopped"].startswith("interrupted")
    names = [p.name for p in list_checkpoints(tmp_path / "c")]
    if presses == 1:  # step 3 completes, then a checkpoint
        assert summary["step"] == 3 and names == ["epoch=0-step=2_lora", "epoch=0-step=3_lora"]
    else:  # out at once, nothing saved mid-update: the periodic checkpoint stands
        assert names == ["epoch=0-step=2_lora"]


def test_fresh_run_refuses_a_folder_with_checkpoints(tiny_transformer_dir, tmp_path):
    config = tiny_config(max_steps=2, save_every=0, warmup_steps=0)
    train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"), SyntheticSource(), tmp_path / "r")
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume latest"):
        train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"), SyntheticSource(),
              tmp_path / "r")


def test_preview_callback_gets_transformer_batch_and_step(tiny_transformer_dir, tmp_path):
    calls = []

    def preview(transformer, batch, step):
        calls.append((step, batch["keys"][0], transformer.training))

    config = tiny_config(max_steps=5, plot_every=2, save_every=0)
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    with pytest.warns(UserWarning, match="60-step"):
        train(config, model, SyntheticSource(n=10), tmp_path / "prev", preview=preview)
    # official: at the start of every step whose index is a multiple of plot_every (step 0 too),
    # on the batch that step trains on, with the model in eval mode
    assert calls == [(0, "song0_0", False), (2, "song2_0", False), (4, "song4_0", False)]
    assert model.training


def test_no_trainable_parameters_is_a_clear_error(tiny_transformer_dir, tmp_path):
    from pipeline.models.transformer import ACEStepTransformer2DModel

    model = ACEStepTransformer2DModel.from_pretrained(tiny_transformer_dir)
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable LoRA"):
        train(tiny_config(), model, SyntheticSource(), tmp_path / "none")


def test_stage_plans_presets_and_sweeps(tmp_path):
    from stages.train import plan_runs

    runs = plan_runs({"experiment": "demo", "max_steps": 20}, {"learning_rate": 5e-5},
                     presets=("conservative", "aggressive"))
    assert [(c.run_name, c.rank, c.max_steps, c.learning_rate) for c in runs] == [
        ("demo_conservative", 16, 20, 5e-5), ("demo_aggressive", 256, 20, 5e-5)]
    assert [c.run_name for c in plan_runs({"experiment": "demo"}, {}, presets=("aggressive",))] == ["demo"]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {preset: balanced, learning_rate: 2e-4}\n- {experiment: mine, rank: 8}\n")
    runs = plan_runs({}, {"max_steps": 3}, sweep=str(sweep))
    assert [(c.run_name, c.rank, c.learning_rate, c.max_steps) for c in runs] == [
        ("sweep_run1", 64, 2e-4, 3), ("mine", 8, 1e-4, 3)]
    sweep.write_text("- {experiment: same}\n- {experiment: same}\n")
    with pytest.raises(ConfigError, match="share the experiment folder same"):
        plan_runs({}, {}, sweep=str(sweep))
    with pytest.raises(ConfigError, match="either --preset"):
        plan_runs({}, {}, presets=("balanced",), sweep=str(sweep))


# --------------------------------------------------------------------------------------------- CLI
def _tiny_cache(folder, n_songs=3, frames=20):
    """A feature cache with the tiny transformer's widths (written by the cache's own writer)."""
    from cache.schema import LATENT_RATE, SongFeatures
    from cache.shards import write_shard

    g = torch.Generator().manual_seed(0)
    songs = {}
    for i in range(n_songs):
        n_m, n_h = round(frames / LATENT_RATE * 75), round(frames / LATENT_RATE * 50)
        songs[f"s{i}"] = SongFeatures(
            key=f"s{i}", latents=torch.randn(8, 16, frames, generator=g),
            mert=torch.randn(n_m, MERT_DIM, generator=g), mhubert=torch.randn(n_h, MHUBERT_DIM, generator=g),
            lyric_ids=torch.randint(1, VOCAB, (9,), generator=g),
            text_states=torch.randn(2, 6, TEXT_DIM, generator=g), text_masks=torch.ones(2, 6, dtype=torch.long))
    for stream in ("latents", "mert", "mhubert", "text"):
        write_shard(folder, stream, None, songs, f"fp-{stream}", {k: "h" for k in songs})


@pytest.fixture
def project(tmp_path, tiny_transformer_dir):
    import shutil

    acestep = tmp_path / "ckpt"
    shutil.copytree(tiny_transformer_dir, acestep / "ace_step_transformer")
    _tiny_cache(tmp_path / "workspace" / "cache" / "features")
    params = tmp_path / "params.yaml"
    params.write_text(
        f"paths:\n  cache: {tmp_path / 'workspace' / 'cache'}\n  exps: {tmp_path / 'workspace' / 'exps' / 'logs'}\n"
        f"models:\n  acestep: {acestep}\n  mert: {tmp_path / 'no-mert'}\n  mhubert: {tmp_path / 'no-hubert'}\n"
        "train:\n  experiment: cli\n  precision: fp32\n  device: cpu\n  rank: 4\n  save_every: 2\n  warmup_steps: 1\n"
    )
    return tmp_path, params


def test_cli_trains_from_the_cache(project):
    from stages.cli import main

    root, params = project
    main(["train", "--params", str(params), "--max-steps", "3", "--no-gradient-checkpointing"])
    run = root / "workspace" / "exps" / "logs" / "cli"
    assert [p.name for p in list_checkpoints(run)] == ["epoch=0-step=2_lora", "epoch=0-step=3_lora"]
    assert len(read_metrics(run / "metrics.jsonl")) == 3
    launched = json.loads((root / "workspace" / "configs" / "lora_config.json").read_text())
    assert launched["rank"] == 4 and launched["max_steps"] == 3 and launched["gradient_checkpointing"] == "none"
    assert json.loads((run / "train_config.json").read_text()) == launched
    # continue the same run for two more steps
    main(["train", "--params", str(params), "--max-steps", "5", "--resume", "latest", "--no-gradient-checkpointing"])
    assert list_checkpoints(run)[-1].name.endswith("step=5_lora")
    # a new run of the same experiment (e.g. `dvc repro` after a data change) keeps the last one aside
    main(["train", "--params", str(params), "--max-steps", "1"])
    assert [p.name for p in list_checkpoints(run)] == ["epoch=0-step=1_lora"]
    (previous,) = run.parent.glob("cli.previous-*")
    assert list_checkpoints(previous)[-1].name.endswith("step=5_lora")


def test_cli_resume_auto_continues_only_the_same_run(project, monkeypatch):
    """`dvc repro` runs `aceturbo train --resume auto`: an interrupted run continues, a changed one restarts."""
    from pipeline import train as train_module
    from stages.cli import main

    root, params = project
    args = ["train", "--params", str(params), "--max-steps", "4", "--no-gradient-checkpointing", "--resume", "auto"]
    real_step, calls = train_module.train_step, {"n": 0}

    def interrupted_after_two(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # like Ctrl-C during `dvc repro`
        return real_step(*a, **kw)

    monkeypatch.setattr(train_module, "train_step", interrupted_after_two)
    with pytest.raises(SystemExit):
        main(args)
    run = root / "workspace" / "exps" / "logs" / "cli"
    assert list_checkpoints(run)[-1].name.endswith("step=2_lora")
    monkeypatch.setattr(train_module, "train_step", real_step)
    main(args)  # same settings, same data: continues from step 2
    assert list_checkpoints(run)[-1].name.endswith("step=4_lora")
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not list(run.parent.glob("cli.previous-*"))
    main(args[:4] + ["5"] + args[5:])  # other settings: a new run, the old one set aside
    assert list(run.parent.glob("cli.previous-*"))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_cli_runs_several_presets_in_sequence(project):
    from stages.cli import main

    root, params = project
    main(["train", "--params", str(params), "--max-steps", "1", "--preset", "conservative",
          "--preset", "balanced", "--rank", "2"])
    logs = root / "workspace" / "exps" / "logs"
    for name in ("cli_conservative", "cli_balanced"):
        saved = json.loads((logs / name / "train_config.json").read_text())
        assert saved["rank"] == 2 and saved["preset"] == name.split("_")[1]
        assert list_checkpoints(logs / name)


def test_cli_errors_are_one_line(project, capsys):
    from stages.cli import main

    root, params = project
    with pytest.raises(SystemExit) as exc:
        main(["train", "--params", str(params), "--precision", "bf16-mixed"])
    assert exc.value.code == 1 and "bf16-true" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--params", str(params), "--cache", str(root / "empty")])
    assert "empty or missing" in capsys.readouterr().err
