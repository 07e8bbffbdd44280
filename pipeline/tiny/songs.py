"""Demo songs made in code: short synthetic triplets so a fresh clone has a dataset to try.

Each song is a few seconds of chords, bass, a lead line and a drum pattern in its own key and
tempo, stereo, written as MP3 (half at 48 kHz, half at 44.1 kHz, so resampling is exercised), with
a prompt of comma-separated tags and structured English lyrics. The last style is instrumental and
its lyrics file says "[inst]", so ingesting the demo gives no warnings. Everything is deterministic
given the seed; four 8-second songs take about half a megabyte.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.audio import save_audio
from pipeline.dataset import INSTRUMENTAL, LYRICS_SUFFIX, PROMPT_SUFFIX, write_text_atomic

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)


@dataclass(frozen=True)
class DemoStyle:
    name: str
    tags: str  # the prompt file's content
    bpm: float
    root: int  # MIDI note of the key's tonic
    scale: tuple[int, ...]
    progression: tuple[int, ...]  # scale degrees (0-based) of the chords, one per bar
    harmonics: int  # 1 = pure sine pad, more = brighter (saw-like)
    sample_rate: int
    lyrics: str


DEMO_STYLES: tuple[DemoStyle, ...] = (
    DemoStyle(
        "neon_drive", "synthwave, female vocals, 120 bpm, A minor, retro", 120, 57, MINOR, (0, 5, 2, 6), 6, 48000,
        "[verse]\nCity lights are calling my name\nNeon rivers running through the rain\n"
        "[chorus]\nDrive, drive into the night\nHold on, we are chasing the light\n",
    ),
    DemoStyle(
        "slow_morning", "lo-fi hip hop, male vocals, 85 bpm, F major, mellow", 85, 53, MAJOR, (0, 3, 5, 4), 3, 44100,
        "[verse]\nCoffee on the window sill\nMorning moving slow and still\n"
        "[chorus]\nTake it easy, take it slow\nLet the quiet morning go\n",
    ),
    DemoStyle(
        "river_song", "folk, acoustic, male vocals, 100 bpm, G major, warm", 100, 55, MAJOR, (0, 4, 5, 3), 4, 48000,
        "[verse]\nDown along the river bend\nI walked the road to find a friend\n"
        "[chorus]\nSing it loud and sing it true\nThe river carries me to you\n"
        "[bridge]\nOh the water knows my name\n",
    ),
    DemoStyle(
        "deep_space", "ambient, instrumental, 70 bpm, D minor, pads", 70, 50, MINOR, (0, 3, 4, 0), 2, 44100,
        INSTRUMENTAL,
    ),
)


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def _note(t: np.ndarray, freq: float, harmonics: int) -> np.ndarray:
    """A tone with `harmonics` partials of falling weight (1/k, like a soft saw)."""
    return sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, harmonics + 1))


def _place(track: np.ndarray, start_s: float, sound: np.ndarray, sr: int) -> None:
    start = int(start_s * sr)
    end = min(len(track), start + len(sound))
    if start < end:
        track[start:end] += sound[: end - start]


def synth_song(style: DemoStyle, seconds: float, rng: np.random.Generator, transpose: int = 0) -> np.ndarray:
    """The song as float32 [2, N] at style.sample_rate, peak 0.8."""
    sr = style.sample_rate
    n = int(seconds * sr)
    t = np.arange(n) / sr
    beat = 60.0 / style.bpm
    bar = 4 * beat
    root = style.root + transpose

    def degree(d: int, octave: int = 0) -> int:
        return root + style.scale[d % 7] + 12 * (d // 7 + octave)

    left, right = np.zeros(n), np.zeros(n)

    # Chords: a triad per bar, each voice slightly detuned between the sides for width.
    chord_at = (t // bar).astype(int) % len(style.progression)
    for voice in (0, 2, 4):
        for side, detune in ((left, -0.08), (right, 0.08)):
            freqs = np.array([_hz(degree(d + voice) + detune) for d in style.progression])
            phase = 2 * np.pi * np.cumsum(freqs[chord_at]) / sr
            side += 0.12 * sum(np.sin(k * phase) / k for k in range(1, style.harmonics + 1))

    # Bass: the chord root, plucked on every beat.
    pluck_t = np.arange(int(beat * sr)) / sr
    for i in range(int(seconds / beat) + 1):
        d = style.progression[int(i * beat // bar) % len(style.progression)]
        sound = 0.35 * _note(pluck_t, _hz(degree(d, -2)), 2) * np.exp(-pluck_t * 4)
        _place(left, i * beat, sound, sr)
        _place(right, i * beat, sound, sr)

    # Lead: random scale notes on eighth notes with vibrato, a stand-in for a voice, left of centre.
    eighth = beat / 2
    lead_t = np.arange(int(eighth * sr)) / sr
    envelope = np.minimum(1.0, lead_t * 50) * np.exp(-lead_t * 3)
    for i in range(int(seconds / eighth)):
        if rng.random() < 0.25:
            continue  # rests make it a melody
        freq = _hz(degree(int(rng.integers(0, 8)), 1))
        vibrato = 1 + 0.006 * np.sin(2 * np.pi * 5.5 * lead_t)
        sound = 0.18 * np.sin(2 * np.pi * np.cumsum(freq * vibrato) / sr) * envelope
        _place(left, i * eighth, 0.8 * sound, sr)
        _place(right, i * eighth, 0.4 * sound, sr)

    # Drums: kick on beats 1 and 3, snare on 2 and 4, hi-hats on eighths (right of centre).
    drum_t = np.arange(int(0.25 * sr)) / sr
    kick = 0.6 * np.sin(2 * np.pi * (50 * drum_t + 60 * (1 - np.exp(-drum_t * 30)) / 30)) * np.exp(-drum_t * 12)
    snare = 0.25 * rng.standard_normal(len(drum_t)) * np.exp(-drum_t * 20)
    hat_noise = rng.standard_normal(int(0.05 * sr))
    hat = 0.08 * np.diff(hat_noise, prepend=0.0) * np.exp(-np.arange(len(hat_noise)) / sr * 60)
    for i in range(int(seconds / beat) + 1):
        hit = kick if i % 2 == 0 else snare
        _place(left, i * beat, hit, sr)
        _place(right, i * beat, hit, sr)
    for i in range(int(seconds / eighth) + 1):
        _place(left, i * eighth, 0.5 * hat, sr)
        _place(right, i * eighth, hat, sr)

    wav = np.stack([left, right])
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.02)  # no clicks at the ends
    wav *= fade
    return (0.8 * wav / np.abs(wav).max()).astype(np.float32)


def make_demo_songs(folder: str | Path, n: int = 4, seconds: float = 8.0, seed: int = 0) -> list[Path]:
    """Write `n` demo triplets into `folder`; returns the audio paths (NAME.mp3)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        style = DEMO_STYLES[i % len(DEMO_STYLES)]
        rnd = i // len(DEMO_STYLES)  # beyond the first round, reuse the styles in other keys
        rng = np.random.default_rng([seed, i])
        name = f"demo_{i + 1:02d}_{style.name}"
        wav = synth_song(style, seconds, rng, transpose=(5 * rnd) % 12)
        audio = save_audio(folder / f"{name}.mp3", wav, style.sample_rate)
        write_text_atomic(folder / f"{name}{PROMPT_SUFFIX}", style.tags + "\n")
        write_text_atomic(folder / f"{name}{LYRICS_SUFFIX}", style.lyrics.rstrip("\n") + "\n")
        paths.append(audio)
    return paths
