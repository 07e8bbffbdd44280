"""`aceturbo export-hf`: the manifest as the HF dataset folder the official ACE-Step trainer reads."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.dataset import read_manifest
from pipeline.hf_export import export_hf_dataset

DEFAULT_OUTPUT = Path("workspace/export/hf_dataset")


@click.command("export-hf")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Manifest written by `aceturbo ingest` [default: workspace/cache/manifest.jsonl].")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder the manifest's paths are relative to [default: params.yaml paths.data].")
@click.option("--output", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_OUTPUT,
              show_default=True, help="Dataset folder to write (a previous export there is replaced).")
@click.option("--repeat-count", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat the song list N times (the official recipe uses large N for tiny datasets).")
def cli(manifest: Path | None, data_dir: Path | None, output: Path, repeat_count: int):
    """Write a `datasets.save_to_disk` folder for the official trainer (`trainer.py --dataset_path`).

    \b
    Columns: keys, filename (absolute audio path), tags, speaker_emb_path (""), norm_lyrics,
    recaption ({}). Read it back with datasets.load_from_disk(OUTPUT).
    """
    params = load_params()
    songs = read_manifest(manifest or params.paths.manifest)
    path = export_hf_dataset(songs, data_dir or Path(params.paths.data), output, repeat_count=repeat_count)
    click.echo(f"{len(songs)} songs x {repeat_count} = {len(songs) * repeat_count} rows -> {path}")
