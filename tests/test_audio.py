"""Audio decoding: every supported format, channel/rate handling, and each way a file can be bad."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.audio import (
    SAMPLE_RATE,
    audio_info,
    load_audio,
    pad_to_min,
    read_audio,
    save_audio,
    save_wav,
)
from pipeline.errors import AudioDecodeError


def _tone(seconds: float, sr: int, channels: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return np.stack([amp * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1).astype(np.float32)


@pytest.mark.parametrize("ext", [".mp3", ".wav", ".flac", ".ogg"])
def test_each_format_decodes_to_48k_stereo(tmp_path, ext):
    path = tmp_path / f"song{ext}"
    sf.write(path, _tone(1.0, 44100, 2), 44100)
    wav = load_audio(path)
    assert wav.dtype == torch.float32 and wav.shape[0] == 2
    assert abs(wav.shape[1] - SAMPLE_RATE) < 3000  # mp3 adds a little encoder padding
    duration, sr, channels = audio_info(path)
    assert (sr, channels) == (44100, 2) and abs(duration - 1.0) < 0.1


def test_mono_is_duplicated_and_extra_channels_dropped(tmp_path):
    sf.write(tmp_path / "mono.wav", _tone(0.5, SAMPLE_RATE, 1), SAMPLE_RATE)
    mono = load_audio(tmp_path / "mono.wav")
    assert mono.shape == (2, SAMPLE_RATE // 2) and torch.equal(mono[0], mono[1])
    sf.write(tmp_path / "six.wav", _tone(0.5, SAMPLE_RATE, 6), SAMPLE_RATE)
    six = load_audio(tmp_path / "six.wav")
    direct = torch.from_numpy(sf.read(tmp_path / "six.wav", dtype="float32")[0][:, :2].T.copy())
    assert six.shape == (2, SAMPLE_RATE // 2) and torch.allclose(six, direct)


def test_output_is_clamped(tmp_path):
    loud = np.full((4800, 2), 1.5, dtype=np.float32)
    sf.write(tmp_path / "loud.wav", loud, 32000, subtype="FLOAT")
    wav = load_audio(tmp_path / "loud.wav")
    assert wav.max() <= 1.0 and wav.min() >= -1.0


def test_pad_to_min():
    wav = torch.ones(2, SAMPLE_RATE)
    padded = pad_to_min(wav, 3.0)
    assert padded.shape == (2, 3 * SAMPLE_RATE) and padded[:, SAMPLE_RATE:].abs().sum() == 0
    long = torch.ones(2, 4 * SAMPLE_RATE)
    assert pad_to_min(long, 3.0) is long


def test_save_wav_roundtrip_and_atomic(tmp_path):
    wav = torch.from_numpy(_tone(0.25, SAMPLE_RATE, 2).T.copy())
    out = save_wav(tmp_path / "sub" / "x.wav", wav, SAMPLE_RATE, subtype="FLOAT")
    assert torch.allclose(load_audio(out), wav)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.wav"]  # no temp file left behind
    with pytest.raises(AudioDecodeError, match="save_wav writes .wav"):
        save_wav(tmp_path / "x.mp3", wav, SAMPLE_RATE)


def test_silence_ratio(tmp_path):
    data = np.zeros((SAMPLE_RATE, 2), dtype=np.float32)
    data[: SAMPLE_RATE // 10] = 0.25
    save_audio(tmp_path / "quiet.flac", data.T, SAMPLE_RATE)
    assert read_audio(tmp_path / "quiet.flac").silence_ratio() == pytest.approx(0.9, abs=1e-3)


def _mp3_bytes(tmp_path) -> bytes:
    sf.write(tmp_path / "good.mp3", _tone(2.0, SAMPLE_RATE, 2), SAMPLE_RATE)
    return (tmp_path / "good.mp3").read_bytes()


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("empty.mp3", lambda good: b"", "empty file"),
        ("corrupt.mp3", lambda good: b"ID3" + bytes(range(256)) * 40, "not a readable mp3"),
        ("truncated.mp3", lambda good: good[: len(good) // 2], "truncated"),
        ("notes.mp3", lambda good: b"these are my lyrics, not audio\n" * 50, "not a readable mp3"),
        ("song.m4a", lambda good: good, "unsupported audio format '.m4a'"),
    ],
)
def test_bad_files_raise_one_line_error_naming_the_file(tmp_path, name, make, reason):
    path = tmp_path / name
    path.write_bytes(make(_mp3_bytes(tmp_path)))
    with pytest.raises(AudioDecodeError) as err:
        load_audio(path)
    message = str(err.value)
    assert reason in message and str(path) in message and "\n" not in message


def test_truncated_wav(tmp_path):
    sf.write(tmp_path / "full.wav", _tone(2.0, SAMPLE_RATE, 2), SAMPLE_RATE)
    raw = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AudioDecodeError, match="truncated"):
        read_audio(tmp_path / "cut.wav")


def test_missing_file(tmp_path):
    with pytest.raises(AudioDecodeError, match="file not found"):
        audio_info(tmp_path / "nope.wav")
