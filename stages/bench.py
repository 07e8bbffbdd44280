"""`aceturbo bench`: cached vs live training speed, the transformer-alone floor, memory, cache size.

Thin: parse options, call pipeline.bench.run_benchmark, print the table, merge the run into
docs/benchmarks.json and rewrite docs/benchmarks.md from every run recorded there.
"""
from __future__ import annotations

from pathlib import Path

import click


@click.command("bench")
@click.option("--size", type=click.Choice(["demo", "small", "full"]), default="demo", show_default=True,
              help="demo: the tiny demo models; small: every width ÷ 8 (real compute ratio); full: the real "
                   "3.5B transformer and real-size encoders (random weights; needs a GPU).")
@click.option("--song-seconds", type=click.FloatRange(min=1.0), default=180.0, show_default=True,
              help="Length of the synthetic song.")
@click.option("--rank", "ranks", type=click.IntRange(min=1), multiple=True,
              help="LoRA rank; repeat for several (e.g. --rank 16 --rank 64 --rank 256) [default: 64].")
@click.option("--precision", type=click.Choice(["bf16-true", "fp32"]), default="bf16-true", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed optimizer steps per mode (the median is reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Steps run before the timed ones, excluded from the median.")
@click.option("--modes", default="floor,cached,live,paired", show_default=True, help="Which modes to run.")
@click.option("--songs", type=click.IntRange(min=1), default=1, show_default=True, help="Songs in the dataset.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu or cuda.")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Cache loader worker processes.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads per child (CPU).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Keep checkpoints, songs and caches here and reuse them [default: a temporary folder].")
@click.option("--out", "out", type=click.Path(dir_okay=False), default="docs/benchmarks.md", show_default=True,
              help="Markdown report; the JSON goes beside it (same name, .json).")
@click.option("--allow-cpu-full", is_flag=True, help="Run --size full without a GPU (very slow; ≥ 24 GB RAM).")
def cli(size, song_seconds, ranks, precision, steps, warmup, modes, songs, device, num_workers,
        gradient_checkpointing, threads, workdir, out, allow_cpu_full):
    """Measure cached vs live training (median s/step, peak memory), the transformer-alone floor, loader
    samples/s, cache MB per minute of audio and encode throughput; write docs/benchmarks.{md,json}."""
    from pipeline import bench
    from pipeline.errors import ConfigError

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not chosen or any(m not in bench.MODES for m in chosen):
        raise ConfigError(f"--modes takes a comma-separated subset of {', '.join(bench.MODES)}")
    settings = bench.BenchSettings(
        size=size, song_seconds=song_seconds, ranks=tuple(ranks) or (64,), precision=precision, steps=steps,
        warmup=warmup, modes=chosen, songs=songs, device=device, num_workers=num_workers,
        gradient_checkpointing=gradient_checkpointing, workdir=workdir, allow_cpu_full=allow_cpu_full,
        threads=threads, command=bench.command_line())
    record = bench.run_benchmark(settings, echo=click.echo)
    click.echo(bench.table_text(record))
    md = Path(out)
    js = md.with_suffix(".json")
    results = bench.load_results(js)
    results["runs"][record["key"]] = record
    bench.write_reports(results, md, js)
    click.echo(f"wrote {md} and {js}")
