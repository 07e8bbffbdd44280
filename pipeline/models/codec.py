"""ACE-Step's audio codec: stereo 48 kHz audio <-> latents [B, 8, 16, T] (spec §3).

``MusicDCAE`` holds two released models and no weights of its own:

- ``dcae``: diffusers' stock ``AutoencoderDC`` (``music_dcae_f8c8/``), which treats a stereo
  log-mel [2, 128, frames] as a 2-channel image and compresses it 8× on both axes;
- ``vocoder``: ``ADaMoSHiFiGANV1`` (``music_vocoder/``), whose ``mel_transform`` makes the mels the
  DCAE encodes and whose ``decode`` turns decoded mels back into audio.

Encode: resample 48k -> 44.1k, pad to a multiple of 4096 samples, log-mel, normalise [-11, 3] to
[-1, 1], DCAE encoder, then (z - shift) · scale. Decode runs that backwards and vocodes each stereo
channel. The numbers below are part of the released model: the transformer was trained on latents
made exactly this way.

Placement: the models are kept on ``storage_device`` (CPU) and moved to the compute ``device`` only
while a call runs when ``offload`` is on (the default on accelerators), so a training process that
encodes once does not keep 250 M codec parameters on the GPU. Compute dtype defaults to fp32 on CPU
and bf16 on CUDA; the mel front end and resampling always run in fp32 (FFTs have no bf16 kernels).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from diffusers import AutoencoderDC
from torch import nn

from pipeline.checkpoints import ACESTEP_PARTS, require_model_dir
from pipeline.models.vocoder import ADaMoSHiFiGANV1

# --- constants of the released codec (spec §3) ---------------------------------------------
SOURCE_SAMPLE_RATE = 48000  # rate of the audio the pipeline feeds in
CODEC_SAMPLE_RATE = 44100  # rate the vocoder and mel front end work at
HOP_LENGTH = 512  # audio samples per mel frame
TIME_MULTIPLE = 8  # DCAE time compression: mel frames per latent frame
SAMPLES_PER_LATENT = HOP_LENGTH * TIME_MULTIPLE  # 4096 samples at 44.1 kHz per latent frame
LATENT_RATE = CODEC_SAMPLE_RATE / SAMPLES_PER_LATENT  # ≈ 10.7666 latent frames per second
LATENT_CHANNELS = 8
LATENT_HEIGHT = 16  # 128 mel bins / 8
MIN_MEL = -11.0  # log-mel range mapped to [-1, 1] before the DCAE
MAX_MEL = 3.0
SCALE_FACTOR = 0.1786  # latent = (z - SHIFT_FACTOR) * SCALE_FACTOR
SHIFT_FACTOR = -1.9091

DCAE_FOLDER = "music_dcae_f8c8"
VOCODER_FOLDER = "music_vocoder"

# --- overlapped decode (spec §3.3) ----------------------------------------------------------
# DCAE windows of 512 latent frames every 256 (the reference's); each inner window edge drops 1024
# mel frames (half the 2048-frame overlap), so the kept pieces tile the output exactly and no piece
# keeps the border frames computed next to the window's zero padding. The DCAE's EfficientViT
# stage attends over the whole window, so windowed output never equals the whole-input decode.
DCAE_WINDOW = 512
DCAE_HOP = 256
# Vocoder windows of 512 mel frames joined by a 128-sample linear cross-fade in the middle of their
# overlap. The reference overlaps them by only 1024 samples (2 frames), which leaves the fade one
# frame from a window edge, well inside the convolutions' border effects. The vocoder is purely
# convolutional, so with enough overlap the windows reproduce the whole-input decode: 32 frames
# (16 of context on each side of the seam) do so to ~1e-4 on the tiny model, for ~7 % extra work.
VOCODER_WINDOW = 512
VOCODER_OVERLAP = 32 * HOP_LENGTH  # 16384 samples
REFERENCE_VOCODER_OVERLAP = 1024  # what the reference uses; pass it to reproduce its seams
VOCODER_FADE = 128


def default_dtype(device: torch.device | str | None) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow there and gain nothing), bf16 on accelerators."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def latent_frames(num_samples: int, sample_rate: int = SOURCE_SAMPLE_RATE) -> int:
    """Latent frames the encoder produces for ``num_samples`` at ``sample_rate`` (after padding)."""
    n44 = _resampled_length(num_samples, sample_rate, CODEC_SAMPLE_RATE)
    return -(-n44 // SAMPLES_PER_LATENT)


def _resampled_length(n: int, orig: int, new: int) -> int:
    # torchaudio's sinc resampler returns ceil(n · new / orig) samples.
    return -(-n * new // orig)


class MusicDCAE(nn.Module):
    """Audio <-> ACE-Step latents with the released DCAE and vocoder."""

    def __init__(
        self,
        dcae: AutoencoderDC,
        vocoder: ADaMoSHiFiGANV1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        offload: bool | None = None,
    ):
        super().__init__()
        self.dcae = dcae
        self.vocoder = vocoder
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        self.storage_device = torch.device("cpu")
        self.offload = (self.device.type != "cpu") if offload is None else bool(offload)
        self._placed_depth = 0
        self.eval()
        self.requires_grad_(False)
        self._cast(self.dtype)
        # Without offloading the models simply live on the compute device.
        self._move(self.storage_device if self.offload else self.device)

    # ------------------------------------------------------------------ loading / placement

    @classmethod
    def from_checkpoint(
        cls,
        root: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        offload: bool | None = None,
    ) -> "MusicDCAE":
        """Load ``<root>/music_dcae_f8c8`` and ``<root>/music_vocoder`` (an ACE-Step v1 checkpoint
        root). A missing or incomplete folder raises ``CheckpointError`` saying what to download."""
        root = Path(root)
        dcae_dir = require_model_dir(
            root / DCAE_FOLDER, ACESTEP_PARTS[DCAE_FOLDER], f"ACE-Step part '{DCAE_FOLDER}'", "acestep"
        )
        vocoder_dir = require_model_dir(
            root / VOCODER_FOLDER, ACESTEP_PARTS[VOCODER_FOLDER], f"ACE-Step part '{VOCODER_FOLDER}'",
            "acestep",
        )
        # Loaded in fp32 and cast in __init__: the vocoder's mel buffers must stay fp32.
        dcae = AutoencoderDC.from_pretrained(dcae_dir, torch_dtype=torch.float32)
        vocoder = ADaMoSHiFiGANV1.from_pretrained(vocoder_dir, torch_dtype=torch.float32)
        return cls(dcae, vocoder, device=device, dtype=dtype, offload=offload)

    def _cast(self, dtype: torch.dtype) -> None:
        # Cast the DCAE's sub-modules rather than the ModelMixin itself: diffusers warns on
        # ModelMixin.to(dtype), and AutoencoderDC has no fp32-only modules to protect.
        for child in self.dcae.children():
            child.to(dtype=dtype)
        self.vocoder.backbone.to(dtype=dtype)
        self.vocoder.head.to(dtype=dtype)
        self.vocoder.mel_transform.to(dtype=torch.float32)

    def _move(self, device: torch.device) -> None:
        self.dcae.to(device)
        self.vocoder.to(device)

    @contextmanager
    def placed(self) -> Iterator["MusicDCAE"]:
        """Keep the models on the compute device for the duration of the block (re-entrant).

        Wrap several ``encode``/``decode`` calls in one ``with codec.placed():`` to avoid moving the
        weights back and forth between them.
        """
        if self._placed_depth == 0 and self.offload:
            self._move(self.device)
        self._placed_depth += 1
        try:
            yield self
        finally:
            self._placed_depth -= 1
            if self._placed_depth == 0 and self.offload:
                self.offload_now()

    def offload_now(self) -> None:
        """Move the weights back to ``storage_device`` and release cached accelerator memory."""
        self._move(self.storage_device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ helpers

    def _resample(self, audio: torch.Tensor, orig: int, new: int) -> torch.Tensor:
        if orig == new:
            return audio
        # Hann-windowed sinc, torchaudio defaults: what the released model was trained with.
        return AF.resample(audio, orig, new)

    def audio_to_mel(self, audio_44k: torch.Tensor) -> torch.Tensor:
        """[B, C, N] at 44.1 kHz -> log-mel [B, C, 128, N/512] (fp32)."""
        return self.vocoder.mel_transform(audio_44k.float())

    def mel_to_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel [C, 128, T] -> audio [C, T·512] at 44.1 kHz (fp32), one channel per batch row."""
        wav = self.vocoder.decode(mel.to(self.dtype))
        return wav.squeeze(1).float()

    # ------------------------------------------------------------------ encode

    def encode(
        self,
        audios: torch.Tensor,
        audio_lengths: torch.Tensor | Sequence[int] | None = None,
        sr: int = SOURCE_SAMPLE_RATE,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stereo audio [B, 2, N] at ``sr`` (48 kHz in the pipeline) -> (latents [B, 8, 16, T],
        latent_lengths [B]). T = ceil(N₄₄/4096); the lengths are the frames each item's real audio
        fills, floor(len/sr · 44100/4096) as the reference reports them (training ignores them).
        Returned in fp32 on the device ``audios`` came from."""
        if audios.dim() != 3:
            raise ValueError(f"encode expects audio [B, channels, samples], got {tuple(audios.shape)}")
        out_device = audios.device
        if audio_lengths is None:
            audio_lengths = torch.full((audios.shape[0],), audios.shape[-1], dtype=torch.long)
        audio_lengths = torch.as_tensor(audio_lengths).cpu()
        with torch.inference_mode(), self.placed():
            audio = self._resample(audios.to(self.device, torch.float32), sr, CODEC_SAMPLE_RATE)
            remainder = audio.shape[-1] % SAMPLES_PER_LATENT
            if remainder:
                audio = F.pad(audio, (0, SAMPLES_PER_LATENT - remainder))
            mel = self.audio_to_mel(audio)
            mel = ((mel - MIN_MEL) / (MAX_MEL - MIN_MEL) - 0.5) / 0.5
            # DCAE one item at a time, like the reference: its activations are the memory peak.
            z = torch.cat([self.dcae.encoder(m.unsqueeze(0).to(self.dtype)) for m in mel])
            latents = ((z.float() - SHIFT_FACTOR) * SCALE_FACTOR).to(out_device)
        # Same arithmetic as the reference (float division, then truncation).
        latent_lengths = (audio_lengths / sr * CODEC_SAMPLE_RATE / HOP_LENGTH / TIME_MULTIPLE).long()
        # Cloned outside inference mode: callers get an ordinary tensor they may use in autograd.
        return latents.clone(), latent_lengths.to(out_device)

    # ------------------------------------------------------------------ decode

    def _latents_to_mel(self, latent: torch.Tensor) -> torch.Tensor:
        """One item's latent [8, 16, T] (already de-scaled) -> log-mel [2, 128, 8T] (fp32)."""
        x = self.dcae.decoder(latent.unsqueeze(0).to(self.dtype))[0].float()
        return (x * 0.5 + 0.5) * (MAX_MEL - MIN_MEL) + MIN_MEL

    def _finish(
        self, wavs: list[torch.Tensor], audio_lengths, sr: int | None, out_device: torch.device
    ) -> tuple[int, list[torch.Tensor]]:
        out_sr = CODEC_SAMPLE_RATE if sr is None else int(sr)
        result = []
        for i, wav in enumerate(wavs):
            wav = self._resample(wav, CODEC_SAMPLE_RATE, out_sr)
            if audio_lengths is not None:
                wav = wav[:, : int(audio_lengths[i])]
            result.append(wav.to(out_device))
        return out_sr, result

    def decode(
        self,
        latents: torch.Tensor,
        audio_lengths: torch.Tensor | Sequence[int] | None = None,
        sr: int | None = None,
    ) -> tuple[int, list[torch.Tensor]]:
        """Latents [B, 8, 16, T] -> (sample rate, list of B stereo waveforms [2, n]).

        Audio comes out at 44.1 kHz (n = T·4096) unless ``sr`` asks for a resample;
        ``audio_lengths`` (samples at the output rate) cuts each item. fp32, on the latents' device.
        """
        out_device = latents.device
        wavs = []
        with torch.inference_mode(), self.placed():
            z = latents.to(self.device, torch.float32) / SCALE_FACTOR + SHIFT_FACTOR
            for item in z:
                wavs.append(self.mel_to_audio(self._latents_to_mel(item)))
            out_sr, wavs = self._finish(wavs, audio_lengths, sr, out_device)
        # Cloned outside inference mode: callers get ordinary tensors they may use in autograd.
        return out_sr, [wav.clone() for wav in wavs]

    def decode_auto(self, latents: torch.Tensor, audio_lengths=None, sr: int | None = None):
        """``decode`` for clips up to one DCAE window (~47 s), ``decode_overlap`` beyond, so memory
        stays bounded for long songs (a 240 s preview or generation)."""
        if latents.shape[-1] > DCAE_WINDOW:
            return self.decode_overlap(latents, audio_lengths=audio_lengths, sr=sr)
        return self.decode(latents, audio_lengths=audio_lengths, sr=sr)

    def decode_overlap(
        self,
        latents: torch.Tensor,
        audio_lengths: torch.Tensor | Sequence[int] | None = None,
        sr: int | None = None,
        dcae_window: int = DCAE_WINDOW,
        dcae_hop: int = DCAE_HOP,
        vocoder_window: int = VOCODER_WINDOW,
        vocoder_overlap: int = VOCODER_OVERLAP,
    ) -> tuple[int, list[torch.Tensor]]:
        """``decode`` for long outputs with bounded memory: the DCAE decoder sees at most
        ``dcae_window`` latent frames and the vocoder at most ``vocoder_window`` mel frames at a
        time (``vocoder_overlap`` samples shared by neighbouring vocoder windows). Same result as
        ``decode`` up to the window seams, identical when the input fits one window of each."""
        if not 0 < dcae_hop < dcae_window or (dcae_window - dcae_hop) % 2:
            raise ValueError(
                f"need 0 < dcae_hop < dcae_window with an even overlap, got {dcae_hop}, {dcae_window}"
            )
        if vocoder_overlap % HOP_LENGTH or vocoder_overlap < VOCODER_FADE:
            raise ValueError(f"vocoder_overlap must be a multiple of {HOP_LENGTH} and ≥ {VOCODER_FADE}")
        if vocoder_window * HOP_LENGTH <= vocoder_overlap:
            raise ValueError(f"vocoder_window must exceed {vocoder_overlap // HOP_LENGTH} mel frames")
        out_device = latents.device
        wavs = []
        with torch.inference_mode(), self.placed():
            z = latents.to(self.device, torch.float32) / SCALE_FACTOR + SHIFT_FACTOR
            for item in z:
                mel = self._decode_mel_windows(item, dcae_window, dcae_hop)
                wavs.append(self._vocode_windows(mel, vocoder_window, vocoder_overlap))
            out_sr, wavs = self._finish(wavs, audio_lengths, sr, out_device)
        return out_sr, [wav.clone() for wav in wavs]

    def _decode_mel_windows(self, latent: torch.Tensor, window: int, hop: int) -> torch.Tensor:
        """Latent [8, 16, L] -> mel [2, 128, 8L] in DCAE windows whose seams are trimmed."""
        length = latent.shape[-1]
        if length <= window:
            return self._latents_to_mel(latent)
        trim = (window - hop) // 2 * TIME_MULTIPLE
        pieces = []
        start = 0
        while True:
            end = min(start + window, length)
            last = end == length
            mel = self._latents_to_mel(latent[..., start:end])
            keep_from = 0 if start == 0 else trim
            keep_to = mel.shape[-1] if last else mel.shape[-1] - trim
            pieces.append(mel[..., keep_from:keep_to])
            if last:
                return torch.cat(pieces, dim=-1)
            start += hop

    def _vocode_windows(self, mel: torch.Tensor, window: int, overlap: int) -> torch.Tensor:
        """Mel [C, 128, T] -> audio [C, 512T] in vocoder windows joined by short cross-fades."""
        frames = mel.shape[-1]
        if frames <= window:
            return self.mel_to_audio(mel)
        overlap_frames = overlap // HOP_LENGTH
        hop_frames = window - overlap_frames
        out = mel.new_zeros(mel.shape[0], frames * HOP_LENGTH, dtype=torch.float32)
        ramp = torch.linspace(0.0, 1.0, VOCODER_FADE + 2, device=mel.device)[1:-1]
        start = 0
        while True:
            end = min(start + window, frames)
            wav = self.mel_to_audio(mel[..., start:end])
            s0 = start * HOP_LENGTH
            if start == 0:
                out[:, : wav.shape[-1]] = wav
            else:
                # The fade sits in the middle of the overlap, away from both windows' edges.
                fade_from = s0 + (overlap - VOCODER_FADE) // 2
                fade_to = fade_from + VOCODER_FADE
                new = wav[:, fade_from - s0 : fade_to - s0]
                out[:, fade_from:fade_to] = out[:, fade_from:fade_to] * (1 - ramp) + new * ramp
                out[:, fade_to : end * HOP_LENGTH] = wav[:, fade_to - s0 :]
            if end == frames:
                return out
            start += hop_frames
