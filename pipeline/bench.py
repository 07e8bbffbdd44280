"""`aceturbo bench`: cached vs live training, the transformer-alone floor, memory, cache size, encode speed.

On one machine, with one model size, song, seed and LoRA config, each mode runs in its own
subprocess (so peak memory is per mode) and trains through the product's own ``pipeline.train.train``:

  floor   one batch read once, fed again every step and moved to the device by the step as a
          cached batch is: the transformer's forward + backward + optimizer step and nothing else
          (what reading and cropping the cache adds to)
  cached  batches from the Zarr feature cache through cache.loader.make_loader (the product)
  live    batches encoded on every step by pipeline.live.LiveSource: decode the audio, DCAE, MERT,
          mHuBERT and UMT5 (what the original trainers do)
  paired  floor and cached steps alternating in one process (same machine load for both)

Each mode runs ``warmup + steps`` optimizer steps; the per-step times come from the trainer's own
metrics.jsonl and the median of the steps after the warm-up is reported. Memory, per mode: the
child's peak resident set (VmHWM) and its split into the process's own and file-backed pages, and on
CUDA ``max_memory_allocated`` / ``max_memory_reserved``; next to them the memory model's estimate
(pipeline.memory). Rows: every ``--rank`` × every combination of ``--matrix`` settings, each with the
``--set`` train settings.

The parent process holds no model: it only plans, starts children and writes the report. A probe
child reports the machine; the full-size memory need is estimated from the memory model before
anything is loaded (rows that cannot fit are skipped with one line; none fitting is an error). The
prepare child writes the random checkpoint and the songs, runs ingest/decode/encode (timing each
encoder), measures the cache and the loader, and counts FLOPs; its result is kept in the workdir, so
a second run there (another --matrix) reuses the one feature build.

FLOPs: the transformer's training step is counted analytically from its config
(``transformer_step_flops``; a test checks its forward against torch's FlopCounterMode) and the
encoders' per-song work with FlopCounterMode on ``meta`` tensors (``encoder_flops``), so the real
sizes can be counted on any machine without running them.

    python -m pipeline.bench child SPEC.json     # one child (used by run_benchmark)
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.memory import (
    GiB,
    MiB,
    checkpointed_blocks,
    estimate_training_memory,
    host_memory,
    lora_params,
    reset_peak_rss,
    transformer_dims,
    transformer_params,
)
from pipeline.train_config import OFFICIAL_TARGETS

MODES = ("floor", "cached", "live", "paired")
SIZES = ("demo", "small", "full")
STREAMS = ("latents", "mert", "mhubert", "text")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; matched on the
# CUDA device name, most specific first. Unknown GPUs get no utilisation figure.
GPU_BF16_PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 0.0),
)
# Kept free on top of the memory model's estimate in the up-front check: the CUDA context and the
# caching allocator's slack on a GPU; Python, torch and the data path in host memory.
DEVICE_OVERHEAD_BYTES = 1 * GiB
HOST_OVERHEAD_BYTES = 1 * GiB
FULL_NEEDS_GPU = ("--size full needs a GPU (the 3.5B transformer alone is 5.4 GB in bf16 and a step is ~27 TFLOP: "
                  "hours on a CPU). Pass --allow-cpu-full to run it on the CPU anyway.")
# What the bench's flags are called, for the memory advice.
BENCH_FLAGS = {"rank": "--rank", "seconds": "--song-seconds", "precision": "--precision",
               "checkpointing": "--set gradient_checkpointing=true"}


# ====================================================================================== FLOPs
def transformer_step_flops(config: dict, tokens: int, text_tokens: int = 64, lyric_tokens: int = 300,
                           rank: int = 64, batch: int = 1, gradient_checkpointing: Any = True,
                           targets=OFFICIAL_TARGETS) -> dict[str, float]:
    """FLOPs of one LoRA training step of the transformer, counted from the config.

    Multiply-accumulates (MACs) of one forward pass:
      * latent path, per latent token: every weight in ``transformer_params()["latent_path"]``
        once (DiT self-attention Q/K/V/out, cross-attention Q/out, GLUMBConv, patch embedding,
        final layer, both SSL heads) plus the LoRA A/B of the wrapped layers;
      * conditioning, per conditioning token (1 + text + lyrics): cross-attention K/V of every
        block, the text/speaker embedders, the lyric Conformer (incl. its relative-position
        projection over 2L-1 offsets) and lyric_proj;
      * attention terms: linear self-attention 2·T·d·(head_dim+1) per block (K^T V and its
        application, the ones-row normaliser included), softmax cross-attention 2·T·L_enc·d per
        block, lyric rel-pos attention ~4·L²·D per layer.
    Then FLOPs = 2 × MACs and the step = forward + backward (the input gradients through every
    frozen weight: another 2 × MACs; LoRA weight gradients: 2 × the LoRA MACs) + the recomputed
    forward of the recomputing DiT blocks (all of them for true/"all", every k-th for k) and of the
    lyric layers under gradient checkpointing. With frozen base
    weights this equals the usual "6 × params-in-path × tokens" (2 fwd + 2 input-grad + 2
    recompute instead of 2 fwd + 4 bwd). Element-wise work (norms, RoPE, SiLU) is not counted.
    """
    k = transformer_dims(config)
    d, D, T = k["d"], k["lyr"], tokens * batch
    L_enc = (1 + text_tokens + lyric_tokens) * batch
    L_lyr = lyric_tokens
    p = transformer_params(config)
    n_attn = sum(1 for t in ("to_q", "to_k", "to_v", "to_out.0") if t in targets)
    lora_latent = k["layers"] * rank * 2 * d * (n_attn + sum(1 for t in ("to_q", "to_out.0") if t in targets))
    lora_cond = k["layers"] * rank * 2 * d * sum(1 for t in ("to_k", "to_v") if t in targets)
    lora_lyric = k["lyr_blocks"] * rank * 2 * D * sum(1 for t in ("linear_q", "linear_k", "linear_v") if t in targets)
    # per-token weights of the latent path, split into blocks (checkpointed) and the rest
    blocks_w = k["layers"] * (4 * d * d + 2 * d * d + 3 * d * k["ff"] + 2 * k["ff"] * 3)
    rest_w = k["in_ch"] * 256 * k["in_ch"] * k["patch"] + k["in_ch"] * 256 * d + d * k["patch"] * k["out_ch"] \
        + sum(2 * d * d + 4 * d * d + 2 * d * od for od in k["ssl_dims"])
    block_latent_macs = T * (blocks_w + lora_latent) + k["layers"] * (2 * T * d * (k["head_dim"] + 1) + 2 * T * L_enc * d)
    block_cond_macs = k["layers"] * L_enc * 2 * d * d + L_enc * lora_cond
    lyric_layer_macs = k["lyr_blocks"] * (L_lyr * (4 * D * D + 2 * D * k["lyr_ff"]) + (2 * L_lyr - 1) * D * D
                                          + 4 * L_lyr * L_lyr * D) * batch + L_lyr * batch * lora_lyric
    other_cond_macs = batch * (k["speaker"] * d + text_tokens * k["text"] * d
                               + L_lyr * (k["lyr_in"] * D + D * d))
    rest_macs = T * rest_w
    fwd_macs = block_latent_macs + block_cond_macs + lyric_layer_macs + other_cond_macs + rest_macs
    lora_macs = T * lora_latent + L_enc * lora_cond + L_lyr * batch * lora_lyric + (rank * (k["speaker"] + d) * batch
                                                                                     if "speaker_embedder" in targets else 0)
    fwd = 2.0 * fwd_macs
    bwd = 2.0 * fwd_macs + 2.0 * lora_macs
    share = checkpointed_blocks(gradient_checkpointing, k["layers"]) / k["layers"]
    recompute = 2.0 * (share * (block_latent_macs + block_cond_macs) + (lyric_layer_macs if share else 0.0))
    return {
        "tokens": T, "conditioning_tokens": L_enc,
        "params_total": p["total"], "params_latent_path": p["latent_path"], "lora_params": lora_params(config, rank, targets),
        "forward": fwd, "backward": bwd, "recompute": recompute,
        "model_flops": fwd + bwd,  # what the step must compute (utilisation convention: no recompute)
        "step_flops": fwd + bwd + recompute,  # what the GPU executes
        "six_n_t": 6.0 * p["latent_path"] * T,
    }


def _meta_flops(fn) -> float:
    """FLOPs torch's FlopCounterMode counts for ``fn()`` (matmuls, convolutions, SDPA)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def encoder_flops(configs: dict[str, dict], seconds: float, text_variants: int = 8, text_tokens: int = 64) -> dict:
    """Forward FLOPs of each encoder for one song of ``seconds``, counted on ``meta`` tensors.

    ``configs``: {"dcae": AutoencoderDC kwargs, "mert": HubertConfig kwargs, "mhubert": ...,
    "umt5": {d_model, num_layers, num_heads, d_kv, d_ff, vocab_size}} (pipeline.tiny.small.configs
    or read from a checkpoint with ``configs_from_models``). Inputs as the encoders see them: a
    stereo log-mel of ceil(seconds·44100/4096)·8 frames; MERT 5 s chunks at 24 kHz; mHuBERT 30 s
    chunks at 16 kHz; ``text_variants`` prompts of ``text_tokens`` tokens.
    """
    import torch

    latent = math.ceil(seconds * 44100 / 4096)
    models = meta_encoders(configs)
    with torch.device("meta"):
        mel = torch.zeros(1, 2, 128, latent * 8)
        out = {"latents": _meta_flops(lambda: models["latents"].encoder(mel))}
        for name, rate, chunk_s in (("mert", 24000, 5), ("mhubert", 16000, 30)):
            chunks = torch.zeros(math.ceil(seconds / chunk_s), rate * chunk_s)
            out[name] = _meta_flops(lambda: models[name](input_values=chunks))
        ids = torch.zeros(text_variants, text_tokens, dtype=torch.long)
        out["text"] = _meta_flops(lambda: models["text"](input_ids=ids))
    out["total"] = sum(out.values())
    return out


def meta_encoders(configs: dict[str, dict]) -> dict:
    """The four encoders (DCAE, MERT-like and mHuBERT-like HuBERT, UMT5 encoder) built on ``meta``
    from ``configs`` (see encoder_flops): their sizes and FLOPs without any weight in memory."""
    import torch
    from diffusers import AutoencoderDC
    from transformers import HubertConfig, HubertModel, UMT5Config, UMT5EncoderModel

    drop = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype")
    u = configs["umt5"]
    with torch.device("meta"):
        return {
            "latents": AutoencoderDC(**configs["dcae"]),
            **{name: HubertModel(HubertConfig(**{k: v for k, v in configs[name].items() if k not in drop})).eval()
               for name in ("mert", "mhubert")},
            "text": UMT5EncoderModel(UMT5Config(d_model=u["d_model"], num_layers=u["num_layers"], num_heads=u["num_heads"],
                                                d_kv=u["d_kv"], d_ff=u["d_ff"], vocab_size=u.get("vocab_size") or 512,
                                                feed_forward_proj="gated-gelu", is_encoder_decoder=False)),
        }


def configs_from_models(models) -> dict[str, dict]:
    """The config dicts ``encoder_flops`` and ``transformer_step_flops`` need, read from a
    checkpoint's folders (params.yaml ``models:``)."""
    paths = models.paths()
    read = lambda p: {k: v for k, v in json.loads(Path(p).read_text()).items() if not k.startswith("_")}  # noqa: E731
    umt5 = read(paths.umt5 / "config.json")
    return {
        "transformer": read(paths.transformer / "config.json"),
        "dcae": read(paths.dcae / "config.json"),
        "mert": read(Path(models.mert) / "config.json"),
        "mhubert": read(Path(models.mhubert) / "config.json"),
        "umt5": {k: umt5[k] for k in ("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size")},
    }


def compute_ratio(configs: dict[str, dict], seconds: float, rank: int = 64, text_tokens: int = 64,
                  lyric_tokens: int = 300, encoders: dict | None = None) -> dict:
    """Encoder FLOPs per song vs transformer FLOPs per training step for one ``seconds`` song.
    ``encoders``: ``encoder_flops(configs, seconds)`` when already counted (it does not depend on
    the rank; the step does, and is counted from the config here, without torch)."""
    tokens = math.ceil(seconds * 44100 / 4096)
    enc = encoders or encoder_flops(configs, seconds)
    step = transformer_step_flops(configs["transformer"], tokens, text_tokens, lyric_tokens, rank)
    return {"seconds": seconds, "tokens": tokens, "encoders": enc, "transformer_step": step["step_flops"],
            "encoders_over_step": enc["total"] / step["step_flops"]}


# ====================================================================================== machine
def machine_info() -> dict:
    """CPU, RAM, torch and the GPU (name, memory, bf16 peak). Called in a child (it touches CUDA)."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "gpu": None}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        total = torch.cuda.get_device_properties(0).total_memory
        info.update(gpu=name, cuda=torch.version.cuda, gpu_memory_gb=round(total / GiB, 1), gpu_memory_bytes=total,
                    gpu_bf16_peak_tflops=gpu_peak_tflops(name))
    return info


def gpu_peak_tflops(name: str) -> float | None:
    for key, peak in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak or None
    return None


# ====================================================================================== settings
@dataclasses.dataclass
class BenchSettings:
    size: str = "demo"
    song_seconds: float = 180.0
    ranks: tuple[int, ...] = (64,)
    precision: str = "bf16-true"
    steps: int = 10
    warmup: int = 3
    modes: tuple[str, ...] = MODES
    songs: int = 1
    device: str = "auto"
    num_workers: int | None = None  # cache loader workers; None: as `aceturbo train` (num_workers -1)
    train: dict = dataclasses.field(default_factory=dict)  # --set: TrainConfig settings for every row
    matrix: dict = dataclasses.field(default_factory=dict)  # --matrix: {name: [values]}, one row per combination
    seed: int = 42
    workdir: str | None = None  # keep checkpoints/songs/cache here (reused when present); default: a temp dir
    allow_cpu_full: bool = False
    loader_seconds: float = 3.0
    threads: int | None = None  # torch threads per child (default: torch's choice)
    command: str = ""


def bench_rows(settings: BenchSettings) -> list[dict]:
    """One row per rank × --matrix combination: {rank, label, train: the TrainConfig settings}. Every
    name and value is checked by TrainConfig now (a typo fails before anything runs)."""
    from pipeline.errors import ConfigError
    from pipeline.train_config import from_params

    fixed = {"rank", "precision", "max_steps", "seed", "device", "save_every", "keep_last", "experiment"}
    for name in list(settings.train) + list(settings.matrix):
        if name in fixed:
            raise ConfigError(f"bench: '{name}' is set by the bench itself (use --rank / --precision / --steps / "
                              "--device), not by --set or --matrix.")
    names = list(settings.matrix)
    rows = []
    for rank in settings.ranks:
        for values in itertools.product(*(settings.matrix[n] for n in names)):
            combo = dict(zip(names, values))
            train = {**settings.train, **combo, "rank": rank, "precision": settings.precision}
            from_params(train).validate()
            label = ", ".join([f"r={rank}"] + [f"{k}={v}" for k, v in combo.items()])
            rows.append({"rank": rank, "label": label, "combo": combo, "train": train})
    return rows


def run_key(settings: BenchSettings, cuda: bool) -> str:
    extra = [f"{k}={v}" for k, v in settings.train.items()] + [f"{k}={'|'.join(map(str, v))}"
                                                               for k, v in settings.matrix.items()]
    return "-".join([settings.size, "cuda" if cuda else "cpu", settings.precision, f"{settings.song_seconds:g}s"]
                    + extra)


def _train_setting(row: dict, name: str):
    """A row's value of a TrainConfig setting (its own, else the TrainConfig default)."""
    from pipeline.train_config import TrainConfig

    return row["train"].get(name, getattr(TrainConfig(), name))


# ====================================================================================== children
def _project_from_dict(data: dict):
    from pipeline.config import EncodeConfig, IngestConfig, ModelsConfig, PathsConfig, ProjectConfig

    return ProjectConfig(paths=PathsConfig(**data["paths"]), models=ModelsConfig(**data["models"]),
                         ingest=IngestConfig(**data["ingest"]), encode=EncodeConfig(**data["encode"]))


def _child_probe(spec: dict) -> dict:
    """The machine, and the encoders' size for this model size (counted on meta)."""
    info = machine_info()
    encoders = None
    if spec["size"] != "demo":
        from pipeline.tiny.small import configs as size_configs

        models = meta_encoders(size_configs(spec["size"]))
        encoders = sum(p.numel() for m in models.values() for p in m.parameters())
    return {"machine": info, "encoder_params": encoders, **host_memory()}


def _build_inputs(spec: dict) -> float | None:
    """The songs and the random checkpoint for the size (skipped when complete); seconds spent on
    the checkpoint, None when it was already there."""
    from pipeline.tiny.songs import make_demo_songs

    data, root = Path(spec["project"]["paths"]["data"]), Path(spec["checkpoint_root"])
    if not any(data.glob("*.mp3")):
        make_demo_songs(data, n=spec["songs"], seconds=spec["song_seconds"], seed=0)
    lyrics = [p.read_text(encoding="utf-8") for p in sorted(data.glob("*_lyrics.txt"))]
    tic = time.perf_counter()
    if spec["size"] == "demo":
        from pipeline.tiny.demo import build_demo_checkpoint

        done = (root / "COMPLETE").exists()
        build_demo_checkpoint(root, lyrics)
    else:
        from pipeline.tiny.small import build_bench_checkpoint

        done = (root / f"COMPLETE-{spec['size']}").exists()
        build_bench_checkpoint(root, spec["size"], lyrics)
    return None if done else time.perf_counter() - tic


def _encode_songs(encoder, texts: list[dict], wavs: list) -> None:
    """One pass of a StreamEncoder over the bench's songs: their prompts and lyrics for the text
    stream, their audio for the others."""
    if encoder.stream == "text":
        for t in texts:
            encoder.text(t["id"], t["tags"], t.get("recaption") or {}, t["lyrics"])
    else:
        for wav in wavs:
            encoder.audio(wav)


def _child_prepare(spec: dict) -> dict:
    """checkpoint + songs → ingest → decode → (timed encoders) → encode every stream into the cache;
    then the cache's size, the loader's speed, one batch's shapes and the FLOP ratios."""
    import torch

    from cache.bench import loader_throughput, measure_cache
    from cache.loader import make_loader
    from cache.pcm import read_pcm
    from pipeline.dataset import read_previous_manifest, scan_dataset, write_manifest, write_stage_views
    from pipeline.encoding import decode_songs, encode_stream, read_rows
    from pipeline.features import StreamEncoder

    checkpoint_s = _build_inputs(spec)
    project = _project_from_dict(spec["project"])
    manifest = project.paths.manifest
    report = scan_dataset(project.paths.data, project.ingest, previous=read_previous_manifest(manifest), progress=False)
    report.raise_for_problems()
    write_manifest(manifest, report.songs)
    write_stage_views(report.songs, project.paths.audio_list, project.paths.text_list)
    tic = time.perf_counter()
    decoded = decode_songs(project, progress=False).encoded
    decode_s = time.perf_counter() - tic if decoded else None  # None: the PCM was already there
    rows = read_rows(project.paths.audio_list)
    texts = read_rows(project.paths.text_list)
    wavs = [read_pcm(project.paths.pcm, r["audio_sha256"]) for r in rows]
    audio_s = sum(w.shape[-1] for w in wavs) / 48000.0
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    streams = {}
    for stream in STREAMS:
        tic = time.perf_counter()
        encoder = StreamEncoder(stream, project.models, project.encode)
        load_s = time.perf_counter() - tic
        if stream == "text":
            _encode_songs(encoder, texts, wavs)  # warm-up
        else:
            encoder.audio(wavs[0][:, :48000 * 3])  # warm-up on 3 s
        sync()
        tic = time.perf_counter()
        _encode_songs(encoder, texts, wavs)
        sync()
        encode_s = time.perf_counter() - tic
        params = _param_bytes(encoder.model)
        del encoder
        tic = time.perf_counter()
        stage = encode_stream(project, stream, progress=False)
        stage_s = time.perf_counter() - tic if stage.encoded else None  # None: the cache was up to date
        streams[stream] = {"load_s": load_s, "encode_s": encode_s, "stage_s": stage_s,
                           "audio_s_per_s": audio_s / encode_s if encode_s > 0 else None, **params}
    configs = configs_from_models(project.models)
    speaker = configs["transformer"].get("speaker_embedding_dim", 512)
    from pipeline.train import loader_settings as training_loader
    from pipeline.train_config import from_params

    loader_params = {"seed": spec["seed"], **({} if spec["num_workers"] is None else {"num_workers": spec["num_workers"]})}
    device = torch.device("cuda" if torch.cuda.is_available() and project.encode.device != "cpu" else "cpu")
    loader_settings = training_loader(from_params(loader_params), device, speaker)  # the loader as `aceturbo train` builds it
    workers = loader_settings.num_workers
    batch = next(iter(make_loader(project.paths.features, loader_settings)))
    shapes = dict(tokens=int(batch["latents"].shape[-1]), text_tokens=int(batch["text_states"].shape[1]),
                  lyric_tokens=int(batch["lyric_ids"].shape[1]), batch=int(batch["latents"].shape[0]))
    full = None
    if spec["size"] != "full":
        from pipeline.tiny.small import configs as size_configs

        full = encoder_flops(size_configs("full"), spec["song_seconds"])
    return {"audio_seconds": audio_s, "decode_s": decode_s, "checkpoint_s": checkpoint_s, "streams": streams,
            "cache": measure_cache(project.paths.features), "shapes": shapes, "configs": configs, "loader_workers": workers,
            "loader_samples_per_s": loader_throughput(project.paths.features, loader_settings,
                                                      seconds=spec["loader_seconds"]),
            # encoder FLOPs only: the ratio to a training step depends on the LoRA rank (the parent's)
            "encoder_flops": encoder_flops(configs, spec["song_seconds"]), "encoder_flops_full_size": full,
            **host_memory()}


def _param_bytes(model) -> dict:
    """Parameter count and bytes of an encoder wrapper (MusicDCAE, SSL extractor, UMT5 encoder)."""
    import torch

    module = model.model if hasattr(model, "model") and isinstance(getattr(model, "model"), torch.nn.Module) else model
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    return {"params": sum(p.numel() for p in params), "param_bytes": sum(p.numel() * p.element_size() for p in params)}


class _Alternate:
    """paired mode: the fixed batch, then a cache batch, then the fixed one again, ... so the
    floor and cached steps interleave in one process and share whatever load the machine has."""

    def __init__(self, loader, batch: dict):
        self.loader, self.batch = loader, batch

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            yield self.batch
            yield next(batches)


class _Repeat:
    """The same batch forever: the floor mode's batch source. It stays on the CPU as the loader
    yields it (pinned on CUDA), so each floor step moves and reads it exactly as a cached step does:
    the same masks read on the CPU, the same copy, only the reading and cropping is gone."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class _Shapes:
    """Passes batches through, recording the first one's sizes (tokens, text and lyric lengths) into
    ``shapes`` for the FLOP count, as the model computes on them: compiled (``bucket_seconds`` =
    max_seconds), after the step's shape bucketing. Forwards the position so train() checkpoints it
    as usual."""

    def __init__(self, inner, shapes: dict, bucket_seconds: float | None = None):
        self.inner, self.shapes, self.bucket_seconds = inner, shapes, bucket_seconds

    def __iter__(self):
        from cache.collate import bucket_shape

        for batch in self.inner:
            if not self.shapes:
                tokens, lyrics = (bucket_shape(batch, self.bucket_seconds) if self.bucket_seconds is not None
                                  else (batch["latents"].shape[-1], batch["lyric_ids"].shape[1]))
                self.shapes.update(tokens=int(tokens), text_tokens=int(batch["text_states"].shape[1]),
                                   lyric_tokens=int(lyrics), batch=int(batch["latents"].shape[0]))
            yield batch

    def state_dict(self):
        return self.inner.state_dict() if hasattr(self.inner, "state_dict") else None

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _device_memory(result: dict, prefix: str = "cuda") -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result[f"{prefix}_max_allocated_mb"] = torch.cuda.max_memory_allocated() / MiB
        result[f"{prefix}_max_reserved_mb"] = torch.cuda.max_memory_reserved() / MiB


def _child_train(spec: dict) -> dict:
    """floor / cached / live / paired: train() for warmup + steps steps; per-step times from
    metrics.jsonl; host and device memory at start, after the model load and at the end."""
    import torch

    from cache.loader import make_loader
    from pipeline.train import load_transformer_for_training, loader_settings, train
    from pipeline.train_config import from_params
    from pipeline.train_guard import is_out_of_memory

    result: dict[str, Any] = {"mode": spec["mode"], "start": host_memory()}
    mode = spec["mode"]
    project = _project_from_dict(spec["project"])
    config = from_params(spec["train"]).validate()
    transformer_dir = project.models.paths().require("ace_step_transformer")
    speaker_dim = json.loads((transformer_dir / "config.json").read_text()).get("speaker_embedding_dim", 512)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if config.device == "auto" else config.device))
    result["device"] = str(device)
    settings = loader_settings(config, device, speaker_dim)  # as `aceturbo train` reads the cache
    if mode != "live":  # live encodes its batches in this process: no cache loader
        result["loader_workers"] = settings.num_workers
    encoders_bytes = 0
    if mode == "live":
        from pipeline.dataset import read_manifest
        from pipeline.live import LiveSource

        source = LiveSource(project, read_manifest(project.paths.manifest), batch_size=config.batch_size,
                            max_seconds=config.max_seconds, seed=config.seed, speaker_dim=speaker_dim)
        for encoder in source.encoders.streams.values():  # resident on the device, as officially
            encoders_bytes += _param_bytes(encoder.model)["param_bytes"]
        batches = source
    else:
        loader = make_loader(project.paths.features, settings)
        if mode == "cached":
            batches = loader
        else:
            first = next(iter(loader))  # on the CPU: train_step moves it, as it moves a cached batch
            batches = _Alternate(make_loader(project.paths.features, settings), first) if mode == "paired" \
                else _Repeat(first)
            del loader
    shapes: dict = {}
    run_dir = Path(spec["run_dir"])
    try:
        transformer = load_transformer_for_training(transformer_dir, config, device)
        result["after_load"] = host_memory()
        _device_memory(result["after_load"])
        result["peak_reset"] = reset_peak_rss()  # from here VmHWM is the training's own peak
        result["transformer_params"] = sum(p.numel() for p in transformer.parameters())
        result["trainable_params"] = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
        result["encoders_param_bytes"] = encoders_bytes
        summary = train(config, transformer, _Shapes(batches, shapes, config.max_seconds if config.compile else None),
                        run_dir)
    except Exception as exc:  # a measurement: "does not fit" is a result, reported in one line
        if not is_out_of_memory(exc):
            raise
        result.update(error="out_of_memory", message=str(exc).strip().splitlines()[0][:300], shapes=shapes,
                      **_training_memory(result))
        _device_memory(result)
        return result
    if device.type == "cuda":
        torch.cuda.synchronize()
    _device_memory(result)
    times = [json.loads(line)["sec_per_step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    warm = spec["warmup"]
    steady = times[warm:] or times
    if mode == "paired":  # even steps: the fixed batch (floor), odd steps: the cache; warm-up in pairs
        floor_t, cached_t = times[2 * warm::2], times[2 * warm + 1::2]
        steady = cached_t
        result.update(floor_times=floor_t, floor_median_s=statistics.median(floor_t),
                      cached_over_floor=statistics.median(cached_t) / statistics.median(floor_t))
    result.update(step_times=times, median_s=statistics.median(steady), warmup=warm, steps=len(steady),
                  loadavg_1min=os.getloadavg()[0],
                  # as resolved by the trainer (e.g. auto → "13 of 24"), which the memory model reads
                  gradient_checkpointing=str((summary.get("step_settings") or {}).get(
                      "gradient_checkpointing", config.gradient_checkpointing)),
                  last_loss=summary.get("last_loss"), shapes=shapes, **_training_memory(result))
    result["step_settings"] = summary.get("step_settings")  # as resolved (e.g. auto checkpointing → "13 of 24")
    return result


def _training_memory(result: dict) -> dict:
    """Host memory at the end: the process's peak over its whole life, and the training's own peak."""
    now = host_memory()
    load_peak = result.get("after_load", {}).get("peak_rss_mb", 0.0)
    whole = max(load_peak, now.get("peak_rss_mb", 0.0)) if result.get("peak_reset") else now.get("peak_rss_mb")
    return {**now, "peak_rss_mb": whole, "training_peak_rss_mb": now.get("peak_rss_mb") if result.get("peak_reset") else None}


def _child_memory_check(spec: dict) -> dict:
    """The memory model against the meter: the full size on meta (several settings), and the demo
    and small sizes on real CPU tensors (random weights written to a temp folder)."""
    import torch

    from pipeline.memory_meter import check_against_meter, count_step_memory, synthetic_batch
    from pipeline.tiny.small import configs as size_configs
    from pipeline.tiny.small import save_transformer
    from pipeline.tiny.transformer import save_tiny_transformer
    from pipeline.train_config import from_params

    rows = []
    full = size_configs("full")["transformer"]
    for seconds, rank, precision, ckpt in spec["meta_settings"]:
        rows.append({"size": "full", "device": "meta", **check_against_meter(full, seconds, rank, precision, ckpt)})
    with tempfile.TemporaryDirectory(prefix="aceturbo-memcheck-") as tmp:
        folders = {"demo": save_tiny_transformer(Path(tmp) / "demo" / "ace_step_transformer", seed=0),
                   "small": save_transformer(Path(tmp) / "small" / "ace_step_transformer",
                                             size_configs("small")["transformer"], dtype=torch.bfloat16)}
        for size, seconds, rank, precision, ckpt in spec["cpu_settings"]:
            config = json.loads((folders[size] / "config.json").read_text())
            train = from_params({"rank": rank, "precision": precision, "gradient_checkpointing": ckpt == "all",
                                 "device": "cpu"})
            counted = count_step_memory(folders[size], train, synthetic_batch(config, seconds), "cpu")
            est = estimate_training_memory(config, tokens=counted["tokens"], rank=rank, precision=precision,
                                           gradient_checkpointing=ckpt, ssl_frames=counted["ssl_frames"])
            rows.append({"size": size, "device": "cpu", "seconds": seconds, "rank": rank, "precision": precision,
                         "gradient_checkpointing": str(ckpt), "tokens": counted["tokens"],
                         "counted_peak": counted["peak"], "estimate": est.total, "ratio": est.total / counted["peak"],
                         "estimate_parts": est.as_dict()})
    return {"rows": rows, "machine": machine_info()}


CHILDREN = {"probe": _child_probe, "prepare": _child_prepare, "memory-check": _child_memory_check}


def _child_main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    result = CHILDREN.get(spec["mode"], _child_train)(spec)
    Path(spec["out"]).write_text(json.dumps(result, indent=1))


def _run_child(spec: dict, workdir: Path, label: str, echo=print) -> dict:
    spec_path = workdir / f"spec-{label}.json"
    out = workdir / f"result-{label}.json"
    out.unlink(missing_ok=True)
    spec = dict(spec, out=str(out))
    spec_path.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench", "child", str(spec_path)], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0 or not out.exists():
        from pipeline.errors import AceTurboError

        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise AceTurboError(f"bench child '{label}' failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - tic
    echo(f"  {label}: done in {result['wall_s']:.1f} s")
    return result


# ====================================================================================== the run
def prepare_workspace(settings: BenchSettings, root: Path):
    """Where the songs, the checkpoint and the cache go (nothing is built here: the prepare child
    builds them), as the ProjectConfig the children use."""
    from pipeline.config import EncodeConfig, IngestConfig, PathsConfig, ProjectConfig

    data = root / f"data-{settings.songs}x{settings.song_seconds:g}s"
    ckpt = root / "checkpoints" / settings.size
    if settings.size == "demo":
        from pipeline.tiny.demo import demo_models

        models = demo_models(ckpt)
    else:
        from pipeline.tiny.small import models_config

        models = models_config(ckpt, settings.size)
    tag = f"{settings.size}-{settings.songs}x{settings.song_seconds:g}s-{settings.device}"
    paths = PathsConfig(data=str(data), cache=str(root / "cache" / tag), exps=str(root / "exps" / tag))
    return ProjectConfig(paths=paths, models=models, ingest=IngestConfig(), encode=EncodeConfig(device=settings.device)), ckpt


def check_memory_up_front(settings: BenchSettings, rows: list[dict], probe: dict, cuda: bool, checkpoint_ready: bool,
                          echo=print) -> list[dict]:
    """The rows whose memory-model estimate fits this machine; the others are skipped with one line
    each. Nothing fitting is a ConfigError naming the estimate and what to change. The demo size is
    not checked (megabytes)."""
    from pipeline.errors import ConfigError
    from pipeline.memory import available_host_bytes, out_of_memory_advice
    from pipeline.tiny.small import SHARD_BYTES
    from pipeline.tiny.small import configs as size_configs

    if settings.size == "demo":
        return rows
    config = size_configs(settings.size)["transformer"]
    machine = probe["machine"]
    available = machine.get("gpu_memory_bytes") if cuda else available_host_bytes()
    if not available:
        return rows
    where = f"GPU memory ({machine.get('gpu')})" if cuda else "free host memory"
    encoders = (probe.get("encoder_params") or 0) * 4 if "live" in settings.modes else 0  # encode.dtype float32
    overhead = DEVICE_OVERHEAD_BYTES if cuda else HOST_OVERHEAD_BYTES
    build = 0 if checkpoint_ready or cuda else 2 * SHARD_BYTES + HOST_OVERHEAD_BYTES  # a shard + the writer's copy
    fits, refused = [], []
    for row in rows:
        seconds = min(settings.song_seconds, float(_train_setting(row, "max_seconds")))
        est = estimate_training_memory(config, seconds, rank=row["rank"], precision=settings.precision,
                                       gradient_checkpointing=_train_setting(row, "gradient_checkpointing"),
                                       batch=int(_train_setting(row, "batch_size")))
        need = max(est.total + encoders + overhead, build)
        row["estimate_up_front"] = est.as_dict()
        if need <= available:
            fits.append(row)
        else:
            line = (f"{settings.size} {row['label']}: the memory model needs about {need / GiB:.1f} GiB "
                    f"({est.summary()}{f' + encoders {encoders / GiB:.1f} GiB' if encoders else ''}) but "
                    f"{available / GiB:.1f} GiB of {where} is there: {out_of_memory_advice(est, BENCH_FLAGS)}")
            refused.append(line)
            row["skipped"] = line
    if not fits:
        raise ConfigError(refused[0] + (f" ({len(refused) - 1} more row(s) do not fit either)" if len(refused) > 1 else ""))
    for line in refused:
        echo(f"  skipped: {line}")
    return fits


def run_benchmark(settings: BenchSettings, echo=print) -> dict:
    """Everything for one size: returns the run record (also what goes into benchmarks.json)."""
    import shutil

    from pipeline.errors import ConfigError

    if settings.size not in SIZES:
        raise ConfigError(f"--size must be one of {', '.join(SIZES)}")
    if settings.warmup < 0 or settings.steps < 1:
        raise ConfigError("--steps must be ≥ 1 and --warmup ≥ 0")
    if settings.size == "full" and settings.device == "cpu" and not settings.allow_cpu_full:
        raise ConfigError(FULL_NEEDS_GPU)
    rows = bench_rows(settings)
    temp = None
    if settings.workdir:
        root = Path(settings.workdir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.mkdtemp(prefix="aceturbo-bench-")
        root = Path(temp)
    try:
        probe = _run_child({"mode": "probe", "size": settings.size, "threads": settings.threads}, root,
                           f"{settings.size}-probe", echo)
        has_gpu = bool(probe["machine"].get("gpu"))
        cuda = settings.device.startswith("cuda") or (settings.device == "auto" and has_gpu)
        if cuda and not has_gpu:
            raise ConfigError(f"--device {settings.device}: this machine has no CUDA GPU (torch sees none).")
        if settings.size == "full" and not cuda and not settings.allow_cpu_full:
            raise ConfigError(FULL_NEEDS_GPU)
        project, ckpt = prepare_workspace(settings, root)
        ready = (ckpt / ("COMPLETE" if settings.size == "demo" else f"COMPLETE-{settings.size}")).exists()
        runnable = check_memory_up_front(settings, rows, probe, cuda, ready, echo)
        echo(f"bench {settings.size}: {settings.songs} song(s) × {settings.song_seconds:g} s, "
             f"{len(runnable)} row(s) ({'; '.join(r['label'] for r in runnable)}), {settings.precision}, "
             f"{settings.warmup} warm-up + {settings.steps} steps per mode, in {root}")
        base = {"project": {"paths": dataclasses.asdict(project.paths), "models": dataclasses.asdict(project.models),
                            "ingest": dataclasses.asdict(project.ingest), "encode": dataclasses.asdict(project.encode)},
                "threads": settings.threads}
        prep = _prepare(settings, base, root, ckpt, echo)
        configs = prep["configs"]
        for row in rows:
            if row in runnable:
                row["modes"] = _run_modes(settings, row, base, root, echo)
            _finish_row(settings, row, prep, configs)
        return {
            "key": run_key(settings, cuda), "size": settings.size, "song_seconds": settings.song_seconds,
            "songs": settings.songs, "precision": settings.precision, "steps": settings.steps,
            "warmup": settings.warmup, "device": "cuda" if cuda else "cpu", "num_workers": prep["loader_workers"],
            "train": settings.train, "matrix": settings.matrix, "seed": settings.seed,
            "command": settings.command, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": probe["machine"], "parent": host_memory(), "prepare": prep, "cache": prep["cache"],
            "loader_samples_per_s": prep["loader_samples_per_s"], "rows": rows,
            **_flop_ratios(settings, prep),
        }
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def _flop_ratios(settings: BenchSettings, prep: dict) -> dict:
    """Encoder FLOPs per song ÷ one training step at the first rank (this size and the full one)."""
    from pipeline.tiny.small import configs as size_configs

    lengths = dict(text_tokens=prep["shapes"]["text_tokens"], lyric_tokens=prep["shapes"]["lyric_tokens"])
    full = prep["encoder_flops_full_size"]
    return {"flop_ratio": compute_ratio(prep["configs"], settings.song_seconds, settings.ranks[0], **lengths,
                                        encoders=prep["encoder_flops"]),
            "flop_ratio_full_size": full and compute_ratio(size_configs("full"), settings.song_seconds,
                                                           settings.ranks[0], **lengths, encoders=full)}


def _prepare(settings: BenchSettings, base: dict, root: Path, ckpt: Path, echo) -> dict:
    """The prepare child's result, reused from an earlier run in this workdir with the same inputs
    (the checkpoint, songs and cache do not depend on the LoRA rank: every rank reuses them; the
    loader throughput it measures depends on the worker count, which is in the name)."""
    workers = "auto" if settings.num_workers is None else settings.num_workers
    tag = f"{settings.size}-{settings.songs}x{settings.song_seconds:g}s-{settings.device}-w{workers}"
    kept = root / f"prepared-{tag}.json"
    if kept.is_file() and Path(base["project"]["paths"]["cache"]).is_dir():
        echo(f"  prepare: reusing {kept.name} (checkpoint, songs and feature cache of an earlier run)")
        return json.loads(kept.read_text())
    spec = {**base, "mode": "prepare", "size": settings.size, "songs": settings.songs, "song_seconds": settings.song_seconds,
            "checkpoint_root": str(ckpt), "num_workers": settings.num_workers, "seed": settings.seed,
            "loader_seconds": settings.loader_seconds}
    prep = _run_child(spec, root, f"{settings.size}-prepare", echo)
    from pipeline.fileio import write_json_atomic

    write_json_atomic(kept, prep, indent=1)  # a killed bench never leaves a half file to be reused
    return prep


def _run_modes(settings: BenchSettings, row: dict, base: dict, root: Path, echo) -> dict:
    import shutil

    from pipeline.memory import out_of_memory_advice

    modes = {}
    for mode in settings.modes:
        name = f"{settings.size}-{mode}-{row['label']}".replace(" ", "").replace(",", "-").replace("=", "")
        run_dir = root / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        pairs = 2 if mode == "paired" else 1
        workers = {} if settings.num_workers is None else {"num_workers": settings.num_workers}
        train = {**row["train"], **workers, "max_steps": pairs * (settings.warmup + settings.steps), "save_every": 0,
                 "keep_last": 1, "seed": settings.seed, "device": settings.device, "warmup_steps": 1,
                 "log_plot_every": 10**6, "experiment": "bench"}
        spec = {**base, "mode": mode, "train": train, "warmup": settings.warmup, "run_dir": str(run_dir)}
        result = _run_child(spec, root, name, echo)
        if result.get("error") == "out_of_memory":
            est = estimate_training_memory(_transformer_config(base), settings.song_seconds, rank=row["rank"],
                                           precision=settings.precision,
                                           gradient_checkpointing=_train_setting(row, "gradient_checkpointing"))
            result["advice"] = out_of_memory_advice(est, BENCH_FLAGS)
            echo(f"  {name}: out of memory ({result['message']}); the memory model puts it at {est.summary()}: "
                 f"{result['advice']}")
        modes[mode] = result
        shutil.rmtree(run_dir, ignore_errors=True)
    return modes


def _transformer_config(base: dict) -> dict:
    from pipeline.config import ModelsConfig

    folder = ModelsConfig(**base["project"]["models"]).paths().transformer
    return json.loads((folder / "config.json").read_text())


def _finish_row(settings: BenchSettings, row: dict, prep: dict, configs: dict) -> None:
    """FLOPs and the memory model's estimate at the shapes the children saw."""
    modes = row.get("modes") or {}
    shapes = next((m["shapes"] for m in modes.values() if m.get("shapes")), None) or prep["shapes"]
    ckpt = next((m["gradient_checkpointing"] for m in modes.values() if m.get("gradient_checkpointing")),
                _train_setting(row, "gradient_checkpointing"))
    row["shapes"], row["gradient_checkpointing"] = shapes, str(ckpt)
    transformer = configs["transformer"]
    row["flops"] = transformer_step_flops(transformer, shapes["tokens"], shapes["text_tokens"], shapes["lyric_tokens"],
                                          row["rank"], shapes["batch"], ckpt)
    row["estimate"] = estimate_training_memory(
        transformer, tokens=shapes["tokens"], rank=row["rank"], precision=settings.precision,
        gradient_checkpointing=ckpt, batch=shapes["batch"], text_tokens=shapes["text_tokens"],
        lyric_tokens=shapes["lyric_tokens"]).as_dict()


def run_memory_check(workdir: Path | None = None, echo=print) -> dict:
    """The memory model against the meter (see _child_memory_check), in a child process."""
    meta = [(180, 64, "bf16-true", "all"), (60, 64, "bf16-true", "all"), (240, 64, "bf16-true", "all"),
            (180, 16, "bf16-true", "all"), (180, 256, "bf16-true", "all"), (180, 64, "bf16-true", "none"),
            (180, 64, "bf16-true", "2"), (180, 64, "bf16-true", "3"), (180, 64, "fp32", "all")]
    cpu = [("demo", 60, 16, "fp32", "all"), ("demo", 60, 16, "fp32", "none"), ("demo", 60, 16, "bf16-true", "all"),
           ("small", 60, 64, "fp32", "all"), ("small", 60, 64, "fp32", "none"), ("small", 60, 64, "bf16-true", "all")]
    with tempfile.TemporaryDirectory(prefix="aceturbo-bench-") as tmp:
        result = _run_child({"mode": "memory-check", "meta_settings": meta, "cpu_settings": cpu, "threads": 1},
                            Path(workdir or tmp), "memory-check", echo)
    result["date"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return result


# ====================================================================================== reports
# The targets. Absolute times and device memory only from a full-size CUDA run.
TARGET_S_PER_STEP = {"none": 0.07, "all": 0.10}
TARGET_UTILISATION = 0.27
TARGET_CACHED_OVER_FLOOR = 1.15
TARGET_LIVE_OVER_CACHED = 1.5
TARGET_MEMORY_OVER_FLOOR = 1.05
TARGET_DEVICE_GIB = 12.0


def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def _is_none_setting(value) -> bool:
    return checkpointed_blocks(value, 24) == 0


def summary_rows(record: dict) -> list[dict]:
    """One dict per bench row: the headline numbers (times, ratios, memory, estimate)."""
    out = []
    cuda = record["device"] == "cuda"
    peak = record["machine"].get("gpu_bf16_peak_tflops") if cuda else None
    for row in record["rows"]:
        m = row.get("modes") or {}
        get = lambda mode, key: (m.get(mode) or {}).get(key)  # noqa: E731
        floor, cached, live = get("floor", "median_s"), get("cached", "median_s"), get("live", "median_s")
        device_mem = lambda mode: get(mode, "cuda_max_allocated_mb")  # noqa: E731
        flops = row.get("flops") or {}
        model_tflops = flops.get("model_flops", 0) / cached / 1e12 if cached and flops else None
        est = row.get("estimate") or {}
        estimate = est.get("total") if cuda else (est["total"] - est["weights"] - est["lora"] if est else None)
        measured = device_mem("cached") if cuda else _training_growth(m.get("cached"))
        out.append({
            "rank": row["rank"], "label": row["label"], "gradient_checkpointing": row.get("gradient_checkpointing"),
            "skipped": row.get("skipped"), "oom": [k for k, v in m.items() if v.get("error") == "out_of_memory"],
            "floor_s": floor, "cached_s": cached, "live_s": live,
            "cached_over_floor": cached / floor if cached and floor else None,
            "paired_cached_over_floor": get("paired", "cached_over_floor"),
            "live_over_cached": live / cached if live and cached else None,
            "host_floor_mb": get("floor", "peak_rss_mb"), "host_cached_mb": get("cached", "peak_rss_mb"),
            "host_live_mb": get("live", "peak_rss_mb"), "host_cached_anon_mb": get("cached", "rss_anon_mb"),
            "host_cached_file_mb": get("cached", "rss_file_mb"),
            "device_floor_mb": device_mem("floor"), "device_cached_mb": device_mem("cached"),
            "device_live_mb": device_mem("live"), "device_cached_reserved_mb": get("cached", "cuda_max_reserved_mb"),
            "encoders_mb": (get("live", "encoders_param_bytes") or 0) / MiB,
            "step_tflop": flops.get("step_flops", 0) / 1e12 or None, "model_tflop": flops.get("model_flops", 0) / 1e12 or None,
            "model_tflops": model_tflops, "utilisation": model_tflops / peak if model_tflops and peak else None,
            "estimate_mb": estimate / MiB if estimate else None,
            "estimate_over_measured": estimate / MiB / measured if estimate and measured else None,
            "tokens": (row.get("shapes") or {}).get("tokens"),
        })
    return out


def _training_growth(result: dict | None) -> float | None:
    """CPU: how far the training's peak RSS rose above the RSS right after the model was loaded (the
    step's own memory: activations, gradients, AdamW state, the batch, allocator slack)."""
    if not result or not result.get("training_peak_rss_mb") or not (result.get("after_load") or {}).get("rss_mb"):
        return None
    return result["training_peak_rss_mb"] - result["after_load"]["rss_mb"]


def table_text(record: dict) -> str:
    """The plain-text table the command prints."""
    cuda = record["device"] == "cuda"
    lines = [f"{record['size']} on {record['device']} ({record['machine']['gpu'] or record['machine']['cpu']}), "
             f"{record['precision']}, song {record['song_seconds']:g} s, median of {record['steps']} steps "
             f"after {record['warmup']} warm-up; parent process peak RSS {record['parent'].get('peak_rss_mb', 0):.0f} MiB"]
    mem = "device MiB" if cuda else "host RSS MiB"
    lines.append(f"{'row':<34} {'floor s':>8} {'cached s':>8} {'live s':>8} {'c/floor':>7} {'paired':>6} {'live/c':>6} "
                 f"{'floor ' + mem:>16} {'cached ' + mem:>17} {'live ' + mem:>15} {'model MiB':>9} {'TFLOP/s':>8}")
    for r in summary_rows(record):
        if r["skipped"]:
            lines.append(f"{r['label']:<34} skipped: does not fit (see above)")
            continue
        key = "device" if cuda else "host"
        lines.append(f"{r['label']:<34} {_fmt(r['floor_s']):>8} {_fmt(r['cached_s']):>8} {_fmt(r['live_s']):>8} "
                     f"{_fmt(r['cached_over_floor']):>7} {_fmt(r['paired_cached_over_floor']):>6} "
                     f"{_fmt(r['live_over_cached']):>6} {_fmt(r[key + '_floor_mb']):>16} {_fmt(r[key + '_cached_mb']):>17} "
                     f"{_fmt(r[key + '_live_mb']):>15} {_fmt(r['estimate_mb']):>9} {_fmt(r['model_tflops']):>8}"
                     + (f"  OOM: {', '.join(r['oom'])}" if r["oom"] else ""))
    lines.append(f"loader {record['loader_samples_per_s']:.1f} samples/s; cache "
                 f"{record['cache']['mb_per_minute']['total']:.2f} MB per minute of audio")
    enc = record["prepare"]["streams"]
    lines.append("encode (s of audio per s): " + ", ".join(f"{s} {_fmt(v['audio_s_per_s'])}" for s, v in enc.items()))
    return "\n".join(lines)


def load_results(path: Path) -> dict:
    """benchmarks.json; records of the layout before per-row memory (no "rows") are dropped."""
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("runs"), dict):
                data["runs"] = {k: v for k, v in data["runs"].items() if isinstance(v.get("rows"), list)}
                return data
        except ValueError:
            pass
    return {"runs": {}}


def _md_run(record: dict) -> list[str]:
    mach = record["machine"]
    cuda = record["device"] == "cuda"
    dev = (f"GPU {mach['gpu']} ({mach.get('gpu_memory_gb')} GiB; dense bf16 peak "
           f"{_fmt(mach.get('gpu_bf16_peak_tflops')) if mach.get('gpu_bf16_peak_tflops') else 'unknown'} TFLOP/s), "
           f"CPU {mach['cpu']}, {mach['cores']} cores" if cuda
           else f"CPU {mach['cpu']}, {mach['cores']} cores, {mach['ram_gb']} GB RAM, no GPU")
    settings = ", ".join(f"{k}={v}" for k, v in (record.get("train") or {}).items()) or "TrainConfig defaults"
    out = [
        f"### {record['size']} — {record['device']}, {record['precision']}, {record['songs']} song × "
        f"{record['song_seconds']:g} s" + (f" ({', '.join(record['matrix'])} varied)" if record.get("matrix") else ""),
        "",
        f"- Machine: {dev}; Python {mach['python']}, torch {mach['torch']}; {mach['platform']}",
        f"- Date: {record['date']}",
        f"- Command: `{record['command']}`",
        f"- Median seconds per optimizer step over {record['steps']} steps after {record['warmup']} warm-up steps, "
        f"batch 1, one subprocess per mode; train settings: {settings}; loader workers {record['num_workers']}."
        + (" Absolute times are for THIS CPU only; compare ratios." if not cuda else ""),
        f"- The bench's parent process (which holds no model) peaked at {record['parent'].get('peak_rss_mb', 0):.0f} MiB RSS.",
        "",
        "| row | gradient checkpointing | floor s/step | cached s/step | live s/step | cached ÷ floor | cached ÷ floor, paired "
        "| live ÷ cached | step TFLOP (model work) | model TFLOP/s (cached) |" + (" of bf16 peak |" if cuda else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    rows = summary_rows(record)
    for r in rows:
        if r["skipped"]:
            out.append(f"| {r['label']} | – | skipped: {r['skipped']} |" + " |" * (7 + cuda))
            continue
        oom = f" (out of memory in {', '.join(r['oom'])})" if r["oom"] else ""
        row = (f"| {r['label']}{oom} | {r['gradient_checkpointing']} | {_fmt(r['floor_s'])} | {_fmt(r['cached_s'])} | "
               f"{_fmt(r['live_s'])} | {_fmt(r['cached_over_floor'])} | {_fmt(r['paired_cached_over_floor'])} | "
               f"{_fmt(r['live_over_cached'])} | {_fmt(r['step_tflop'], 4)} ({_fmt(r['model_tflop'], 4)}) | "
               f"{_fmt(r['model_tflops'])} |")
        if cuda:
            row += f" {_fmt(r['utilisation'] * 100 if r['utilisation'] else None)} % |"
        out.append(row)
    out += ["", "Memory (MiB): host = peak RSS (VmHWM) of each mode's process"
            + ("; device = torch.cuda.max_memory_allocated (reserved in brackets)" if cuda else
               "; cached own / file = the cached process's anonymous and file-backed pages at its end")
            + "; model = pipeline.memory's estimate"
            + (" of the step (÷ measured: device allocated)." if cuda else
               " of what the step adds to the loaded model (÷ measured: the cached process's training peak RSS "
               "minus its RSS right after loading)."),
            ""]
    if cuda:
        out += ["| row | host floor | host cached | host live | device floor | device cached | device live | "
                "encoders' weights | model | model ÷ measured |", "|---|" + "---:|" * 9]
        for r in rows:
            if not r["skipped"]:
                out.append(f"| {r['label']} | {_fmt(r['host_floor_mb'])} | {_fmt(r['host_cached_mb'])} | "
                           f"{_fmt(r['host_live_mb'])} | {_fmt(r['device_floor_mb'])} | {_fmt(r['device_cached_mb'])} "
                           f"({_fmt(r['device_cached_reserved_mb'])}) | {_fmt(r['device_live_mb'])} | "
                           f"{_fmt(r['encoders_mb'])} | {_fmt(r['estimate_mb'])} | {_fmt(r['estimate_over_measured'])} |")
    else:
        out += ["| row | host floor | host cached | host live | cached own / file | encoders' weights | model | "
                "model ÷ measured |", "|---|" + "---:|" * 7]
        for r in rows:
            if not r["skipped"]:
                out.append(f"| {r['label']} | {_fmt(r['host_floor_mb'])} | {_fmt(r['host_cached_mb'])} | "
                           f"{_fmt(r['host_live_mb'])} | {_fmt(r['host_cached_anon_mb'])} / "
                           f"{_fmt(r['host_cached_file_mb'])} | {_fmt(r['encoders_mb'])} | {_fmt(r['estimate_mb'])} | "
                           f"{_fmt(r['estimate_over_measured'])} |")
    enc = record["prepare"]["streams"]
    cache = record["cache"]["mb_per_minute"]
    loads = [f"{r['label']} {mode} {v.get('loadavg_1min', 0):.1f}" for r in record["rows"]
             for mode, v in (r.get("modes") or {}).items()]
    out += [
        "",
        f"Machine load (1-min load average at the end of each mode, {mach['cores']} cores): " + ", ".join(loads)
        + (". Other jobs shared this machine, so absolute times are noisy; each ratio is from one run." if not cuda else "."),
        "",
        f"Data path: loader {record['loader_samples_per_s']:.1f} samples/s (workers {record['num_workers']}); "
        f"cache {cache['total']:.2f} MB per minute of audio ("
        + ", ".join(f"{s} {v:.2f}" for s, v in cache.items() if s != "total") + "); "
        + (f"decode (MP3 → 48 kHz PCM) {record['prepare']['decode_s']:.2f} s for "
           f"{record['prepare']['audio_seconds']:.0f} s of audio." if record["prepare"].get("decode_s")
           else "decode: the PCM was already decoded by an earlier run in this workdir (live mode decodes every step)."),
        "",
        "| stream | encoder params | load s | encode s | s of audio per s | encode stage s (load+hash+encode+write; – = cache was up to date) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s, v in enc.items():
        out.append(f"| {s} | {v['params'] / 1e6:.2f} M | {_fmt(v['load_s'])} | {_fmt(v['encode_s'])} | "
                   f"{_fmt(v['audio_s_per_s'])} | {_fmt(v['stage_s'])} |")
    ratio, full = record.get("flop_ratio"), record.get("flop_ratio_full_size")
    if ratio:
        enc_f = ratio["encoders"]
        out += ["", f"FLOPs (song {ratio['seconds']:g} s = {ratio['tokens']} tokens): encoders per song "
                f"{enc_f['total'] / 1e12:.4g} TFLOP (DCAE {enc_f['latents'] / 1e12:.3g}, MERT {enc_f['mert'] / 1e12:.3g}, "
                f"mHuBERT {enc_f['mhubert'] / 1e12:.3g}, UMT5 {enc_f['text'] / 1e12:.2g}); transformer step "
                f"{ratio['transformer_step'] / 1e12:.4g} TFLOP; encoders ÷ step = **{ratio['encoders_over_step']:.2f}**"
                + (f" (real sizes: {full['encoders_over_step']:.2f})" if full else "") + "."]
    return out


def target_rows(runs: list[dict]) -> list[tuple[str, str, str]]:
    """(target, where measured, result) for each of the issue's targets, from the recorded runs."""
    out = []
    cuda_full = [r for r in runs if r["device"] == "cuda" and r["size"] == "full"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    for setting, limit in TARGET_S_PER_STEP.items():
        hits = [(rec, r) for rec in cuda_full for r in summary_rows(rec)
                if r["rank"] == 64 and rec["song_seconds"] == 180 and r["cached_s"]
                and _is_none_setting(r["gradient_checkpointing"]) == (setting == "none")]
        target = f"r=64, 3-min song, bf16-true, checkpointing {setting}: ≤ {limit} s/step"
        if setting == "none":
            target += f" (≥ {TARGET_UTILISATION:.0%} of the bf16 peak)"
        if not hits:
            out.append((target, "–", "not run (needs a full-size CUDA run)"))
        for rec, r in hits:
            util = f", {r['utilisation']:.1%} of peak" if r["utilisation"] else ""
            ok = r["cached_s"] <= limit and (setting != "none" or (r["utilisation"] or 0) >= TARGET_UTILISATION)
            out.append((target, rec["machine"]["gpu"], f"{r['cached_s']:.3f} s{util} — {verdict(ok)}"))
    hits = [(rec, r) for rec in cuda_full for r in summary_rows(rec)
            if r["rank"] == 64 and rec["song_seconds"] == 180 and not _is_none_setting(r["gradient_checkpointing"])
            and r["device_cached_reserved_mb"]]
    target = f"r=64, 3-min song, with checkpointing: ≤ {TARGET_DEVICE_GIB:g} GiB of device memory (max reserved)"
    if not hits:
        out.append((target, "–", "not run (needs a full-size CUDA run); the memory model says "
                    f"{_model_r64_gib():.1f} GiB allocated"))
    for rec, r in hits:
        gib = r["device_cached_reserved_mb"] / 1024
        out.append((target, rec["machine"]["gpu"], f"{gib:.2f} GiB — {verdict(gib <= TARGET_DEVICE_GIB)}"))
    for rec in runs:
        where = f"{rec['size']} {rec['device']} ({rec['precision']}, {rec['song_seconds']:g} s)"
        cuda = rec["device"] == "cuda"
        noisy, few_steps = _timing_caveat(rec), _timing_caveat(rec, load_matters=False)
        for r in summary_rows(rec):
            if r["skipped"]:
                continue
            label = f"{where}, {r['label']}"
            ratio = r["paired_cached_over_floor"] or r["cached_over_floor"]
            if ratio:
                out.append((f"cached ≤ {TARGET_CACHED_OVER_FLOOR} × floor (s/step)", label,
                            f"{ratio:.2f}{' paired' if r['paired_cached_over_floor'] else ''} — "
                            f"{verdict(ratio <= TARGET_CACHED_OVER_FLOOR)}"
                            f"{few_steps if r['paired_cached_over_floor'] else noisy}"))
            if r["live_over_cached"]:
                out.append((f"live ÷ cached ≥ {TARGET_LIVE_OVER_CACHED}", label,
                            f"{r['live_over_cached']:.2f} — {verdict(r['live_over_cached'] >= TARGET_LIVE_OVER_CACHED)}"
                            f"{noisy}"))
            key = "device" if cuda else "host"
            floor_m, cached_m, live_m = r[f"{key}_floor_mb"], r[f"{key}_cached_mb"], r[f"{key}_live_mb"]
            if floor_m and cached_m:
                out.append((f"cached memory ≤ floor + 5 % ({key})", label,
                            f"{cached_m:,.0f} vs {floor_m:,.0f} MiB ({cached_m / floor_m:.3f}) — "
                            f"{verdict(cached_m <= TARGET_MEMORY_OVER_FLOOR * floor_m)}"))
            if cuda and cached_m and live_m:
                out.append(("cached device memory below live by ≥ the encoders' weights", label,
                            f"{live_m - cached_m:,.0f} MiB less (encoders {r['encoders_mb']:,.0f}) — "
                            f"{verdict(live_m - cached_m >= r['encoders_mb'])}"))
    return out


def _timing_caveat(record: dict, load_matters: bool = True) -> str:
    """A note for time ratios that cannot be trusted: under 3 timed steps, or (for ratios of separate
    processes; paired mode shares the load) a machine busier than its cores."""
    cores = record["machine"].get("cores") or 1
    load = max((m.get("loadavg_1min") or 0.0 for r in record["rows"] for m in (r.get("modes") or {}).values()),
               default=0.0)
    if record["steps"] < 3 or (load_matters and load > cores):
        return f" (unreliable: {record['steps']} timed step(s), load average up to {load:.1f} on {cores} cores)"
    return ""


def _model_r64_gib() -> float:
    from pipeline.tiny.small import FULL_TRANSFORMER_CONFIG

    return estimate_training_memory(FULL_TRANSFORMER_CONFIG, 180, rank=64, gradient_checkpointing="all").total / GiB


SEED_TABLE_4090 = {16: 14, 64: 18, 256: 22}  # the seed's "4090" table, GB, 3-minute song (issue #15)


def _md_memory(results: dict) -> list[str]:
    """The memory model's table for the full size, its checks, and the seed's table next to it."""
    from pipeline.memory import memory_table
    from pipeline.tiny.small import FULL_TRANSFORMER_CONFIG

    params = transformer_params(FULL_TRANSFORMER_CONFIG)
    out = [
        "## Memory",
        "",
        "The memory model (`pipeline.memory.estimate_training_memory`; the formula is in that module's docstring)",
        "adds up what one LoRA step holds on its device — what `torch.cuda.max_memory_allocated` reports: the",
        f"frozen weights as loaded for training ({params['loaded_for_training'] / 1e9:.3f} B parameters: the checkpoint's "
        f"{params['total'] / 1e9:.3f} B less the {params['cross_attn_unused'] / 1e6:.0f} M of the cross-attention",
        "`add_*` projections no forward pass uses, which `load_transformer_for_training` no longer reads), the LoRA,",
        "its gradients, AdamW's two moments, the batch, and the activations autograd keeps for backward, per latent",
        "token (10.77 per second of audio), per block, with and without gradient checkpointing. It leaves out the",
        "CUDA context (~0.5 GiB) and the caching allocator's slack (max_memory_reserved − allocated).",
        "",
        "Full size (3.5B), bf16-true, 64 text + 300 lyric tokens, batch 1, GiB:",
        "",
        "| LoRA r | song s | checkpointing all: total | weights | LoRA + grads + AdamW | activations | "
        "checkpointing none: total | activations | seed's 4090 table (3-min) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table = memory_table(FULL_TRANSFORMER_CONFIG)
    by = {(r["gradient_checkpointing"], r["seconds"], r["rank"]): r for r in table}
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    for sec in (60, 180, 240):
        for rank in (16, 64, 256):
            a, n = by[("all", sec, rank)], by[("none", sec, rank)]
            seed = f"~{SEED_TABLE_4090[rank]} GB" if sec == 180 else ""
            out.append(f"| {rank} | {sec} | **{g(a['total'])}** | {g(a['weights'])} | "
                       f"{g(a['lora'] + a['gradients'] + a['optimizer'])} | {g(a['activations'])} | {g(n['total'])} | "
                       f"{g(n['activations'])} | {seed} |")
    lyric = [(L, estimate_training_memory(FULL_TRANSFORMER_CONFIG, 180, rank=64, lyric_tokens=L).total / GiB)
             for L in (300, 1000, 2000, 4096)]
    out += ["", "Lyrics cost memory quadratically (the lyric Conformer keeps [16 heads × L × L] attention matrices): "
            "r=64, 180 s, checkpointing all, with " + ", ".join(f"{L} lyric tokens {v:.2f} GiB" for L, v in lyric) + "."]
    checks = (results.get("memory_checks") or {}).get("rows") or []
    if checks:
        out += ["", "The model against the meter (`pipeline.memory_meter.count_step_memory`: the product's `train_step`, "
                "two steps, under `TensorMemoryMeter`, which counts every tensor storage alive on the step's device (the "
                "batch comes from the host, as the loaders give it) — at the full size on "
                "`meta` tensors, at the demo and small sizes on real CPU tensors; "
                f"`aceturbo bench --memory-check`, {results['memory_checks'].get('date', '')}):", "",
                "| size | tensors | song s | r | precision | checkpointing | counted peak MiB | model MiB | model ÷ counted |",
                "|---|---|---:|---:|---|---|---:|---:|---:|"]
        for c in checks:
            out.append(f"| {c['size']} | {c['device']} | {c['seconds']:g} | {c['rank']} | {c['precision']} | "
                       f"{c['gradient_checkpointing']} | {c['counted_peak'] / MiB:,.1f} | {c['estimate'] / MiB:,.1f} | "
                       f"{c['ratio']:.3f} |")
    out += [""] + list(results.get("memory_notes") or [])
    return out


def write_reports(results: dict, md_path: Path, json_path: Path) -> None:
    """benchmarks.json (every run, keyed) and benchmarks.md (all runs' tables + notes)."""
    from pipeline.fileio import write_text_atomic

    runs = sorted(results["runs"].values(), key=lambda r: (r["device"] != "cuda", SIZES.index(r["size"]), r["key"]))
    lines = [
        "# Benchmarks: cached vs live training, data-path overhead, memory, cache size",
        "",
        "Written by `aceturbo bench` (pipeline/bench.py); every number below comes from the run it is listed",
        "under. Modes, each in its own subprocess, all through the product's `pipeline.train.train`:",
        "",
        "- **floor**: one batch read once and fed again every step (the step moves it to the device, as a cached",
        "  batch) — the transformer's forward + backward + AdamW step alone, what any data path adds to;",
        "- **cached**: batches from the Zarr feature cache (`cache.loader.make_loader`) — the product;",
        "- **paired**: floor and cached steps alternating in ONE process (fixed batch, cache batch, ...), so",
        "  both share the same machine load; its cached ÷ floor is the robust one on a shared machine;",
        "- **live**: batches encoded every step (`pipeline.live.LiveSource`: decode MP3 + DCAE + MERT +",
        "  mHuBERT + UMT5), what the original trainers do. On a GPU the encoders are kept resident on the",
        "  device (as the official trainer does) so live is not slowed by weight transfers.",
        "",
        "Songs are synthetic (`pipeline.tiny.songs`), weights random (`pipeline.tiny`), nothing is",
        "downloaded. Step FLOPs are counted analytically (`transformer_step_flops`: 2 × MACs forward, the",
        "same again for the input gradients through the frozen weights, 2 × LoRA MACs for the LoRA weight",
        "gradients, plus the recomputed forward of the recomputing DiT blocks and lyric layers under",
        "gradient checkpointing; attention terms included, element-wise work not); \"model TFLOP/s\" divides",
        "the model work (no recompute) by the cached s/step, the usual utilisation convention. Encoder",
        "FLOPs are counted by torch's FlopCounterMode on `meta` tensors.",
        "",
        "Targets (issue #15; H100/H200, 3-minute song, r=64, bf16-true): ≤ 0.07 s/step without checkpointing",
        "(≥ 27 % of the 989 TFLOP/s dense bf16 peak on ~18.9 TFLOP of model work) and ≤ 0.10 s with it;",
        "cached ≤ 1.15 × floor; live ÷ cached ≥ 1.5; cached device memory below live by at least the",
        "encoders' weights; cached memory ≤ floor + 5 %; r=64 with checkpointing in ≤ 12 GiB of device memory.",
        "",
        "## GPU table",
        "",
        "`scripts/gpu_check.sh` options (see its header): `GPU_CHECK_PYTHON=/path/bin/python` uses a prepared",
        "environment (offline machines: no `scripts/setup.sh`); `GPU_CHECK_PHASES=tests,bench,train` (bench is",
        "bench-all, bench-none, bench-auto, bench-compiled) runs only those parts, so short GPU sessions can",
        "split the check over one `GPU_CHECK_WORKDIR` (the feature build is reused).",
        "",
    ]
    cuda_runs = [r for r in runs if r["device"] == "cuda"]
    if not any(r["size"] == "full" for r in cuda_runs):
        lines += ["Not run yet: no GPU was available to the sessions that wrote this file. On a machine with a CUDA",
                  "GPU, `bash scripts/gpu_check.sh` installs the project, runs the CUDA-only tests and the full-size",
                  "bench (r = 16, 64, 256; floor, cached, live, paired; checkpointing all, none and auto; compiled)",
                  "and rewrites this file with the GPU table, then trains for real on that checkpoint (compile on,",
                  "validation)."] + list(results.get("gpu_pending_notes") or []) + [""]
    for r in cuda_runs:
        lines += _md_run(r) + [""]
    lines += ["## Targets", "", "| target | measured on | result |", "|---|---|---|"]
    lines += [f"| {t} | {w} | {v} |" for t, w, v in target_rows(runs)] + [""]
    lines += _md_memory(results) + [""]
    lines += ["## CPU tables", ""]
    cpu_runs = [r for r in runs if r["device"] == "cpu"]
    if not cpu_runs:
        lines += ["(none yet)", ""]
    for r in cpu_runs:
        lines += _md_run(r) + [""]
    extra = results.get("notes")
    if extra:
        lines += ["## Notes", ""] + list(extra) + [""]
    write_text_atomic(json_path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_text_atomic(md_path, "\n".join(lines))


def command_line(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    name = Path(argv[0]).name if argv else "aceturbo"
    name = "aceturbo" if name in ("aceturbo", "__main__.py", "cli.py") else name
    return " ".join([name] + [shlex.quote(a) for a in argv[1:]])


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "child":
        _child_main(sys.argv[2:])
    else:
        print(__doc__)
