"""`aceturbo bench`: cached vs live training, the transformer-alone floor, cache size, encode speed.

On one machine, with one model size, song, seed and LoRA config, three modes each run in their own
subprocess (so peak memory is per mode) and train through the product's own ``pipeline.train.train``:

  floor   one batch already on the device, fed again every step: the transformer's forward +
          backward + optimizer step and nothing else (what any data path adds to)
  cached  batches from the Zarr feature cache through cache.loader.make_loader (the product)
  live    batches encoded on every step by pipeline.live.LiveSource: decode the audio, DCAE, MERT,
          mHuBERT and UMT5 (what the original trainers do)

Each mode runs ``warmup + steps`` optimizer steps; the per-step times come from the trainer's own
metrics.jsonl and the median of the steps after the warm-up is reported. Peak memory: the child's
VmHWM (peak resident set) on a CPU, torch.cuda.max_memory_allocated on a GPU. Besides the modes:
loader samples/s (cache.bench.loader_throughput), cache MB per minute of audio
(cache.bench.measure_cache), and the encode throughput of each stream (seconds of audio per second).

FLOPs: the transformer's training step is counted analytically from its config
(``transformer_step_flops``; a test checks its forward against torch's FlopCounterMode) and the
encoders' per-song work with FlopCounterMode on ``meta`` tensors (``encoder_flops``), so the real
sizes can be counted on any machine without running them.

    python -m pipeline.bench child SPEC.json     # one mode (used by run_benchmark)
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
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

from pipeline.lora import DEFAULT_TARGETS

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
OFFICIAL_TARGETS = tuple(DEFAULT_TARGETS)


# ====================================================================================== FLOPs
def _transformer_dims(config: dict) -> dict:
    d = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 64))
    return dict(
        d=d, head_dim=int(config.get("attention_head_dim", 64)), layers=int(config.get("num_layers", 28)),
        ff=int(d * float(config.get("mlp_ratio", 4.0))), in_ch=int(config.get("in_channels", 8)),
        patch=int(config.get("patch_size", [16, 1])[0]) * int(config.get("patch_size", [16, 1])[1]),
        out_ch=int(config.get("out_channels", 8)), speaker=int(config.get("speaker_embedding_dim", 512)),
        text=int(config.get("text_embedding_dim", 768)), vocab=int(config.get("lyric_encoder_vocab_size", 6681)),
        lyr_in=int(config.get("lyric_hidden_size", 1024)), lyr=int(config.get("lyric_encoder_output_size", 1024)),
        lyr_ff=int(config.get("lyric_encoder_linear_units", 4096)),
        lyr_blocks=int(config.get("lyric_encoder_num_blocks", 6)),
        ssl_dims=[int(x) for x in config.get("ssl_latent_dims", [1024, 768])],
    )


def transformer_params(config: dict) -> dict[str, int]:
    """Parameter counts of ACEStepTransformer2DModel from its config (spec §2.1), by part.

    ``latent_path``: the weights every latent token goes through (DiT blocks without the unused
    cross-attention add_* projections and without the cross-attention K/V, which see the
    conditioning tokens; patch embedding, final layer, SSL heads)."""
    k = _transformer_dims(config)
    d, ff = k["d"], k["ff"]
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    attn_self = 4 * lin(d, d)
    cross_used_latent = 2 * lin(d, d)  # to_q, to_out.0
    cross_kv = 2 * lin(d, d)  # to_k, to_v (conditioning tokens)
    cross_unused = 4 * lin(d, d)  # add_q/k/v_proj, to_add_out: in the checkpoint, never used
    ffn = lin(d, 2 * ff) + (2 * ff * 3 + 2 * ff) + lin(ff, d, bias=False)
    block_latent = 6 * d + attn_self + cross_used_latent + ffn
    blocks = k["layers"] * (block_latent + cross_kv + cross_unused)
    hidden = k["in_ch"] * 256
    proj_in = hidden * k["in_ch"] * k["patch"] + hidden + 2 * hidden + lin(hidden, d)
    final = 2 * d + lin(d, k["patch"] * k["out_ch"])
    projectors = sum(lin(d, 2 * d) + lin(2 * d, 2 * d) + lin(2 * d, od) for od in k["ssl_dims"])
    timestep = lin(256, d) + lin(d, d) + lin(d, 6 * d)
    D, U = k["lyr"], k["lyr_ff"]
    lyric_layer = 4 * lin(D, D) + D * D + 2 * D + lin(D, U) + lin(U, D) + 4 * D
    lyric = k["vocab"] * k["lyr_in"] + lin(k["lyr_in"], D) + 2 * D + k["lyr_blocks"] * lyric_layer + 2 * D
    cond = lin(k["speaker"], d) + lin(k["text"], d) + lyric + lin(D, d)
    total = blocks + proj_in + final + projectors + timestep + cond
    return {
        "total": total,
        "blocks": blocks,
        "latent_path": k["layers"] * block_latent + proj_in + final + projectors,
        "cross_attn_unused": k["layers"] * cross_unused,
        "conditioning": cond + k["layers"] * cross_kv,
    }


def lora_params(config: dict, rank: int, targets=OFFICIAL_TARGETS) -> int:
    """Trainable LoRA parameters (spec §7: 211 wrapped layers for the official target list)."""
    k = _transformer_dims(config)
    d, D = k["d"], k["lyr"]
    n = 0
    per_block = sum(1 for t in ("to_q", "to_k", "to_v", "to_out.0") if t in targets)
    n += 2 * k["layers"] * per_block * rank * (d + d)  # attn and cross_attn
    n += k["lyr_blocks"] * sum(1 for t in ("linear_q", "linear_k", "linear_v") if t in targets) * rank * (D + D)
    if "speaker_embedder" in targets:
        n += rank * (k["speaker"] + d)
    return n


def transformer_step_flops(config: dict, tokens: int, text_tokens: int = 64, lyric_tokens: int = 300,
                           rank: int = 64, batch: int = 1, gradient_checkpointing: bool = True,
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
    forward of the DiT blocks and lyric layers under gradient checkpointing. With frozen base
    weights this equals the usual "6 × params-in-path × tokens" (2 fwd + 2 input-grad + 2
    recompute instead of 2 fwd + 4 bwd). Element-wise work (norms, RoPE, SiLU) is not counted.
    """
    k = _transformer_dims(config)
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
    recompute = 2.0 * (block_latent_macs + block_cond_macs + lyric_layer_macs) if gradient_checkpointing else 0.0
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
    from diffusers import AutoencoderDC
    from transformers import HubertConfig, HubertModel, UMT5Config, UMT5EncoderModel

    latent = math.ceil(seconds * 44100 / 4096)
    out = {}
    with torch.device("meta"):
        dcae = AutoencoderDC(**configs["dcae"])
        mel = torch.zeros(1, 2, 128, latent * 8)
        out["latents"] = _meta_flops(lambda: dcae.encoder(mel))
        for name, rate, chunk_s in (("mert", 24000, 5), ("mhubert", 16000, 30)):
            drop = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype")
            cfg = {k: v for k, v in configs[name].items() if k not in drop}
            model = HubertModel(HubertConfig(**cfg)).eval()
            chunks = torch.zeros(math.ceil(seconds / chunk_s), rate * chunk_s)
            out[name] = _meta_flops(lambda: model(input_values=chunks))
        u = configs["umt5"]
        text = UMT5EncoderModel(UMT5Config(d_model=u["d_model"], num_layers=u["num_layers"], num_heads=u["num_heads"],
                                           d_kv=u["d_kv"], d_ff=u["d_ff"], vocab_size=u.get("vocab_size") or 512,
                                           feed_forward_proj="gated-gelu", is_encoder_decoder=False))
        ids = torch.zeros(text_variants, text_tokens, dtype=torch.long)
        out["text"] = _meta_flops(lambda: text(input_ids=ids))
    out["total"] = sum(out.values())
    return out


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
                  lyric_tokens: int = 300) -> dict:
    """Encoder FLOPs per song vs transformer FLOPs per training step for one ``seconds`` song."""
    tokens = math.ceil(seconds * 44100 / 4096)
    enc = encoder_flops(configs, seconds)
    step = transformer_step_flops(configs["transformer"], tokens, text_tokens, lyric_tokens, rank)
    return {"seconds": seconds, "tokens": tokens, "encoders": enc, "transformer_step": step["step_flops"],
            "encoders_over_step": enc["total"] / step["step_flops"]}


# ====================================================================================== machine
def machine_info() -> dict:
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
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    gpu_bf16_peak_tflops=gpu_peak_tflops(torch.cuda.get_device_name(0)))
    return info


def gpu_peak_tflops(name: str) -> float | None:
    for key, peak in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak or None
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB (MiB·1.048576 would be MB; we report MiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    num_workers: int = 0
    gradient_checkpointing: bool = True
    seed: int = 42
    workdir: str | None = None  # keep checkpoints/songs/cache here (reused when present); default: a temp dir
    allow_cpu_full: bool = False
    loader_seconds: float = 3.0
    threads: int | None = None  # torch threads per child (default: torch's choice)
    command: str = ""


def _default_ckpt_dtype(size: str, precision: str):
    import torch

    return torch.bfloat16 if precision == "bf16-true" else torch.float32


# ====================================================================================== children
def _project_from_dict(data: dict):
    from pipeline.config import EncodeConfig, IngestConfig, ModelsConfig, PathsConfig, ProjectConfig

    return ProjectConfig(paths=PathsConfig(**data["paths"]), models=ModelsConfig(**data["models"]),
                         ingest=IngestConfig(**data["ingest"]), encode=EncodeConfig(**data["encode"]))


def _child_prepare(spec: dict) -> dict:
    """ingest → decode → (timed encoders) → encode every stream into the cache."""
    import torch

    from cache.pcm import read_pcm
    from pipeline.dataset import read_previous_manifest, scan_dataset, write_manifest, write_stage_views
    from pipeline.encoding import decode_songs, encode_stream, read_rows
    from pipeline.features import StreamEncoder

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
            run = lambda: [encoder.text(t["id"], t["tags"], t.get("recaption") or {}, t["lyrics"]) for t in texts]  # noqa: E731
            run()  # warm-up
        else:
            encoder.audio(wavs[0][:, :48000 * 3])  # warm-up on 3 s
            run = lambda: [encoder.audio(w) for w in wavs]  # noqa: E731
        sync()
        tic = time.perf_counter()
        run()
        sync()
        encode_s = time.perf_counter() - tic
        params = _param_bytes(encoder.model)
        del encoder
        tic = time.perf_counter()
        stage = encode_stream(project, stream, progress=False)
        stage_s = time.perf_counter() - tic if stage.encoded else None  # None: the cache was up to date
        streams[stream] = {"load_s": load_s, "encode_s": encode_s, "stage_s": stage_s,
                           "audio_s_per_s": audio_s / encode_s if encode_s > 0 else None, **params}
    return {"audio_seconds": audio_s, "decode_s": decode_s, "streams": streams, "peak_rss_mb": peak_rss_mb()}


def _param_bytes(model) -> dict:
    """Parameter count and bytes of an encoder wrapper (MusicDCAE, SSL extractor, UMT5 encoder)."""
    import torch

    module = model.model if hasattr(model, "model") and isinstance(getattr(model, "model"), torch.nn.Module) else model
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    return {"params": sum(p.numel() for p in params), "param_bytes": sum(p.numel() * p.element_size() for p in params)}


class _Alternate:
    """paired mode: the fixed device batch, then a cache batch, then the fixed one again, ... so the
    floor and cached steps interleave in one process and share whatever load the machine has."""

    def __init__(self, loader, batch: dict):
        self.loader, self.batch = loader, batch

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            yield self.batch
            yield next(batches)


class _Repeat:
    """The same (device-resident) batch forever: the floor mode's batch source."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def _child_train(spec: dict) -> dict:
    """floor / cached / live: train() for warmup + steps steps; per-step times from metrics.jsonl."""
    import torch

    from cache.loader import LoaderSettings, make_loader
    from pipeline.train import PRECISION_DTYPES, batch_to_device, load_transformer_for_training, train
    from pipeline.train_config import from_params

    mode = spec["mode"]
    project = _project_from_dict(spec["project"])
    config = from_params(spec["train"]).validate()
    paths = project.models.paths()
    transformer_dir = paths.require("ace_step_transformer")
    speaker_dim = json.loads((transformer_dir / "config.json").read_text()).get("speaker_embedding_dim", 512)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if config.device == "auto" else config.device))
    cuda = device.type == "cuda"
    result: dict[str, Any] = {"mode": mode, "device": str(device)}
    settings = LoaderSettings(batch_size=config.batch_size, max_seconds=config.max_seconds, seed=config.seed,
                              num_workers=spec.get("num_workers", 0), speaker_dim=speaker_dim)
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
            first = batch_to_device(next(iter(loader)), device, PRECISION_DTYPES[config.precision])
            batches = _Alternate(make_loader(project.paths.features, settings), first) if mode == "paired" \
                else _Repeat(first)
            del loader
    transformer = load_transformer_for_training(transformer_dir, config, device)
    result["transformer_params"] = sum(p.numel() for p in transformer.parameters())
    result["trainable_params"] = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    result["encoders_param_bytes"] = encoders_bytes
    shapes = {}

    class _Shapes:  # records the first batch's sizes (tokens, text and lyric lengths) for the FLOP count
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for batch in self.inner:
                if not shapes:
                    shapes.update(tokens=int(batch["latents"].shape[-1]), text_tokens=int(batch["text_states"].shape[1]),
                                  lyric_tokens=int(batch["lyric_ids"].shape[1]), batch=int(batch["latents"].shape[0]))
                yield batch

        def state_dict(self):
            return self.inner.state_dict() if hasattr(self.inner, "state_dict") else None

        def load_state_dict(self, state):
            self.inner.load_state_dict(state)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run_dir = Path(spec["run_dir"])
    summary = train(config, transformer, _Shapes(batches), run_dir)
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
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
                  last_loss=summary.get("last_loss"), shapes=shapes, peak_rss_mb=peak_rss_mb())
    result["step_settings"] = summary.get("step_settings")  # as resolved (e.g. auto checkpointing → "13 of 24")
    return result


def _child_main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    result = _child_prepare(spec) if spec["mode"] == "prepare" else _child_train(spec)
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
def prepare_workspace(settings: BenchSettings, root: Path, echo=print):
    """Checkpoint for the size, synthetic songs, and the ProjectConfig pointing at them."""
    from pipeline.config import EncodeConfig, IngestConfig, PathsConfig, ProjectConfig
    from pipeline.tiny.songs import make_demo_songs

    data = root / f"data-{settings.songs}x{settings.song_seconds:g}s"
    if not any(data.glob("*.mp3")):
        make_demo_songs(data, n=settings.songs, seconds=settings.song_seconds, seed=0)
    lyrics = [p.read_text(encoding="utf-8") for p in sorted(data.glob("*_lyrics.txt"))]
    ckpt = root / "checkpoints"
    if settings.size == "demo":
        from pipeline.tiny.demo import build_demo_checkpoint

        models = build_demo_checkpoint(ckpt / "demo", lyrics)
    else:
        from pipeline.tiny.small import build_bench_checkpoint

        tic = time.perf_counter()
        models = build_bench_checkpoint(ckpt / settings.size, settings.size, lyrics,
                                        dtype=_default_ckpt_dtype(settings.size, settings.precision))
        echo(f"  checkpoint {settings.size}: ready in {time.perf_counter() - tic:.1f} s")
    tag = f"{settings.size}-{settings.songs}x{settings.song_seconds:g}s-{settings.device}"
    paths = PathsConfig(data=str(data), cache=str(root / "cache" / tag), exps=str(root / "exps" / tag))
    return ProjectConfig(paths=paths, models=models, ingest=IngestConfig(), encode=EncodeConfig(device=settings.device))


def run_benchmark(settings: BenchSettings, echo=print) -> dict:
    """Everything for one size: returns the run record (also what goes into benchmarks.json)."""
    import shutil

    import torch

    from cache.bench import loader_throughput, measure_cache
    from cache.loader import LoaderSettings
    from pipeline.errors import ConfigError

    cuda = torch.cuda.is_available() and settings.device in ("auto", "cuda") or settings.device.startswith("cuda")
    if settings.size not in SIZES:
        raise ConfigError(f"--size must be one of {', '.join(SIZES)}")
    if settings.size == "full" and not cuda and not settings.allow_cpu_full:
        raise ConfigError("--size full needs a GPU (the 3.5B transformer alone is 6.6 GB in bf16 and a step is "
                          "~27 TFLOP: hours on a CPU). Pass --allow-cpu-full to run it on the CPU anyway.")
    if settings.warmup < 0 or settings.steps < 1:
        raise ConfigError("--steps must be ≥ 1 and --warmup ≥ 0")
    temp = None
    if settings.workdir:
        root = Path(settings.workdir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.mkdtemp(prefix="aceturbo-bench-")
        root = Path(temp)
    try:
        echo(f"bench {settings.size}: {settings.songs} song(s) × {settings.song_seconds:g} s, r={list(settings.ranks)}, "
             f"{settings.precision}, {settings.warmup} warm-up + {settings.steps} steps per mode, in {root}")
        project = prepare_workspace(settings, root, echo)
        base = {"project": {"paths": dataclasses.asdict(project.paths), "models": dataclasses.asdict(project.models),
                            "ingest": dataclasses.asdict(project.ingest), "encode": dataclasses.asdict(project.encode)},
                "threads": settings.threads}
        prep = _run_child({**base, "mode": "prepare"}, root, f"{settings.size}-prepare", echo)
        cache_size = measure_cache(project.paths.features)
        speaker = json.loads((project.models.paths().transformer / "config.json").read_text()).get("speaker_embedding_dim", 512)
        loader_sps = loader_throughput(project.paths.features,
                                       LoaderSettings(num_workers=settings.num_workers, speaker_dim=speaker,
                                                      seed=settings.seed), seconds=settings.loader_seconds)
        configs = configs_from_models(project.models)
        by_rank = {}
        for rank in settings.ranks:
            modes = {}
            for mode in settings.modes:
                run_dir = root / "runs" / f"{settings.size}-{mode}-r{rank}"
                shutil.rmtree(run_dir, ignore_errors=True)
                pairs = 2 if mode == "paired" else 1
                train = {"rank": rank, "precision": settings.precision,
                         "max_steps": pairs * (settings.warmup + settings.steps),
                         "save_every": 0, "keep_last": 1, "seed": settings.seed, "device": settings.device,
                         "warmup_steps": 1, "gradient_checkpointing": settings.gradient_checkpointing,
                         "log_plot_every": 10**6, "experiment": "bench"}
                spec = {**base, "mode": mode, "train": train, "warmup": settings.warmup, "run_dir": str(run_dir),
                        "num_workers": settings.num_workers}
                modes[mode] = _run_child(spec, root, f"{settings.size}-{mode}-r{rank}", echo)
                shutil.rmtree(run_dir, ignore_errors=True)
            shapes = next((m["shapes"] for m in modes.values() if m.get("shapes")), {})
            flops = transformer_step_flops(configs["transformer"], shapes.get("tokens", 0), shapes.get("text_tokens", 64),
                                           shapes.get("lyric_tokens", 300), rank, shapes.get("batch", 1),
                                           settings.gradient_checkpointing) if shapes else None
            by_rank[str(rank)] = {"modes": modes, "flops": flops, "shapes": shapes}
        seen = next((e["shapes"] for e in by_rank.values() if e["shapes"]), {})
        lengths = dict(text_tokens=seen.get("text_tokens", 64), lyric_tokens=seen.get("lyric_tokens", 300))
        ratio = compute_ratio(configs, settings.song_seconds, settings.ranks[0], **lengths)
        full_ratio = None
        if settings.size != "full":
            from pipeline.tiny.small import configs as size_configs

            full_ratio = compute_ratio(size_configs("full"), settings.song_seconds, settings.ranks[0], **lengths)
        record = {
            "key": run_key(settings, cuda), "size": settings.size, "song_seconds": settings.song_seconds,
            "songs": settings.songs, "precision": settings.precision, "steps": settings.steps,
            "warmup": settings.warmup, "device": "cuda" if cuda else "cpu", "num_workers": settings.num_workers,
            "gradient_checkpointing": settings.gradient_checkpointing, "seed": settings.seed,
            "command": settings.command, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(), "prepare": prep, "cache": cache_size, "loader_samples_per_s": loader_sps,
            "ranks": by_rank, "flop_ratio": ratio, "flop_ratio_full_size": full_ratio,
        }
        return record
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def run_key(settings: BenchSettings, cuda: bool) -> str:
    return f"{settings.size}-{'cuda' if cuda else 'cpu'}-{settings.precision}-{settings.song_seconds:g}s"


# ====================================================================================== reports
def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits}g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def summary_rows(record: dict) -> list[dict]:
    """One row per LoRA rank: the headline numbers of a run."""
    rows = []
    peak = (record["machine"].get("gpu_bf16_peak_tflops") if record["device"] == "cuda" else None)
    for rank, entry in record["ranks"].items():
        m = entry["modes"]
        get = lambda mode, key: m.get(mode, {}).get(key)  # noqa: E731
        floor, cached, live = get("floor", "median_s"), get("cached", "median_s"), get("live", "median_s")
        mem_key = "cuda_peak_mb" if record["device"] == "cuda" else "peak_rss_mb"
        flops = (entry.get("flops") or {}).get("step_flops")
        achieved = flops / cached / 1e12 if flops and cached else None
        rows.append({
            "rank": int(rank), "floor_s": floor, "cached_s": cached, "live_s": live,
            "cached_over_floor": cached / floor if cached and floor else None,
            "paired_cached_over_floor": get("paired", "cached_over_floor"),
            "live_over_cached": live / cached if live and cached else None,
            "cached_peak_mb": get("cached", mem_key), "live_peak_mb": get("live", mem_key),
            "floor_peak_mb": get("floor", mem_key), "encoders_mb": (get("live", "encoders_param_bytes") or 0) / 2**20,
            "step_tflop": flops / 1e12 if flops else None, "achieved_tflops": achieved,
            "utilisation": achieved / peak if achieved and peak else None, "tokens": entry.get("shapes", {}).get("tokens"),
        })
    return rows


def table_text(record: dict) -> str:
    """The plain-text table the command prints."""
    lines = [f"{record['size']} on {record['device']} ({record['machine']['gpu'] or record['machine']['cpu']}), "
             f"{record['precision']}, song {record['song_seconds']:g} s, median of {record['steps']} steps "
             f"after {record['warmup']} warm-up"]
    mem = "GPU peak MiB" if record["device"] == "cuda" else "peak RSS MiB"
    lines.append(f"{'r':>4} {'floor s':>9} {'cached s':>9} {'live s':>9} {'cached/floor':>12} {'paired':>7} {'live/cached':>11} "
                 f"{'cached ' + mem:>20} {'live ' + mem:>18} {'TFLOP/s':>8}")
    for r in summary_rows(record):
        lines.append(f"{r['rank']:>4} {_fmt(r['floor_s']):>9} {_fmt(r['cached_s']):>9} {_fmt(r['live_s']):>9} "
                     f"{_fmt(r['cached_over_floor']):>12} {_fmt(r['paired_cached_over_floor']):>7} "
                     f"{_fmt(r['live_over_cached']):>11} "
                     f"{_fmt(r['cached_peak_mb']):>20} {_fmt(r['live_peak_mb']):>18} {_fmt(r['achieved_tflops']):>8}")
    lines.append(f"loader {record['loader_samples_per_s']:.1f} samples/s; cache "
                 f"{record['cache']['mb_per_minute']['total']:.2f} MB per minute of audio")
    enc = record["prepare"]["streams"]
    lines.append("encode (s of audio per s): " + ", ".join(f"{s} {_fmt(v['audio_s_per_s'])}" for s, v in enc.items()))
    return "\n".join(lines)


def load_results(path: Path) -> dict:
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("runs"), dict):
                return data
        except ValueError:
            pass
    return {"runs": {}}


def _md_run(record: dict) -> list[str]:
    mach = record["machine"]
    dev = f"GPU {mach['gpu']} (bf16 peak {_fmt(mach.get('gpu_bf16_peak_tflops'))} TFLOP/s)" if record["device"] == "cuda" \
        else f"CPU {mach['cpu']}, {mach['cores']} cores, {mach['ram_gb']} GB RAM, no GPU"
    mem_unit = "GPU peak (max_memory_allocated) MiB" if record["device"] == "cuda" else "peak RSS (VmHWM) MiB"
    out = [
        f"### {record['size']} — {record['device']}, {record['precision']}, {record['songs']} song × "
        f"{record['song_seconds']:g} s",
        "",
        f"- Machine: {dev}; Python {mach['python']}, torch {mach['torch']}; {mach['platform']}",
        f"- Date: {record['date']}",
        f"- Command: `{record['command']}`",
        f"- Median seconds per optimizer step over {record['steps']} steps after {record['warmup']} warm-up steps, "
        f"batch 1, one subprocess per mode, gradient checkpointing {'on' if record['gradient_checkpointing'] else 'off'}"
        f", loader workers {record['num_workers']}."
        + (" Absolute times are for THIS CPU only; compare ratios." if record["device"] == "cpu" else ""),
        "",
        f"| LoRA r | floor s/step | cached s/step | live s/step | cached ÷ floor | cached ÷ floor, paired | live ÷ cached | "
        f"cached {mem_unit} | live {mem_unit} | floor {mem_unit} | encoders' weights MiB | step TFLOP | "
        f"achieved TFLOP/s (step TFLOP ÷ cached s)"
        + (" | of bf16 peak |" if record["device"] == "cuda" else " |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if record["device"] == "cuda" else ""),
    ]
    for r in summary_rows(record):
        row = (f"| {r['rank']} | {_fmt(r['floor_s'])} | {_fmt(r['cached_s'])} | {_fmt(r['live_s'])} | "
               f"{_fmt(r['cached_over_floor'])} | {_fmt(r['paired_cached_over_floor'])} | {_fmt(r['live_over_cached'])} | "
               f"{_fmt(r['cached_peak_mb'])} | "
               f"{_fmt(r['live_peak_mb'])} | {_fmt(r['floor_peak_mb'])} | {_fmt(r['encoders_mb'])} | "
               f"{_fmt(r['step_tflop'], 4)} | {_fmt(r['achieved_tflops'])} |")
        if record["device"] == "cuda":
            row += f" {_fmt(r['utilisation'])} |"
        out.append(row)
    enc = record["prepare"]["streams"]
    cache = record["cache"]["mb_per_minute"]
    loads = [f"{mode} {v.get('loadavg_1min', 0):.1f}" for entry in record["ranks"].values()
             for mode, v in entry["modes"].items()]
    out += [
        "",
        f"Machine load (1-min load average at the end of each mode, {mach['cores']} cores): " + ", ".join(loads)
        + (". Other jobs shared this machine, so absolute times are noisy; each ratio is from one run." if
           record["device"] == "cpu" else "."),
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


def write_reports(results: dict, md_path: Path, json_path: Path) -> None:
    """benchmarks.json (every run, keyed) and benchmarks.md (all runs' tables + notes)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    runs = sorted(results["runs"].values(), key=lambda r: (r["device"] != "cuda", SIZES.index(r["size"]), r["key"]))
    lines = [
        "# Benchmarks: cached vs live training, data-path overhead, cache size",
        "",
        "Written by `aceturbo bench` (pipeline/bench.py); every number below comes from the run it is listed",
        "under. Modes, each in its own subprocess, all through the product's `pipeline.train.train`:",
        "",
        "- **floor**: one batch already on the device, fed again every step — the transformer's forward +",
        "  backward + AdamW step alone, what any data path adds to;",
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
        "gradients, plus the recomputed forward of the DiT blocks and lyric layers under gradient",
        "checkpointing; attention terms included, element-wise work not). Encoder FLOPs are counted by",
        "torch's FlopCounterMode on `meta` tensors.",
        "",
        "Targets (from the issue): cached step ≤ 1.15 × floor; H100, 3-minute song, r=64: ≤ 0.15 s/step;",
        "cached peak memory below live by at least the encoders' weights.",
        "",
    ]
    gpu_runs = [r for r in runs if r["device"] == "cuda"]
    lines += ["## GPU table", ""]
    if not any(r["size"] == "full" for r in gpu_runs):
        lines += ["GPU table: not run (no GPU in this session). On a GPU machine run:", "",
                  "    aceturbo bench --size full --song-seconds 180 --rank 16 --rank 64 --rank 256 --precision bf16-true",
                  ""]
    for r in gpu_runs:
        lines += _md_run(r) + [""]
    lines += ["## CPU tables", ""]
    cpu_runs = [r for r in runs if r["device"] == "cpu"]
    if not cpu_runs:
        lines += ["(none yet)", ""]
    for r in cpu_runs:
        lines += _md_run(r) + [""]
    extra = results.get("notes")
    if extra:
        lines += ["## Notes", ""] + list(extra) + [""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines), encoding="utf-8")


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
