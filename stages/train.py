"""`aceturbo train`: LoRA training from the feature cache (or live with --live).

Thin: read params.yaml, build one TrainConfig per run (presets / sweep file), pick the batch source,
load the transformer, call pipeline.train.train. Several --preset values or a sweep file train
several configs one after another on the same cache, each in its own experiment folder.
Multi-GPU: `torchrun --nproc_per_node N -m stages train ...` (only rank 0 writes files).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from pipeline.errors import CacheError, ConfigError
from pipeline.fileio import write_json_atomic, write_text_atomic
from pipeline.train_config import TrainConfig, build_config, fields_help

_KIND_TYPES = {"int": int, "float": float, "str": str}
_OWN_OPTIONS = {"preset"}  # fields with a dedicated option below


def _config_options(func):
    """One --option per TrainConfig field, with the field's help; unset options stay None."""
    for row in reversed(fields_help()):
        name, kind = row["name"], row["type"]
        if name in _OWN_OPTIONS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{row['help']} [default: {_show(row['default'])}]"
        if kind == "bool":
            option = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_text)
        elif kind == "pair":
            option = click.option(flag, name, type=float, nargs=2, default=None, help=help_text)
        elif kind == "list":
            option = click.option(flag, name, type=str, default=None, metavar="A,B,...", help=help_text)
        else:
            option = click.option(flag, name, type=_KIND_TYPES[kind], default=None, help=help_text)
        func = option(func)
        if row.get("cli_off"):  # a former on/off switch: --no-NAME still works (= NAME cli_off)
            func = click.option(f"--no-{name.replace('_', '-')}", name, flag_value=row["cli_off"], default=None,
                                hidden=True)(func)
    return func


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@click.command("train")
@click.option("--preset", "presets", multiple=True,
              help="Preset name (conservative, balanced, aggressive); repeat to train several in sequence.")
@click.option("--config", "sweep", type=click.Path(dir_okay=False),
              help="Sweep YAML: a list of settings mappings (or {runs: [...]}), one training run each.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Project settings; its train: section overrides the preset, options override both.")
@click.option("--resume", default=None, metavar="latest|auto|PATH",
              help="Continue a run: 'latest' checkpoint of the experiment, or a checkpoint folder. 'auto' "
                   "(what dvc.yaml uses) continues when the run has the same settings and data, e.g. after "
                   "Ctrl-C, and otherwise starts a new run (the old folder is set aside).")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="Feature cache folder or fsspec URL [default: params.yaml paths.feature_store, else <paths.cache>/features].")
@_config_options
def cli(presets, sweep, params_path, resume, cache_dir, **options):
    """Train a LoRA on the cached features (or --live) and write checkpoints, metrics.jsonl, loss.png."""
    from pipeline.config import load_params

    project = load_params(params_path)
    options = {k: v for k, v in options.items() if v is not None}
    configs = plan_runs(project.train, options, presets, sweep)
    if resume and len(configs) > 1 and resume not in ("latest", "auto"):
        raise ConfigError("--resume PATH needs a single run; with several presets/sweep runs use --resume latest.")
    from pipeline import distributed

    try:
        warnings.showwarning = _one_line_warning
        for i, config in enumerate(configs, 1):
            if len(configs) > 1:
                click.echo(f"=== run {i}/{len(configs)}: {config.run_name} (preset {config.preset}) ===")
            summary = run_one(config, project, resume=resume, cache_dir=cache_dir)
            if summary["stopped"] != "completed":
                # Interrupted: later runs of a sweep are not started; a non-zero status tells DVC/the UI.
                sys.exit(143 if summary["stopped"] == "SIGTERM" else 130)
    finally:
        warnings.showwarning = _show_warning
        distributed.cleanup()


_show_warning = warnings.showwarning


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"Warning: {message}", err=True)


def plan_runs(params: dict, options: dict, presets: tuple[str, ...] = (), sweep: str | None = None) -> list[TrainConfig]:
    """The configs to train, in order: params.yaml → preset / sweep entry → command-line options."""
    if presets and sweep:
        raise ConfigError("use either --preset (one or more) or --config SWEEP.yaml, not both.")
    if sweep:
        entries = read_sweep(sweep)
    elif len(presets) == 1:
        return [build_config(params=params, overrides=options, preset=presets[0])]
    elif presets:
        entries = [{"preset": p} for p in presets]
    else:
        return [build_config(params=params, overrides=options)]
    base_name = options.get("experiment") or params.get("experiment") or ""
    configs = []
    for i, entry in enumerate(entries, 1):
        config = build_config(params=params, overrides={**entry, **options}, preset=entry.get("preset"))
        if "experiment" not in entry:
            suffix = entry["preset"] if (presets or set(entry) == {"preset"}) else f"run{i}"
            name = f"{base_name}_{suffix}" if base_name else (suffix if presets else f"sweep_{suffix}")
            config = dataclasses.replace(config, experiment=name).validate()
        configs.append(config)
    names = [c.run_name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"several runs would share the experiment folder {', '.join(duplicates)}; "
                          "give each sweep entry its own 'experiment' name.")
    return configs


def read_sweep(path: str | Path) -> list[dict]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' not found.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and "runs" in data:
        data = data["runs"]
    if not isinstance(data, list) or not data or not all(isinstance(e, dict) for e in data):
        raise ConfigError(f"{path} must be a non-empty list of settings mappings (or runs: [...]), e.g. "
                          "[{preset: conservative}, {preset: balanced, learning_rate: 5e-5}].")
    return data


def run_one(config: TrainConfig, project, resume: str | None = None, cache_dir: str | None = None) -> dict:
    """Train one config: batch source + transformer + train(); returns the summary."""
    import torch

    from pipeline import distributed
    from pipeline.train import load_transformer_for_training, train

    device = distributed.resolve_device(config.device)
    rank = distributed.init(device)
    paths = project.models.paths()
    transformer_dir = paths.require("ace_step_transformer")
    run_dir = Path(project.paths.exps) / config.run_name
    stamp = data_stamp(config, project, cache_dir)
    if resume == "auto":
        resume = "latest" if can_continue(run_dir, config, stamp) else None
    distributed.barrier()  # every rank has decided before the folder may move
    if not resume and rank.is_main:
        set_aside_previous(run_dir)
    distributed.barrier()  # the other ranks must not see the old folder
    if rank.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / DATA_STAMP, stamp + "\n")
        write_json_atomic(_workspace(project) / "configs" / "lora_config.json", config.to_dict(), sort_keys=True)
        click.echo(f"experiment {config.run_name}: preset {config.preset}, r={config.rank}, alpha={config.alpha}, "
                   f"lr={config.learning_rate}, {config.max_steps} steps, {config.precision} on {device} "
                   f"→ {run_dir}")
    batches = make_batches(config, project, transformer_dir, cache_dir, device, rank)
    transformer = load_transformer_for_training(transformer_dir, config, device)
    preview = make_preview(config, project, run_dir) if config.plot_every and rank.is_main else None
    try:
        summary = train(config, transformer, batches, run_dir, preview=preview, resume=resume)
    finally:
        del transformer, batches
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if rank.is_main and summary["stopped"] == "completed":
        speed = f", {summary['sec_per_step']:.3f} s/step" if summary["sec_per_step"] else ""
        click.echo(f"done: {summary['step']} steps, last loss {summary['last_loss']}{speed}; "
                   f"LoRA in {summary['checkpoint']}")
    return summary


DATA_STAMP = "data_stamp.txt"


def data_stamp(config: TrainConfig, project, cache_dir: str | None) -> str:
    """What the run trains on, as one hash: every cached song's content hash and encoder
    fingerprint (or, with --live, the manifest's content)."""
    import hashlib

    if config.live:
        manifest = Path(project.paths.manifest)
        return hashlib.sha256(manifest.read_bytes() if manifest.is_file() else b"").hexdigest()
    from cache.shards import CacheIndex

    try:
        index = CacheIndex.open(cache_dir or project.paths.features)
        rows = sorted((stream, key, entry.content_hash, info.fingerprint)
                      for stream in index.streams() for key, (info, entry) in index.live(stream).items())
    except CacheError:
        rows = []  # make_batches reports a broken cache properly
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def can_continue(run_dir: Path, config: TrainConfig, stamp: str) -> bool:
    """True when run_dir holds a checkpoint of a run with these settings on this data."""
    from pipeline.train_state import latest_checkpoint

    try:
        same_config = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8")) == \
            json.loads(config.to_json())
        same_data = (run_dir / DATA_STAMP).read_text(encoding="utf-8").strip() == stamp
    except (OSError, ValueError):
        return False
    return same_config and same_data and latest_checkpoint(run_dir) is not None


def set_aside_previous(run_dir: Path) -> Path | None:
    """A new run (no --resume) of an experiment that already has a folder moves that folder to
    ``<experiment>.previous-<time>``. So `dvc repro` can retrain after a data or settings change
    (dvc.yaml keeps the run folder: persist), and no earlier run is ever lost to a repeated command
    (delete old ones yourself when you no longer want them)."""
    import time

    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    previous = run_dir.with_name(f"{run_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while previous.exists():
        n += 1
        previous = previous.with_name(f"{previous.name.split('~')[0]}~{n}")
    run_dir.replace(previous)
    click.echo(f"note: a new run of '{run_dir.name}': the previous one moved to {previous} "
               "(use --resume latest to continue a run instead).")
    return previous


def make_batches(config: TrainConfig, project, transformer_dir: Path, cache_dir: str | None, device, rank):
    """The cache loader (fingerprints checked), or the live source with --live."""
    speaker_dim = _transformer_config(transformer_dir).get("speaker_embedding_dim", 512)
    if config.live:
        from pipeline.live import make_live_source

        return make_live_source(project=project, config=config, speaker_dim=speaker_dim)
    from cache.loader import LoaderSettings, make_loader

    folder = cache_dir or project.paths.features  # a folder or an fsspec URL
    # make_loader runs cache.fingerprint.check_cache with these: a cache made by other encoders is refused
    settings = LoaderSettings(batch_size=config.batch_size, max_seconds=config.max_seconds, seed=config.seed,
                              num_workers=config.loader_workers(device.type), pin_memory=device.type == "cuda",
                              speaker_dim=speaker_dim,
                              expected_fingerprints=expected_fingerprints(project))
    return make_loader(folder, settings)


def expected_fingerprints(project) -> dict[str, str] | None:
    """The fingerprint each stream must have for the encoders in params.yaml → models; None (only a
    consistency check) when the encoder weights are not on this machine (a copied cache)."""
    from pipeline.errors import CheckpointError
    from pipeline.features import STREAMS, stream_fingerprint

    try:  # the file-digest memo lives in paths.cache, where the encode stages keep theirs
        return {s: stream_fingerprint(s, project.models, project.encode, project.ingest.min_seconds,
                                      cache_dir=Path(project.paths.cache)) for s in STREAMS}
    except CheckpointError as exc:
        click.echo(f"note: cannot verify which encoders made the cache ({exc}); checking it for consistency only.",
                   err=True)
        return None


def make_preview(config: TrainConfig, project, run_dir: Path):
    """The preview callback (it loads the codec only while previewing; train() never imports it)."""
    from pipeline.preview import make_preview_callback

    return make_preview_callback(project.models.acestep, project.models.lyric_vocab, run_dir,
                                 texts=_manifest_texts(project))


def _manifest_texts(project) -> dict[str, tuple[str, str]]:
    """{song id: (prompt, lyrics)} from the manifest, for the preview's text file (empty if none)."""
    from pipeline.dataset import read_manifest

    if not Path(project.paths.manifest).is_file():
        return {}
    return {s.id: (", ".join(s.tags), s.lyrics) for s in read_manifest(project.paths.manifest)}


def _transformer_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _workspace(project) -> Path:
    """workspace/ when paths.exps is the usual <workspace>/exps/logs; else the folder holding paths.exps
    (an absolute /data/runs must not send lora_config.json to /configs)."""
    exps = Path(project.paths.exps)
    if exps.parts[-2:] == ("exps", "logs"):
        return exps.parents[1]
    return exps.parent


__all__ = ["cli", "plan_runs", "read_sweep", "run_one", "make_batches", "set_aside_previous", "expected_fingerprints"]
