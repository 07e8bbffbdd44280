"""The log-mel front end of ACE-Step's codec (spec §3.1).

It is the vocoder's ``mel_transform``: the DCAE encoder sees these mels and the vocoder turns mels
back into audio, so both directions must use exactly this transform. Buffer names
(``spectrogram.window``, ``mel_scale.fb``) follow the released vocoder checkpoint, which stores them
under ``mel_transform.*``; when a checkpoint lacks them the values computed here are used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchaudio.transforms import MelScale

# Floor of the magnitude before log: ln(1e-5) ≈ -11.51 is the quietest representable bin.
LOG_FLOOR = 1e-5
# Added under the square root of the magnitude so silent bins keep a finite gradient.
MAGNITUDE_EPS = 1e-6


class LinearSpectrogram(nn.Module):
    """Magnitude STFT, Hann window, centre=False after an explicit reflect pad.

    The pad is (win - hop) / 2 on each side instead of the usual n_fft / 2, which makes the frame
    count exactly ``samples / hop`` for lengths that are multiples of the hop.
    """

    def __init__(self, n_fft: int = 2048, win_length: int = 2048, hop_length: int = 512):
        super().__init__()
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = hop_length
        # Persistent: the released checkpoint carries it (mel_transform.spectrogram.window).
        self.register_buffer("window", torch.hann_window(win_length), persistent=True)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio`` [..., N] -> magnitude [..., n_fft/2+1, frames]."""
        lead = audio.shape[:-1]
        flat = audio.reshape(-1, audio.shape[-1])
        left = (self.win_length - self.hop_length) // 2
        right = (self.win_length - self.hop_length + 1) // 2
        flat = F.pad(flat.unsqueeze(1), (left, right), mode="reflect").squeeze(1)
        spec = torch.stft(
            flat,
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.to(flat.dtype),
            center=False,
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        spec = torch.view_as_real(spec)
        magnitude = torch.sqrt(spec.pow(2).sum(-1) + MAGNITUDE_EPS)
        return magnitude.reshape(*lead, *magnitude.shape[-2:])


class LogMelSpectrogram(nn.Module):
    """Natural-log mel spectrogram (slaney mel scale and norm), 128 bins by default."""

    def __init__(
        self,
        sample_rate: int = 44100,
        n_fft: int = 2048,
        win_length: int = 2048,
        hop_length: int = 512,
        n_mels: int = 128,
        f_min: float = 40.0,
        f_max: float = 16000.0,
    ):
        super().__init__()
        self.sample_rate = sample_rate
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.spectrogram = LinearSpectrogram(n_fft, win_length, hop_length)
        # torchaudio's MelScale registers ``fb`` [n_fft/2+1, n_mels] as a persistent buffer.
        self.mel_scale = MelScale(
            n_mels=n_mels,
            sample_rate=sample_rate,
            f_min=f_min,
            f_max=f_max,
            n_stft=n_fft // 2 + 1,
            norm="slaney",
            mel_scale="slaney",
        )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio`` [..., N] at ``sample_rate`` -> log-mel [..., n_mels, frames].

        Computed in at least fp32 whatever the input dtype: FFTs in bf16 are unsupported on CPU and
        CUDA, and the log of tiny magnitudes needs the precision.
        """
        out_dtype = audio.dtype
        work = audio.float() if audio.dtype in (torch.float16, torch.bfloat16) else audio
        linear = self.spectrogram(work)
        mel = torch.matmul(linear.transpose(-1, -2), self.mel_scale.fb.to(work.dtype)).transpose(-1, -2)
        return torch.log(torch.clamp(mel, min=LOG_FLOOR)).to(out_dtype)
