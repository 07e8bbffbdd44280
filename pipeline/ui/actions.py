"""What the web UI does, as plain functions (no gradio here): tested by tests/test_ui.py.

Every function works on the project in the current directory (params.yaml, workspace/), like the
`aceturbo` commands. Long work (convert, training) runs as a separate process started the way a
user would start it (`aceturbo ingest`, `dvc repro ...`, `aceturbo train ...`), in its own session,
with its output in a log file; a small JSON "job file" under workspace/ui/ records its pid, so only
one runs at a time and a restarted UI finds it again. Nothing here decodes, trains or exports by
itself: it calls the library (dataset edits, ZIP import) or the CLI.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import uuid
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ProjectConfig, load_params
from pipeline.dataset import (
    LYRICS_SUFFIX,
    PROMPT_SUFFIX,
    classify_file,
    list_dataset_files,
    read_previous_manifest,
    read_text,
    scan_dataset,
    write_text_atomic,
)
from pipeline.errors import AceTurboError, DatasetError
from pipeline.fileio import atomic_output

PARAMS = "params.yaml"

# The stages the Convert button brings up to date (DVC runs ingest and decode first: dependencies).
ENCODE_STAGES = ("encode-latents", "encode-mert", "encode-mhubert", "encode-text")
CONVERT_STAGES = ("ingest", "decode", *ENCODE_STAGES)
LOSS_SERIES = ("loss", "denoise_loss", "mert_loss", "mhubert_loss", "val_loss")
SMOOTHED_LOSS = "loss (smoothed)"
PREVIEW_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,150}$")


class UIError(AceTurboError):
    """Something the user asked for cannot be done; the message says why and what to do."""


# ------------------------------------------------------------------ project and folders
def project(params: str | Path = PARAMS) -> ProjectConfig:
    return load_params(params)


def workspace_dir(proj: ProjectConfig) -> Path:
    """workspace/ (two levels above paths.exps = workspace/exps/logs), as stages.train uses it."""
    exps = Path(proj.paths.exps)
    return exps.parents[1] if len(exps.parts) >= 3 else Path("workspace")


def ui_dir(proj: ProjectConfig) -> Path:
    """workspace/ui/: job files, the convert log, uploads in transit, exports for download."""
    folder = workspace_dir(proj) / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def command_env() -> dict[str, str]:
    """The environment of every process the UI starts: this venv first on PATH (dvc runs stage
    commands through the shell), output unbuffered (the log streams), nothing online."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    return env


def aceturbo(*args: str) -> list[str]:
    """argv of `aceturbo ARGS` run by this interpreter (the same CLI as the console script)."""
    return [sys.executable, "-m", "stages", *args]


def params_option(proj: ProjectConfig) -> list[str]:
    """`--params FILE` when the UI was started with another settings file than params.yaml, so the
    processes it starts use the settings its forms show."""
    return [] if Path(proj.source).resolve() == Path(PARAMS).resolve() else ["--params", proj.source]


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def run_command(argv: list[str], timeout: float | None = None) -> tuple[int, str]:
    """Run a short command to completion: (exit status, its output with stdout and stderr merged)."""
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=command_env(),
                          timeout=timeout, text=True, errors="replace")
    return done.returncode, clean_log(done.stdout)


# ------------------------------------------------------------------ dataset
@dataclass
class SongEntry:
    """One song of the data folder as the editor shows it, valid or not."""

    id: str
    audio: str | None = None  # paths relative to the data folder
    prompt: str | None = None
    lyrics: str | None = None
    other: list[str] = field(default_factory=list)  # unsupported audio, extra files of a double
    duration: float | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return [p for p in (self.audio, self.prompt, self.lyrics) if p] + self.other

    @property
    def status(self) -> str:
        if self.problems:
            return f"{len(self.problems)} problem(s)"
        if self.warnings:
            return f"{len(self.warnings)} warning(s)"
        return "ok"


@dataclass
class DatasetView:
    songs: list[SongEntry]
    general: list[str]  # messages that name no single song (e.g. "no songs found")
    data_dir: Path

    def get(self, song_id: str) -> SongEntry:
        for song in self.songs:
            if song.id == song_id:
                return song
        raise UIError(f"no song {song_id!r} in {self.data_dir}; refresh the list")


def data_dir(proj: ProjectConfig) -> Path:
    return Path(proj.paths.data)


def scan_songs(proj: ProjectConfig) -> DatasetView:
    """Every song key in the data folder with its files, duration and the scan's messages."""
    folder = data_dir(proj)
    if not folder.is_dir():
        return DatasetView([], [f"{folder} does not exist yet: upload songs or a ZIP to create it"], folder)
    entries: dict[str, SongEntry] = {}
    for rel in list_dataset_files(folder):
        kind_key = classify_file(rel)
        if kind_key is None:
            continue
        kind, key = kind_key
        entry = entries.setdefault(key, SongEntry(id=key))
        if kind == "unsupported" or getattr(entry, kind) is not None:
            entry.other.append(rel)
        else:
            setattr(entry, kind, rel)
    report = scan_dataset(folder, proj.ingest, previous=read_previous_manifest(proj.paths.manifest),
                          progress=False)
    durations = {song.id: song.duration for song in report.songs}
    general = []
    for kind, messages in (("problems", report.problems), ("warnings", report.warnings), ("notes", report.notes)):
        for message in messages:
            owners = [e for e in entries.values() if _mentions(message, folder, e)]
            for owner in owners:
                getattr(owner, kind).append(message)
            if not owners:
                general.append(message)
    for entry in entries.values():
        entry.duration = durations.get(entry.id)
        if entry.duration is None and entry.audio:
            entry.duration = _header_duration(folder / entry.audio)
    return DatasetView(sorted(entries.values(), key=lambda e: e.id), general, folder)


def _mentions(message: str, folder: Path, entry: SongEntry) -> bool:
    """Whether a scan message is about this song: it starts with one of its files, or (messages
    about several files) lists one of them."""
    for rel in entry.files:
        if message.startswith(f"{folder / rel}:"):
            return True
    if message.startswith(f"{folder}:"):
        return any(re.search(rf"(^|[ (,]){re.escape(rel)}([,)]|$)", message) for rel in entry.files)
    return False


def _header_duration(path: Path) -> float | None:
    from pipeline.audio import audio_info

    try:
        return audio_info(path)[0]
    except AceTurboError:
        return None


def song_rows(view: DatasetView) -> list[list[Any]]:
    """The song table: id, duration, status, files, messages (one line each)."""
    rows = []
    for song in view.songs:
        messages = song.problems + [f"warning: {w}" for w in song.warnings] + [f"note: {n}" for n in song.notes]
        rows.append([song.id, round(song.duration, 1) if song.duration is not None else None, song.status,
                     ", ".join(Path(f).name for f in song.files), "\n".join(_short(m, view.data_dir) for m in messages)])
    return rows


def _short(message: str, folder: Path) -> str:
    """A scan message without the data folder prefix (the table is narrow)."""
    return message.replace(f"{folder}/", "").replace(f"{folder}", "data folder")


def read_song_text(proj: ProjectConfig, song_id: str) -> tuple[str, str]:
    """(prompt, lyrics) of a song as stored ("" for a missing file)."""
    song = scan_songs(proj).get(song_id)
    folder = data_dir(proj)
    texts = []
    for rel in (song.prompt, song.lyrics):
        if rel is None:
            texts.append("")
            continue
        try:
            texts.append(read_text(folder / rel))
        except DatasetError as exc:
            raise UIError(f"{exc} (it cannot be edited here until it is UTF-8)") from None
    return texts[0], texts[1]


def save_song_text(proj: ProjectConfig, song_id: str, prompt: str, lyrics: str) -> list[Path]:
    """Write the prompt and lyrics of a song in place (atomically); creates a missing file.
    Returns the files written."""
    song = scan_songs(proj).get(song_id)
    folder = data_dir(proj)
    if song.audio is None:
        raise UIError(f"{song_id} has no audio file; add the audio or delete the song")
    written = []
    for rel, suffix, text in ((song.prompt, PROMPT_SUFFIX, prompt), (song.lyrics, LYRICS_SUFFIX, lyrics)):
        path = folder / (rel or song_id + suffix)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.endswith("\n"):
            text += "\n"
        write_text_atomic(path, text)
        written.append(path)
    return written


def delete_song(proj: ProjectConfig, song_id: str) -> list[Path]:
    """Remove every file of a song (its triplet, and any stray file of the same name)."""
    song = scan_songs(proj).get(song_id)
    folder = data_dir(proj)
    removed = []
    for rel in song.files:
        path = folder / rel
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def add_song(proj: ProjectConfig, audio: str | Path, prompt: str, lyrics: str, name: str = "",
             overwrite: bool = False) -> str:
    """One new triplet from an uploaded audio file and the two texts; returns its id."""
    from pipeline.audio import AUDIO_EXTENSIONS

    audio = Path(audio)
    ext = audio.suffix.lower()
    if ext not in AUDIO_EXTENSIONS:
        raise UIError(f"{audio.name}: not a supported audio file; use {', '.join(AUDIO_EXTENSIONS)}")
    name = (name or audio.stem).strip()
    if not _SAFE_NAME.match(name) or name.lower().endswith(("_prompt", "_lyrics")):
        raise UIError(f"song name {name!r}: use letters, digits, spaces and . _ - ( ) + (no folders, "
                      "not ending in _prompt/_lyrics)")
    if not prompt.strip():
        raise UIError("the prompt is empty: give a few comma-separated tags, e.g. 'pop, female vocals, 120 bpm'")
    folder = data_dir(proj)
    targets = {folder / f"{name}{ext}": None, folder / f"{name}{PROMPT_SUFFIX}": prompt,
               folder / f"{name}{LYRICS_SUFFIX}": lyrics}
    _refuse_existing(list(targets), overwrite)
    check_upload_sizes(proj, [audio])
    folder.mkdir(parents=True, exist_ok=True)
    _copy_atomic(audio, folder / f"{name}{ext}")
    for path, text in targets.items():
        if text is not None:
            text = text.replace("\r\n", "\n")
            write_text_atomic(path, text if text.endswith("\n") else text + "\n")
    discard_uploads([audio])
    return name


def add_files(proj: ProjectConfig, files: list[str | Path], overwrite: bool = False) -> list[Path]:
    """Copy uploaded triplet files (NAME.mp3, NAME_prompt.txt, NAME_lyrics.txt...) into the data
    folder, all or nothing. ZIP archives go through `import_zip_file`."""
    files = [Path(f) for f in files]
    if not files:
        raise UIError("no files given")
    folder = data_dir(proj)
    bad = [f.name for f in files if f.name.startswith(".") or classify_file(f.name) is None
           or classify_file(f.name)[0] == "unsupported"]
    if bad:
        raise UIError(f"not part of a song triplet: {', '.join(bad)} (expected NAME.mp3/.wav/.flac/.ogg, "
                      f"NAME{PROMPT_SUFFIX}, NAME{LYRICS_SUFFIX}; a .zip goes in the ZIP box)")
    names = [f.name for f in files]
    doubles = sorted({n for n in names if names.count(n) > 1})
    if doubles:
        raise UIError(f"the same file name twice: {', '.join(doubles)}")
    targets = [folder / f.name for f in files]
    _refuse_existing(targets, overwrite)
    check_upload_sizes(proj, files)
    folder.mkdir(parents=True, exist_ok=True)
    for src, dst in zip(files, targets):
        _copy_atomic(src, dst)
    discard_uploads(files)
    return targets


def import_zip_file(proj: ProjectConfig, zip_path: str | Path, overwrite: bool = False):
    """`aceturbo import-zip` through the same library call (same safety rules)."""
    from pipeline.zip_import import import_zip

    check_upload_sizes(proj, [zip_path])
    result = import_zip(zip_path, data_dir(proj), overwrite=overwrite, progress=False)
    discard_uploads([zip_path])
    return result


def _refuse_existing(targets: list[Path], overwrite: bool) -> None:
    existing = [t.name for t in targets if t.exists()]
    if existing and not overwrite:
        raise UIError(f"already in the data folder: {', '.join(existing)}; tick 'overwrite' to replace "
                      "(nothing was written)")


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


# ------------------------------------------------------------------ uploads in transit
UPLOAD_MAX_AGE_S = 6 * 3600  # an upload never added to the dataset is deleted after this long


def max_upload_bytes(proj: ProjectConfig) -> int:
    """params.yaml → ui → max_upload_mb in bytes (Gradio refuses bigger uploads with this too)."""
    return int(proj.ui.max_upload_mb * 1_000_000)


def upload_folder() -> Path:
    """Where Gradio puts uploads: GRADIO_TEMP_DIR (`aceturbo ui` sets workspace/ui/uploads), else
    Gradio's default <tmp>/gradio."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def check_upload_sizes(proj: ProjectConfig, files: list[str | Path]) -> None:
    """UIError naming the first file over the upload limit (nothing is written)."""
    limit = max_upload_bytes(proj)
    for f in files:
        try:
            size = Path(f).stat().st_size
        except OSError:
            raise UIError(f"{Path(f).name}: the uploaded file is gone (the page was open too long?); "
                          "upload it again") from None
        if size > limit:
            raise UIError(f"{Path(f).name} is {size / 1e6:.1f} MB, over the upload limit of "
                          f"{proj.ui.max_upload_mb:g} MB (params.yaml → ui → max_upload_mb); raise the limit "
                          f"there, or copy big files into {data_dir(proj)} yourself (nothing was written)")


def discard_uploads(files: list[str | Path]) -> None:
    """Delete Gradio's temp copies of uploads once they are in the data folder (Gradio keeps them
    until it restarts). Files outside the upload folder are never touched."""
    root = upload_folder()
    for f in files:
        path = Path(f).resolve()
        if root not in path.parents:
            continue
        path.unlink(missing_ok=True)
        if path.parent != root:  # Gradio keeps each upload in a folder of its own
            try:
                path.parent.rmdir()
            except OSError:
                pass


def clean_stale_uploads(folder: str | Path, max_age_s: float = UPLOAD_MAX_AGE_S) -> list[Path]:
    """Delete uploads older than ``max_age_s`` from ``folder`` (left by a UI that was stopped or by
    uploads never added); younger ones may belong to another UI on this workspace."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in folder.iterdir():
        try:
            if now - entry.stat().st_mtime < max_age_s:
                continue
        except OSError:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# ------------------------------------------------------------------ background jobs
@dataclass
class Job:
    """A process the UI started (or found through its job file)."""

    kind: str
    pid: int
    argv: list[str]
    log: str
    started: float
    info: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    stop_requested: float | None = None

    @property
    def running(self) -> bool:
        return self.returncode is None and _alive(self.pid)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)


_CHILDREN: dict[int, subprocess.Popen] = {}  # processes started by this UI process, to reap them


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def job_file(proj: ProjectConfig, kind: str) -> Path:
    return ui_dir(proj) / f"{kind}.job.json"


def read_job(proj: ProjectConfig, kind: str) -> Job | None:
    """The last job of this kind (running or finished), with its exit status when known."""
    path = job_file(proj, kind)
    try:
        job = Job(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    child = _CHILDREN.get(job.pid)
    if job.returncode is None and child is not None and child.poll() is not None:
        job.returncode = child.returncode
        _write_job(proj, job)
    return job


def _write_job(proj: ProjectConfig, job: Job) -> None:
    write_text_atomic(job_file(proj, job.kind), job.to_json())


def running_job(proj: ProjectConfig, *kinds: str) -> Job | None:
    for kind in kinds:
        job = read_job(proj, kind)
        if job is not None and job.running:
            return job
    return None


# Convert and training both use the cache (one writes it, one reads it): one of them at a time.
EXCLUSIVE = ("train", "convert")


def outside_trainings(proj: ProjectConfig) -> dict:
    """{experiment: owner} of trainings this UI did not start (a terminal, `dvc repro`, another UI):
    they hold the run locks under paths.exps (pipeline.locks)."""
    from pipeline.locks import held_run_locks

    job = read_job(proj, "train")
    ours = job.pid if job is not None and job.running else None
    return {name: owner for name, owner in held_run_locks(proj.paths.exps).items() if owner.pid != ours}


def outside_encodes(proj: ProjectConfig) -> dict:
    """{stream: owner} of feature streams being written by a process this UI did not start (an
    `aceturbo encode`, a `dvc repro` encode stage): they hold the stream locks
    ``<features>/<stream>/.lock-<worker>`` (cache/lock.py). Local feature folders only."""
    from pipeline.locks import STALE_AFTER_S, holder

    features = Path(proj.paths.features)
    if "://" in proj.paths.features or not features.is_dir():
        return {}
    found = {}
    for path in sorted(features.glob("*/.lock-*")):
        owner = holder(path, stale_after=STALE_AFTER_S)
        if owner is not None:
            found.setdefault(path.parent.name, owner)
    return found


def start_job(proj: ProjectConfig, kind: str, argv: list[str], log: Path, info: dict | None = None,
              exclusive: tuple[str, ...] = EXCLUSIVE) -> Job:
    """Start ``argv`` in its own session with stdout+stderr appended to ``log``; UIError if a job
    of ``exclusive`` kinds is running (started here, or for "train" and "convert", elsewhere)."""
    from pipeline.locks import OwnerLock

    # Two clicks at once (or two UIs): only one gets past here, and it checks for busy jobs while
    # holding the lock, so the other sees the job it started.
    start = OwnerLock(ui_dir(proj) / "start.lock", "the UI's job start",
                      hint="another job is being started right now; try again in a moment", error=UIError)
    with start:
        _refuse_busy(proj, exclusive)
        return _spawn(proj, kind, argv, log, info)


def _refuse_busy(proj: ProjectConfig, exclusive: tuple[str, ...]) -> None:
    busy = running_job(proj, *exclusive)
    if busy is not None:
        what = "a training" if busy.kind == "train" else f"a {busy.kind}"
        raise UIError(f"{what} is already running (pid {busy.pid}, started {time.strftime('%H:%M:%S', time.localtime(busy.started))}); "
                      f"wait for it to finish or stop it first")
    outside = outside_trainings(proj) if "train" in exclusive else {}
    if outside:  # started in a terminal, by `dvc repro` or by another UI
        experiment, owner = next(iter(outside.items()))
        raise UIError(f"a training of experiment '{experiment}' is already running outside this UI "
                      f"({owner.describe()}); wait for it to finish or stop it first")
    # No convert of ours runs (checked above), so a held stream lock is someone else's encode.
    encoding = outside_encodes(proj) if "convert" in exclusive else {}
    if encoding:
        stream, owner = next(iter(encoding.items()))
        raise UIError(f"feature stream '{stream}' is being encoded outside this UI ({owner.describe()}); "
                      f"wait for it to finish or stop it first")


def _spawn(proj: ProjectConfig, kind: str, argv: list[str], log: Path, info: dict | None) -> Job:
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(_shown(argv))}\n".encode())
        out.flush()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=command_env(), start_new_session=True)
    _CHILDREN[child.pid] = child
    job = Job(kind=kind, pid=child.pid, argv=list(argv), log=str(log), started=time.time(), info=info or {})
    _write_job(proj, job)
    return job


def _shown(argv: list[str]) -> list[str]:
    """argv as the user would type it (`aceturbo ...`, `dvc ...`)."""
    if argv[:3] == [sys.executable, "-m", "stages"]:
        return ["aceturbo", *argv[3:]]
    if argv[:3] == [sys.executable, "-m", "dvc"]:
        return ["dvc", *argv[3:]]
    return argv


def shown_command(argv: list[str]) -> str:
    return shlex.join(_shown(argv))


def stop_job(proj: ProjectConfig, kind: str, whole_group: bool = False) -> str:
    """Ask a running job to stop with SIGTERM (training saves a checkpoint, then exits)."""
    job = read_job(proj, kind)
    if job is None or not job.running:
        return f"no {kind} is running"
    try:
        if whole_group:
            os.killpg(job.pid, signal.SIGTERM)
        else:
            os.kill(job.pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"the {kind} had already finished"
    job.stop_requested = time.time()
    _write_job(proj, job)
    return f"stop requested (SIGTERM to pid {job.pid})"


def wait_job(proj: ProjectConfig, kind: str, timeout: float) -> Job | None:
    """Block until the job of ``kind`` ends (tests and scripts)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = read_job(proj, kind)
        if job is None or not job.running:
            return read_job(proj, kind)
        time.sleep(0.2)
    return read_job(proj, kind)


def clean_log(text: str) -> str:
    """Terminal output as a reader sees it: a progress bar redrawn with \\r keeps its last state."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if "\r" in line:
            parts = [p for p in line.split("\r") if p.strip()]
            line = parts[-1] if parts else ""
        lines.append(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line))
    return "\n".join(lines)


def tail(path: str | Path, max_lines: int = 60, max_bytes: int = 256_000) -> str:
    """The last lines of a (growing) log file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = clean_log(data).split("\n")
    return "\n".join(lines[-max_lines:])


def job_status(job: Job | None, what: str) -> str:
    if job is None:
        return f"No {what} started yet."
    if job.running:
        stopping = " — stopping (saving a checkpoint)…" if job.stop_requested else ""
        return f"{what.capitalize()} running (pid {job.pid}, {time.time() - job.started:.0f} s){stopping}"
    if job.returncode is None:
        return f"{what.capitalize()} finished (started by another UI process; see its log)."
    if job.returncode == 0:
        return f"{what.capitalize()} finished successfully."
    if job.returncode in (143, 130, -15, -2):
        return f"{what.capitalize()} stopped (exit {job.returncode})."
    return f"{what.capitalize()} FAILED (exit {job.returncode}); the log below says why."


# ------------------------------------------------------------------ convert and export
def convert_argv() -> list[str]:
    """`aceturbo ingest && dvc repro <encode stages>` as one shell line: ingest first so dataset
    problems show as one clear list before DVC starts; DVC then runs what is out of date."""
    return ["/bin/sh", "-c", f"{shlex.join(aceturbo('ingest'))} && {shlex.join(dvc('repro', *ENCODE_STAGES))}"]


def start_convert(proj: ProjectConfig) -> Job:
    if Path(proj.source).resolve() != Path(PARAMS).resolve():
        raise UIError(f"Convert runs `dvc repro`, which always reads {PARAMS}; this UI was started with "
                      f"--params {proj.source}. Restart it without --params (or copy your settings into {PARAMS}).")
    log = ui_dir(proj) / "convert.log"
    log.write_text("", encoding="utf-8")  # one conversion per log
    return start_job(proj, "convert", convert_argv(), log)


def convert_progress(log_text: str) -> tuple[float, str]:
    """(fraction done, current step) from the convert log: `aceturbo ingest` prints its summary, then
    DVC names each stage it runs ("Running stage 'X'" ... "Updating lock file") or skips."""
    done, current = 0, "starting"
    for line in log_text.split("\n"):
        if re.search(r"\d+ songs \(.*\) -> ", line) and current == "starting":
            done, current = 1, "ingest"
        m = re.search(r"(Running stage|Stage) '([^']+)'", line)
        if m and m.group(2) in CONVERT_STAGES:
            index = CONVERT_STAGES.index(m.group(2))
            current = m.group(2)
            done = max(done, index + (1 if "didn't change" in line else 0))
        elif line.startswith("Updating lock file") and current in CONVERT_STAGES:
            done = max(done, CONVERT_STAGES.index(current) + 1)
    return min(1.0, done / len(CONVERT_STAGES)), current


def export_hf(proj: ProjectConfig, output: str | None = None) -> tuple[int, str]:
    """`aceturbo export-hf` (needs the manifest: run Convert first)."""
    argv = aceturbo("export-hf", "--manifest", str(proj.paths.manifest), "--data-dir", proj.paths.data)
    argv += ["--output", output] if output else []
    code, text = run_command(argv)
    return code, f"$ {shown_command(argv)}\n{text}"


# ------------------------------------------------------------------ training
def train_fields() -> list[dict[str, Any]]:
    """fields_help() rows the form shows (all but the preset, which has its own selector)."""
    from pipeline.train_config import fields_help

    return [row for row in fields_help() if row["name"] != "preset"]


def preset_values(proj: ProjectConfig, preset: str) -> dict[str, Any]:
    """Every setting as the preset + params.yaml give it (what training would use untouched)."""
    from pipeline.train_config import build_config

    return build_config(params=proj.train, preset=preset).to_dict()


def config_from_form(proj: ProjectConfig, preset: str, values: dict[str, Any]):
    """The TrainConfig the form describes (ConfigError naming a bad field)."""
    from pipeline.train_config import build_config

    values = {k: (None if v == "" and k != "experiment" else v) for k, v in values.items()}
    return build_config(params=proj.train, overrides=values, preset=preset)


def train_argv(proj: ProjectConfig, preset: str, values: dict[str, Any], resume: bool = False) -> tuple[list[str], Any]:
    """(argv of `aceturbo train`, its config): options only for settings that differ from what
    the preset + params.yaml give, plus --experiment so the run folder is explicit."""
    base = config_from_form(proj, preset, {})
    config = config_from_form(proj, preset, values)
    argv = ["train", *params_option(proj), "--preset", preset]
    if config.run_name != base.run_name or config.experiment:
        argv += ["--experiment", config.run_name]
    for row in train_fields():
        name, kind = row["name"], row["type"]
        if name == "experiment":
            continue
        value, default = getattr(config, name), getattr(base, name)
        if _same(value, default):
            continue
        flag = "--" + name.replace("_", "-")
        if kind == "bool":
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif kind == "pair":
            argv += [flag, _num(value[0]), _num(value[1])]
        elif kind == "list":
            argv += [flag, ",".join(value)]
        else:
            argv += [flag, _num(value) if kind in ("int", "float") else str(value)]
    if resume:
        argv += ["--resume", "latest"]
    return aceturbo(*argv), config


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _num(x) -> str:
    return repr(x) if isinstance(x, float) else str(x)


def run_dir(proj: ProjectConfig, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise UIError(f"bad run name {name!r}")
    return Path(proj.paths.exps) / name


def train_log_path(proj: ProjectConfig, experiment: str) -> Path:
    """Where the UI keeps a run's console output: workspace/ui/logs/<experiment>.log (appended, one
    header per start). Not inside the run folder: a fresh run moves an existing run folder aside
    (stages.train.set_aside_previous), which would carry an open log away with it."""
    run_dir(proj, experiment)  # validates the name
    return ui_dir(proj) / "logs" / f"{experiment}.log"


def start_training(proj: ProjectConfig, preset: str, values: dict[str, Any], resume: bool = False) -> Job:
    """Start `aceturbo train` as its own process, output appended to train_log_path()."""
    from pipeline.train_state import latest_checkpoint

    argv, config = train_argv(proj, preset, values, resume=resume)
    folder = run_dir(proj, config.run_name)
    if resume and latest_checkpoint(folder) is None:
        raise UIError(f"nothing to resume: {folder / 'checkpoints'} holds no checkpoint; press Start")
    note = ""
    if not resume and folder.is_dir() and any(folder.iterdir()):
        note = (f"{folder} already exists: the trainer moves it to {config.run_name}.previous-<time> "
                "(nothing is lost; Resume continues a run instead)")
    return start_job(proj, "train", argv, train_log_path(proj, config.run_name),
                     info={"experiment": config.run_name, "run_dir": str(folder), "max_steps": config.max_steps,
                           "resume": resume, "command": shown_command(argv), "note": note})


def stop_training(proj: ProjectConfig) -> str:
    return stop_job(proj, "train")


# ------------------------------------------------------------------ run folders and metrics
def list_runs(proj: ProjectConfig) -> list[str]:
    """Experiment folders (newest activity first)."""
    root = Path(proj.paths.exps)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and any((p / n).exists() for n in ("metrics.jsonl", "checkpoints", "train_config.json"))]
    return [p.name for p in sorted(runs, key=_activity, reverse=True)]


def _activity(folder: Path) -> float:
    times = [folder.stat().st_mtime] + [(folder / n).stat().st_mtime for n in ("metrics.jsonl", "train_config.json", "checkpoints")
                                       if (folder / n).exists()]
    return max(times)


def run_metrics(folder: str | Path) -> list[dict[str, Any]]:
    from pipeline.metrics import read_metrics

    return read_metrics(Path(folder) / "metrics.jsonl")


def loss_table(records: list[dict[str, Any]]):
    """Long-format DataFrame (step, value, series) of the losses, for gr.LinePlot: the raw training
    losses, the training loss smoothed as in loss.png, and the validation loss where it was measured."""
    from pipeline.metrics import ema

    trained = [r for r in records if isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float))]
    smoothed = {SMOOTHED_LOSS: list(zip([r["step"] for r in trained], ema([float(r["loss"]) for r in trained])))}
    return series_table(records, LOSS_SERIES, smoothed)


def series_table(records: list[dict[str, Any]], names: tuple[str, ...], extra: dict[str, list] | None = None):
    """Long-format DataFrame (step, value, series) of the metrics ``names`` (+ ``extra``: {series:
    [(step, value)]}), for gr.LinePlot."""
    import pandas as pd

    steps, values, series = [], [], []
    for r in records:
        if not isinstance(r.get("step"), int):
            continue
        for name in names:
            if isinstance(r.get(name), (int, float)):
                steps.append(r["step"])
                values.append(float(r[name]))
                series.append(name)
    for name, points in (extra or {}).items():
        for step, value in points:
            steps.append(step)
            values.append(float(value))
            series.append(name)
    # Typed columns even when empty: the plot fixes its axis types from the first frame it gets.
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "value": pd.Series(values, dtype="float64"),
                         "series": pd.Series(series, dtype="object")})


def speed(records: list[dict[str, Any]], max_steps: int | None, window: int = 10) -> dict[str, Any]:
    """Seconds per step (median of the last ``window`` steps), current step and ETA in seconds."""
    if not records:
        return {"step": 0, "sec_per_step": None, "eta_s": None, "max_steps": max_steps}
    step = int(records[-1].get("step", 0))
    recent = sorted(float(r["sec_per_step"]) for r in records[-window:] if r.get("sec_per_step"))
    sec = recent[len(recent) // 2] if recent else None
    eta = max(0, max_steps - step) * sec if (sec and max_steps) else None
    return {"step": step, "sec_per_step": sec, "eta_s": eta, "max_steps": max_steps}


def run_max_steps(folder: str | Path) -> int | None:
    """max_steps of a run from its train_config.json (written by the trainer)."""
    try:
        return int(json.loads((Path(folder) / "train_config.json").read_text(encoding="utf-8"))["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_speed(info: dict[str, Any]) -> str:
    if not info["step"]:
        return "No steps yet."
    text = f"step {info['step']}" + (f" / {info['max_steps']}" if info["max_steps"] else "")
    if info["sec_per_step"]:
        text += f" · {info['sec_per_step']:.3f} s/step"
    if info["eta_s"] is not None:
        text += f" · ETA {format_seconds(info['eta_s'])}"
    return text


def format_seconds(s: float) -> str:
    s = int(round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


@dataclass
class CheckpointInfo:
    name: str
    epoch: int
    step: int
    loss: float | None
    path: Path
    val_loss: float | None = None  # the validation loss at its step, when one ran
    best: bool = False  # named in best.json


def run_checkpoints(folder: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run (oldest first) with the training and validation loss logged at
    their step, and which one is the best (best.json)."""
    from pipeline.train_state import list_checkpoints, parse_checkpoint_name, read_best

    records = {r.get("step"): r for r in run_metrics(folder)}
    best = read_best(folder)
    found = []
    for path in list_checkpoints(folder):
        epoch, step = parse_checkpoint_name(path.name)
        r = records.get(step, {})
        found.append(CheckpointInfo(path.name, epoch, step, r.get("loss"), path, r.get("val_loss"),
                                    best is not None and best["path"] == path))
    return found


def checkpoint_rows(folder: str | Path) -> list[list[Any]]:
    """The checkpoint table: name, step, epoch, training loss, validation loss, "best"."""
    def r4(x):
        return None if x is None else round(x, 4)
    return [[c.name, c.step, c.epoch, r4(c.loss), r4(c.val_loss), "★ best" if c.best else ""]
            for c in run_checkpoints(folder)]


BEST = "best"  # the compare picker's name for the run's best checkpoint


def compare_choices(folder: str | Path) -> list[str]:
    """What the compare picker offers: every checkpoint, and "best" when the run has one."""
    found = run_checkpoints(folder)
    return [c.name for c in found] + ([BEST] if any(c.best for c in found) else [])


def compare_checkpoints(proj: ProjectConfig, run: str, picks: list[str], weights: str, prompt: str, lyrics: str,
                        duration: float = 10.0, steps: int = 27, seed: int = 0) -> tuple[dict, Path, str]:
    """`aceturbo compare` on the picked checkpoints (names or "best"): (its index.json, the folder,
    the command and its output)."""
    from pipeline.sampling.compare import default_out_dir
    from pipeline.train_state import parse_checkpoint_name

    folder = run_dir(proj, run)
    tokens = []
    for pick in picks or []:
        parsed = parse_checkpoint_name(pick)
        if pick != BEST and parsed is None:
            raise UIError(f"{pick!r} is not a checkpoint of {run}; refresh the list")
        tokens.append(BEST if pick == BEST else str(parsed[1]))
    if not tokens:
        raise UIError("pick at least one checkpoint to compare")
    out = default_out_dir(proj.paths.exps, folder.name, int(seed))
    lyrics_file = ui_dir(proj) / f"compare_lyrics_{uuid.uuid4().hex[:8]}.txt"
    write_text_atomic(lyrics_file, lyrics or "")
    argv = aceturbo("compare", *params_option(proj), "--run", str(folder), "--steps", ",".join(tokens),
                    "--weights", weights or "1.0", "--prompt", prompt or "music", "--lyrics", str(lyrics_file),
                    "--duration", _num(float(duration)), "--sampling-steps", str(int(steps)), "--seed", str(int(seed)),
                    "--out", str(out))
    try:
        code, text = run_command(argv)
    finally:
        lyrics_file.unlink(missing_ok=True)
    log = f"$ {shown_command(argv)}\n{text}"
    if code != 0 or not (out / "index.json").is_file():
        raise UIError(f"compare failed (exit {code}):\n{text.strip()[-2000:]}")
    return json.loads((out / "index.json").read_text(encoding="utf-8")), out, log


def compare_cells(index: dict, folder: str | Path) -> tuple[list[str], list[tuple[float, list[str | None]]]]:
    """The grid of a compare folder with absolute clip paths: (column labels, [(weight, [path|None])])."""
    from pipeline.sampling.compare import grid

    labels, rows = grid(index)
    return labels, [(w, [str(Path(folder, f).resolve()) if f else None for f in files]) for w, files in rows]


def preview_files(folder: str | Path) -> list[tuple[str, str]]:
    """(label "step N / file", path) of the preview audio in <run>/eval_results/step_N/."""
    root = Path(folder) / "eval_results"
    if not root.is_dir():
        return []
    found = []
    for path in root.rglob("*"):
        if path.suffix.lower() in PREVIEW_EXTENSIONS and path.is_file():
            m = re.search(r"step_(\d+)", path.parent.name)
            found.append((int(m.group(1)) if m else -1, path))
    found.sort(key=lambda t: (t[0], t[1].name))
    return [(f"step {s} / {p.name}", str(p)) for s, p in found]


def checkpoint_path(proj: ProjectConfig, run: str, checkpoint: str) -> Path:
    for c in run_checkpoints(run_dir(proj, run)):
        if c.name == checkpoint:
            return c.path
    raise UIError(f"no checkpoint {checkpoint!r} in run {run!r}; refresh the list")


def generate_sample(proj: ProjectConfig, run: str, checkpoint: str, prompt: str, lyrics: str,
                    duration: float = 10.0, steps: int = 27, seed: int = 0) -> tuple[Path, str]:
    """`aceturbo generate --lora <checkpoint>`; returns (wav, command output)."""
    lora = checkpoint_path(proj, run, checkpoint)
    out_dir = workspace_dir(proj) / "exps" / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{run}_{checkpoint.replace('=', '')}_seed{int(seed)}.wav"
    # One lyrics file per request: the Gradio queue may run several generations at once.
    lyrics_file = ui_dir(proj) / f"generate_lyrics_{uuid.uuid4().hex[:8]}.txt"
    write_text_atomic(lyrics_file, lyrics or "")
    argv = aceturbo("generate", *params_option(proj), "--lora", str(lora), "--prompt", prompt or "music",
                    "--lyrics", str(lyrics_file), "--duration", _num(float(duration)), "--steps", str(int(steps)),
                    "--seed", str(int(seed)), "--out", str(out))
    try:
        code, text = run_command(argv)
    finally:
        lyrics_file.unlink(missing_ok=True)
    log = f"$ {shown_command(argv)}\n{text}"
    if code != 0 or not out.is_file():
        raise UIError(f"generate failed (exit {code}):\n{text.strip()[-2000:]}")
    return out, log


DOWNLOAD_KINDS = ("safetensors file (strength 1.0 everywhere)",
                  "zip (official folder, unbaked: trained alpha in metadata)")
# → `aceturbo export-lora --format` (None: the checkpoint's own file, already baked; a "baked" export
# of it would be the same file again)
_EXPORT_FORMATS = dict(zip(DOWNLOAD_KINDS, (None, "official")))


def lora_download(proj: ProjectConfig, run: str, checkpoint: str, kind: str) -> Path:
    """The file to download: the checkpoint's safetensors (scale baked in), or a zip of
    `aceturbo export-lora --format official`'s folder."""
    from pipeline.train_state import LORA_FILE

    src = checkpoint_path(proj, run, checkpoint)
    if kind not in _EXPORT_FORMATS:
        raise UIError(f"unknown download kind {kind!r}; pick one of: {', '.join(DOWNLOAD_KINDS)}")
    fmt = _EXPORT_FORMATS[kind]
    if fmt is None:
        return src / LORA_FILE
    name = f"{run}_{checkpoint.replace('=', '')}_{fmt}"
    out = ui_dir(proj) / "exports" / name
    if out.exists():
        shutil.rmtree(out)
    argv = aceturbo("export-lora", str(src), "--out", str(out), "--format", fmt)
    code, text = run_command(argv)
    if code != 0:
        raise UIError(f"export-lora failed (exit {code}): {text.strip()[-1000:]}")
    archive = out.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(out.rglob("*")):
            if path.is_file():
                zf.write(path, Path(name) / path.relative_to(out))
    return archive


__all__ = [name for name in dir() if not name.startswith("_")]
