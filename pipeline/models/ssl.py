"""MERT and mHuBERT feature extractors: the SSL targets of ACE-Step's alignment loss (spec §5).

Each extractor turns a batch of 48 kHz stereo waveforms into one ``[T_ssl, D]`` tensor per sample,
computed the way the official trainer computes them:

1. stereo → mono (mean of the two channels), resampled 48 kHz → 24 kHz (MERT) / 16 kHz (mHuBERT);
2. the valid length is ``wav_length // 2`` (MERT) or ``// 3`` (mHuBERT);
3. zero mean / unit variance over the valid part only (unbiased variance, + 1e-7);
4. the valid part is cut into 5 s (MERT) / 30 s (mHuBERT) chunks, the last one zero-padded to full
   length, and every chunk goes through the model; ``last_hidden_state`` is kept;
5. of each chunk, ``ceil(valid_samples / 320)`` frames are kept (the model yields one frame fewer
   for a full chunk, so slicing keeps what exists, exactly like the reference) and the chunks of a
   sample are concatenated.

Unlike the reference, chunks of all samples are pooled and run in forward passes of bounded size
(``max_batch_seconds`` of audio each), so a GPU is used well while memory stays bounded. Every chunk
is padded to the same full length and the models have no cross-sample operation, so the features
do not depend on how chunks are grouped.

Loading: MERT-v1 ships its own modelling code (config.json with ``auto_map``), loaded with
``trust_remote_code=True`` from the local folder only. A folder whose config is a plain HuBERT
config (``model_type: hubert``, no ``auto_map``) loads as the stock ``HubertModel`` — that is what
mHuBERT-147 is, and what the tiny reference checkpoints are.

The weights live on the CPU between uses and are moved to the compute device only while used:
``extract`` moves them there for the call and back afterwards, unless the caller keeps them there
for many calls with ``with extractor.on_device(): ...`` (or ``.to(device)`` / ``.offload()``).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from pipeline.checkpoints import DOWNLOAD_HINTS, require_model_dir
from pipeline.errors import CheckpointError

SOURCE_RATE = 48_000  # the rate every caller hands in (decoded PCM of the cache)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class SSLSettings:
    """What differs between the two extractors (spec §5 table)."""

    name: str  # for messages
    sample_rate: int  # the model's input rate
    chunk_seconds: int  # the reference's chunk length
    stride: int = 320  # samples per output frame (product of the conv strides)
    var_eps: float = 1e-7

    @property
    def chunk_samples(self) -> int:
        return self.sample_rate * self.chunk_seconds

    @property
    def length_divisor(self) -> int:
        """48 kHz length → valid length at the model rate (the reference uses integer division)."""
        return SOURCE_RATE // self.sample_rate

    @property
    def feature_rate(self) -> float:
        return self.sample_rate / self.stride


MERT_SETTINGS = SSLSettings("MERT", sample_rate=24_000, chunk_seconds=5)
MHUBERT_SETTINGS = SSLSettings("mHuBERT", sample_rate=16_000, chunk_seconds=30)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves memory and is what the official trainer's autocast ran these models in on GPU;
    # on CPU bf16 matmuls are slow and lossy, so fp32 there.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_ssl_model(folder: str | Path, what: str, hint_key: str, dtype: torch.dtype) -> torch.nn.Module:
    """Load a HuBERT-family model from a local folder onto the CPU, frozen, in eval mode.

    ``auto_map`` in config.json → the folder's own modelling code (MERT-v1 style);
    ``model_type: hubert`` → transformers' ``HubertModel``. Nothing is downloaded.
    """
    folder = require_model_dir(folder, ("config.json",), what, hint_key)
    if not any((folder / name).exists() for name in WEIGHT_FILES):
        raise CheckpointError(
            f"{what} at '{folder}' is incomplete: no weights ({' or '.join(WEIGHT_FILES[:2])}). "
            f"Re-download {DOWNLOAD_HINTS.get(hint_key, hint_key)} into that folder."
        )
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{what}: cannot read '{folder / 'config.json'}': {err}") from err

    from transformers import AutoModel, HubertModel

    try:
        if "auto_map" in config:
            # The folder's own code; the flag must be explicit or transformers asks interactively.
            model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, local_files_only=True,
                                                    dtype=dtype, output_loading_info=True)
        elif config.get("model_type") == "hubert":
            model, info = HubertModel.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                      output_loading_info=True)
        else:
            raise CheckpointError(
                f"{what} at '{folder}': config.json is neither a HuBERT config (model_type "
                f"{config.get('model_type')!r}) nor ships its own code (no auto_map). Expected "
                f"{DOWNLOAD_HINTS.get(hint_key, hint_key)}."
            )
    except CheckpointError:
        raise
    except (OSError, ValueError, ImportError) as err:
        raise CheckpointError(
            f"{what} at '{folder}' could not be loaded ({type(err).__name__}: {err}). "
            f"Re-download {DOWNLOAD_HINTS.get(hint_key, hint_key)} into that folder."
        ) from err
    # A weight the file lacks would silently stay random and make every feature garbage.
    # masked_spec_embed is only used for SpecAugment during pre-training, never here.
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("masked_spec_embed"))
    if missing:
        raise CheckpointError(
            f"{what} at '{folder}' lacks {len(missing)} weights (e.g. {', '.join(missing[:3])}). "
            f"Re-download {DOWNLOAD_HINTS.get(hint_key, hint_key)} into that folder."
        )
    model.eval()  # no dropout, no layerdrop, no SpecAugment masking
    model.requires_grad_(False)
    return model.to(device="cpu", dtype=dtype)


def conv_output_frames(config, num_samples: int) -> int:
    """Frames the HuBERT conv front end yields for ``num_samples`` input samples."""
    length = num_samples
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
    return max(length, 0)


class SSLExtractor:
    """Shared logic of MERT and mHuBERT; subclasses only pick settings and names."""

    settings: ClassVar[SSLSettings]
    what: ClassVar[str]
    hint_key: ClassVar[str]

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str,
                 max_batch_seconds: float = 60.0):
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)  # where extract() computes
        # Bound on audio per forward pass: MERT 12 × 5 s chunks, mHuBERT 2 × 30 s chunks by default.
        self.max_chunks = max(1, int(max_batch_seconds // self.settings.chunk_seconds))

    @classmethod
    def from_folder(cls, path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, max_batch_seconds: float = 60.0):
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        model = load_ssl_model(path, cls.what, cls.hint_key, dtype)
        return cls(model, dtype, device, max_batch_seconds=max_batch_seconds)

    # -- properties -------------------------------------------------------------------------------
    @property
    def feature_rate(self) -> float:
        """Output frames per second (75 for MERT, 50 for mHuBERT)."""
        return self.settings.feature_rate

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def sample_rate(self) -> int:
        return self.settings.sample_rate

    def num_frames(self, wav_length_48k: int) -> int:
        """T_ssl that ``extract`` returns for a sample of this many 48 kHz samples."""
        valid = int(wav_length_48k) // self.settings.length_divisor
        chunk = self.settings.chunk_samples
        full_frames = conv_output_frames(self.model.config, chunk)
        total = 0
        for start in range(0, valid, chunk):
            total += min(math.ceil(min(chunk, valid - start) / self.settings.stride), full_frames)
        return total

    # -- placement --------------------------------------------------------------------------------
    @property
    def weights_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str | None = None):
        """Move the weights to ``device`` (default: the compute device) and compute there."""
        if device is not None:
            self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def offload(self):
        """Move the weights back to the CPU (the compute device is kept for the next use)."""
        on_cuda = self.weights_device.type == "cuda"
        self.model.to("cpu")
        if on_cuda:
            torch.cuda.empty_cache()
        return self

    @contextmanager
    def on_device(self, device: torch.device | str | None = None) -> Iterator["SSLExtractor"]:
        """Keep the weights on the compute device for a block of ``extract`` calls, then put them
        back where they were."""
        home = self.weights_device
        self.to(device)
        try:
            yield self
        finally:
            if home.type == "cpu" and self.weights_device.type != "cpu":
                self.offload()
            else:
                self.model.to(home)

    # -- the extraction ---------------------------------------------------------------------------
    def _normalised_mono(self, wavs_48k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, 2, N] at 48 kHz → [B, M] mono at the model rate, normalised over each valid part.
        Always in fp32: resampling and the statistics are where precision matters."""
        mono = wavs_48k.to(torch.float32).mean(dim=1)
        # Resample the whole padded batch like the reference does (same sinc filter defaults as
        # torchaudio.transforms.Resample).
        mono = AF.resample(mono, SOURCE_RATE, self.settings.sample_rate)
        out = torch.empty_like(mono)
        for i in range(mono.shape[0]):
            part = mono[i, : int(valid[i])]
            if part.numel() == 0:
                out[i] = 0
                continue
            mean, var = part.mean(), part.var()  # unbiased variance, as torch.Tensor.var
            out[i] = (mono[i] - mean) / torch.sqrt(var + self.settings.var_eps)
        return out

    @torch.inference_mode()
    def extract(self, wavs_48k: torch.Tensor, wav_lengths: torch.Tensor | list[int]) -> list[torch.Tensor]:
        """wavs_48k [B, 2, N] (any float dtype, any device), wav_lengths [B] valid 48 kHz samples
        → B tensors [T_ssl, D] in the model dtype on the compute device."""
        if wavs_48k.dim() != 3:
            raise ValueError(f"expected wavs [B, 2, N], got shape {tuple(wavs_48k.shape)}")
        lengths = torch.as_tensor(wav_lengths).to("cpu", torch.long)
        if lengths.numel() != wavs_48k.shape[0]:
            raise ValueError(f"{lengths.numel()} lengths for a batch of {wavs_48k.shape[0]}")
        valid = lengths // self.settings.length_divisor
        chunk = self.settings.chunk_samples

        audio = self._normalised_mono(wavs_48k.to(self.device), valid)
        # (sample index, chunk tensor, frames to keep) for every chunk of every sample.
        pieces: list[tuple[int, torch.Tensor, int]] = []
        for i in range(audio.shape[0]):
            n = int(valid[i])
            for start in range(0, n, chunk):
                piece = audio[i, start : min(start + chunk, n)]
                keep = math.ceil(piece.numel() / self.settings.stride)
                pieces.append((i, F.pad(piece, (0, chunk - piece.numel())), keep))

        per_sample: list[list[torch.Tensor]] = [[] for _ in range(audio.shape[0])]
        moved = self.weights_device != self.device
        if moved:
            self.model.to(self.device)
        try:
            for first in range(0, len(pieces), self.max_chunks):
                group = pieces[first : first + self.max_chunks]
                batch = torch.stack([p[1] for p in group]).to(self.dtype)
                hidden = self.model(input_values=batch).last_hidden_state
                for (i, _, keep), h in zip(group, hidden):
                    per_sample[i].append(h[:keep])
        finally:
            if moved:
                self.offload()

        empty = torch.zeros(0, self.hidden_size, dtype=self.dtype, device=self.device)
        return [torch.cat(chunks, dim=0) if chunks else empty for chunks in per_sample]


class MertExtractor(SSLExtractor):
    """MERT-v1-330M (m-a-p): 24 kHz input, 5 s chunks, 75 frames/s, 1024-d."""

    settings = MERT_SETTINGS
    what = "MERT model"
    hint_key = "mert"


class MHubertExtractor(SSLExtractor):
    """mHuBERT-147 (utter-project): 16 kHz input, 30 s chunks, 50 frames/s, 768-d."""

    settings = MHUBERT_SETTINGS
    what = "mHuBERT model"
    hint_key = "mhubert"
