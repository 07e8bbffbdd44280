"""`aceturbo bench`: cached vs live training speed, the transformer-alone floor, memory, cache size.

Thin: parse options, call pipeline.bench.run_benchmark (or run_memory_check), print the table, merge
the run into docs/benchmarks.json and rewrite docs/benchmarks.md from everything recorded there.
"""
from __future__ import annotations

from pathlib import Path

import click


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    from pipeline.errors import ConfigError

    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{option} takes NAME=VALUE (a train setting, e.g. gradient_checkpointing=false), "
                              f"got {item!r}")
        out[name.strip()] = value.strip()
    return out


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
@click.option("--num-workers", type=click.IntRange(min=0), default=None,
              help="Cache loader worker processes (default: as `aceturbo train`, 2 on CUDA, 0 on the CPU).")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
              help="A train setting for every row (any `aceturbo train` setting, e.g. gradient_checkpointing=false); "
                   "repeat for several.")
@click.option("--matrix", "matrix", multiple=True, metavar="NAME=V1,V2",
              help="One row per value (per combination when repeated), each --rank, e.g. "
                   "--matrix gradient_checkpointing=true,false.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads per child (CPU).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Keep checkpoints, songs and caches here and reuse them [default: a temporary folder].")
@click.option("--out", "out", type=click.Path(dir_okay=False), default="docs/benchmarks.md", show_default=True,
              help="Markdown report; the JSON goes beside it (same name, .json).")
@click.option("--allow-cpu-full", is_flag=True, help="Run --size full without a GPU (very slow; needs the memory "
                                                     "the up-front estimate names).")
@click.option("--memory-check", is_flag=True,
              help="Instead of benchmarking: check the memory model against the tensor meter (full size on meta, "
                   "demo and small on CPU) and record the result in the report.")
def cli(size, song_seconds, ranks, precision, steps, warmup, modes, songs, device, num_workers, sets, matrix,
        threads, workdir, out, allow_cpu_full, memory_check):
    """Measure cached vs live training (median s/step, host and device peak memory next to the memory
    model's estimate), the transformer-alone floor, loader samples/s, cache MB per minute of audio and
    encode throughput; write docs/benchmarks.{md,json}."""
    from pipeline import bench
    from pipeline.errors import ConfigError

    md = Path(out)
    js = md.with_suffix(".json")
    if memory_check:
        checks = bench.run_memory_check(Path(workdir) if workdir else None, echo=click.echo)
        for row in checks["rows"]:
            click.echo(f"{row['size']:>5} {row['device']:>4} {row['seconds']:>4g} s r={row['rank']:<3} "
                       f"{row['precision']:>9} checkpointing {row['gradient_checkpointing']:>4}: counted "
                       f"{row['counted_peak'] / 2**20:9,.1f} MiB, model {row['estimate'] / 2**20:9,.1f} MiB "
                       f"({row['ratio']:.3f})")
        results = bench.load_results(js)  # read now: other runs may have written it meanwhile
        results["memory_checks"] = checks
        bench.write_reports(results, md, js)
        click.echo(f"wrote {md} and {js}")
        return
    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not chosen or any(m not in bench.MODES for m in chosen):
        raise ConfigError(f"--modes takes a comma-separated subset of {', '.join(bench.MODES)}")
    grid = {name: [v.strip() for v in value.split(",") if v.strip()] for name, value in _pairs(matrix, "--matrix").items()}
    settings = bench.BenchSettings(
        size=size, song_seconds=song_seconds, ranks=tuple(ranks) or (64,), precision=precision, steps=steps,
        warmup=warmup, modes=chosen, songs=songs, device=device, num_workers=num_workers,
        train=_pairs(sets, "--set"), matrix=grid, workdir=workdir, allow_cpu_full=allow_cpu_full,
        threads=threads, command=bench.command_line())
    record = bench.run_benchmark(settings, echo=click.echo)
    click.echo(bench.table_text(record))
    results = bench.load_results(js)  # read now: a long run must not drop what others wrote meanwhile
    results["runs"][record["key"]] = record
    bench.write_reports(results, md, js)
    click.echo(f"wrote {md} and {js}")
