"""DVC's experiment tools on a git copy of the project set up by `aceturbo demo` (4 tiny songs, 2 steps):
metrics and plots, queued experiments on one feature cache, dataset versions, a local remote.

One prepared repository is shared by the tests (module fixture); each test leaves it at the trained
v1 commit it found. Every dvc / aceturbo call is a subprocess, as a user would type it.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_dvc_pipeline import _dvc_env, _project_copy

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="dvc experiments need git")

ENCODE_STAGES = ("encode-latents", "encode-mert", "encode-mhubert", "encode-text")
UPSTREAM = ("ingest", "decode", *ENCODE_STAGES)
STREAMS = ("latents", "mert", "mhubert", "text")
QUEUE_TIMEOUT_S = 600


def run(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """`dvc ARGS` (or `git ARGS` when args[0] == "git") in ``cwd``; asserts success unless ok=False."""
    argv = list(args) if args[0] == "git" else [sys.executable, "-m", "dvc", *args]
    result = subprocess.run(argv, cwd=cwd, env=_dvc_env(), capture_output=True, text=True)
    if ok:
        assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def ran_stages(output: str) -> list[str]:
    """The stages that ran, without `fingerprints`: it runs on every repro (always_changed) and only
    rewrites a file whose fingerprint changed; the encode stages it feeds show whether one did."""
    return [s for s in re.findall(r"Running stage '([\w-]+)'", output) if s != "fingerprints"]


def up_to_date(status: str) -> bool:
    """`dvc status` lists nothing but the fingerprints stage (always_changed: it re-checks the
    encoder weights on every repro, see dvc.yaml)."""
    return status.strip() in ("Data and pipelines are up to date.", "fingerprints:\n\talways changed")


def skipped_stages(output: str) -> list[str]:
    return re.findall(r"Stage '([\w-]+)' didn't change, skipping", output)


def cache_rows(project: Path) -> list[tuple]:
    """What the feature cache holds: (stream, song, content hash, fingerprint) of every live song."""
    from cache.shards import CacheIndex

    index = CacheIndex.open(project / "workspace/cache/features")
    return sorted((stream, key, entry.content_hash, info.fingerprint)
                  for stream in index.streams() for key, (info, entry) in index.live(stream).items())


def restore(project: Path, rev: str) -> None:
    """Back to a commit with its data: drop workspace edits, git checkout, dvc checkout."""
    run(project, "git", "checkout", "-q", "-f", rev)
    run(project, "checkout", "-f", "-q")
    assert up_to_date(run(project, "status").stdout)


def test_run_metrics_and_curves_for_dvc(tmp_path):
    from pipeline.metrics import write_dvc_files

    nan = float("nan")
    records = [{"step": 1, "loss": 2.0, "denoise_loss": 1.0, "mert_loss": 0.5, "mhubert_loss": 0.5, "lr": 1e-4},
               {"step": 2, "loss": nan, "denoise_loss": nan, "mert_loss": 0.5, "mhubert_loss": 0.5, "lr": 1e-4,
                "val_loss": 1.5},
               {"step": 3, "loss": 1.0, "denoise_loss": 0.5, "mert_loss": 0.25, "mhubert_loss": 0.25, "lr": 5e-5,
                "val_loss": 1.75}]
    summary = {"run_dir": "r", "step": 3, "stopped": "completed", "checkpoint": "r/checkpoints/epoch=0-step=3_lora",
               "sec_per_step": 0.5, "best_checkpoint": "r/checkpoints/best_lora", "tensorboard": False}
    metrics_path, plots_path = write_dvc_files(tmp_path / "m", summary, records, samples_per_s=2.0, peak_rss_mb=900.0)
    metrics = json.loads(metrics_path.read_text())
    assert metrics["steps"] == 3 and metrics["loss"] == 1.0 and metrics["val_loss"] == 1.75
    assert (metrics["best_loss"], metrics["best_step"]) == (1.5, 2)  # validation loss decides when present
    assert metrics["best_checkpoint"] == "r/checkpoints/best_lora" and metrics["samples_per_s"] == 2.0
    assert not {"run_dir", "stopped", "tensorboard"} & set(metrics)
    rows = json.loads(plots_path.read_text())
    assert [r["step"] for r in rows] == [1, 2, 3] and all(set(r) == set(rows[0]) for r in rows)
    assert rows[0]["val_loss"] is None and rows[1]["loss"] is None and rows[2]["lr"] == 5e-5

    without_val = json.loads(write_dvc_files(tmp_path / "n", summary, records[:1])[0].read_text())
    assert (without_val["best_loss"], without_val["best_step"]) == (2.0, 1)  # smoothed training loss


def test_dvc_dir_takes_one_run(tmp_path):
    from click.testing import CliRunner

    from pipeline.errors import ConfigError
    from stages.train import cli

    result = CliRunner().invoke(cli, ["--params", str(tmp_path / "none.yaml"), "--preset", "conservative",
                                      "--preset", "balanced", "--dvc-dir", str(tmp_path / "m")])
    assert isinstance(result.exception, ConfigError) and "--dvc-dir describes one run" in str(result.exception)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git repository of the project after `aceturbo demo --no-sample` (4 × 3 s songs, 2 training
    steps), everything committed and tagged v1."""
    root = tmp_path_factory.mktemp("dvc_experiments") / "project"
    root.mkdir()
    _project_copy(root)
    for key, value in (("user.name", "test"), ("user.email", "test@example.com"), ("commit.gpgsign", "false")):
        run(root, "git", "config", key, value)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(max_steps=2, save_every=2, plot_every=0, warmup_steps=0, gradient_checkpointing=False)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    demo = subprocess.run([sys.executable, "-m", "stages", "demo", "--songs", "4", "--seconds", "3", "--no-sample"],
                          cwd=root, env=_dvc_env(), capture_output=True, text=True)
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    assert (root / "workspace/data.dvc").is_file(), "the demo tracks its data folder with dvc add"
    run(root, "git", "add", "-A")
    tracked = run(root, "git", "diff", "--cached", "--name-only").stdout.split()
    assert {"dvc.lock", "workspace/data.dvc", "workspace/metrics/train.json",
            "workspace/metrics/train_steps.json"} <= set(tracked)
    assert not [t for t in tracked if t.startswith(("workspace/data/", "workspace/cache/", "workspace/exps/"))]
    run(root, "git", "commit", "-q", "-m", "dataset v1, trained")
    run(root, "git", "tag", "v1")
    return root


def test_metrics_and_plots_are_read_by_dvc(project):
    shown = json.loads(run(project, "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]["workspace/metrics/train.json"]["data"]  # keyed by revision
    assert metrics["steps"] == 2
    for key in ("loss", "loss_smoothed", "best_loss", "best_step", "sec_per_step", "samples_per_s", "peak_rss_mb"):
        assert isinstance(metrics[key], (int, float)), key
    assert metrics["checkpoint"].endswith("checkpoints/epoch=0-step=2_lora")
    assert (project / metrics["checkpoint"] / "pytorch_lora_weights.safetensors").is_file()

    plots = json.loads(run(project, "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    assert set(plots["data"]) == {"Loss", "Loss terms", "Learning rate"}
    steps = json.loads((project / "workspace/metrics/train_steps.json").read_text())
    assert [row["step"] for row in steps] == [1, 2]
    assert all(set(row) == set(steps[0]) for row in steps), "DVC needs the same keys in every row"
    run_dir = project / "workspace/exps/logs/demo"
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "loss.png").is_file()


def test_queued_experiments_train_on_the_same_cache(project, tmp_path):
    for setting, name in (("train.preset=conservative", "cons"), ("train.rank=0", "bad"), ("train.rank=16", "r16")):
        run(project, "exp", "run", "--queue", "-S", setting, "-n", name)
    run(project, "queue", "start", "-j", "1")
    try:
        status = wait_for_queue(project)
    finally:
        stop_workers(project)
    assert re.search(r"\bcons\b.*\bSuccess\b", status) and re.search(r"\br16\b.*\bSuccess\b", status), status
    assert re.search(r"\bbad\b.*\bFailed\b", status), status

    for name in ("cons", "r16"):
        log = run(project, "queue", "logs", name).stdout
        assert sorted(skipped_stages(log)) == sorted(UPSTREAM), log  # no re-ingest, re-decode, re-encode
        assert ran_stages(log) == ["train"], log
    bad = run(project, "queue", "logs", "bad").stdout
    assert "Error: train setting 'rank' must be ≥ 1 (try 16, 64 or 256)." in bad.splitlines(), bad
    assert "Traceback" not in bad

    rows = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(run(project, "exp", "show", "--csv").stdout))}
    assert rows["cons"]["train.preset"] == "conservative" and rows["r16"]["train.rank"] == "16"
    for name in ("cons", "r16"):
        assert rows[name]["steps"] == "2" and float(rows[name]["loss"]) > 0

    html = tmp_path / "plots"
    run(project, "plots", "diff", "cons", "r16", "-o", str(html))
    page = (html / "index.html").read_text()
    assert "cons" in page and "r16" in page and "Learning rate" in page

    # A queued run's LoRA outlives its temporary copy: it is in the DVC cache.
    run(project, "exp", "apply", "r16")
    config = json.loads((project / "workspace/exps/logs/demo/train_config.json").read_text())
    assert config["rank"] == 16
    assert list((project / "workspace/exps/logs/demo/checkpoints").glob("*/pytorch_lora_weights.safetensors"))
    restore(project, "v1")


def wait_for_queue(project: Path) -> str:
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        status = run(project, "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"queued experiments still running after {QUEUE_TIMEOUT_S} s:\n{status}")
        time.sleep(2)


def stop_workers(project: Path) -> None:
    """The queue's worker exits by itself when the queue is empty; make sure it is gone."""
    run(project, "queue", "stop", ok=False)
    for pid_file in (project / ".dvc/tmp/exps/celery").glob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def test_dataset_versions_reencode_only_what_differs(project):
    from pipeline.tiny.songs import make_demo_songs

    data = project / "workspace/data"
    v1_rows = cache_rows(project)
    v1_curves = json.loads(run(project, "git", "show", "v1:workspace/metrics/train_steps.json").stdout)

    # v2: one song added, one prompt edited, one song removed
    make_demo_songs(data / "new", n=1, seconds=3.0, seed=5)
    next(data.glob("demo_02_*_prompt.txt")).write_text("lofi, piano\n", encoding="utf-8")
    for path in data.glob("demo_04_*"):
        path.unlink()
    out = run(project, "repro").stdout
    counts = dict(re.findall(r"^(\w+): (encoded \d+, up to date \d+, removed \d+)$", out, re.M))
    audio = "encoded 1, up to date 3, removed 1"
    assert counts == {"decode": audio, "latents": audio, "mert": audio, "mhubert": audio,
                      "text": "encoded 2, up to date 2, removed 1"}, out
    v2_rows = cache_rows(project)
    kept = {r for r in v1_rows if "demo_04" not in r[1] and not (r[0] == "text" and "demo_02" in r[1])}
    assert kept <= set(v2_rows), "features of songs in both versions are kept as they were"
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-q", "-m", "dataset v2")
    run(project, "git", "tag", "v2")

    # back to v1: dvc checkout restores v1's manifest, audio, features and run from the DVC cache
    restore(project, "v1")
    assert ran_stages(run(project, "repro").stdout) == []
    assert cache_rows(project) == v1_rows
    # training v1 again sees the same batches: the same losses, bit for bit
    assert ran_stages(run(project, "repro", "--force", "--single-item", "train").stdout) == ["train"]
    assert json.loads((project / "workspace/metrics/train_steps.json").read_text()) == v1_curves

    restore(project, "v2")
    assert ran_stages(run(project, "repro").stdout) == []
    assert cache_rows(project) == v2_rows
    restore(project, "v1")


def test_remote_push_then_fresh_clone_pull_trains_without_encoding(project, tmp_path):
    run(project, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    run(project, "git", "commit", "-q", "-am", "a DVC remote")
    assert "pushed" in run(project, "push").stdout

    # an unreachable remote: DVC's error, nothing changed locally
    run(project, "remote", "add", "offline", "http://127.0.0.1:9/store")
    failed = run(project, "push", "-r", "offline", ok=False)
    assert failed.returncode != 0 and "ERROR" in failed.stderr, failed.stderr[-2000:]
    assert up_to_date(run(project, "status").stdout)
    run(project, "remote", "remove", "offline")

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    for key, value in (("user.name", "test"), ("user.email", "test@example.com")):
        run(clone, "git", "config", key, value)
    run(clone, "pull")
    # the models are machine-local (not in git or DVC): a new machine downloads the same checkpoint
    shutil.copytree(project / "workspace/checkpoints", clone / "workspace/checkpoints")
    assert up_to_date(run(clone, "status").stdout)
    out = run(clone, "exp", "run", "-S", "train.rank=16").stdout
    assert sorted(skipped_stages(out)) == sorted(UPSTREAM) and ran_stages(out) == ["train"], out
    assert cache_rows(clone) == cache_rows(project), "same songs, hashes and encoder fingerprints"
    restore(project, "v1")
