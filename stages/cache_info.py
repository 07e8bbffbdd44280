"""`aceturbo cache info`: what the feature cache holds and what it costs on disk."""
from __future__ import annotations

import json

import click

from pipeline.errors import CacheError

# cache.* pulls in torch and zarr: imported inside the commands so `aceturbo --help` stays fast.


def cache_summary(folder) -> dict:
    """measure_cache plus, per stream: shards, songs, fingerprints, schema versions, float storage."""
    from cache.bench import measure_cache
    from cache.schema import SCHEMA_VERSION
    from cache.shards import CacheIndex

    index = CacheIndex.open(folder)
    if not index.all_shards():
        raise CacheError(f"feature cache {index.url} is empty or missing: run `dvc repro` (or `aceturbo encode`)")
    sizes = measure_cache(folder)
    streams = {}
    for stream in index.streams():
        shards = index.shards[stream]
        streams[stream] = {
            "shards": len(shards),
            "songs": len(index.live(stream)),
            "bytes": sizes["bytes"][stream],
            "mb_per_minute": sizes["mb_per_minute"][stream],
            "fingerprints": sorted({s.fingerprint for s in shards}),
            "schema_versions": sorted({s.schema_version for s in shards}),
            "float_storage": sorted({s.float_storage for s in shards}),
        }
    return {"cache": index.url, "schema_version": SCHEMA_VERSION, "songs": sizes["songs"],
            "minutes": sizes["minutes"], "bytes": sizes["bytes_total"],
            "mb_per_minute": sizes["mb_per_minute"]["total"], "streams": streams}


def format_summary(summary: dict) -> str:
    lines = [f"Feature cache {summary['cache']}  (this code reads schema {summary['schema_version']})",
             f"{summary['songs']} songs, {summary['minutes']:.1f} minutes of audio", ""]
    header = f"{'stream':<9} {'shards':>6} {'songs':>6} {'MB':>10} {'MB/min':>8}  {'storage':<9} {'schema':<6} fingerprint"
    lines += [header, "-" * len(header)]
    for name, s in summary["streams"].items():
        prints = ", ".join(f[:12] for f in s["fingerprints"])
        if len(s["fingerprints"]) > 1:
            prints += "  (mixed: rerun `dvc repro`)"
        lines.append(f"{name:<9} {s['shards']:>6} {s['songs']:>6} {s['bytes'] / 1e6:>10.1f} {s['mb_per_minute']:>8.2f}  "
                     f"{','.join(s['float_storage']):<9} {','.join(map(str, s['schema_versions'])):<6} {prints}")
    lines.append(f"{'total':<9} {'':>6} {summary['songs']:>6} {summary['bytes'] / 1e6:>10.1f} "
                 f"{summary['mb_per_minute']:>8.2f}")
    return "\n".join(lines)


@click.group(name="cache")
def cli():
    """Inspect the feature cache (Zarr shards written by the encode stages)."""


@cli.command("info")
@click.option("--cache", "cache_dir", default=None,
              help="Cache folder or fsspec URL  [default: params.yaml paths → the feature cache].")
@click.option("--params", "params_file", default="params.yaml", show_default=True, help="Settings file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(cache_dir: str, params_file: str, as_json: bool):
    """Songs, minutes of audio, bytes and MB per minute per stream, fingerprints, schema version."""
    from pipeline.config import load_params

    summary = cache_summary(cache_dir or load_params(params_file).paths.features)
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


@cli.command("fingerprints")
@click.option("--params", "params_file", default="params.yaml", show_default=True, help="Settings file.")
def fingerprints(params_file: str):
    """Write each stream's encoder fingerprint to <paths.cache>/fingerprints/<stream>.txt.

    \b
    The `fingerprints` DVC stage: it runs on every `dvc repro` (cheap: weight files are re-hashed
    only when they changed) and rewrites a file only when its fingerprint changed, so editing an
    encoder's weights in place makes `dvc repro` re-encode exactly that stream (and train again).
    A stream whose encoder weights are not on this machine keeps its recorded fingerprint (a cache
    fetched with `dvc pull` trains without the encoders).
    """
    from pipeline.config import load_params
    from pipeline.encoding import write_fingerprints

    for stream, (value, state) in write_fingerprints(load_params(params_file)).items():
        click.echo(f"{stream:<8} {value[:12]}  {state}")
