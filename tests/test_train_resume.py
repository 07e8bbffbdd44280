"""Resume is bit-exact: N steps in one go == N/2 steps, stop, resume, N/2 steps (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.metrics import read_metrics
from pipeline.train import load_transformer_for_training, train
from pipeline.train_state import STATE_FILE, checkpoint_lora_weights, list_checkpoints
from test_train import SyntheticSource, lora_weights, one_thread, tiny_config, tiny_transformer_dir  # noqa: F401 (fixtures)

N = 8


def _interrupt_at(k):
    def hook(i, batch):
        if i == k:
            raise KeyboardInterrupt
    return hook


def _config():
    # lyric-encoder dropout (global torch RNG), CFG dropout, sigma and noise (our generator),
    # gradient checkpointing (block 0 and the lyric encoder recompute, block 1 keeps its
    # activations), epochs of 3 batches: everything a resume must restore
    return tiny_config(max_steps=N, save_every=0, warmup_steps=3, keep_last=0, gradient_checkpointing=2)


def _to_old_format(ckpt):
    """Rewrite a checkpoint the way aceturbo wrote it before LoRA files were baked: the LoRA file
    unbaked (official trainer's form), training_state.pt format 1 without lora_weights."""
    from pipeline.lora import inspect_lora, write_lora_file

    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    trained = state.pop("lora_weights")
    state["format"] = 1
    torch.save(state, ckpt / STATE_FILE)
    write_lora_file(trained, ckpt, inspect_lora(ckpt).trained, baked=False)


@pytest.mark.parametrize("old_format", [False, True], ids=["new", "old-format-checkpoint"])
def test_resume_is_bit_exact(tiny_transformer_dir, tmp_path, old_format):
    config = _config()
    whole = train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"),
                  SyntheticSource(n=3), tmp_path / "whole")
    assert whole["step"] == N

    half = train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"),
                 SyntheticSource(n=3, on_batch=_interrupt_at(N // 2)), tmp_path / "split")
    assert half["step"] == N // 2 and half["stopped"].startswith("interrupted")
    if old_format:
        _to_old_format(list_checkpoints(tmp_path / "split")[-1])
    # a fresh process would build everything again: new model (same seed), new source
    resumed = train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"),
                    SyntheticSource(n=3), tmp_path / "split", resume="latest")
    assert resumed["step"] == N and resumed["epoch"] == whole["epoch"]

    a = lora_weights(tmp_path / "whole" / "checkpoints" / f"epoch={whole['epoch']}-step={N}_lora")
    b = lora_weights(tmp_path / "split" / "checkpoints" / f"epoch={resumed['epoch']}-step={N}_lora")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA differs from the uninterrupted run"
    a, b = (checkpoint_lora_weights(tmp_path / run / "checkpoints" / f"epoch={r['epoch']}-step={N}_lora")
            for run, r in (("whole", whole), ("split", resumed)))
    assert all(torch.equal(a[k], b[k]) for k in a), "the unbaked weights kept for resume differ"
    la = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert la == lb  # one record per step, none duplicated by the resume


def test_resume_from_a_path_after_sigterm(tiny_transformer_dir, tmp_path):
    import os
    import signal

    def term(i, batch):
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_config(max_steps=4, save_every=0)
    run = tmp_path / "run"
    first = train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"),
                  SyntheticSource(on_batch=term), run)
    assert first["stopped"] == "SIGTERM" and first["step"] == 2
    ckpt = list_checkpoints(run)[-1]
    second = train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"),
                   SyntheticSource(), run, resume=str(ckpt))
    assert second["step"] == 4 and second["stopped"] == "completed"
    assert [p.name for p in list_checkpoints(run)] == ["epoch=0-step=2_lora", "epoch=0-step=4_lora"]


def test_resume_errors_are_clear(tiny_transformer_dir, tmp_path):
    config = tiny_config(max_steps=3, save_every=0)
    model = load_transformer_for_training(tiny_transformer_dir, config, "cpu")
    with pytest.raises(ConfigError, match="no complete checkpoint.*drop --resume"):
        train(config, model, SyntheticSource(), tmp_path / "empty", resume="latest")
    with pytest.raises(ConfigError, match="not found"):
        train(config, model, SyntheticSource(), tmp_path / "empty", resume=str(tmp_path / "nope"))
    train(config, model, SyntheticSource(), tmp_path / "r4")
    other = tiny_config(max_steps=4, rank=8)
    with pytest.raises(ConfigError, match="rank|'r': 4"):
        train(other, load_transformer_for_training(tiny_transformer_dir, other, "cpu"), SyntheticSource(),
              tmp_path / "r4", resume="latest")
