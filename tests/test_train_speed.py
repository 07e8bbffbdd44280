"""The training step's speed settings, proven on the CPU with the tiny transformer: gradient
checkpointing by choice (all / none / every k-th block / auto), and that each keeps the numbers."""
from __future__ import annotations

import pytest
import torch

from cache.schema import LATENT_RATE, SongFeatures
from pipeline import checkpointing
from pipeline.errors import ConfigError
from pipeline.objective import training_sigmas
from pipeline.train import compute_loss, load_transformer_for_training
from pipeline.train_config import TrainConfig, from_params
from test_train import one_thread  # noqa: F401 (fixture: tiny ops on 2 busy cores)

TEXT_DIM, MERT_DIM, MHUBERT_DIM, VOCAB, SPEAKER_DIM = 12, 24, 20, 40, 8
LAYERS = 4


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory):
    from pipeline.tiny.transformer import save_tiny_transformer

    return save_tiny_transformer(tmp_path_factory.mktemp("tiny") / "ace_step_transformer", seed=0,
                                 num_layers=LAYERS, ssl_encoder_depths=[1, 2])


def config(**changes) -> TrainConfig:
    base = dict(precision="fp32", device="cpu", rank=4, seed=3, text_dropout=0.0, speaker_dropout=0.0,
                lyric_dropout=0.0)
    base.update(changes)
    return from_params(base).validate()


def song_batch(frames: int, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "keys": [f"song{seed}_{i}" for i in range(batch)],
        "latents": torch.randn(batch, 8, 16, frames, generator=g),
        "latent_mask": torch.ones(batch, frames),
        "text_states": torch.randn(batch, 5, TEXT_DIM, generator=g),
        "text_mask": torch.ones(batch, 5, dtype=torch.long),
        "speaker": torch.zeros(batch, SPEAKER_DIM),
        "lyric_ids": torch.randint(1, VOCAB, (batch, 7), generator=g),
        "lyric_mask": torch.ones(batch, 7, dtype=torch.long),
        "mert": [torch.randn(frames * 7, MERT_DIM, generator=g) for _ in range(batch)],
        "mhubert": [torch.randn(frames * 5, MHUBERT_DIM, generator=g) for _ in range(batch)],
    }


def lora_grads(model, cfg: TrainConfig, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _ = compute_loss(model, batch, torch.Generator().manual_seed(5), training_sigmas(), cfg,
                           torch.device("cpu"), torch.float32)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# ------------------------------------------------------------------ a. gradient checkpointing
@pytest.mark.parametrize("given, stored", [(True, "all"), (False, "none"), ("yes", "all"), ("off", "none"),
                                           (1, "all"), (0, "none"), (3, "3"), ("2", "2"), ("AUTO", "auto")])
def test_checkpointing_spellings(given, stored):
    assert from_params({"gradient_checkpointing": given}).gradient_checkpointing == stored
    assert TrainConfig(gradient_checkpointing=given).gradient_checkpointing == stored


def test_checkpointing_bad_value_names_the_setting():
    with pytest.raises(ConfigError, match="gradient_checkpointing.*every k-th block"):
        from_params({"gradient_checkpointing": "sometimes"})


def test_plans():
    assert checkpointing.plan_blocks("all", 5) == [0, 1, 2, 3, 4]
    assert checkpointing.plan_blocks("none", 5) == []
    assert checkpointing.plan_blocks("2", 5) == [0, 2, 4]
    assert checkpointing.describe([0, 2, 4], 5) == "3 of 5" and checkpointing.describe([], 5) == "none"


def test_each_setting_recomputes_its_blocks_and_keeps_the_gradients(transformer_dir):
    batch = song_batch(12)
    grads = {}
    for setting, expected in (("none", []), ("all", [0, 1, 2, 3]), ("2", [0, 2])):
        cfg = config(gradient_checkpointing=setting)
        model = load_transformer_for_training(transformer_dir, cfg, "cpu")
        model.eval()  # no dropout: the comparison is about recomputation
        assert model.checkpointed_blocks == expected
        recomputed = []
        inner = model._gradient_checkpointing_func if model.gradient_checkpointing else None
        if inner is not None:
            def counting(block, *args, _inner=inner, _blocks=list(model.transformer_blocks), _seen=recomputed):
                _seen.append(_blocks.index(block))
                return _inner(block, *args)
            model._gradient_checkpointing_func = counting
        grads[setting] = lora_grads(model, cfg, batch)
        assert recomputed == expected
    for setting in ("all", "2"):
        assert grads[setting].keys() == grads["none"].keys()
        for name, grad in grads["none"].items():
            torch.testing.assert_close(grads[setting][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_auto_takes_the_fewest_recomputing_blocks_that_fit(transformer_dir):
    model = load_transformer_for_training(transformer_dir, config(gradient_checkpointing="none"), "cpu")
    estimate = checkpointing.estimate_activations(model, tokens=400, text_tokens=5, lyric_tokens=7)
    assert estimate.num_blocks == LAYERS and estimate.per_block > 10 * estimate.block_input > 0
    # each recomputing block saves memory, until only one is kept: it costs what the block being
    # redone does, so recomputing the last one too saves nothing
    needs = [estimate.needed(r) for r in range(LAYERS + 1)]
    assert all(a > b for a, b in zip(needs[:-1], needs[1:-1])) and needs[-1] >= needs[-2]
    margin = checkpointing.MARGIN_BYTES
    assert checkpointing.auto_blocks(estimate, free=needs[0] + margin, total=0) == []
    assert checkpointing.auto_blocks(estimate, free=needs[2] + margin, total=0) == [0, 1]
    assert checkpointing.auto_blocks(estimate, free=0, total=0) == [0, 1, 2, 3]  # nothing fits: least memory
    # the estimate grows with the song: a longer one needs more per block
    longer = checkpointing.estimate_activations(model, tokens=800, text_tokens=5, lyric_tokens=7)
    assert 1.8 < longer.per_block / estimate.per_block < 2.2


# ------------------------------------------------------------------ g. exact batches > 1
def song(key: str, frames: int, seed: int) -> SongFeatures:
    g = torch.Generator().manual_seed(seed)
    seconds = frames / LATENT_RATE
    return SongFeatures(key=key, latents=torch.randn(8, 16, frames, generator=g),
                        mert=torch.randn(round(seconds * 75), MERT_DIM, generator=g),
                        mhubert=torch.randn(round(seconds * 50), MHUBERT_DIM, generator=g),
                        text_states=torch.randn(2, 5, TEXT_DIM, generator=g), text_masks=torch.ones(2, 5, dtype=torch.long),
                        lyric_ids=torch.randint(1, VOCAB, (3 + seed,), generator=g))


def forward(model, batch: dict, sigma: torch.Tensor, noise: torch.Tensor):
    """Sample output and loss of the model on ``batch`` with the given σ and noise (fp32, no dropout)."""
    from pipeline.objective import denoise_loss, noisy_latents, total_loss

    x0 = batch["latents"]
    x_t = noisy_latents(x0, noise, sigma)
    out = model(hidden_states=x_t, attention_mask=batch["latent_mask"], encoder_text_hidden_states=batch["text_states"],
                text_attention_mask=batch["text_mask"], speaker_embeds=batch["speaker"],
                lyric_token_idx=batch["lyric_ids"], lyric_mask=batch["lyric_mask"], timestep=1000 * sigma,
                ssl_hidden_states=[batch["mert"], batch["mhubert"]])
    loss, _ = total_loss(denoise_loss(out.sample, x_t, x0, sigma, batch["latent_mask"]), out.proj_losses)
    return out.sample, loss


def one(batch: dict, i: int) -> dict:
    return {k: (v[i:i + 1] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}


def test_a_batch_of_two_equals_two_batches_of_one(transformer_dir):
    """Two songs of different lengths: the batch of two (equal-length crops) gives each song exactly
    what it gets alone. Padding the shorter one instead would leak the padded frames into it."""
    import random

    from cache.collate import collate, make_batch, make_sample

    model = load_transformer_for_training(transformer_dir, config(gradient_checkpointing="none"), "cpu")
    model.eval()
    songs = [song("short", 20, 0), song("long", 33, 1)]
    batch = make_batch(songs, [random.Random(0), random.Random(1)], max_seconds=240.0, speaker_dim=SPEAKER_DIM)
    assert batch["latents"].shape[-1] == 20 and batch["latent_mask"].all()  # the long one cropped, none padded
    sigma = torch.tensor([0.3, 0.8])
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        both, loss = forward(model, batch, sigma, noise)
        alone = [forward(model, one(batch, i), sigma[i:i + 1], noise[i:i + 1]) for i in range(2)]
    for i, (sample, _) in enumerate(alone):
        torch.testing.assert_close(both[i:i + 1], sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, (alone[0][1] + alone[1][1]) / 2, rtol=1e-5, atol=1e-7)

    # what equal-length crops avoid: padding the short song next to the long one changes its output
    padded = collate([make_sample(s, random.Random(k), 240.0) for k, s in enumerate(songs)], speaker_dim=SPEAKER_DIM)
    assert padded["latents"].shape[-1] == 33 and not padded["latent_mask"].all()
    noise = torch.randn(padded["latents"].shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed, _ = forward(model, padded, sigma, noise)
        solo, _ = forward(model, {**one(padded, 0), "latents": padded["latents"][:1, ..., :20],
                                  "latent_mask": padded["latent_mask"][:1, :20]}, sigma[:1], noise[:1, ..., :20])
    assert (mixed[0, ..., :20] - solo[0]).abs().max() > 1e-2


# ------------------------------------------------------------------ b. compiled blocks, shape buckets
class CountingBackend:
    """A torch.compile backend that runs the captured graph eagerly and counts the compiles."""

    def __init__(self):
        self.shapes = []

    def __call__(self, graph, example_inputs):
        self.shapes.append(tuple(tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)))
        return graph.forward


def test_a_run_over_songs_of_many_lengths_compiles_once_per_bucket(transformer_dir):
    """20 songs of 20 lengths and lyrics: the compiled block compiles once per shape bucket, and
    every block shares the compiles. (Counted with a backend that runs the captured graph eagerly:
    Inductor on 2 CPU cores is too slow for this; compiled == eager is checked on its own below.)"""
    import random

    import torch._dynamo

    from cache.collate import bucket_batch, make_batch
    from pipeline.train import compile_blocks

    torch._dynamo.reset()
    # blocks 0 and 2 recompute in backward: the compiled graph serves plain and checkpointed blocks
    cfg = config(gradient_checkpointing=2, compile=True, max_seconds=20.0)  # a 215-frame window
    model = load_transformer_for_training(transformer_dir, config(gradient_checkpointing=2), "cpu")
    backend = CountingBackend()
    compile_blocks(model, backend=backend)
    rng = random.Random(0)
    raw, buckets = set(), set()
    for i in range(20):  # 20 lengths of 100..200 frames, 3..8 lyric tokens
        s = song(f"s{i}", 100 + 5 * i + rng.randrange(4), i).replace(
            lyric_ids=torch.randint(1, VOCAB, (rng.randrange(3, 9),)))
        batch = make_batch([s], [random.Random(i)], cfg.max_seconds, SPEAKER_DIM)
        raw.add((batch["latents"].shape[-1], batch["lyric_ids"].shape[1]))
        cut = bucket_batch(batch, torch.Generator(), cfg.max_seconds)
        buckets.add((cut["latents"].shape[-1], 1 + cut["text_states"].shape[1] + cut["lyric_ids"].shape[1]))
        loss, _ = compute_loss(model, batch, torch.Generator().manual_seed(i), training_sigmas(), cfg,
                               torch.device("cpu"), torch.float32)
        loss.backward()
        model.zero_grad(set_to_none=True)
    assert len(raw) == 20  # unbucketed, each song would be a new shape: 20 compiles
    assert len(backend.shapes) == len(set(backend.shapes)) == len(buckets) <= 10  # once per bucket
    assert {t for t, _ in buckets} <= {180, 152, 127, 107, 90}  # int(215·2^(-i/4))
    assert {c for _, c in buckets} <= {12, 16}  # ⌈2^(j/2)⌉ ≥ 1 + 5 prompt + 3..8 lyric tokens


def _compiled_tiny_model(transformer_dir, backend):
    """The tiny model compiled with ``backend`` (a TrainConfig with compile on would use Inductor)."""
    import torch._dynamo

    from pipeline.train import compile_blocks

    torch._dynamo.reset()
    model = load_transformer_for_training(transformer_dir, config(gradient_checkpointing="none"), "cpu")
    compile_blocks(model, backend=backend)
    return model


def test_validation_and_previews_run_eagerly_when_compiled(transformer_dir, tmp_path):
    """Compiled, only the training step's shape buckets compile: validation (eval mode, no grad,
    the σ grid as the batch) and previews run on shapes of their own and would otherwise use up the
    recompile limit and pay a compile each."""
    from pipeline.train import train
    from pipeline.validation import build_validation_set, split_songs

    cfg = config(compile=True, gradient_checkpointing="none", max_seconds=20.0, max_steps=2, warmup_steps=0,
                 save_every=0, log_plot_every=0, val_every=1, plot_every=1)
    backend = CountingBackend()
    model = _compiled_tiny_model(transformer_dir, backend)
    songs = {f"val/{i}": song(f"val/{i}", 60 + 7 * i, i) for i in range(2)}
    vset = build_validation_set(songs.__getitem__, split_songs([*songs, "a"], ["val/*"], 2), cfg, SPEAKER_DIM)
    previews = []

    def preview(transformer, batch, step):
        previews.append(step)
        forward(transformer, batch, torch.tensor([0.5]), torch.randn(batch["latents"].shape))

    batches = [song_batch(150)]  # one song: one latent and one condition bucket
    summary = train(cfg, model, batches, tmp_path, preview=preview, validation=vset)
    assert previews == [0, 1] and summary["val_loss"] is not None
    assert len(backend.shapes) == 1, backend.shapes  # the training bucket's graph only


def test_the_recompile_limit_is_one_line_naming_compile(transformer_dir, tmp_path):
    """Past torch's recompile limit the compiled block (fullgraph=True) raises instead of falling
    back to eager: the run stops with one line saying to turn compile off."""
    import torch._dynamo

    from pipeline.train import train

    cfg = config(compile=True, gradient_checkpointing="none", max_seconds=20.0, max_steps=3, warmup_steps=0,
                 save_every=1, log_plot_every=0)
    model = _compiled_tiny_model(transformer_dir, CountingBackend())
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(ConfigError) as caught:
        train(cfg, model, [song_batch(100), song_batch(200)], tmp_path)  # two latent buckets: 90, 180 frames
    message = str(caught.value)
    assert "\n" not in message and "compile: false" in message and "recompile limit" in message
    assert "epoch=0-step=1_lora" in message  # the last good checkpoint


def test_block_and_model_trace_without_graph_breaks(transformer_dir):
    import torch._dynamo

    model = load_transformer_for_training(transformer_dir, config(gradient_checkpointing="none"), "cpu")
    batch = song_batch(12)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(
        hidden_states=batch["latents"], attention_mask=None, encoder_text_hidden_states=batch["text_states"],
        text_attention_mask=batch["text_mask"], speaker_embeds=batch["speaker"], lyric_token_idx=batch["lyric_ids"],
        lyric_mask=batch["lyric_mask"], timestep=torch.tensor([500.0]), ssl_hidden_states=[batch["mert"], batch["mhubert"]])
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    from pipeline.models.attention import rope_tables

    width, heads = 32, 2
    hidden, cond = torch.randn(1, 12, width), torch.randn(1, 9, width)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.transformer_blocks[1])(
        hidden, None, cond, torch.ones(1, 9), rope_tables(12, width // heads, 1e6), rope_tables(9, width // heads, 1e6),
        torch.randn(1, 6 * width))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def _cpp_compiler() -> str | None:
    import os
    import shutil

    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@pytest.mark.skipif(_cpp_compiler() is None, reason="Inductor on the CPU needs a C++ compiler (none on PATH)")
def test_compiled_equals_eager(transformer_dir):
    """The real backend (Inductor, on the CPU here): loss and LoRA gradients of the compiled step
    match eager within 1e-5 (fp32). The slowest test here (~1 min on 2 busy cores, mostly the C++
    compiler); one compile thread spares it the start of a worker pool."""
    import torch._dynamo
    import torch._inductor.config

    from pipeline.train import compile_blocks

    torch._dynamo.reset()
    cfg = config(gradient_checkpointing="none", compile=True)
    batch = song_batch(20)
    results = []
    for compiled in (False, True):
        model = load_transformer_for_training(transformer_dir, config(gradient_checkpointing="none"), "cpu")
        model.eval()  # no dropout: the same numbers both ways
        if compiled:
            compile_blocks(model)
        model.zero_grad(set_to_none=True)
        with torch._inductor.config.patch(compile_threads=1):
            loss, _ = compute_loss(model, batch, torch.Generator().manual_seed(5), training_sigmas(), cfg,
                                   torch.device("cpu"), torch.float32)
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


# ------------------------------------------------------------------ c. host syncs and copies
class HostTraffic:
    """A dispatch mode for a step on `meta` tensors (a stand-in for a GPU): counts every time the host
    reads a device value (.item(), float(), .tolist(), .cpu(): each a GPU→CPU sync on CUDA) and every
    host→device copy. Reads return zeros."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
                    counter.syncs += 1
                    return 0
                if func is torch.ops.aten._to_copy.default and "device" in kwargs:
                    source, target = args[0].device.type, torch.device(kwargs["device"]).type
                    if (source, target) == ("meta", "cpu"):
                        counter.syncs += 1
                        return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
                    if (source, target) == ("cpu", "meta"):
                        counter.uploads += 1
                return func(*args, **kwargs)

        self.mode = Mode()
        self.syncs = self.uploads = 0

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_one_host_sync_per_optimizer_step(transformer_dir):
    """compute_loss never waits for the device; train_step reads the step's numbers (losses, gradient
    norm: what is logged and NaN-checked) in one fetch, once per optimizer step, whatever the
    gradient accumulation. The noise and σ go up in one copy."""
    from pipeline.train import _BatchStream, train_step

    cfg = config(gradient_checkpointing="none", grad_accumulation=2)
    model = load_transformer_for_training(transformer_dir, cfg, "cpu").to("meta")
    meta = torch.device("meta")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    source = _BatchStream([song_batch(12, seed=i) for i in range(4)])
    batch_tensors = sum(1 + (len(v) - 1 if isinstance(v, list) else 0) for k, v in song_batch(12).items()
                        if k != "keys")
    with HostTraffic() as traffic:
        loss, _ = compute_loss(model, song_batch(12), torch.Generator().manual_seed(0), training_sigmas(), cfg,
                               meta, torch.float32)
        loss.backward()
    assert traffic.syncs == 0
    assert traffic.uploads == batch_tensors + 1  # the batch's tensors + noise and σ together
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        with HostTraffic() as traffic:
            record = train_step(model, source, optimizer, scheduler, params, generator, training_sigmas(), cfg,
                                meta, torch.float32)
        assert traffic.syncs == 1, "one fetch per optimizer step (2 micro-batches)"
    assert set(record) == {"loss", "denoise_loss", "mert_loss", "mhubert_loss", "grad_norm", "lr", "lora_norm",
                           "update_ratio"}


@pytest.mark.cuda("counts real GPU→CPU syncs")
def test_one_cuda_sync_per_optimizer_step(transformer_dir):
    import warnings

    from pipeline.train import _BatchStream, train_step

    cfg = config(gradient_checkpointing="none", device="cuda")
    model = load_transformer_for_training(transformer_dir, cfg, "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    source = _BatchStream([song_batch(12, seed=i) for i in range(3)])
    generator = torch.Generator().manual_seed(0)
    args = (model, source, optimizer, scheduler, params, generator, training_sigmas(), cfg, torch.device("cuda"),
            torch.float32)
    train_step(*args)  # warm-up: first-use allocations and library loads
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_loss_png_is_drawn_off_the_training_thread(tmp_path, monkeypatch):
    import threading

    from pipeline import metrics

    release, drawn = threading.Event(), []

    def slow_plot(records, path, title=""):
        drawn.append((threading.current_thread() is threading.main_thread(), len(records)))
        release.wait(10)
        if len(records) == 3:
            raise OSError("disk trouble")

    monkeypatch.setattr(metrics, "plot_loss", slow_plot)
    logger = metrics.MetricsLogger(tmp_path, plot_every=1, tensorboard=False)
    logger.log({"step": 1, "loss": 1.0})  # starts a drawing and returns while it is still running
    logger.log({"step": 2, "loss": 1.0})  # one drawing at a time: this request is skipped
    assert drawn == [(False, 1)] and len(metrics.read_metrics(tmp_path / "metrics.jsonl")) == 2
    release.set()
    logger.plot()  # the final drawing: waits for the running one, then draws all records here
    assert drawn == [(False, 1), (True, 2)]
    logger.log({"step": 3, "loss": 1.0})  # its drawing fails in the background...
    with pytest.raises(OSError, match="disk trouble"):
        logger.plot()  # ...and the error surfaces on the training thread
    logger.close()


# ------------------------------------------------------------------ d. linear attention on tensor cores
def test_fp32_out_matmul_keeps_16_bit_inputs_on_a_gpu():
    """On a GPU (meta stands in here) the linear attention's sums take bf16 inputs and give fp32; the
    gradients come back in bf16. On the CPU both inputs are cast to fp32 (the reference's way)."""
    from pipeline.models.attention import matmul_fp32

    for device in ("meta", "cpu"):
        a = torch.randn(2, 3, 64, 16, dtype=torch.bfloat16, device=device, requires_grad=True)
        b = torch.randn(2, 3, 16, 8, dtype=torch.float32, device=device, requires_grad=True)
        out = matmul_fp32(a, b)
        assert out.dtype == torch.float32 and out.shape == (2, 3, 64, 8)
        out.sum().backward()
        assert a.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.float32


@pytest.mark.cuda("bmm with out_dtype")
def test_fp32_out_matmul_matches_fp32_on_cuda():
    from pipeline.models.attention import matmul_fp32

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(2, 3, 512, 64, device="cuda", generator=g).relu().bfloat16().requires_grad_()
    b = torch.randn(2, 3, 64, 32, device="cuda", generator=g).bfloat16().requires_grad_()
    out = matmul_fp32(a, b)
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    ref = a32 @ b32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)  # exact products, fp32 sums
    grad = torch.randn(out.shape, device="cuda", generator=g)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(a.grad.float(), a32.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(b.grad.float(), b32.grad, rtol=2e-2, atol=5e-1)


# ------------------------------------------------------------------ f. no mask where nothing is padded
def test_masks_are_skipped_where_nothing_is_padded(transformer_dir, monkeypatch):
    """Equal-length crops and an unpadded prompt and lyrics: the linear attention multiplies no mask
    and the cross-attention runs without one (flash kernels on a GPU); same loss as with the masks."""
    import torch.nn.functional as F

    from pipeline.models import attention

    model = load_transformer_for_training(transformer_dir, config(gradient_checkpointing="none"), "cpu")
    model.eval()
    seen = {"cross": [], "self": []}
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen["cross"].append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    forward = attention.LinearSelfAttention.forward
    monkeypatch.setattr(attention.LinearSelfAttention, "forward",
                        lambda self, h, mask, rope: (seen["self"].append(mask), forward(self, h, mask, rope))[1])
    cfg = config(gradient_checkpointing="none")
    for lyric_mask in (torch.ones(1, 7, dtype=torch.long), torch.tensor([[1, 1, 1, 1, 1, 0, 0]])):
        seen["cross"].clear(), seen["self"].clear()
        batch = {**song_batch(12), "lyric_mask": lyric_mask}
        with torch.no_grad():
            compute_loss(model, batch, torch.Generator().manual_seed(0), training_sigmas(), cfg, torch.device("cpu"),
                         torch.float32)
        assert seen["self"] == [None] * LAYERS
        assert all((m is None) == bool(lyric_mask.all()) for m in seen["cross"]) and len(seen["cross"]) == LAYERS
    # the same numbers as the masked path on the unpadded batch
    with torch.no_grad():
        batch = song_batch(12)
        masked = model(hidden_states=batch["latents"], attention_mask=batch["latent_mask"],
                       encoder_text_hidden_states=batch["text_states"], text_attention_mask=batch["text_mask"],
                       speaker_embeds=batch["speaker"], lyric_token_idx=batch["lyric_ids"],
                       lyric_mask=batch["lyric_mask"], timestep=torch.tensor([500.0])).sample
        plain = model(hidden_states=batch["latents"], attention_mask=None,
                      encoder_text_hidden_states=batch["text_states"], text_attention_mask=None,
                      speaker_embeds=batch["speaker"], lyric_token_idx=batch["lyric_ids"], lyric_mask=None,
                      timestep=torch.tensor([500.0])).sample
    torch.testing.assert_close(plain, masked, rtol=1e-5, atol=1e-6)


def test_the_run_reports_the_step_settings_it_resolved(transformer_dir, tmp_path):
    from pipeline.train import train

    cfg = config(gradient_checkpointing=2, max_steps=1, warmup_steps=0, save_every=0, log_plot_every=0)
    summary = train(cfg, load_transformer_for_training(transformer_dir, cfg, "cpu"), [song_batch(12)], tmp_path)
    assert summary["step_settings"] == {"gradient_checkpointing": "2 of 4", "compile": False}
