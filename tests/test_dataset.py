"""Triplet scanning, the dataset rules (each with a real bad file) and the manifest."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from pipeline.config import IngestConfig
from pipeline.dataset import (
    RULES,
    Song,
    parse_tags,
    read_manifest,
    read_text,
    scan_dataset,
    write_manifest,
)
from pipeline.errors import DatasetError
from stages.cli import group

SR = 44100


def _audio(path, seconds=4.0, silent_fraction=0.0, channels=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    data = np.stack([0.3 * np.sin(2 * np.pi * 330 * t)] * channels, axis=1).astype(np.float32)
    data[: int(n * silent_fraction)] = 0.0
    sf.write(path, data, SR)
    return path


def _triplet(root, name, ext=".flac", prompt="pop, female vocals", lyrics="[verse]\nla la", **audio):
    base = root / name
    _audio(base.parent / (base.name + ext), **audio)
    if prompt is not None:
        (base.parent / f"{base.name}_prompt.txt").write_text(prompt, encoding="utf-8")
    if lyrics is not None:
        (base.parent / f"{base.name}_lyrics.txt").write_text(lyrics, encoding="utf-8")


def _scan(data, **kw):
    return scan_dataset(data, IngestConfig(**kw), progress=False)


def _problem(data, **kw) -> str:
    """The single DatasetError message of a dataset with exactly one problem."""
    with pytest.raises(DatasetError) as err:
        _scan(data, **kw).raise_for_problems()
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_good_dataset_nested_and_sorted(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "b_song", ext=".mp3", prompt=" synthwave ,, 120 bpm,\n")
    _triplet(data, "album/a_song", ext=".wav", lyrics="[verse]\nhello\n[chorus]\nworld\n")
    report = _scan(data)
    report.raise_for_problems()
    assert [s.id for s in report.songs] == ["album/a_song", "b_song"]
    song = report.songs[0]
    assert song.audio_path == "album/a_song.wav" and song.prompt_path == "album/a_song_prompt.txt"
    assert song.lyrics == "[verse]\nhello\n[chorus]\nworld" and song.recaption == {}
    assert (song.sample_rate, song.channels) == (SR, 2) and abs(song.duration - 4.0) < 1e-3
    assert len(song.audio_sha256) == 64 and song.lyrics_sha256 is not None
    assert report.songs[1].tags == ["synthwave", "120 bpm"]
    assert report.warnings == [] and report.notes == []


def test_manifest_roundtrip_unchanged_keeps_mtime_and_id_is_stable(tmp_path):
    data, manifest = tmp_path / "data", tmp_path / "cache" / "manifest.jsonl"
    _triplet(data, "z")
    _triplet(data, "a")
    songs = _scan(data).songs
    assert write_manifest(manifest, songs) is True
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a", "z"] and rows[0]["recaption"] == {}
    assert read_manifest(manifest) == songs
    os.utime(manifest, (1_000_000, 1_000_000))
    again = scan_dataset(data, previous=read_manifest(manifest), progress=False).songs
    assert write_manifest(manifest, again) is False
    assert manifest.stat().st_mtime == 1_000_000  # untouched: DVC sees no change
    (data / "a_prompt.txt").write_text("rock", encoding="utf-8")
    changed = _scan(data).songs
    assert [s.id for s in changed] == ["a", "z"] and changed[0].tags == ["rock"]
    assert write_manifest(manifest, changed) is True
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["manifest.jsonl"]  # no temp left


def test_bom_and_crlf_are_fine(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "s", prompt=None, lyrics=None)
    (data / "s_prompt.txt").write_bytes("\ufeffpop, caf\u00e9\r\n".encode("utf-8"))
    (data / "s_lyrics.txt").write_bytes("\ufeff[verse]\r\nl\u00e0 l\u00e0\r\n".encode("utf-8"))
    song = _scan(data).songs[0]
    assert song.tags == ["pop", "caf\u00e9"] and song.lyrics == "[verse]\nl\u00e0 l\u00e0"


def test_latin1_text_is_an_error(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "s", lyrics=None)
    (data / "s_lyrics.txt").write_bytes("[verse]\ncaf\u00e9".encode("latin-1"))
    message = _problem(data)
    assert "s_lyrics.txt" in message and "not UTF-8" in message and "re-save it as UTF-8" in message
    assert "\ufffd" not in message


def test_utf16_without_bom_is_an_error(tmp_path):
    (tmp_path / "x.txt").write_bytes("pop".encode("utf-16-le"))
    with pytest.raises(DatasetError, match="NUL"):
        read_text(tmp_path / "x.txt")


def test_missing_prompt_is_an_error(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "s", prompt=None)
    message = _problem(data)
    assert "missing prompt file" in message and "s_prompt.txt" in message


def test_missing_lyrics_is_instrumental_with_warning(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "s", lyrics=None)
    report = _scan(data)
    report.raise_for_problems()
    assert report.songs[0].lyrics == "[inst]" and report.songs[0].lyrics_path is None
    assert len(report.warnings) == 1 and "instrumental" in report.warnings[0]


def test_empty_prompt_gives_music_tag():
    assert parse_tags(" , \n ") == ["music"]


def test_orphan_audio(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "s", prompt=None, lyrics=None)
    message = _problem(data)
    assert "s.flac" in message and "s_prompt.txt" in message


@pytest.mark.parametrize("kind", ["prompt", "lyrics"])
def test_orphan_text(tmp_path, kind):
    data = tmp_path / "data"
    _triplet(data, "good")
    data.joinpath(f"lost_{kind}.txt").write_text("x", encoding="utf-8")
    message = _problem(data)
    assert f"lost_{kind}.txt" in message and "no audio file" in message


def test_case_clash(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "Song", prompt=None, lyrics=None)
    (data / "song_prompt.txt").write_text("pop", encoding="utf-8")
    (data / "song_lyrics.txt").write_text("la", encoding="utf-8")
    message = _problem(data)
    assert "differ only by case" in message and "Song.flac" in message and "song_prompt.txt" in message


def test_two_audio_files_for_one_song(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "s")
    _audio(data / "s.wav")
    assert "several files for one song" in _problem(data)


def test_silence_is_rejected_with_ratio(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "quiet", silent_fraction=0.97)
    message = _problem(data)
    assert "quiet.flac" in message and "97.0% digital silence" in message
    assert _scan(data, max_silence=0.99).songs  # the limit is a setting


def test_short_clip_is_accepted_with_note(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "short", seconds=1.5)
    report = _scan(data)
    report.raise_for_problems()
    assert len(report.songs) == 1 and "padded with silence to 3 s" in report.notes[0]


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("corrupt.mp3", b"ID3" + bytes(range(256)) * 40, "not a readable mp3"),
        ("empty.mp3", b"", "empty file"),
        ("song.m4a", b"\x00\x00\x00\x20ftypM4A ", "unsupported audio format"),
    ],
)
def test_bad_audio_is_reported(tmp_path, name, content, reason):
    data = tmp_path / "data"
    stem = name.rsplit(".", 1)[0]
    (data).mkdir()
    (data / name).write_bytes(content)
    (data / f"{stem}_prompt.txt").write_text("pop", encoding="utf-8")
    (data / f"{stem}_lyrics.txt").write_text("la", encoding="utf-8")
    report = _scan(data)
    assert not report.songs
    assert any(reason in p and name in p for p in report.problems), report.problems


def test_truncated_mp3_is_reported(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "cut", ext=".mp3")
    raw = (data / "cut.mp3").read_bytes()
    (data / "cut.mp3").write_bytes(raw[: len(raw) // 2])
    assert "truncated" in _problem(data)


def test_all_problems_reported_together(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "ok")
    _triplet(data, "no_prompt", prompt=None)
    _triplet(data, "quiet", silent_fraction=1.0)
    (data / "orphan_lyrics.txt").write_text("la", encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        _scan(data).raise_for_problems()
    lines = str(err.value).splitlines()
    assert lines[0].startswith("3 problems in") and len(lines) == 4
    assert all(name in str(err.value) for name in ("no_prompt", "quiet", "orphan_lyrics"))


def test_hidden_and_macosx_are_ignored(tmp_path):
    data = tmp_path / "data"
    _triplet(data, "s")
    (data / "__MACOSX").mkdir()
    (data / "__MACOSX" / "._s.flac").write_bytes(b"junk")
    (data / ".DS_Store").write_bytes(b"junk")
    (data / "cover.jpg").write_bytes(b"junk")
    assert [s.id for s in _scan(data).songs] == ["s"]


def test_missing_or_empty_data_dir(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        _scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no songs found"):
        _scan(tmp_path / "empty").raise_for_problems()


def test_damaged_manifest(tmp_path):
    (tmp_path / "m.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="line 1"):
        read_manifest(tmp_path / "m.jsonl")
    with pytest.raises(DatasetError, match="run `aceturbo ingest`"):
        read_manifest(tmp_path / "none.jsonl")


def test_song_row_roundtrip():
    song = Song("a", "a.mp3", "a_prompt.txt", None, "0" * 64, "1" * 64, None, 4.0, SR, 2, 0.0, ["pop"], "[inst]")
    assert Song.from_row(json.loads(json.dumps(song.to_row()))) == song


# --- the CLI ---------------------------------------------------------------------------------------

def test_cli_ingest_writes_manifest_then_is_a_noop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: built-in defaults
    data = tmp_path / "workspace" / "data"
    _triplet(data, "s", lyrics=None)
    runner = CliRunner()
    first = runner.invoke(group, ["ingest"])
    assert first.exit_code == 0, first.output
    assert "Warning:" in first.output and "(written)" in first.output
    manifest = tmp_path / "workspace" / "cache" / "manifest.jsonl"
    assert [s.id for s in read_manifest(manifest)] == ["s"]
    second = runner.invoke(group, ["ingest", "--data-dir", str(data), "--manifest", str(manifest)])
    assert second.exit_code == 0 and "(unchanged)" in second.output


def test_cli_ingest_error_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data, manifest = tmp_path / "d", tmp_path / "m.jsonl"
    _triplet(data, "s", silent_fraction=0.5)
    result = CliRunner().invoke(
        group, ["ingest", "--data-dir", str(data), "--manifest", str(manifest), "--max-silence", "0.4"]
    )
    assert isinstance(result.exception, DatasetError)
    assert "\n" not in str(result.exception) and "% digital silence (limit 40%)" in str(result.exception)
    assert not manifest.exists()


def test_cli_main_prints_error_line(tmp_path, monkeypatch, capsys):
    from stages.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["ingest", "--data-dir", str(tmp_path / "nothing")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: data folder") and "\n" not in err


def test_rules_are_in_help():
    result = CliRunner().invoke(group, ["ingest", "--help"])
    assert result.exit_code == 0 and "differ only by case" in result.output and "95 %" in RULES
