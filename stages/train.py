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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from pipeline.errors import CacheError, ConfigError, LockHeldError
from pipeline.fileio import disk_full_guard, write_json_atomic, write_text_atomic
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
@click.option("--dvc-dir", type=click.Path(file_okay=False), default=None,
              help="Also write train.json (final/best loss, speed, peak memory, checkpoints) and train_steps.json "
                   "(per-step losses, lr) here for `dvc metrics/plots/exp show` (dvc.yaml's train stage sets it).")
@_config_options
def cli(presets, sweep, params_path, resume, cache_dir, dvc_dir, **options):
    """Train a LoRA on the cached features (or --live) and write checkpoints, metrics.jsonl, loss.png."""
    from pipeline.config import load_params

    project = load_params(params_path)
    options = {k: v for k, v in options.items() if v is not None}
    configs = plan_runs(project.train, options, presets, sweep)
    if resume and len(configs) > 1 and resume not in ("latest", "auto"):
        raise ConfigError("--resume PATH needs a single run; with several presets/sweep runs use --resume latest.")
    if dvc_dir and len(configs) > 1:
        raise ConfigError("--dvc-dir describes one run; train several presets/sweep runs without it, or queue "
                          "them as DVC experiments (dvc exp run --queue -S train.preset=...).")
    from pipeline import distributed

    try:
        warnings.showwarning = _one_line_warning
        for i, config in enumerate(configs, 1):
            if len(configs) > 1:
                click.echo(f"=== run {i}/{len(configs)}: {config.run_name} (preset {config.preset}) ===")
            summary = run_one(config, project, resume=resume, cache_dir=cache_dir, dvc_dir=dvc_dir)
            from pipeline.train import FINISHED

            if summary["stopped"] not in FINISHED:
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


def run_one(config: TrainConfig, project, resume: str | None = None, cache_dir: str | None = None,
            dvc_dir: str | None = None) -> dict:
    """Train one config: batch source + transformer + train(); returns the summary.

    Nothing in the run folder moves or is written before (1) the run lock is ours (another live
    training of this experiment is refused, naming its pid) and (2) everything that can fail at the
    start has been checked and loaded: settings, device, model files, LoRA targets and rank, the
    cache, the resume checkpoint. A run that then fails, or is stopped at once (a second Ctrl-C),
    before its first checkpoint puts the previous run back in place. With ``dvc_dir`` a completed
    run also writes DVC's metrics and plots files there (pipeline.metrics.write_dvc_files).
    """
    import torch

    from pipeline import distributed
    from pipeline.train import FINISHED, load_transformer_for_training, train
    from pipeline.train_guard import explain_failures, preflight
    from pipeline.train_state import clean_leftovers, resolve_resume

    device = distributed.resolve_device(config.device)  # `cuda` without a GPU: one line
    rank = distributed.init(device)
    run_dir = Path(project.paths.exps) / config.run_name
    with hold_run_lock(run_dir, rank, device) as lock:
        if lock is not None:
            if lock.took_over:
                click.echo(f"note: {lock.took_over_line}.", err=True)
            for note in clean_leftovers(run_dir):
                click.echo(f"note: {run_dir.name}: {note}", err=True)
        distributed.barrier()  # leftovers are cleared before any rank reads the folder
        transformer_dir = project.models.paths().require("ace_step_transformer")
        preflight(config, transformer_dir, device)
        stamp = data_stamp(config, project, cache_dir)
        if resume == "auto":
            resume = "latest" if can_continue(run_dir, config, stamp) else None
        if resume:
            resolve_resume(run_dir, resume)  # "no checkpoint to resume" before anything loads
        # before the run folder is touched: a bad val_songs or cache must leave the previous run where it is
        batches, validation = make_data(config, project, transformer_dir, cache_dir, device, rank)
        with explain_failures(config, run_dir, "loading the transformer with its LoRA"):
            transformer = load_transformer_for_training(transformer_dir, config, device)
        distributed.barrier()  # every rank has loaded everything before the folder may move
        previous = set_aside_previous(run_dir) if not resume and rank.is_main else None
        distributed.barrier()  # the other ranks must not see the old folder
        try:
            if rank.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                with disk_full_guard(run_dir / DATA_STAMP):
                    write_text_atomic(run_dir / DATA_STAMP, stamp + "\n")
                launched = _workspace(project) / "configs" / "lora_config.json"
                with disk_full_guard(launched):
                    write_json_atomic(launched, config.to_dict(), sort_keys=True)
                click.echo(f"experiment {config.run_name}: preset {config.preset}, r={config.rank}, "
                           f"alpha={config.alpha}, lr={config.learning_rate}, {config.max_steps} steps, "
                           f"{config.precision} on {device} → {run_dir}")
            preview = make_preview(config, project, run_dir) if config.plot_every and rank.is_main else None
            with explain_failures(config, run_dir, "training"):
                summary = train(config, transformer, batches, run_dir, preview=preview, resume=resume,
                                validation=validation)
            if previous is not None and summary["checkpoint"] is None:
                put_back_previous(run_dir, previous)  # a second Ctrl-C returns before any checkpoint
        except BaseException:
            if previous is not None:
                put_back_previous(run_dir, previous)
            raise
        finally:
            del transformer, batches, validation
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if rank.is_main and summary["stopped"] in FINISHED:
        speed = f", {summary['sec_per_step']:.3f} s/step" if summary["sec_per_step"] else ""
        click.echo(f"done: {summary['step']} steps, last loss {summary['last_loss']}{speed}; "
                   f"LoRA in {summary['checkpoint']}")
        if summary["best_step"] is not None:
            cost = f"; {summary['val_seconds']:.2f} s per validation" if summary["val_seconds"] is not None else ""
            click.echo(f"best: val_loss {summary['best_val_loss']:.5f} at step {summary['best_step']} → "
                       f"{summary['best_checkpoint']} (named in best.json{cost})")
        if dvc_dir:
            from pipeline.metrics import read_metrics, write_dvc_files

            paths = write_dvc_files(dvc_dir, summary, read_metrics(run_dir / "metrics.jsonl"),
                                    **measured_resources(config, summary, device, rank.world_size))
            click.echo(f"DVC metrics: {paths[0]}, plots: {paths[1]}")
    return summary


def measured_resources(config: TrainConfig, summary: dict, device, world_size: int = 1) -> dict:
    """samples/s over the steady steps and this process's peak memory (RSS; GPU allocations on CUDA)."""
    import torch

    from pipeline.memory import host_memory

    samples = config.batch_size * config.grad_accumulation * world_size
    out = {"samples_per_s": samples / summary["sec_per_step"] if summary.get("sec_per_step") else None,
           "peak_rss_mb": round(host_memory().get("peak_rss_mb", 0.0), 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


@contextmanager
def hold_run_lock(run_dir: Path, rank, device):
    """The run folder's lock (pipeline.locks), held by rank 0 for the whole run (None on the other
    ranks). When rank 0 cannot have it every rank stops with one line, not at the next collective."""
    from pipeline import distributed
    from pipeline.locks import run_lock

    lock, refused = (run_lock(run_dir) if rank.is_main else None), None
    if lock is not None:
        try:
            lock.acquire()
        except LockHeldError as exc:
            refused = exc
    if distributed.any_rank(refused is not None, device):
        raise refused or LockHeldError(f"rank 0 could not lock {run_dir}: another training uses that experiment.")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


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
        rows = []  # make_data reports a broken cache properly
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
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    previous = _beside(run_dir, "previous")
    run_dir.replace(previous)
    click.echo(f"note: a new run of '{run_dir.name}': the previous one moved to {previous} "
               "(use --resume latest to continue a run instead).")
    return previous


def put_back_previous(run_dir: Path, previous: Path) -> None:
    """A new run that stopped before its first checkpoint gives the experiment name back to the run
    it had set aside (so `--resume latest` continues that one); the failed start's folder is kept
    beside it as ``<experiment>.failed-<time>`` (its log and metrics say what went wrong)."""
    from pipeline.train_state import latest_checkpoint

    if latest_checkpoint(run_dir) is not None or not previous.is_dir():
        return
    failed = None
    if run_dir.exists():
        failed = _beside(run_dir, "failed")
        run_dir.replace(failed)
    previous.replace(run_dir)
    kept = f"; this start's files are in {failed}" if failed else ""
    click.echo(f"note: the run stopped before its first checkpoint: the previous run is back in {run_dir}{kept}.",
               err=True)


def _beside(run_dir: Path, what: str) -> Path:
    """A free name beside the run folder: ``<experiment>.<what>-<time>``, then ``~2``, ``~3``, ..."""
    import time

    name = f"{run_dir.name}.{what}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = run_dir.with_name(name), 1
    while path.exists():
        n += 1
        path = run_dir.with_name(f"{name}~{n}")
    return path


def make_data(config: TrainConfig, project, transformer_dir: Path, cache_dir: str | None, device, rank):
    """(training batches, validation set): the cache loader (fingerprints checked) or, with --live,
    the live source, over the songs ``val_songs`` does not hold out; the fixed validation set (rank 0
    only; None when validation is off) from the held-out songs, else from training songs."""
    from pipeline.validation import build_validation_set, split_songs

    speaker_dim = _transformer_config(transformer_dir).get("speaker_embedding_dim", 512)
    if config.live:
        from pipeline.dataset import read_manifest
        from pipeline.live import make_live_source

        songs = {s.id: s for s in read_manifest(project.paths.manifest)}
        split = split_songs(songs, config.val_songs, config.val_max_songs,
                            {k: s.audio_sha256 for k, s in songs.items()})
        batches = make_live_source(project=project, config=config, speaker_dim=speaker_dim, keys=split.train)
        read_song = lambda key: batches.features(songs[key])  # noqa: E731
    else:
        from cache.loader import make_loader
        from pipeline.train import loader_settings

        folder = cache_dir or project.paths.features  # a folder or an fsspec URL
        # make_loader runs cache.fingerprint.check_cache with these: a cache made by other encoders is refused
        settings = loader_settings(config, device, speaker_dim, expected_fingerprints=expected_fingerprints(project))
        batches = make_loader(folder, settings)
        split = split_songs(batches.keys, config.val_songs, config.val_max_songs,
                            batches.index.content_hashes("latents"))
        if split.held_out:
            batches = make_loader(folder, settings, keys=split.train)
        read_song = lambda key: batches.index.read_song(key, settings.streams)  # noqa: E731
    validation = None
    if rank.is_main:
        for note in split.warnings:
            click.echo(f"Warning: {note}", err=True)
        validation = build_validation_set(read_song, split, config, speaker_dim)
        if validation is not None:
            every = config.validation_interval
            click.echo(f"validation: {validation.describe()}, "
                       f"{f'every {every} steps and ' if every else ''}at the end")
    return batches, validation


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


__all__ = ["cli", "plan_runs", "read_sweep", "run_one", "make_data", "set_aside_previous", "put_back_previous",
           "expected_fingerprints"]
