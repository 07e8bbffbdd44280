"""Export the manifest as the HF `datasets` folder the official ACE-Step trainer reads (spec §9).

Columns, as in the official `convert2hf_dataset.py` output:
  keys (str, the song id), filename (str, absolute audio path), tags (list[str]),
  speaker_emb_path (str, always ""), norm_lyrics (str), recaption (struct).

`recaption`: Arrow has no "empty dict" value, so it is stored as a struct whose fields are the
union of the recaption keys of all songs (a song without one of them gets None there). With no
recaptions at all - the normal case - it is a struct with no fields, which `save_to_disk` (Arrow
IPC files) accepts and `datasets.load_from_disk` gives back as `{}` for every row, exactly what the
official dataset holds. (Parquet could not store it; `save_to_disk` does not use Parquet.)

Compatibility with older `datasets`: datasets >= 4 writes list columns as `"_type": "List"`, which
datasets 3.x (the official trainer pins 3.4.1) cannot read ("Feature type 'List' not found"). So
after saving, the feature descriptions (dataset_info.json and the copy in each .arrow file's schema
metadata) are rewritten with the older equivalent `"_type": "Sequence"`, which every version reads;
the data itself is untouched.

`datasets` is imported only inside the functions: it is heavy and only this export needs it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from pipeline.dataset import Song
from pipeline.errors import DatasetError

SPEAKER_EMB_PATH = ""  # the released model has no speaker embeddings (spec §2.2)


def hf_rows(songs: Iterable[Song], data_dir: str | Path) -> list[dict]:
    """One official-format row per song (not yet repeated), in manifest order."""
    data_dir = Path(data_dir).resolve()
    return [
        {
            "keys": song.id,
            "filename": str(song.audio_file(data_dir)),
            "tags": list(song.tags),
            "speaker_emb_path": SPEAKER_EMB_PATH,
            "norm_lyrics": song.lyrics,
            "recaption": dict(song.recaption),
        }
        for song in songs
    ]


def _features(rows: list[dict]):
    import datasets

    recaption_keys = sorted({key for row in rows for key in row["recaption"]})
    return datasets.Features(
        {
            "keys": datasets.Value("string"),
            "filename": datasets.Value("string"),
            "tags": datasets.Sequence(datasets.Value("string")),
            "speaker_emb_path": datasets.Value("string"),
            "norm_lyrics": datasets.Value("string"),
            "recaption": {key: datasets.Value("string") for key in recaption_keys},
        }
    )


def _legacy_features(node):
    """Feature JSON with every `List` written as the equivalent `Sequence` (readable by datasets 2-5)."""
    if isinstance(node, dict):
        node = {key: _legacy_features(value) for key, value in node.items()}
        if node.get("_type") == "List":
            node["_type"] = "Sequence"
        return node
    if isinstance(node, list):
        return [_legacy_features(value) for value in node]
    return node


def _write_legacy_features(folder: Path) -> None:
    """Rewrite the feature descriptions of a save_to_disk folder in place (see module docstring)."""
    import pyarrow as pa

    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info_path.write_text(json.dumps(_legacy_features(info), indent=2, sort_keys=True), encoding="utf-8")
    for arrow_path in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(arrow_path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        metadata = dict(table.schema.metadata or {})
        if b"huggingface" in metadata:
            hf = _legacy_features(json.loads(metadata[b"huggingface"]))
            metadata[b"huggingface"] = json.dumps(hf).encode("utf-8")
        table = table.replace_schema_metadata(metadata)
        rewritten = arrow_path.with_suffix(".arrow.tmp")
        with pa.OSFile(str(rewritten), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(rewritten, arrow_path)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def export_hf_dataset(songs: list[Song], data_dir: str | Path, output: str | Path, repeat_count: int = 1) -> Path:
    """Write `output` with Dataset.save_to_disk: built in a temp folder beside it, then renamed in.

    An existing export at `output` is replaced; any other existing folder there is refused.
    """
    import datasets

    output = Path(output)
    if repeat_count < 1:
        raise DatasetError(f"repeat count must be at least 1 (got {repeat_count})")
    if not songs:
        raise DatasetError("the manifest has no songs; run `aceturbo ingest` on a dataset first")
    if output.exists() and not _is_saved_dataset(output):
        raise DatasetError(f"{output} exists and is not an exported dataset; choose another --output or remove it")
    rows = hf_rows(songs, data_dir)
    missing = [row["filename"] for row in rows if not Path(row["filename"]).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DatasetError(
            f"audio listed in the manifest is missing ({shown}); check --data-dir or rerun `aceturbo ingest`"
        )
    # The official recipe repeats the list (e.g. 2000× one demo song) so an "epoch" is long.
    dataset = datasets.Dataset.from_list(rows * repeat_count, features=_features(rows))

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    old = staging.with_name(staging.name + "-old")
    try:
        dataset.save_to_disk(str(staging / "ds"))
        _write_legacy_features(staging / "ds")
        if output.exists():
            os.replace(output, old)  # a folder cannot be os.replace'd onto a non-empty one
        os.replace(staging / "ds", output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return output
