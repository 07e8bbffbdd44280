"""`aceturbo ingest` (DVC stage: data folder -> manifest) and `aceturbo import-zip` (ZIP -> data folder)."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import IngestConfig, load_params
from pipeline.dataset import RULES, read_previous_manifest, scan_dataset, write_manifest, write_stage_views
from pipeline.zip_import import GB, ZipLimits, import_zip

INGEST_HELP = f"""Check the song triplets in the data folder and write the manifest.

Every problem of the dataset is listed at once (one line each); the manifest is only written when
there are none, and only when its content changed (so `dvc repro` sees no change after a no-op).
Defaults come from params.yaml (paths.data, paths.cache, ingest.*).

\b
{RULES}
"""


@click.command("ingest", help=INGEST_HELP)
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder of triplets, searched recursively [default: params.yaml paths.data = workspace/data].")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Manifest to write [default: <paths.cache>/manifest.jsonl = workspace/cache/manifest.jsonl].")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=None,
              help="Shorter clips are padded with silence to this length [default: 3].")
@click.option("--max-silence", type=click.FloatRange(0, 1), default=None,
              help="Reject clips with a larger fraction of exact-zero samples [default: 0.95].")
def cli(data_dir: Path | None, manifest: Path | None, min_seconds: float | None, max_silence: float | None):
    params = load_params()
    data_dir = data_dir or Path(params.paths.data)
    manifest = manifest or params.paths.manifest
    settings = IngestConfig(
        min_seconds=params.ingest.min_seconds if min_seconds is None else min_seconds,
        max_silence=params.ingest.max_silence if max_silence is None else max_silence,
    )
    report = scan_dataset(data_dir, settings, previous=read_previous_manifest(manifest))
    # Warnings and notes first: they matter even when the problems stop the run.
    for line in report.warnings:
        click.echo(f"Warning: {line}", err=True)
    for line in report.notes:
        click.echo(f"Note: {line}", err=True)
    report.raise_for_problems()
    changed = write_manifest(manifest, report.songs)
    # The per-stage views live beside the manifest (see write_stage_views).
    write_stage_views(report.songs, manifest.parent / "audio_list.jsonl", manifest.parent / "text_list.jsonl")
    minutes = sum(s.duration for s in report.songs) / 60
    state = "written" if changed else "unchanged"
    click.echo(f"{len(report.songs)} songs ({minutes:.1f} min) -> {manifest} ({state})")


@click.command("import-zip")
@click.argument("zip_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the triplets go [default: params.yaml paths.data = workspace/data].")
@click.option("--overwrite", is_flag=True, help="Replace files that already exist in the data folder.")
@click.option("--max-total-gb", type=click.FloatRange(min=0, min_open=True), default=ZipLimits.max_total_bytes / GB,
              show_default=True, help="Refuse archives that unpack to more than this.")
def import_zip_cli(zip_file: Path, data_dir: Path | None, overwrite: bool, max_total_gb: float):
    """Unpack a ZIP of song triplets into the data folder (then run `aceturbo ingest`).

    \b
    Flat or nested archives are fine: the layout below a single top folder is kept;
    __MACOSX and dotfiles are skipped. All or nothing: archives with absolute or '..' paths,
    symlinks, more than 10,000 members, too much data or bomb-like compression ratios, or
    corrupt data are refused with nothing written. Existing files are never replaced
    without --overwrite.
    """
    data_dir = data_dir or Path(load_params().paths.data)
    limits = ZipLimits(max_total_bytes=int(max_total_gb * GB))
    result = import_zip(zip_file, data_dir, overwrite=overwrite, limits=limits)
    extra = f", replaced {len(result.replaced)}" if result.replaced else ""
    skipped = f", skipped {len(result.skipped)} (__MACOSX/dotfiles)" if result.skipped else ""
    click.echo(f"Imported {len(result.files)} files into {data_dir}{extra}{skipped}. Next: aceturbo ingest")
