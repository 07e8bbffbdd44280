"""Demo songs: a valid, warning-free, small and deterministic dataset."""
from __future__ import annotations

import numpy as np
import soundfile as sf

from pipeline.dataset import scan_dataset
from pipeline.tiny.songs import make_demo_songs


def test_demo_dataset_ingests_cleanly(tmp_path):
    paths = make_demo_songs(tmp_path / "data")
    assert len(paths) == 4 and all(p.suffix == ".mp3" for p in paths)
    assert sum(p.stat().st_size for p in paths) < 2_000_000
    report = scan_dataset(tmp_path / "data", progress=False)
    assert report.problems == [] and report.warnings == [] and report.notes == []
    songs = {s.id: s for s in report.songs}
    assert set(songs) == {p.stem for p in paths}
    assert {s.sample_rate for s in songs.values()} == {44100, 48000}
    assert all(s.channels == 2 and abs(s.duration - 8.0) < 0.1 for s in songs.values())
    assert all(s.silence_ratio < 0.05 for s in songs.values())
    assert len({next(t for t in s.tags if "bpm" in t) for s in songs.values()}) == 4  # four tempos
    lyrics = [s.lyrics for s in songs.values()]
    assert lyrics.count("[inst]") == 1
    assert all("[verse]" in text and "[chorus]" in text for text in lyrics if text != "[inst]")
    left, right = sf.read(paths[0], dtype="float32")[0].T
    assert not np.allclose(left, right)  # real stereo


def test_deterministic_given_seed(tmp_path):
    a = make_demo_songs(tmp_path / "a", n=5, seconds=2.0, seed=1)
    b = make_demo_songs(tmp_path / "b", n=5, seconds=2.0, seed=1)
    c = make_demo_songs(tmp_path / "c", n=1, seconds=2.0, seed=2)
    assert [p.name for p in a] == [p.name for p in b] and len({p.name for p in a}) == 5
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert a[0].read_bytes() != c[0].read_bytes()
