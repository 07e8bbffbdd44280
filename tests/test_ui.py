"""The web UI's logic without a browser (pipeline.ui.actions, stages/ui.py port check).

Each test works in its own tmp_path project (params.yaml + workspace/) with the cwd moved there,
as `aceturbo ui` runs in a project folder. Processes are stand-ins (a sleeping python), never a real
training: the browser test does the real thing.
"""
from __future__ import annotations

import json
import socket
import sys
import time
import zipfile
from pathlib import Path

import pytest

from pipeline.errors import AceTurboError
from pipeline.tiny.songs import make_demo_songs
from pipeline.ui import actions as A

PARAMS = """\
paths:
  data: workspace/data
  cache: workspace/cache
  exps: workspace/exps/logs
train:
  experiment: demo
  max_steps: 20
  save_every: 10
"""


@pytest.fixture
def proj(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS, encoding="utf-8")
    return A.project("params.yaml")


@pytest.fixture
def songs(proj):
    make_demo_songs("workspace/data", n=2, seconds=3.0)
    return proj


# ------------------------------------------------------------------ dataset
def test_song_listing_with_durations_and_problems(songs):
    data = Path("workspace/data")
    (data / "orphan_prompt.txt").write_text("pop\n", encoding="utf-8")  # text without audio
    (data / "old.m4a").write_bytes(b"\0" * 100)  # unsupported format
    (data / "demo_02_slow_morning_lyrics.txt").unlink()  # -> a warning (instrumental)
    view = A.scan_songs(songs)
    by_id = {s.id: s for s in view.songs}
    assert sorted(by_id) == ["demo_01_neon_drive", "demo_02_slow_morning", "old", "orphan"]
    ok = by_id["demo_01_neon_drive"]
    assert ok.status == "ok" and ok.duration == pytest.approx(3.0, abs=0.1)
    assert ok.files == ["demo_01_neon_drive.mp3", "demo_01_neon_drive_prompt.txt", "demo_01_neon_drive_lyrics.txt"]
    assert by_id["demo_02_slow_morning"].status == "1 warning(s)"
    assert "instrumental" in by_id["demo_02_slow_morning"].warnings[0]
    assert by_id["orphan"].problems and "no audio file" in by_id["orphan"].problems[0]
    assert by_id["old"].problems and "unsupported audio format" in by_id["old"].problems[0]
    rows = A.song_rows(view)
    assert rows[0][:3] == ["demo_01_neon_drive", 3.0, "ok"]
    orphan_row = next(r for r in rows if r[0] == "orphan")
    assert "orphan_prompt.txt: no audio file" in orphan_row[4]  # data folder prefix stripped
    assert str(data) not in orphan_row[4]


def test_listing_without_a_data_folder(proj):
    view = A.scan_songs(proj)
    assert view.songs == [] and "does not exist" in view.general[0]


def test_edit_prompt_and_lyrics_in_place(songs):
    sid = "demo_01_neon_drive"
    prompt, lyrics = A.read_song_text(songs, sid)
    assert "synthwave" in prompt and "[verse]" in lyrics
    A.save_song_text(songs, sid, "rock, male vocals", "[chorus]\r\nla la")
    data = Path("workspace/data")
    assert (data / f"{sid}_prompt.txt").read_text(encoding="utf-8") == "rock, male vocals\n"
    assert (data / f"{sid}_lyrics.txt").read_bytes() == b"[chorus]\nla la\n"
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # no temp files left
    # A missing lyrics file is created beside the audio.
    (data / "demo_02_slow_morning_lyrics.txt").unlink()
    A.save_song_text(songs, "demo_02_slow_morning", "ambient", "")
    assert (data / "demo_02_slow_morning_lyrics.txt").read_text(encoding="utf-8") == "\n"
    with pytest.raises(A.UIError, match="no song"):
        A.save_song_text(songs, "../../etc/passwd", "x", "y")


def test_delete_song_removes_its_triplet(songs):
    removed = A.delete_song(songs, "demo_01_neon_drive")
    assert sorted(p.name for p in removed) == ["demo_01_neon_drive.mp3", "demo_01_neon_drive_lyrics.txt",
                                               "demo_01_neon_drive_prompt.txt"]
    assert sorted(p.name for p in Path("workspace/data").iterdir()) == [
        "demo_02_slow_morning.mp3", "demo_02_slow_morning_lyrics.txt", "demo_02_slow_morning_prompt.txt"]
    with pytest.raises(A.UIError):
        A.delete_song(songs, "demo_01_neon_drive")


def test_upload_song_files_and_zip(proj, tmp_path):
    source = tmp_path / "src"
    make_demo_songs(source, n=2, seconds=3.0)
    # One audio file + the two texts typed in.
    sid = A.add_song(proj, source / "demo_01_neon_drive.mp3", "pop, 100 bpm", "[verse]\nhi", name="my song")
    assert sid == "my song"
    data = Path("workspace/data")
    assert (data / "my song_prompt.txt").read_text(encoding="utf-8") == "pop, 100 bpm\n"
    with pytest.raises(A.UIError, match="already in the data folder"):
        A.add_song(proj, source / "demo_01_neon_drive.mp3", "pop", "", name="my song")
    A.add_song(proj, source / "demo_01_neon_drive.mp3", "jazz", "", name="my song", overwrite=True)
    assert (data / "my song_prompt.txt").read_text(encoding="utf-8") == "jazz\n"
    for bad in ("../up", "a/b", ".hidden", "x_prompt"):
        with pytest.raises(A.UIError, match="song name"):
            A.add_song(proj, source / "demo_01_neon_drive.mp3", "pop", "", name=bad)
    with pytest.raises(A.UIError, match="prompt is empty"):
        A.add_song(proj, source / "demo_01_neon_drive.mp3", "  ", "", name="other")
    # Triplet files as uploaded (all or nothing).
    triplet = sorted(source.glob("demo_02_*"))
    notes = tmp_path / "notes.docx"
    notes.write_bytes(b"x")
    with pytest.raises(A.UIError, match="not part of a song triplet: notes.docx"):
        A.add_files(proj, [*triplet, notes])
    assert not (data / "demo_02_slow_morning.mp3").exists()
    assert len(A.add_files(proj, triplet)) == 3
    # A ZIP goes through pipeline.zip_import (same refusals as `aceturbo import-zip`).
    archive = tmp_path / "songs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in source.glob("demo_01_*"):
            zf.write(p, f"album/{p.name}")
    result = A.import_zip_file(proj, archive)
    assert len(result.files) == 3
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape_prompt.txt", "x")
    with pytest.raises(AceTurboError, match="outside the folder"):
        A.import_zip_file(proj, evil)
    assert {s.id for s in A.scan_songs(proj).songs} == {"my song", "demo_02_slow_morning", "demo_01_neon_drive"}  # single top folder dropped


# ------------------------------------------------------------------ jobs
SLEEPER = [sys.executable, "-c",
           "import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: (print('saving checkpoint', flush=True), sys.exit(143)))\n"
           "print('training', flush=True)\n"
           "time.sleep(60)\n"]


def test_only_one_training_at_a_time_and_stop(proj):
    log = A.train_log_path(proj, "demo")
    job = A.start_job(proj, "train", SLEEPER, log, info={"experiment": "demo"})
    try:
        assert A.running_job(proj, "train").pid == job.pid
        with pytest.raises(A.UIError, match=r"a training is already running \(pid"):
            A.start_job(proj, "train", SLEEPER, log)
        with pytest.raises(A.UIError, match="already running"):  # convert shares the cache: refused too
            A.start_convert(proj)
        with pytest.raises(A.UIError, match="already running"):
            A.start_training(proj, "balanced", {})
        # The job file lets another UI process (a restarted UI) find the running training.
        saved = json.loads(A.job_file(proj, "train").read_text())
        assert saved["pid"] == job.pid and saved["info"]["experiment"] == "demo"
        deadline = time.time() + 10
        while "training" not in A.tail(log) and time.time() < deadline:
            time.sleep(0.05)
        assert "running" in A.job_status(A.read_job(proj, "train"), "training")
        assert A.stop_training(proj).startswith("stop requested")
        done = A.wait_job(proj, "train", timeout=10)
        assert done.returncode == 143 and not done.running
        assert "stopped" in A.job_status(done, "training")
        text = A.tail(log)
        assert "saving checkpoint" in text and "=== " in text  # header line with the command
        assert A.stop_training(proj) == "no train is running"
        # Free again: a new job starts.
        again = A.start_job(proj, "train", [sys.executable, "-c", "print('ok')"], log)
        assert A.wait_job(proj, "train", timeout=10).returncode == 0 and again.pid != job.pid
    finally:
        A.stop_job(proj, "train")
        A.wait_job(proj, "train", timeout=10)


@pytest.fixture
def lock_holder():
    """Start a real process that holds the run lock of a folder (as a training does) until the test ends."""
    import subprocess

    started = []

    def start(run_dir: str):
        code = ("import time\nfrom pipeline.locks import run_lock\n"
                f"run_lock({run_dir!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                env={**A.command_env(), "PYTHONPATH": str(Path(A.__file__).resolve().parents[2])})
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_training_started_outside_the_ui_blocks_train_and_convert(proj, lock_holder):
    """A `dvc repro` or terminal training holds its run lock: the one-job rule sees it."""
    other = lock_holder(str(Path("workspace/exps/logs/cli_run").resolve()))
    assert A.outside_trainings(proj)["cli_run"].pid == other.pid
    with pytest.raises(A.UIError, match=rf"experiment 'cli_run' is already running outside this UI \(pid "
                                        rf"{other.pid} on host .*wait for it to finish"):
        A.start_training(proj, "balanced", {})
    with pytest.raises(A.UIError, match="outside this UI"):
        A.start_convert(proj)
    other.kill()
    other.wait()
    assert A.outside_trainings(proj) == {}  # its lock is stale now: free


def test_an_encode_started_outside_the_ui_blocks_train_and_convert(proj):
    """An `aceturbo encode` / dvc encode stage holds its stream lock: the one-job rule sees it too."""
    import subprocess

    code = ("import time\nfrom cache.shards import lock_stream\n"
            "lock_stream('workspace/cache/features', 'text').acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**A.command_env(), "PYTHONPATH": str(Path(A.__file__).resolve().parents[2])})
    try:
        assert other.stdout.readline().strip() == "held"
        assert A.outside_encodes(proj)["text"].pid == other.pid
        with pytest.raises(A.UIError, match=rf"feature stream 'text' is being encoded outside this UI \(pid "
                                            rf"{other.pid} on host .*wait for it to finish"):
            A.start_convert(proj)
        with pytest.raises(A.UIError, match="being encoded outside this UI"):
            A.start_training(proj, "balanced", {})
    finally:
        other.kill()
        other.wait()
    assert A.outside_encodes(proj) == {}  # killed: its lock (record still in the file) is free


def test_two_starts_at_once_one_is_refused_in_one_line(proj):
    """The UI's start lock is an OwnerLock: a start while another is under way gets one line (no
    traceback, no stale file to trip over afterwards)."""
    from pipeline.locks import OwnerLock

    with OwnerLock(A.ui_dir(proj) / "start.lock", "a test"), \
            pytest.raises(A.UIError, match="another job is being started right now; try again in a moment"):
        A.start_job(proj, "train", [sys.executable, "-c", "print('ok')"], Path("workspace/t.log"))
    job = A.start_job(proj, "train", [sys.executable, "-c", "print('ok')"], Path("workspace/t.log"))
    assert A.wait_job(proj, "train", timeout=10).returncode == 0 and job.pid
    assert not (A.ui_dir(proj) / "start.lock").exists()


def test_the_cli_refuses_the_experiment_the_ui_is_training(proj, capsys):
    """The UI's training job holds the run lock (stand-in: a process taking it as `aceturbo train`
    does): a `dvc repro` / terminal training of that experiment is refused, naming the job's pid."""
    from pipeline.locks import held_run_locks
    from stages.cli import main

    code = ("import time\nfrom pipeline.locks import run_lock\nrun_lock('workspace/exps/logs/demo').acquire()\n"
            "print('training', flush=True)\ntime.sleep(60)\n")
    job = A.start_job(proj, "train", [sys.executable, "-c", code], A.train_log_path(proj, "demo"),
                      info={"experiment": "demo"})
    try:
        deadline = time.time() + 60
        while "demo" not in held_run_locks(proj.paths.exps) and time.time() < deadline:
            time.sleep(0.05)
        assert A.outside_trainings(proj) == {}  # the UI's own job is not "outside"
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--params", "params.yaml", "--device", "cpu"])
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert f"Error: experiment 'demo' ({Path('workspace/exps/logs/demo')}) is in use by pid {job.pid} on host" in err
        assert not Path("workspace/exps/logs/demo").exists()  # nothing was created or moved
    finally:
        A.stop_job(proj, "train")
        A.wait_job(proj, "train", timeout=10)


def test_a_finished_job_of_another_process_is_not_running(proj):
    gone = A.Job(kind="train", pid=2**22 + 12345, argv=["x"], log="x.log", started=time.time())
    A._write_job(proj, gone)
    assert A.running_job(proj, "train") is None
    assert "another UI process" in A.job_status(A.read_job(proj, "train"), "training")


def _fake_checkpoint(run: Path, epoch: int, step: int) -> Path:
    folder = run / "checkpoints" / f"epoch={epoch}-step={step}_lora"
    folder.mkdir(parents=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (folder / "training_state.pt").write_bytes(b"x")
    return folder


def test_train_command_has_only_changed_settings(proj):
    values = {k: v for k, v in A.preset_values(proj, "conservative").items() if k != "preset"}
    assert values["rank"] == 16 and values["max_steps"] == 20  # preset, then params.yaml
    argv, config = A.train_argv(proj, "conservative", values)
    assert argv[:3] == [sys.executable, "-m", "stages"]
    assert argv[3:] == ["train", "--preset", "conservative", "--experiment", "demo"]
    changed = dict(values, max_steps="6", rslora=False, betas="0.9, 0.99", learning_rate=5e-5,
                   target_modules="to_q, to_k", experiment="mine")
    argv, config = A.train_argv(proj, "conservative", changed, resume=True)
    assert A.shown_command(argv) == ("aceturbo train --preset conservative --experiment mine --no-rslora "
                                     "--target-modules to_q,to_k --learning-rate 5e-05 --betas 0.9 0.99 "
                                     "--max-steps 6 --resume latest")
    assert config.max_steps == 6 and config.run_name == "mine"
    with pytest.raises(AceTurboError, match="rank"):
        A.train_argv(proj, "balanced", dict(values, rank=0))


def test_start_training_guards_existing_and_missing_checkpoints(proj, monkeypatch):
    run = Path("workspace/exps/logs/demo")
    with pytest.raises(A.UIError, match="nothing to resume"):
        A.start_training(proj, "balanced", {}, resume=True)
    # A fresh start over an existing run is the CLI's business (it moves the old folder aside); the
    # UI says so. A stand-in command keeps this fast.
    _fake_checkpoint(run, 1, 10)
    monkeypatch.setattr(A, "aceturbo", lambda *args: [sys.executable, "-c", "print('fake train')"])
    job = A.start_training(proj, "balanced", {"max_steps": 7})
    assert "moves it to demo.previous-<time>" in job.info["note"] and job.info["max_steps"] == 7
    assert job.log == str(A.train_log_path(proj, "demo"))
    assert A.wait_job(proj, "train", timeout=10).returncode == 0
    assert "fake train" in A.tail(job.log)


def test_convert_command_and_progress():
    argv = A.convert_argv()
    assert argv[:2] == ["/bin/sh", "-c"]
    assert "-m stages ingest &&" in argv[2] and argv[2].endswith(
        "-m dvc repro encode-latents encode-mert encode-mhubert encode-text")
    log = ("4 songs (0.5 min) -> workspace/cache/manifest.jsonl (written)\n"
           "Running stage 'ingest':\n> aceturbo ingest\nUpdating lock file 'dvc.lock'\n"
           "Running stage 'decode':\n")
    assert A.convert_progress(log) == (pytest.approx(1 / 6), "decode")
    log += ("Updating lock file 'dvc.lock'\nStage 'encode-latents' didn't change, skipping\n"
            "Running stage 'encode-mert':\n")
    frac, current = A.convert_progress(log)
    assert current == "encode-mert" and frac == pytest.approx(3 / 6)


def test_clean_log_keeps_the_last_progress_state(tmp_path):
    text = "start\ntrain:  10%|#  | 1/10\rtrain:  20%|## | 2/10\r\nend\x1b[0m"
    assert A.clean_log(text) == "start\ntrain:  20%|## | 2/10\nend"
    log = tmp_path / "x.log"
    log.write_text("\n".join(f"line {i}" for i in range(100)))
    assert A.tail(log, 3) == "line 97\nline 98\nline 99"
    assert A.tail(tmp_path / "missing.log") == ""


# ------------------------------------------------------------------ run folders
def _write_metrics(run: Path, steps: int) -> None:
    run.mkdir(parents=True, exist_ok=True)
    with (run / "metrics.jsonl").open("w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "epoch": 0, "loss": 3.0 - s / 10, "denoise_loss": 2.0, "mert_loss": 0.5,
                                "mhubert_loss": 0.5, "lr": 1e-4, "grad_norm": 1.0, "sec_per_step": 0.5,
                                "samples_per_s": 2.0}) + "\n")
        f.write('{"step": 99, "loss"')  # a torn last line (crash mid-write) is skipped


def test_metrics_for_the_graph_and_eta(proj):
    run = Path("workspace/exps/logs/demo")
    _write_metrics(run, 4)
    (run / "train_config.json").write_text(json.dumps({"max_steps": 20}))
    records = A.run_metrics(run)
    table = A.loss_table(records)
    assert list(table.columns) == ["step", "value", "series"] and len(table) == 20
    assert set(table["series"]) == {"loss", "denoise_loss", "mert_loss", "mhubert_loss", A.SMOOTHED_LOSS}
    assert table[table.series == "loss"]["value"].tolist() == pytest.approx([2.9, 2.8, 2.7, 2.6])
    smoothed = table[table.series == A.SMOOTHED_LOSS]["value"].tolist()
    assert smoothed[0] == pytest.approx(2.9) and 2.6 < smoothed[-1] < 2.9  # the EMA of loss.png
    info = A.speed(records, A.run_max_steps(run))
    assert info == {"step": 4, "sec_per_step": 0.5, "eta_s": 8.0, "max_steps": 20}
    assert A.format_speed(info) == "step 4 / 20 · 0.500 s/step · ETA 8s"
    assert A.format_seconds(3725) == "1h02m05s"
    assert A.loss_table([]).empty and A.format_speed(A.speed([], None)) == "No steps yet."


def test_checkpoint_listing_with_losses_and_previews(proj):
    run = Path("workspace/exps/logs/demo")
    _write_metrics(run, 4)
    _fake_checkpoint(run, 0, 2)
    _fake_checkpoint(run, 1, 4)
    (run / "checkpoints" / "epoch=1-step=6_lora").mkdir()  # incomplete: not listed
    preview = run / "eval_results" / "step_4"
    preview.mkdir(parents=True)
    (preview / "demo_01.wav").write_bytes(b"RIFF")
    (preview / "demo_01.txt").write_text("prompt")
    other = Path("workspace/exps/logs/other")
    _fake_checkpoint(other, 0, 1)
    assert set(A.list_runs(proj)) == {"demo", "other"}
    assert A.checkpoint_rows(run) == [["epoch=0-step=2_lora", 2, 0, 2.8, None, ""],
                                      ["epoch=1-step=4_lora", 4, 1, 2.6, None, ""]]
    assert A.preview_files(run) == [("step 4 / demo_01.wav", str(preview / "demo_01.wav"))]
    lora = A.lora_download(proj, "demo", "epoch=1-step=4_lora", A.DOWNLOAD_KINDS[0])
    assert lora.name == "pytorch_lora_weights.safetensors" and lora.parent.name == "epoch=1-step=4_lora"
    with pytest.raises(A.UIError, match="no checkpoint"):
        A.checkpoint_path(proj, "demo", "epoch=1-step=6_lora")
    with pytest.raises(A.UIError, match="bad run name"):
        A.run_dir(proj, "../x")


# ------------------------------------------------------------------ the command
def test_port_in_use_is_a_clear_error():
    from stages.ui import check_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(AceTurboError, match=rf"port {port} on 127.0.0.1 is already in use.*--port {port + 1}"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again


def test_ui_command_refuses_a_busy_port_before_importing_gradio(proj):
    import subprocess

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "stages", "ui", "--port", str(port), "--host", "localhost"],
                              capture_output=True, text=True, timeout=60, cwd=Path.cwd(),
                              env={**A.command_env(), "PYTHONPATH": str(Path(A.__file__).resolve().parents[2])})
    assert done.returncode == 1
    assert "Warning: listening on localhost" in done.stderr
    assert f"Error: port {port} on localhost is already in use" in done.stderr


def test_app_builds(proj):
    from pipeline.ui.app import build_app

    app = build_app("params.yaml")
    labels = {getattr(block, "label", None) for block in app.blocks.values()}
    assert {"Songs in the data folder", "Training log (workspace/ui/logs/<experiment>.log)", "Checkpoints"} <= labels
    helps = {block.label: block.info for block in app.blocks.values() if getattr(block, "info", None)}
    assert helps["max_steps"].startswith("Optimizer steps")  # every setting carries its one-line help


def test_a_other_params_file_reaches_the_commands_the_ui_starts(proj, tmp_path):
    (tmp_path / "other.yaml").write_text(PARAMS, encoding="utf-8")
    other = A.project("other.yaml")
    values = {k: v for k, v in A.preset_values(other, "balanced").items() if k != "preset"}
    argv, _ = A.train_argv(other, "balanced", values)
    assert argv[3:6] == ["train", "--params", "other.yaml"]
    assert "--params" not in A.train_argv(proj, "balanced", values)[0]
    with pytest.raises(A.UIError, match="dvc repro"):  # DVC always reads params.yaml
        A.start_convert(other)


# ------------------------------------------------------------------ uploads
def test_upload_limit_and_gradio_temp_files_are_deleted_once_added(proj, tmp_path, monkeypatch):
    import os
    import shutil

    uploads = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    source = tmp_path / "src"
    make_demo_songs(source, n=2, seconds=3.0)

    def uploaded(path: Path, tag: str) -> Path:  # where gradio keeps an upload: <folder>/<hash>/<name>
        (uploads / tag).mkdir(parents=True)
        return Path(shutil.copy(path, uploads / tag / path.name))

    audio = uploaded(source / "demo_01_neon_drive.mp3", "a1")
    Path("params.yaml").write_text(PARAMS + "ui:\n  max_upload_mb: 0.001\n", encoding="utf-8")
    small = A.project("params.yaml")
    with pytest.raises(A.UIError, match=r"demo_01_neon_drive\.mp3 is 0\.\d+ MB, over the upload limit of "
                                        r"0\.001 MB \(params\.yaml → ui → max_upload_mb\)"):
        A.add_song(small, audio, "pop", "")
    assert not Path("workspace/data").exists() and audio.is_file()  # nothing written; kept for a retry
    with pytest.raises(A.UIError, match="over the upload limit"):
        A.add_files(small, [audio])
    assert A.add_song(proj, audio, "pop", "") == "demo_01_neon_drive"  # default limit: 500 MB
    assert not audio.exists() and not (uploads / "a1").exists()  # gradio's copy is gone
    trip = [uploaded(p, f"t{i}") for i, p in enumerate(sorted(source.glob("demo_02_*")))]
    A.add_files(proj, trip)
    assert not any(p.exists() for p in trip)
    mine = source / "demo_01_neon_drive.mp3"  # a file given by path, outside the upload folder: kept
    A.add_song(proj, mine, "pop", "", name="again")
    assert mine.is_file()
    # uploads never added (a closed tab, a crashed UI) go after a few hours, younger ones stay
    old, young = uploads / "old", uploads / "young"
    old.mkdir()
    young.mkdir()
    os.utime(old, (time.time() - A.UPLOAD_MAX_AGE_S - 60,) * 2)
    assert A.clean_stale_uploads(uploads) == [old] and young.is_dir()
    with pytest.raises(AceTurboError, match="max_upload_mb must be a number of MB > 0"):
        Path("params.yaml").write_text(PARAMS + "ui:\n  max_upload_mb: 0\n", encoding="utf-8")
        A.project("params.yaml")
