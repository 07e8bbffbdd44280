"""The training step's memory: the model (pipeline.memory) against the meter (pipeline.memory_meter) on
the tiny model's real CPU tensors and on the small size's meta tensors, and loading for training
without the cross-attention add_* weights no step uses (same loss, same gradients)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline import memory
from pipeline.errors import CheckpointError
from pipeline.memory_meter import TensorMemoryMeter, check_against_meter, count_step_memory, synthetic_batch
from pipeline.train import UNUSED_IN_TRAINING, compute_loss, load_transformer_for_training
from pipeline.train_config import from_params
from test_train import one_thread, tiny_transformer_dir  # noqa: F401 (fixtures)

# The model is a sum of counted terms; what it leaves out (small temporaries, the lyric encoder's
# linear terms, allocator-free transients) is a few percent at every size we measured. Stated here:
TINY_TOLERANCE = 0.12  # tiny model: megabytes, where fixed-size leftovers weigh most
SMALL_TOLERANCE = 0.06


def _config(**changes):
    base = {"precision": "fp32", "device": "cpu", "rank": 8, "seed": 3, "text_dropout": 0.0,
            "speaker_dropout": 0.0, "lyric_dropout": 0.0}
    return from_params({**base, **changes}).validate()


# ------------------------------------------------------------------ the model
def test_frame_rates_agree_with_the_cache_schema():
    from cache import schema

    assert (memory.LATENT_RATE, memory.MERT_RATE, memory.MHUBERT_RATE) == \
        (schema.LATENT_RATE, schema.MERT_RATE, schema.MHUBERT_RATE)


def test_checkpointing_settings():
    assert [memory.checkpointed_blocks(v, 24) for v in (True, False, "all", "none", "true", "false", "auto", "4", "6 of 24")] \
        == [24, 0, 24, 0, 24, 0, 24, 6, 6]


def test_full_size_estimate_and_what_fits_12_gib():
    """r=64, 3-minute song, bf16-true: with checkpointing it fits 12 GiB with room; without it does not."""
    from pipeline.tiny.small import FULL_TRANSFORMER_CONFIG

    params = memory.transformer_params(FULL_TRANSFORMER_CONFIG)
    assert params["cross_attn_unused"] == 24 * 4 * (2560 * 2560 + 2560)  # 629 M
    est = memory.estimate_training_memory(FULL_TRANSFORMER_CONFIG, 180, rank=64, gradient_checkpointing=True)
    assert est.weights == params["loaded_for_training"] * 2
    assert est.lora == est.gradients == est.optimizer // 2 == memory.lora_params(FULL_TRANSFORMER_CONFIG, 64) * 2
    assert 5.5 * memory.GiB < est.total < 7 * memory.GiB
    none = memory.estimate_training_memory(FULL_TRANSFORMER_CONFIG, 180, rank=64, gradient_checkpointing="none")
    assert none.total > 12 * memory.GiB
    every_third = memory.estimate_training_memory(FULL_TRANSFORMER_CONFIG, 180, rank=64, gradient_checkpointing="3")
    assert est.total < every_third.total < none.total
    unused = memory.estimate_training_memory(FULL_TRANSFORMER_CONFIG, 180, rank=64, skip_unused=False)
    assert unused.total - est.total == params["cross_attn_unused"] * 2  # 1.26 GB
    assert "lower --rank (now 64)" in memory.out_of_memory_advice(none, {"rank": "--rank"})
    assert none.summary().startswith(f"{none.total / memory.GiB:.2f} GiB (weights")


@pytest.mark.parametrize("precision,checkpointing", [("fp32", "all"), ("fp32", "none"), ("bf16-true", "all")])
def test_model_matches_the_meter_on_the_tiny_model(tiny_transformer_dir, precision, checkpointing):
    """Real CPU tensors: the product's train_step under the meter vs the model, within TINY_TOLERANCE."""
    config = json.loads((tiny_transformer_dir / "config.json").read_text())
    train = _config(precision=precision, gradient_checkpointing=checkpointing == "all")
    counted = count_step_memory(tiny_transformer_dir, train, synthetic_batch(config, 30, lyric_tokens=200), "cpu")
    est = memory.estimate_training_memory(config, tokens=counted["tokens"], rank=train.rank, precision=precision,
                                          gradient_checkpointing=checkpointing, lyric_tokens=200,
                                          ssl_frames=counted["ssl_frames"])
    assert est.weights == counted["weights"] and est.lora == counted["lora"]
    assert est.total == pytest.approx(counted["peak"], rel=TINY_TOLERANCE)


@pytest.mark.parametrize("checkpointing", ["all", "none", "3"])
def test_model_matches_the_meter_on_meta_at_the_small_size(checkpointing):
    """meta tensors (nothing allocated, nothing computed): every width ÷ 8 of the real model. Without
    checkpointing the blocks' saved activations are most of the total, so a stale per-block count
    shows there first. The full size is checked the same way by `aceturbo bench --memory-check`
    (docs/benchmarks.md)."""
    from pipeline.tiny.small import configs

    check = check_against_meter(configs("small")["transformer"], 60, 64, "bf16-true", checkpointing)
    assert check["ratio"] == pytest.approx(1.0, abs=SMALL_TOLERANCE)


def test_meter_counts_only_its_device():
    """A meter for one device leaves the others' storages out, as max_memory_allocated does: the
    host batch a loader hands to a GPU step is not device memory."""
    meter = TensorMemoryMeter("meta")
    with meter:
        on_host = torch.ones(1000)  # 4 kB on the CPU: not counted
        on_meta = torch.ones(500, device="meta")  # 2 kB
    assert meter.peak == 2000
    del on_host, on_meta


def test_meter_counts_live_storage_and_peak():
    meter = TensorMemoryMeter()
    with meter:
        a = torch.ones(1000)  # 4 kB
        b = a.view(10, 100)  # a view: no new storage
        c = torch.ones(2000)  # 8 kB
        del c
    assert meter.peak == 12000 and meter.live == 4000
    del a, b


def test_host_memory_fields():
    mem = memory.host_memory()
    assert {"peak_rss_mb", "rss_mb", "rss_anon_mb", "rss_file_mb"} <= set(mem)
    assert memory.reset_peak_rss()
    assert memory.host_memory()["peak_rss_mb"] <= mem["peak_rss_mb"] + 64


# ------------------------------------------------------------------ loading without unused weights
class _Touched(TorchFunctionMode):
    """Records every tensor an operator receives (parameters reach F.linear, conv, norms as arguments)."""

    def __init__(self):
        super().__init__()
        self.ids = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor):
                self.ids.add(id(t))
        return func(*args, **(kwargs or {}))


def _batch(config):
    return synthetic_batch(config, 4, text_tokens=5, lyric_tokens=7)


def test_the_step_never_touches_the_add_projections(tiny_transformer_dir):
    """Forward + backward of the full model: the only parameters no operator receives are the
    cross-attention add_* projections, exactly what skip_unused leaves out."""
    from pipeline.objective import training_sigmas

    config = json.loads((tiny_transformer_dir / "config.json").read_text())
    train = _config(gradient_checkpointing=False)
    model = load_transformer_for_training(tiny_transformer_dir, train, "cpu", skip_unused=False)
    with _Touched() as touched:
        loss, _ = compute_loss(model, _batch(config), torch.Generator().manual_seed(0), training_sigmas(), train,
                               torch.device("cpu"), torch.float32)
        loss.backward()
    untouched = sorted(n for n, p in model.named_parameters() if id(p) not in touched.ids)
    assert untouched and all(n.split(".")[-2] in UNUSED_IN_TRAINING and ".cross_attn." in n for n in untouched)
    assert len(untouched) == 2 * len(UNUSED_IN_TRAINING) * config["num_layers"]  # weight + bias each


@pytest.mark.parametrize("precision", ["fp32", "bf16-true"])
def test_skip_unused_gives_identical_loss_and_gradients(tiny_transformer_dir, precision):
    from pipeline.objective import training_sigmas

    config = json.loads((tiny_transformer_dir / "config.json").read_text())
    train = _config(precision=precision)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    results = []
    for skip in (True, False):
        model = load_transformer_for_training(tiny_transformer_dir, train, "cpu", skip_unused=skip)
        loss, parts = compute_loss(model, _batch(config), torch.Generator().manual_seed(5), training_sigmas(), train,
                                   torch.device("cpu"), dtype)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, {n for n, _ in model.named_parameters()}))
    (loss_a, grads_a, names_a), (loss_b, grads_b, names_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    dropped = names_b - names_a
    assert dropped and all(n.split(".")[-2] in UNUSED_IN_TRAINING for n in dropped)


def test_meta_load_reads_no_weights(tmp_path, tiny_transformer_dir):
    (tmp_path / "config.json").write_text((tiny_transformer_dir / "config.json").read_text())  # no weights file at all
    model = load_transformer_for_training(tmp_path, _config(precision="bf16-true"), "meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_weights_are_one_line_errors(tmp_path, tiny_transformer_dir):
    from safetensors.torch import load_file, save_file

    from pipeline.models.transformer import WEIGHTS_NAME

    folder = tmp_path / "ace_step_transformer"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_transformer_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="are missing"):
        load_transformer_for_training(folder, _config(), "cpu")
    state = load_file(str(tiny_transformer_dir / WEIGHTS_NAME))
    state.pop("proj_in.early_conv_layers.0.weight")
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="lack 1 tensor"):
        load_transformer_for_training(folder, _config(), "cpu")


def test_loaded_weights_are_the_process_own_memory(tiny_transformer_dir):
    """Read with pread: no parameter aliases a memory-mapped file (whose pages the kernel may drop
    and re-read, which made peak RSS depend on the machine's load)."""
    from pathlib import Path

    model = load_transformer_for_training(tiny_transformer_dir, _config(), "cpu")
    mapped = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in
              Path("/proc/self/maps").read_text().splitlines() if ".safetensors" in line]
    assert not any(a <= p.data_ptr() < b for p in model.parameters() for a, b in mapped)


def test_sharded_checkpoint_loads_the_same(tmp_path, monkeypatch, tiny_transformer_dir):
    """The bench writes big transformers in shards (one shard in memory at a time); both load paths
    read them, to the same values as a single file."""
    import pipeline.tiny.small as small
    from pipeline.tiny.transformer import TINY_TRANSFORMER_CONFIG

    monkeypatch.setattr(small, "SHARD_BYTES", 200_000)
    folder = small.save_transformer(tmp_path / "ace_step_transformer", TINY_TRANSFORMER_CONFIG, dtype=torch.float32)
    assert len(list(folder.glob("*-of-*.safetensors"))) > 1
    skipped = load_transformer_for_training(folder, _config(), "cpu").state_dict()
    full = load_transformer_for_training(folder, _config(), "cpu", skip_unused=False).state_dict()
    monkeypatch.setattr(small, "SHARD_BYTES", 2 << 30)
    single = small.save_transformer(tmp_path / "single" / "ace_step_transformer", TINY_TRANSFORMER_CONFIG,
                                    dtype=torch.float32)
    reference = load_transformer_for_training(single, _config(), "cpu").state_dict()
    assert all(torch.equal(skipped[k], full[k]) and torch.equal(skipped[k], reference[k]) for k in skipped)
