"""`aceturbo compare`: listen to a run's checkpoints side by side (same prompt, seed and noise).

Thin: find the run and its checkpoints (step numbers, `best`, `latest`), call
pipeline.sampling.compare, print where the page went.
"""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.errors import ConfigError


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{what} '{text}' must be numbers separated by commas, e.g. 0.5,1.0") from None
    if not values:
        raise ConfigError(f"{what} is empty; pass e.g. 0.5,1.0")
    return values


def run_folder(project, run: str) -> Path:
    """The run folder of an experiment name (under params.yaml paths.exps) or of a path."""
    folder = Path(run)
    if not folder.is_dir():
        folder = Path(project.paths.exps) / run
    if not folder.is_dir():
        exps = Path(project.paths.exps)
        runs = sorted(p.name for p in exps.iterdir() if p.is_dir()) if exps.is_dir() else []
        raise ConfigError(f"no run '{run}' in {exps}; runs there: {', '.join(runs) or 'none'} (or pass a run folder).")
    return folder


def plan_columns(run_dir: Path, steps: str):
    """The base model + one column per distinct checkpoint that ``steps`` names (duplicates merged:
    "1000,best" is one column when the best is step 1000)."""
    from pipeline.sampling.compare import Column
    from pipeline.train_state import find_checkpoints, list_checkpoints, parse_checkpoint_name, read_best

    tokens = [t.strip() for t in steps.split(",") if t.strip()] if steps else []
    if not tokens:  # default: every checkpoint the run kept
        tokens = [str(parse_checkpoint_name(p.name)[1]) for p in list_checkpoints(run_dir)] or ["latest"]
    paths = find_checkpoints(run_dir, tokens)
    best = read_best(run_dir)
    columns = [Column("base model")]
    for path in dict.fromkeys(paths):
        step = parse_checkpoint_name(path.name)[1]
        tag = " (best)" if best is not None and best["path"] == path else ""
        columns.append(Column(f"step {step}{tag}", lora=path, step=step))
    return columns


@click.command("compare")
@click.option("--run", "run", required=True, help="Experiment name (a folder under params.yaml paths.exps) or a run folder.")
@click.option("--steps", "steps", default="", metavar="500,1000,best",
              help="Checkpoints to compare: step numbers, 'best' (best.json) and/or 'latest' [default: every checkpoint kept].")
@click.option("--weights", default="1.0", show_default=True, metavar="0.5,1.0",
              help="LoRA weights (multipliers on the trained scale); one clip per checkpoint and weight.")
@click.option("--prompt", required=True, help='Tags / description, e.g. "synthwave, female vocals, 120 bpm".')
@click.option("--lyrics", "lyrics_file", default=None, type=click.Path(dir_okay=False),
              help="Lyrics text file ([verse], [chorus] … sections). Omit for an instrumental.")
@click.option("--seed", default=0, show_default=True, type=int, help="Noise seed, the same for every clip.")
@click.option("--duration", default=30.0, show_default=True, type=float, help="Length of each clip in seconds.")
@click.option("--sampling-steps", default=60, show_default=True, type=int, help="Sampling steps per clip.")
@click.option("--guidance", default=15.0, show_default=True, type=float, help="Guidance scale.")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Output folder [default: <paths.exps>/../compare/<run>/<date-time>_seed<N>/, i.e. "
                   "workspace/exps/compare/...].")
@click.option("--checkpoint", default=None, type=click.Path(),
              help="ACE-Step-v1-3.5B folder [default: params.yaml models.acestep].")
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Project settings (paths.exps, models).")
@click.option("--lyric-vocab", default=None, type=click.Path(dir_okay=False),
              help="VoiceBPE vocab.json [default: as for `aceturbo generate`].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Transformer/text-encoder dtype (auto: bfloat16 on CUDA, float32 on CPU).")
def cli(run, steps, weights, prompt, lyrics_file, seed, duration, sampling_steps, guidance, out, checkpoint,
        params_path, lyric_vocab, device, dtype):
    """Generate one clip per (checkpoint, LoRA weight) plus the base model, all with the same seed and
    noise, into one folder with index.html (players in a grid) and index.json."""
    from pipeline.config import load_params
    from pipeline.sampling import SamplerSettings
    from pipeline.sampling.compare import INDEX_HTML, compare, default_out_dir
    from pipeline.sampling.generation import default_model_paths, read_lyrics_file

    project = load_params(params_path)
    run_dir = run_folder(project, run)
    columns = plan_columns(run_dir, steps)
    weight_list = list(dict.fromkeys(_floats(weights, "--weights")))  # 1,1: one clip (one file name each)
    lyrics = read_lyrics_file(lyrics_file)
    checkpoint, lyric_vocab = default_model_paths(project.models, checkpoint, lyric_vocab)
    out_dir = Path(out) if out else default_out_dir(project.paths.exps, run_dir.name, seed)
    n = 1 + (len(columns) - 1) * len(weight_list)
    click.echo(f"{n} clips: base model + {', '.join(c.label for c in columns[1:])} × weights "
               f"{', '.join(f'{w:g}' for w in weight_list)} (seed {seed}, {duration:g} s)")
    index = compare(checkpoint, columns, weight_list, prompt, lyrics, duration, out_dir, seed=seed,
                    settings=SamplerSettings(steps=sampling_steps, guidance_scale=guidance),
                    device=device, dtype=dtype, lyric_vocab=lyric_vocab, extra={"run": run_dir.name})
    click.echo(f"wrote {n} clips to {out_dir}: open {out_dir / INDEX_HTML} (index: {index})")
