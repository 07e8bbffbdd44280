"""`dvc repro` on a copy of the project with the demo models: full run, no-op rerun (leftover temp
stores in the cache are ignored), a prompt edit plus MERT weights edited in place rerun only the
text and mert steps and training, a new song is encoded alone (scripted check for CI).
The `fingerprints` stage runs every time (always_changed) and triggers nothing when nothing changed."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="dvc needs git")


def _project_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not name.startswith(("workspace/", "tests/", "docs/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def _dvc_env() -> dict[str, str]:
    """dvc (and the `aceturbo` its stages call) from this environment, analytics off."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def _repro(cwd: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=cwd, env=_dvc_env(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return re.findall(r"Running stage '([\w-]+)'", result.stdout)


def test_dvc_repro_full_noop_prompt_edit_and_new_song(tmp_path):
    from pipeline.tiny.demo import build_demo_checkpoint
    from pipeline.tiny.songs import make_demo_songs

    project = tmp_path / "project"
    _project_copy(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(max_steps=2, save_every=2, gradient_checkpointing=False)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = project / "workspace" / "data"
    make_demo_songs(data, n=2, seconds=4.0)
    build_demo_checkpoint(project / "workspace/checkpoints/demo",
                          [p.read_text() for p in data.glob("*_lyrics.txt")])
    all_stages = ["fingerprints", "ingest", "decode", "encode-latents", "encode-mert", "encode-mhubert",
                  "encode-text", "train"]

    assert sorted(_repro(project)) == sorted(all_stages)
    run = project / "workspace/exps/logs/demo"
    assert (run / "checkpoints" / "epoch=0-step=2_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "metrics.jsonl").is_file() and (run / "loss.png").is_file()

    mert = project / "workspace/cache/features/mert"
    for leftover in (".tmp-shard-1@elsewhere-0badc0de.zarr", ".trash-shard-00007.zarr-x1"):
        (mert / leftover / "c").mkdir(parents=True)
        (mert / leftover / "c" / "0").write_bytes(b"half")
    assert _repro(project) == ["fingerprints"], "a second dvc repro must do nothing"

    # A prompt edit and the MERT weights edited in place (size and mtime kept), in one repro to keep
    # the test short: text and mert are encoded again (and training), latents and mhubert are not.
    prompt = next(data.glob("*_prompt.txt"))
    prompt.write_text("lofi, piano\n", encoding="utf-8")
    weights = project / "workspace/checkpoints/demo/MERT-tiny/model.safetensors"
    before = weights.stat()
    with open(weights, "r+b") as handle:
        handle.seek(before.st_size - 64)
        tail = handle.read(64)
        handle.seek(before.st_size - 64)
        handle.write(bytes(b ^ 0x01 for b in tail))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert sorted(_repro(project)) == ["encode-mert", "encode-text", "fingerprints", "ingest", "train"]

    make_demo_songs(data / "new", n=1, seconds=4.0, seed=5)
    ran = _repro(project)
    assert sorted(ran) == sorted(all_stages)
    from cache.shards import CacheIndex

    index = CacheIndex.open(project / "workspace/cache/features")
    for stream in ("latents", "mert", "mhubert", "text"):
        assert len(index.keys(stream)) == 3
        # the new song went into a shard of its own: one song encoded, the others untouched (the
        # text stream also holds the re-encoded edited song in its own shard)
        expected = [1, 1, 1] if stream == "text" else [1, 2]
        assert sorted(len(s.songs) for s in index.shards[stream]) == expected
    assert list(project.glob("workspace/exps/logs/demo.previous-*")), "earlier runs are kept"
