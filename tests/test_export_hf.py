"""HF export: the official trainer's dataset layout, read back with datasets.load_from_disk."""
from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from pipeline.dataset import Song, write_manifest
from pipeline.errors import DatasetError
from pipeline.hf_export import export_hf_dataset
from stages.cli import group

datasets = pytest.importorskip("datasets")


def _songs(data):
    data.mkdir(parents=True, exist_ok=True)
    songs = []
    for sid, lyrics in [("album/one", "[verse]\nla"), ("two", "[inst]")]:
        (data / sid).parent.mkdir(parents=True, exist_ok=True)
        (data / f"{sid}.mp3").write_bytes(b"audio")  # export only checks the file exists
        songs.append(Song(sid, f"{sid}.mp3", f"{sid}_prompt.txt", None, "0" * 64, "1" * 64, None,
                          5.0, 48000, 2, 0.0, ["pop", "120 bpm"], lyrics))
    return songs


def test_roundtrip_with_repeat(tmp_path):
    data = tmp_path / "data"
    out = export_hf_dataset(_songs(data), data, tmp_path / "hf", repeat_count=3)
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 6
    assert ds.column_names == ["keys", "filename", "tags", "speaker_emb_path", "norm_lyrics", "recaption"]
    first = ds[0]
    assert first == {
        "keys": "album/one",
        "filename": str((data / "album/one.mp3").resolve()),
        "tags": ["pop", "120 bpm"],
        "speaker_emb_path": "",
        "norm_lyrics": "[verse]\nla",
        "recaption": {},
    }
    assert ds[1]["keys"] == "two" and ds[5]["keys"] == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hf"]  # no temp folder left


def test_recaption_keys_become_struct_fields(tmp_path):
    data = tmp_path / "data"
    one, two = _songs(data)
    one = dataclasses.replace(one, recaption={"simplified": "soft pop song"})
    ds = datasets.load_from_disk(str(export_hf_dataset([one, two], data, tmp_path / "hf")))
    assert ds[0]["recaption"] == {"simplified": "soft pop song"}
    assert ds[1]["recaption"] == {"simplified": None}


def test_previous_export_is_replaced_but_other_folders_are_not(tmp_path):
    data = tmp_path / "data"
    songs = _songs(data)
    export_hf_dataset(songs, data, tmp_path / "hf", repeat_count=2)
    export_hf_dataset(songs[:1], data, tmp_path / "hf")
    assert len(datasets.load_from_disk(str(tmp_path / "hf"))) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(DatasetError, match="not an exported dataset"):
        export_hf_dataset(songs, data, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_missing_audio_is_an_error(tmp_path):
    data = tmp_path / "data"
    songs = _songs(data)
    (data / "two.mp3").unlink()
    with pytest.raises(DatasetError, match="two.mp3"):
        export_hf_dataset(songs, data, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_export_hf(tmp_path):
    data, manifest = tmp_path / "data", tmp_path / "manifest.jsonl"
    write_manifest(manifest, _songs(data))
    out = tmp_path / "hf"
    result = CliRunner().invoke(group, ["export-hf", "--manifest", str(manifest), "--data-dir", str(data),
                                        "--output", str(out), "--repeat-count", "2"])
    assert result.exit_code == 0, result.output
    assert "4 rows" in result.output and len(datasets.load_from_disk(str(out))) == 4
    bad = CliRunner().invoke(group, ["export-hf", "--manifest", str(tmp_path / "none.jsonl"), "--output", str(out)])
    assert isinstance(bad.exception, DatasetError) and "\n" not in str(bad.exception)


def test_features_readable_by_datasets_3(tmp_path):
    """datasets 3.x (the official trainer's pin) knows `Sequence` but not datasets 4+'s `List`."""
    import json

    import pyarrow as pa

    data = tmp_path / "data"
    out = export_hf_dataset(_songs(data), data, tmp_path / "hf")
    info = (out / "dataset_info.json").read_text(encoding="utf-8")
    assert '"List"' not in info and json.loads(info)["features"]["tags"]["_type"] == "Sequence"
    for arrow in out.glob("*.arrow"):
        with pa.memory_map(str(arrow)) as source:
            assert b'"List"' not in pa.ipc.open_stream(source).schema.metadata[b"huggingface"]
    assert datasets.load_from_disk(str(out))[0]["tags"] == ["pop", "120 bpm"]
