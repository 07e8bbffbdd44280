"""DVC stages `encode-latents`, `encode-mert`, `encode-mhubert`, `encode-text`: one feature stream each."""
from __future__ import annotations

import click

from pipeline.config import load_params
from pipeline.encoding import encode_stream, worker_slot
from pipeline.features import STREAMS


@click.command("encode")
@click.argument("stream", type=click.Choice(STREAMS))
@click.option("--params", "params_file", default="params.yaml", show_default=True, help="Settings file.")
@click.option("--num-workers-total", type=click.IntRange(min=1), default=None,
              help="Split this step over N parallel workers (machines or GPUs); default: torchrun's "
                   "WORLD_SIZE, else 1.")
@click.option("--worker-index", type=click.IntRange(min=0), default=None,
              help="This worker's index in 0..N-1; default: torchrun's RANK, else 0.")
@click.option("--verify", is_flag=True,
              help="Also check the checksum of every cached song (reads and decompresses the whole stream, "
                   "about one epoch of reading) and re-encode what fails. Without it, each shard's layout "
                   "is checked (cheap).")
def cli(stream: str, params_file: str, num_workers_total: int | None, worker_index: int | None, verify: bool):
    """Encode one feature stream into the Zarr cache (latents | mert | mhubert | text).

    \b
    Only songs whose content (audio sha256, or tags+lyrics for text) or encoder fingerprint
    (weights + settings + code version) changed are encoded; songs that left the dataset leave the
    cache. Safe to kill and rerun. With N workers (e.g. `torchrun --nproc_per_node 4 -m stages
    encode mert`), each encodes every N-th missing song into its own shards; worker 0 removes
    stale ones. Encoders run in encode.dtype on encode.device.

    \b
    One process per stream (and worker) at a time: a second one stops with a line naming the
    first (its pid, host and start); the lock of a process that died is taken over. Shards that
    fail their checks are replaced and their songs re-encoded.
    """
    project = load_params(params_file)
    worker = worker_slot(worker_index, num_workers_total)
    summary = encode_stream(project, stream, worker, verify=verify)
    for line in summary.damaged:
        click.echo(f"Note: {line}: what it held is encoded again", err=True)
    click.echo(summary.line())
