"""`aceturbo demo`: the whole pipeline on built-in demo songs and a tiny random-weight checkpoint.

What it does, in order: writes a few synthetic song triplets into the data folder (only when it
holds no audio yet), builds the tiny RANDOM-weight checkpoint the demo params point at, tracks the
data folder with `dvc add` (README "Experiments": dataset versions, queued experiments, remotes),
runs `dvc repro` (ingest → decode → encode × 4 → train), then generates a short sample with the
trained LoRA. It is for trying the pipeline; its audio is noise.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.errors import AceTurboError

DEMO_ROOT = Path("workspace/checkpoints/demo")


def _dvc(*args: str) -> None:
    """Run dvc from this environment (its `aceturbo` on PATH, analytics off, no network)."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    result = subprocess.run([sys.executable, "-m", "dvc", *args], env=env)
    if result.returncode != 0:
        raise AceTurboError(f"`dvc {' '.join(args)}` failed (exit {result.returncode}); see its output above")


def track_data(data: Path) -> None:
    """`dvc add` the data folder once (DATA.dvc beside it), so dataset versions are git commits,
    `dvc checkout` restores any of them and queued experiments find the songs in their copy of the
    repository. `dvc repro` keeps DATA.dvc up to date after later edits."""
    pointer = data.with_name(data.name + ".dvc")
    if pointer.exists():
        return
    if data.resolve().is_relative_to(Path.cwd().resolve()):
        _dvc("add", "-q", str(data))
        click.echo(f"DVC tracks {data} ({pointer}): commit it with git to version the dataset")
    else:
        click.echo(f"note: {data} is outside this repository, so DVC does not version it")


@click.command("demo")
@click.option("--params", "params_file", default="params.yaml", show_default=True, help="Settings file.")
@click.option("--songs", default=4, show_default=True, help="Demo songs to write when the data folder is empty.")
@click.option("--seconds", default=8.0, show_default=True, help="Length of each demo song.")
@click.option("--no-sample", is_flag=True, help="Skip generating a sample with the trained LoRA.")
def cli(params_file: str, songs: int, seconds: float, no_sample: bool):
    """Run the whole pipeline on demo songs with a tiny RANDOM-weight checkpoint (minutes, on a CPU)."""
    from pipeline.audio import AUDIO_EXTENSIONS
    from pipeline.tiny.demo import build_demo_checkpoint, demo_models
    from pipeline.tiny.songs import make_demo_songs

    project = load_params(params_file)
    data = Path(project.paths.data)
    if not any(p.suffix.lower() in AUDIO_EXTENSIONS for p in data.rglob("*") if p.is_file()):
        make_demo_songs(data, n=songs, seconds=seconds)
        click.echo(f"Wrote {songs} demo songs into {data}")
    lyrics = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(data.rglob("*_lyrics.txt"))]
    demo = demo_models(DEMO_ROOT)
    if Path(project.models.acestep).resolve() == Path(demo.acestep).resolve():
        build_demo_checkpoint(DEMO_ROOT, lyrics)
        click.echo(f"Tiny RANDOM-weight checkpoint ready in {DEMO_ROOT} (for trying the pipeline only)")
    else:
        click.echo(f"params.yaml points at {project.models.acestep}: using those models, not the demo checkpoint")
    if not Path(".dvc").is_dir():
        _dvc("init", "--no-scm", "-q")
    track_data(data)
    _dvc("repro")
    run_dir = Path(project.paths.exps) / str(project.train.get("experiment", "demo"))
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch=*-step=*_lora"),
                         key=lambda p: int(p.name.split("step=")[1].split("_")[0]))
    if not checkpoints:
        raise AceTurboError(f"training wrote no checkpoint under {run_dir}/checkpoints")
    click.echo(f"LoRA checkpoints: {', '.join(p.name for p in checkpoints)} in {run_dir / 'checkpoints'}")
    click.echo(f"Metrics: {run_dir / 'metrics.jsonl'}   loss graph: {run_dir / 'loss.png'}")
    previews = sorted(run_dir.glob("eval_results/step_*/pred_wav_*.wav"))
    if previews:
        click.echo(f"Preview audio: {', '.join(str(p) for p in previews)}")
    if not no_sample:
        from pipeline.sampling import generate

        # Beside the run, not inside it: the run folder is a DVC output and must stay as training left it.
        out = Path(project.paths.exps).parent / "samples" / f"{run_dir.name}_sample.wav"
        generate(project.models.acestep, prompt="synthwave, female vocals, 120 bpm", lyrics="[verse]\nhello demo",
                 duration=1.0, steps=8, seed=0, lora=checkpoints[-1], out=out, lyric_vocab=project.models.lyric_vocab)
        click.echo(f"Sample with the trained LoRA: {out} (+ {out.with_suffix('.json').name})")
