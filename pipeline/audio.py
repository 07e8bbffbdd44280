"""Audio decoding, resampling and writing: every song enters the pipeline through `load_audio`.

Decoder choice: soundfile. Its wheel bundles libsndfile 1.2.2, which reads and writes MP3, WAV,
FLAC and Ogg with no system package, and it was the fastest reader measured on these machines.
`torchaudio.load` (2.11) is not used: it goes through torchcodec for every format, WAV included,
and needs the FFmpeg shared libraries installed on the system (STACK.md pitfalls 2 and 3).
Resampling still uses torchaudio (`torchaudio.functional.resample`), which needs no FFmpeg.

torch is imported only inside the functions that return tensors, so scanning a dataset
(`aceturbo ingest`, `import-zip`, `--help`) does not wait seconds for it.

Every failure to read a file (missing, empty, corrupt, truncated, unsupported) raises
`AudioDecodeError` with the file name and the reason, so a bad song never crashes a stage with a
C-library traceback.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from pipeline.errors import AudioDecodeError
from pipeline.fileio import atomic_output

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 48000  # ACE-Step's codec works on 48 kHz stereo (spec §3)
CHANNELS = 2

# Extensions we decode, with the soundfile format name used when writing them.
AUDIO_FORMATS: dict[str, str] = {".mp3": "MP3", ".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}
AUDIO_EXTENSIONS: tuple[str, ...] = tuple(AUDIO_FORMATS)

# A decoded file shorter than its header announces by more than this is called truncated. MP3
# decoders legitimately differ from the header by the encoder delay/padding (a few thousand
# samples), so the tolerance is generous; a cut-off download loses far more.
_TRUNCATION_TOLERANCE = 0.02
_TRUNCATION_MIN_SAMPLES = 8192


@dataclass(frozen=True)
class DecodedAudio:
    """A file's samples exactly as decoded, before any resampling or channel change."""

    samples: np.ndarray  # float32 [channels, frames]
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def frames(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate

    def silence_ratio(self) -> float:
        """Fraction of samples that are exactly zero (digital silence), over all channels."""
        if self.samples.size == 0:
            return 1.0
        return float(np.count_nonzero(self.samples == 0.0)) / self.samples.size


def _check_path(path: Path) -> None:
    if not path.is_file():
        raise AudioDecodeError(f"{path}: file not found")
    if path.suffix.lower() not in AUDIO_FORMATS:
        raise AudioDecodeError(
            f"{path}: unsupported audio format {path.suffix or '(no extension)'!r}; "
            f"convert it to one of {', '.join(AUDIO_EXTENSIONS)}"
        )
    if path.stat().st_size == 0:
        raise AudioDecodeError(f"{path}: empty file (0 bytes); replace it with the real audio")


def _open_error(path: Path, exc: Exception) -> AudioDecodeError:
    reason = getattr(exc, "error_string", None) or str(exc)
    # libsndfile says "File does not exist or is not a regular file" for any content it cannot
    # recognise, which misleads: the file exists, its bytes are just not audio it knows.
    if "not a regular file" in reason:
        reason = "the decoder does not recognise its content"
    return AudioDecodeError(
        f"{path}: not a readable {path.suffix.lower().lstrip('.')} file, corrupt or another format "
        f"renamed ({reason.strip().rstrip('.')}); re-export or re-download it"
    )


def audio_info(path: str | Path) -> tuple[float, int, int]:
    """(duration in seconds, sample rate, channels) from the file header, without decoding.

    Cheap but trusts the header: a truncated MP3 may report its full length. `read_audio`
    decodes and checks.
    """
    path = Path(path)
    _check_path(path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise _open_error(path, exc) from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioDecodeError(f"{path}: header has no sample rate or channels; re-export it")
    return float(info.frames) / info.samplerate, int(info.samplerate), int(info.channels)


def _wav_declared_frames(path: Path, channels: int, subtype_bytes: int) -> int | None:
    """Frames the WAV 'data' chunk header announces, or None when unknown.

    libsndfile quietly shortens a truncated WAV to the bytes present, so this reads the RIFF
    chunk list itself to notice a cut-off file.
    """
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                if size in (0, 0xFFFFFFFF):  # written by a streaming encoder: length unknown
                    return None
                return size // (channels * subtype_bytes)
            f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to even sizes


_WAV_SAMPLE_BYTES = {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}


def read_audio(path: str | Path) -> DecodedAudio:
    """Decode a whole file at its own sample rate and channel count, checking it is complete."""
    path = Path(path)
    _check_path(path)
    try:
        with sf.SoundFile(str(path)) as f:
            declared, sample_rate, channels, subtype = f.frames, f.samplerate, f.channels, f.subtype
            data = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise _open_error(path, exc) from None
    if path.suffix.lower() == ".wav" and subtype in _WAV_SAMPLE_BYTES:
        declared = _wav_declared_frames(path, channels, _WAV_SAMPLE_BYTES[subtype]) or declared
    frames = data.shape[0]
    if frames == 0:
        raise AudioDecodeError(f"{path}: contains no audio samples; re-export it")
    missing = declared - frames
    if missing > max(_TRUNCATION_MIN_SAMPLES, _TRUNCATION_TOLERANCE * declared):
        raise AudioDecodeError(
            f"{path}: truncated (decoded {frames / sample_rate:.1f} s of the {declared / sample_rate:.1f} s "
            f"its header announces); re-download or re-export it"
        )
    if not np.isfinite(data).all():
        raise AudioDecodeError(f"{path}: contains NaN or infinite samples; re-export it")
    return DecodedAudio(np.ascontiguousarray(data.T), int(sample_rate))


def to_model_audio(decoded: DecodedAudio) -> torch.Tensor:
    """Stereo float32 [2, N] at SAMPLE_RATE in [-1, 1] from a decoded file."""
    import torch

    wav = torch.from_numpy(decoded.samples)
    if wav.shape[0] == 1:
        wav = wav.expand(CHANNELS, -1)  # mono: the same signal on both sides
    wav = wav[:CHANNELS].contiguous()  # extra channels (5.1...) are dropped, not downmixed
    if decoded.sample_rate != SAMPLE_RATE:
        import torchaudio.functional as AF  # imported here: only needed when rates differ

        wav = AF.resample(wav, decoded.sample_rate, SAMPLE_RATE)
    # Resampling overshoots near full-scale peaks; the codec expects [-1, 1]. (Out of place: without
    # resampling `wav` still shares memory with `decoded`.)
    return wav.clamp(-1.0, 1.0)


def load_audio(path: str | Path) -> torch.Tensor:
    """Decode a song to float32 stereo [2, N] at 48 kHz in [-1, 1] (AudioDecodeError if unreadable)."""
    return to_model_audio(read_audio(path))


def pad_to_min(wav: torch.Tensor, seconds: float = 3.0, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Pad [C, N] with trailing silence to at least `seconds` (short clips are accepted, spec'd in RULES)."""
    import torch

    need = int(round(seconds * sample_rate)) - wav.shape[-1]
    if need <= 0:
        return wav
    return torch.nn.functional.pad(wav, (0, need))


def save_audio(path: str | Path, wav: "torch.Tensor | np.ndarray", sample_rate: int, subtype: str | None = None) -> Path:
    """Write [C, N] audio atomically; the format follows the extension (.wav/.flac/.ogg/.mp3)."""
    path = Path(path)
    fmt = AUDIO_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AudioDecodeError(f"{path}: cannot write {path.suffix!r}; use one of {', '.join(AUDIO_EXTENSIONS)}")
    if hasattr(wav, "detach"):  # a torch tensor (checked without importing torch)
        wav = wav.detach().cpu().float().numpy()
    data = np.asarray(wav, dtype=np.float32)
    if data.ndim == 1:
        data = data[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        sf.write(tmp, np.ascontiguousarray(data.T), int(sample_rate), format=fmt, subtype=subtype)
    return path


def save_wav(path: str | Path, wav: "torch.Tensor | np.ndarray", sr: int, subtype: str = "PCM_16") -> Path:
    """Write [C, N] audio as a WAV file atomically (16-bit PCM unless `subtype` says otherwise)."""
    path = Path(path)
    if path.suffix.lower() != ".wav":
        raise AudioDecodeError(f"{path}: save_wav writes .wav files; use save_audio for other formats")
    return save_audio(path, wav, sr, subtype=subtype)
