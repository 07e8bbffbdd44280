"""DVC stage `decode`: audio files → 48 kHz stereo float32 PCM (once per audio content)."""
from __future__ import annotations

import click

from pipeline.config import load_params
from pipeline.encoding import decode_songs


@click.command("decode")
@click.option("--params", "params_file", default="params.yaml", show_default=True, help="Settings file.")
def cli(params_file: str):
    """Decode every new or changed song to 48 kHz stereo PCM under <paths.cache>/pcm.

    Songs already decoded (same audio sha256) are skipped; PCM of songs that left the dataset is
    removed. (Clips shorter than ingest.min_seconds are padded by the encode steps.)
    """
    summary = decode_songs(load_params(params_file))
    click.echo(summary.line())
