"""`generate`: checkpoint folder + prompt + lyrics (+ optional LoRA) → a 48 kHz wav and a JSON
file recording every parameter used (the reference writes the same kind of `_input_params.json`).

Model loading helpers live here too so the training preview (pipeline.preview) loads the decode
models exactly the same way.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoints import ACESTEP_PARTS, lyric_embedding_rows, require_model_dir
from pipeline.errors import CheckpointError, ConfigError
from pipeline.fileio import write_json_atomic
from pipeline.sampling.sampler import SamplerSettings, duration_for_frames, frames_for_duration, sample

OUTPUT_SAMPLE_RATE = 48000
LYRIC_VOCAB_NAME = "lyrics_vocab.json"


@dataclass
class Conditioning:
    """Model inputs for one or more prompts (the sampler's ``cond`` dict, see as_dict)."""

    text_states: torch.Tensor
    text_mask: torch.Tensor
    speaker: torch.Tensor
    lyric_ids: torch.Tensor
    lyric_mask: torch.Tensor
    text_states_null: torch.Tensor | None = None

    def as_dict(self) -> dict[str, torch.Tensor]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in d.items() if v is not None}


# ------------------------------------------------------------------------------- devices
def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} was asked for but CUDA is not available; use --device cpu")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: bf16 on CUDA (as the reference pipeline), fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# ------------------------------------------------------------------------------- loading
def require_part(checkpoint_root: Path, part: str) -> Path:
    return require_model_dir(
        Path(checkpoint_root) / part, ACESTEP_PARTS[part], f"ACE-Step part '{part}'", "acestep"
    )


def load_transformer(checkpoint_root: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from pipeline.models.transformer import ACEStepTransformer2DModel

    folder = require_part(checkpoint_root, "ace_step_transformer")
    model = ACEStepTransformer2DModel.from_pretrained(str(folder), torch_dtype=dtype)
    return model.to(device=device).eval()  # dtype already set by from_pretrained


def load_text_encoder(checkpoint_root: Path, device: torch.device, dtype: torch.dtype):
    from pipeline.models.text_encoder import UMT5TextEncoder

    folder = require_part(checkpoint_root, "umt5-base")
    return UMT5TextEncoder.from_folder(folder, dtype=dtype, device=device)


def load_codec(checkpoint_root: Path, device: torch.device):
    """The DCAE + vocoder, in fp32: decoding is cheap next to sampling and fp32 avoids audible
    rounding in the vocoder."""
    from pipeline.models.codec import MusicDCAE

    # No offloading: the codec is loaded for one decode and released right after.
    return MusicDCAE.from_checkpoint(Path(checkpoint_root), dtype=torch.float32, device=device, offload=False)


def load_lyric_tokenizer(vocab: Path):
    from pipeline.text.lyrics import LyricTokenizer

    return LyricTokenizer(vocab)


def find_lyric_vocab(checkpoint_root: Path, lyric_vocab: str | Path | None) -> Path:
    """The VoiceBPE vocabulary: the given path, else ``lyrics_vocab.json`` inside or beside the
    checkpoint folder (where `aceturbo demo` and the README put it)."""
    if lyric_vocab is not None:
        path = Path(lyric_vocab)
        if not path.is_file():
            raise CheckpointError(
                f"lyric vocabulary '{path}' not found; pass --lyric-vocab with the path of the "
                f"ACE-Step VoiceBPE vocab.json (acestep/models/lyrics_utils/vocab.json)"
            )
        return path
    root = Path(checkpoint_root)
    for candidate in (root / LYRIC_VOCAB_NAME, root.parent / LYRIC_VOCAB_NAME):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"no lyric vocabulary found at '{root / LYRIC_VOCAB_NAME}' or '{root.parent / LYRIC_VOCAB_NAME}'; "
        f"pass --lyric-vocab with the path of the ACE-Step VoiceBPE vocab.json"
    )


def default_model_paths(models, checkpoint: str | None, lyric_vocab: str | None) -> tuple[str, str | None]:
    """The checkpoint root and lyric vocabulary a command uses: the ones given, else the project's
    ``models`` settings (pipeline.config.ModelsConfig). The vocabulary stays None when one lies
    inside or beside the checkpoint (find_lyric_vocab finds it there: it wins) or models names none
    that exists."""
    if checkpoint is None:
        checkpoint = models.acestep
    if lyric_vocab is None:
        try:
            find_lyric_vocab(Path(checkpoint), None)
        except CheckpointError:
            if Path(models.lyric_vocab).is_file():
                lyric_vocab = models.lyric_vocab
    return checkpoint, lyric_vocab


def read_lyrics_file(path: str | Path | None) -> str:
    """The lyrics in a UTF-8 text file (--lyrics); "" without one (an instrumental)."""
    if path is None:
        return ""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"lyrics file '{p}' is not UTF-8 text; save it as UTF-8 and retry") from None
    except OSError as exc:
        raise ConfigError(f"cannot read lyrics file '{p}' ({exc.strerror}); check the --lyrics path") from None


def tokenize_lyrics(tokenizer, lyrics: str) -> tuple[list[int], list[int]]:
    """Lyric ids and mask; empty lyrics are [0] with mask [0] as in the reference pipeline."""
    if hasattr(tokenizer, "ids_and_mask"):
        ids, mask = tokenizer.ids_and_mask(lyrics)
        return list(ids), list(mask)
    if not lyrics.strip():
        return [0], [0]
    ids = list(tokenizer.tokenize(lyrics))
    if not ids:
        return [0], [0]
    return ids, [1] * len(ids)


def encode_text(text_encoder, prompts: list[str], erg_null: bool):
    states, mask = text_encoder.encode(prompts)
    null = None
    if erg_null:
        null = text_encoder.erg_null_encode(prompts)
        if isinstance(null, (tuple, list)):
            null = null[0]
    return states, mask, null


def build_conditioning(
    text_encoder,
    lyric_tokenizer,
    prompts: list[str],
    lyrics: list[str],
    speaker_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    erg_null: bool = False,
) -> Conditioning:
    """Encode prompts (UMT5) and tokenize lyrics into the sampler's inputs (padded to the batch)."""
    states, mask, null = encode_text(text_encoder, prompts, erg_null)
    tokenized = [tokenize_lyrics(lyric_tokenizer, text) for text in lyrics]
    width = max(len(ids) for ids, _ in tokenized)
    ids = torch.zeros(len(tokenized), width, dtype=torch.long)
    lmask = torch.zeros(len(tokenized), width, dtype=torch.long)
    for i, (row, m) in enumerate(tokenized):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lmask[i, : len(m)] = torch.tensor(m, dtype=torch.long)
    return Conditioning(
        text_states=states.to(device=device, dtype=dtype),
        text_mask=mask.to(device=device),
        speaker=torch.zeros(len(prompts), speaker_dim, device=device, dtype=dtype),
        lyric_ids=ids.to(device),
        lyric_mask=lmask.to(device),
        text_states_null=None if null is None else null.to(device=device, dtype=dtype),
    )


def speaker_dim_of(transformer) -> int:
    config = getattr(transformer, "config", None)
    dim = getattr(config, "speaker_embedding_dim", None) if config is not None else None
    if dim is None:
        dim = transformer.speaker_embedder.in_features
    return int(dim)


def release() -> None:
    """Return freed model memory after the caller dropped its references (``del model``)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------- LoRA
def require_lora_path(lora: str | Path) -> Path:
    path = Path(lora)
    if not path.exists():
        raise CheckpointError(
            f"LoRA '{path}' not found; pass --lora with a checkpoint folder "
            f"(…/epoch=E-step=S_lora/) or its pytorch_lora_weights.safetensors"
        )
    return path


def apply_lora(transformer, lora: str | Path, weight: float) -> dict[str, Any]:
    """Load a LoRA (a ``pytorch_lora_weights.safetensors`` file or its folder, any kind:
    pipeline.lora.inspect_lora) at ``weight`` × its trained change, and return what to record about it."""
    from pipeline.lora import attach_lora, read_lora_file

    path = require_lora_path(lora)
    weights, info = read_lora_file(path)  # the header once: what to apply and how the file carries its scale
    attach_lora(transformer, weights, info, weight=weight)
    trained = info.trained
    return {
        "path": str(path.resolve()),
        "weight": float(weight),
        "trained_scale": float(trained.scale),
        # the strength on the trained factors (B·A): weight × trained scale, baked into the file or not
        "effective_scale": float(weight) * float(trained.scale),
        "r": trained.r,
        "alpha": trained.alpha,
        "use_rslora": trained.use_rslora,
        "baked": info.baked,
        "scale_source": info.source,
    }


def lora_summary(info: dict[str, Any]) -> str:
    """One line on the LoRA a generation applied (``apply_lora``'s record; `aceturbo generate` prints it)."""
    return (f"LoRA {info['path']}: weight {info['weight']:g} x trained scale {info['trained_scale']:g} "
            f"(r={info['r']}, alpha={info['alpha']:g}, rsLoRA={info['use_rslora']}; {info['scale_source']}) "
            f"= applied scale {info['effective_scale']:g}")


# ----------------------------------------------------------------------------- metadata
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("aceturbo", "torch", "diffusers", "transformers", "peft", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def params_path(out: Path) -> Path:
    """Where generate writes its parameters: the wav path with .json instead of .wav."""
    return Path(out).with_suffix(".json")


# ------------------------------------------------------------------------- the steps
def check_request(duration: float, settings: SamplerSettings | None, steps: int | None) -> tuple[SamplerSettings, int]:
    """(sampler settings with ``steps`` applied, latent frames) of a request; ConfigError if bad."""
    if duration <= 0:
        raise ConfigError(f"duration must be > 0 seconds (got {duration}); pass e.g. --duration 30")
    settings = settings or SamplerSettings()
    if steps is not None:
        settings = settings.replace(steps=int(steps))
    settings.validate()
    n_frames = frames_for_duration(duration)
    if n_frames < 1:
        raise ConfigError(
            f"duration {duration} s is shorter than one latent frame; ask for at least "
            f"{duration_for_frames(1):.2f} s"
        )
    return settings, n_frames


def require_checkpoint_root(checkpoint_root: str | Path) -> Path:
    root = Path(checkpoint_root)
    if not root.is_dir():
        raise CheckpointError(
            f"checkpoint folder '{root}' not found; pass --checkpoint with the ACE-Step-v1-3.5B "
            f"folder (holding ace_step_transformer/, music_dcae_f8c8/, music_vocoder/, umt5-base/)"
        )
    return root


def encode_prompt(root: Path, vocab: Path, transformer, prompt: str, lyrics: str, settings: SamplerSettings,
                  device: torch.device, dtype: torch.dtype) -> tuple[Conditioning, int]:
    """(the sampler's conditioning, lyric token count) for one prompt; the text encoder is loaded for
    this and released after."""
    text_encoder = load_text_encoder(root, device, dtype)
    tokenizer = load_lyric_tokenizer(vocab)
    rows = lyric_embedding_rows(root / "ace_step_transformer")
    if rows is not None:
        tokenizer.require_fits(rows, root)
    erg_null = settings.use_erg_tag and settings.use_erg_lyric
    with torch.no_grad():
        cond = build_conditioning(
            text_encoder, tokenizer, [prompt], [lyrics], speaker_dim_of(transformer), device, dtype, erg_null
        )
    del text_encoder
    release()
    return cond, int(cond.lyric_mask.sum().item())


def decode_latents(root: Path, device: torch.device, latents: list[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
    """(sample rate, [wav [2, n] fp32 CPU]) of latents [1, 8, 16, T] each; the codec is loaded once
    for all of them and released after."""
    codec = load_codec(root, device)
    wavs = []
    with torch.no_grad():
        for lat in latents:
            sr, out = codec.decode_auto(lat.to(device=device, dtype=torch.float32), sr=OUTPUT_SAMPLE_RATE)
            wavs.append(out[0].detach().float().cpu())
    del codec
    release()
    return int(sr), wavs


# ------------------------------------------------------------------------------ generate
def generate(
    checkpoint_root: str | Path,
    prompt: str,
    lyrics: str,
    duration: float,
    steps: int | None = None,
    seed: int = 0,
    lora: str | Path | None = None,
    lora_weight: float = 1.0,
    out: str | Path = "output.wav",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    lyric_vocab: str | Path | None = None,
    settings: SamplerSettings | None = None,
    progress: bool = True,
) -> Path:
    """Generate one song and write it to ``out`` (48 kHz wav) plus ``out`` with .json (every
    parameter, seed, LoRA scale, timings and versions). ``steps`` overrides ``settings.steps``.
    Returns the wav path."""
    t_start = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".wav":
        raise ConfigError(f"output '{out}' must be a .wav file; pass e.g. --out song.wav")
    settings, n_frames = check_request(duration, settings, steps)
    root = require_checkpoint_root(checkpoint_root)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    vocab = find_lyric_vocab(root, lyric_vocab)
    if lora is not None:
        require_lora_path(lora)  # fail before minutes of model loading
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    transformer = load_transformer(root, dev, dt)
    lora_info = apply_lora(transformer, lora, lora_weight) if lora is not None else None
    timings["load_transformer_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cond, n_lyric_tokens = encode_prompt(root, vocab, transformer, prompt, lyrics, settings, dev, dt)
    timings["encode_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    latents = sample(transformer, cond.as_dict(), settings, seeds=[seed], n_frames=n_frames, progress=progress)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timings["sampling_s"] = time.perf_counter() - t0
    del transformer
    release()

    t0 = time.perf_counter()
    sr, (wav,) = decode_latents(root, dev, [latents])
    timings["decode_s"] = time.perf_counter() - t0

    from pipeline.audio import save_wav

    save_wav(out, wav, sr)
    timings["total_s"] = time.perf_counter() - t_start
    record = {
        "audio": str(out.resolve()),
        "checkpoint": str(root.resolve()),
        "prompt": prompt,
        "lyrics": lyrics,
        "lyric_vocab": str(vocab.resolve()),
        "lyric_tokens": n_lyric_tokens,
        "seed": int(seed),
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "cfg_type": settings.cfg_type,
        "sampler": dataclasses.asdict(settings),
        "lora": lora_info,
        "lora_path": None if lora_info is None else lora_info["path"],
        "lora_weight": None if lora_info is None else lora_info["weight"],
        "lora_effective_scale": None if lora_info is None else lora_info.get("effective_scale"),
        "duration_requested_s": float(duration),
        "latent_frames": n_frames,
        "duration_s": wav.shape[-1] / sr,
        "sample_rate": sr,
        "channels": int(wav.shape[0]),
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(params_path(out), record)
    return out
