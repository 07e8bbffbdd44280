"""`aceturbo compare`: one clip per (checkpoint, weight) + the base model, same seed, one page (tiny checkpoint)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import soundfile as sf
from click.testing import CliRunner

from pipeline.sampling import SamplerSettings, generate
from pipeline.train_state import STATE_FILE, write_best
from test_generate import LYRICS, _tiny_lora, tiny_checkpoint  # noqa: F401 (fixture)
from test_train import one_thread  # noqa: F401 (fixture: tiny ops on 2 busy cores)


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tmp_path_factory):
    """A run folder with checkpoints at steps 1 and 2 (different LoRAs) and best = step 2."""
    folder = tmp_path_factory.mktemp("exps") / "exp"
    for step, r in ((1, 4), (2, 2)):
        ckpt = _tiny_lora(tiny_checkpoint, folder / "checkpoints" / f"epoch=0-step={step}_lora", r=r).parent
        (ckpt / STATE_FILE).write_bytes(b"resume state (not read by compare)")
    write_best(folder, folder / "checkpoints" / "epoch=0-step=2_lora", val_loss=0.5)
    return folder


def _args(tiny_checkpoint, run, out, *more):
    return ["compare", "--run", str(run), "--prompt", "synthwave", "--duration", "0.1", "--sampling-steps", "2",
            "--seed", "3", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--out", str(out), *more]


def test_compare_writes_the_grid_with_the_base_model(tiny_checkpoint, run, tmp_path):
    from stages.cli import group

    lyrics = tmp_path / "lyrics.txt"
    lyrics.write_text(LYRICS, encoding="utf-8")
    out = tmp_path / "grid"
    result = CliRunner().invoke(group, _args(tiny_checkpoint, run, out, "--steps", "1,2,best", "--weights", "0.5,1",
                                              "--lyrics", str(lyrics)))
    assert result.exit_code == 0, result.output
    assert "5 clips: base model + step 1, step 2 (best) × weights 0.5, 1" in result.output  # 2 and best: one column
    index = json.loads((out / "index.json").read_text())
    assert [c["label"] for c in index["columns"]] == ["base model", "step 1", "step 2 (best)"]
    files = [c["file"] for c in index["clips"]]
    assert files == ["base.wav", "step1_w0.5.wav", "step1_w1.wav", "step2_w0.5.wav", "step2_w1.wav"]
    assert index["seed"] == 3 and index["weights"] == [0.5, 1.0] and index["run"] == "exp"
    assert index["clips"][1]["lora"]["weight"] == 0.5 and index["clips"][0]["lora"] is None
    audio = {f: (out / f).read_bytes() for f in files}
    assert len(set(audio.values())) == 5  # every LoRA and weight sounds different from the others
    data, sr = sf.read(out / "base.wav")
    assert sr == 48000 and data.shape[1] == 2
    page = (out / "index.html").read_text()
    assert page.count("<audio") == 5 and "step 2 (best)" in page and "weight 0.5" in page
    # the base column is the base model: the same clip `generate` makes without a LoRA
    plain = generate(tiny_checkpoint, "synthwave", LYRICS, duration=0.1, steps=2, seed=3, out=tmp_path / "plain.wav",
                     settings=SamplerSettings(), device="cpu", progress=False)
    assert plain.read_bytes() == audio["base.wav"]


def test_compare_names_the_checkpoints_that_exist(tiny_checkpoint, run, tmp_path, capsys):
    from stages.cli import main

    with pytest.raises(SystemExit) as exc:
        main(_args(tiny_checkpoint, run, tmp_path / "x", "--steps", "1,700,latest,9"))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1
    assert err == ("Error: run 'exp' has no checkpoint for 700, 9; its checkpoints are at steps 1, 2; best = step 2. "
                   "Pick from those (e.g. --steps 1,2).")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(_args(tiny_checkpoint, run.parent / "nope", tmp_path / "x"))
    assert "no run" in capsys.readouterr().err


def test_compare_writes_beside_the_samples_not_into_the_dvc_cached_run(tiny_checkpoint, run, tmp_path, monkeypatch):
    """Without --out the grid goes to <paths.exps parent>/compare/<run>/<time>_seed<N>/: the run
    folder is the train stage's DVC output (a new file there would make `dvc repro` train again)."""
    import pipeline.sampling.compare as sampling_compare
    from stages.cli import group

    exps = tmp_path / "workspace" / "exps" / "logs"
    params = tmp_path / "params.yaml"
    params.write_text(f"paths:\n  exps: {exps}\n", encoding="utf-8")
    seen = {}

    def fake_compare(checkpoint_root, columns, weights, prompt, lyrics, duration, out_dir, **kwargs):
        seen["out"] = Path(out_dir)
        return Path(out_dir) / "index.json"

    monkeypatch.setattr(sampling_compare, "compare", fake_compare)
    args = _args(tiny_checkpoint, run, "", "--steps", "best", "--params", str(params))
    del args[args.index("--out"):args.index("--out") + 2]
    result = CliRunner().invoke(group, args)
    assert result.exit_code == 0, result.output
    assert seen["out"].parent == tmp_path / "workspace" / "exps" / "compare" / "exp"
    assert seen["out"].name.endswith("_seed3") and str(seen["out"]) in result.output
    assert not (run / "compare").exists()


def test_a_weight_given_twice_is_sampled_once(tiny_checkpoint, run, tmp_path, monkeypatch):
    """--weights 1,0.5,1: every clip of a checkpoint has its own file name, so 1 is sampled once."""
    import pipeline.sampling.compare as sampling_compare
    from stages.cli import group

    seen = {}

    def fake_compare(checkpoint_root, columns, weights, *args, **kwargs):
        seen["weights"] = weights
        return tmp_path / "index.json"

    monkeypatch.setattr(sampling_compare, "compare", fake_compare)
    result = CliRunner().invoke(group, _args(tiny_checkpoint, run, tmp_path / "out", "--steps", "best",
                                             "--weights", "1,0.5,1.0"))
    assert result.exit_code == 0, result.output
    assert seen["weights"] == [1.0, 0.5] and "3 clips: base model + step 2 (best) × weights 1, 0.5" in result.output


def test_ui_compare_runs_the_command_and_reads_the_grid(run, tmp_path, monkeypatch):
    from pipeline.config import ProjectConfig
    from pipeline.ui import actions as A

    monkeypatch.chdir(tmp_path)
    proj = ProjectConfig()
    proj.paths.exps = str(run.parent)
    assert A.compare_choices(run) == ["epoch=0-step=1_lora", "epoch=0-step=2_lora", "best"]
    assert A.checkpoint_rows(run)[1][-1] == "★ best"
    seen = {}

    def fake_run(argv, timeout=None):
        seen["argv"] = argv
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        index = {"weights": [1.0], "columns": [{"label": "base model"}, {"label": "step 2 (best)"}],
                 "clips": [{"file": "base.wav", "column": "base model", "weight": None},
                           {"file": "step2_w1.wav", "column": "step 2 (best)", "weight": 1.0}]}
        (out / "index.json").write_text(json.dumps(index))
        return 0, "wrote 2 clips"

    monkeypatch.setattr(A, "run_command", fake_run)
    index, folder, log = A.compare_checkpoints(proj, "exp", ["epoch=0-step=1_lora", "best"], "0.5, 1", "pop", "la",
                                               duration=5, steps=3, seed=2)
    argv = seen["argv"]
    assert argv[:4] == [sys.executable, "-m", "stages", "compare"]
    assert argv[argv.index("--steps") + 1] == "1,best" and argv[argv.index("--weights") + 1] == "0.5, 1"
    assert folder.parent == run.parent.parent / "compare" / "exp" and "wrote 2 clips" in log
    labels, rows = A.compare_cells(index, folder)
    assert labels == ["base model", "step 2 (best)"]
    assert rows == [(1.0, [str((folder / "base.wav").resolve()), str((folder / "step2_w1.wav").resolve())])]
    with pytest.raises(A.UIError, match="pick at least one"):
        A.compare_checkpoints(proj, "exp", [], "1", "pop", "")
