"""The dataset: a folder of song triplets, checked against RULES and summarised in a manifest.

A song is three files side by side (any depth below the data folder):
``NAME.mp3`` (or .wav/.flac/.ogg), ``NAME_prompt.txt`` (comma-separated tags) and
``NAME_lyrics.txt``. `scan_dataset` finds every triplet, checks every rule and collects *all*
problems at once, so a user fixes a whole dataset in one pass instead of one error per run. The
manifest (JSON lines, one `Song` per line, sorted by id) is what every later stage reads; it is only
rewritten when its content changes, so DVC sees no change after a no-op ingest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from pipeline.audio import AUDIO_EXTENSIONS, read_audio
from pipeline.config import IngestConfig
from pipeline.errors import AceTurboError, DatasetError
from pipeline.fileio import disk_full_guard, write_text_atomic  # write_text_atomic: re-exported for the UI and demo

PROMPT_SUFFIX = "_prompt.txt"
LYRICS_SUFFIX = "_lyrics.txt"
INSTRUMENTAL = "[inst]"  # ACE-Step's lyric text for a song without vocals
DEFAULT_TAGS = ("music",)  # tags of a song whose prompt file is empty
# Audio people often have that we cannot decode without FFmpeg: named, so they are not silently skipped.
UNSUPPORTED_AUDIO = (".m4a", ".aac", ".wma", ".opus", ".mp4", ".aif", ".aiff", ".ape", ".alac", ".webm")

# The rules, as a user reads them (`aceturbo ingest --help`, README). One paragraph, no blank line:
# click keeps it unwrapped after a \b marker.
RULES = """\
Dataset rules (the data folder is searched recursively):
- A song is NAME.mp3 (or .wav, .flac, .ogg) + NAME_prompt.txt + NAME_lyrics.txt in the same folder;
  its id is the path below the data folder without extension (e.g. album/song1).
- NAME_prompt.txt holds tags separated by commas (or new lines), e.g. "synthwave, female vocals,
  120 bpm". Missing: error. Empty: the tag "music".
- NAME_lyrics.txt holds the lyrics ([verse], [chorus] ... sections). Missing or empty: the song is
  instrumental ("[inst]"), with a warning when missing.
- Text files are UTF-8 (with or without BOM, LF or CRLF line ends). Other encodings are an error:
  re-save them as UTF-8.
- An audio file without prompt and lyrics, or a text file without audio, is an error.
- Names that differ only by case (Song.mp3, song_prompt.txt) are an error: they collide on
  Windows and macOS. Two audio files for one name (song.mp3 + song.wav) are an error.
- Corrupt, empty, truncated or unsupported audio (e.g. .m4a) is an error: convert it.
- Clips shorter than 3 s are accepted and padded with silence to 3 s (a note is shown).
- A clip that is more than 95 % digital silence (exact zeros) is rejected.
- Files and folders whose names start with "." and __MACOSX folders are ignored.
- All problems are listed together; fix them and rerun ingest."""


@dataclass
class Song:
    """One manifest row. Paths are relative to the data folder (POSIX separators)."""

    id: str  # relative path without extension: stable when the prompt or lyrics change
    audio_path: str
    prompt_path: str
    lyrics_path: str | None  # None: no lyrics file (instrumental)
    audio_sha256: str
    prompt_sha256: str
    lyrics_sha256: str | None
    duration: float  # seconds, as decoded
    sample_rate: int  # of the file, before resampling to 48 kHz
    channels: int  # of the file, before making it stereo
    silence_ratio: float  # fraction of exact-zero samples
    tags: list[str]
    lyrics: str  # the lyrics text, or "[inst]"
    recaption: dict[str, str] = field(default_factory=dict)  # prompt alternatives (spec §9)

    def audio_file(self, data_dir: str | Path) -> Path:
        return Path(data_dir) / self.audio_path

    def to_row(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> "Song":
        return cls(**row)


@dataclass
class ScanReport:
    """What `scan_dataset` found: the valid songs and every message for the user."""

    data_dir: Path
    songs: list[Song] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # errors: the manifest is not written
    warnings: list[str] = field(default_factory=list)  # accepted, but probably not intended
    notes: list[str] = field(default_factory=list)  # accepted, for information

    def raise_for_problems(self) -> None:
        """One DatasetError listing every problem (one line each), or nothing."""
        if not self.problems:
            return
        if len(self.problems) == 1:
            raise DatasetError(self.problems[0])
        # Sorted: each line starts with its file, so a song's problems end up together.
        lines = "\n".join(f"  - {p}" for p in sorted(self.problems))
        raise DatasetError(
            f"{len(self.problems)} problems in {self.data_dir} (rules: `aceturbo ingest --help`); "
            f"fix them all, then rerun ingest:\n{lines}"
        )


# --- text files ---------------------------------------------------------------------------------

def read_text(path: str | Path) -> str:
    """A UTF-8 text file (BOM optional) with LF line ends; DatasetError for any other encoding."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # strict: latin-1 bytes fail here instead of becoming mojibake
    except UnicodeDecodeError as exc:
        bad = raw[exc.start]
        raise DatasetError(
            f"{path}: not UTF-8 text (byte 0x{bad:02x} at offset {exc.start}); "
            f"re-save it as UTF-8 in your editor"
        ) from None
    if "\x00" in text:  # UTF-16 without a BOM decodes as "UTF-8" full of NULs
        raise DatasetError(f"{path}: contains NUL bytes (UTF-16?); re-save it as UTF-8 in your editor")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_tags(prompt: str) -> list[str]:
    """Tags from a prompt: split on commas and line breaks, trimmed, empties dropped."""
    tags = [t.strip() for line in prompt.split("\n") for t in line.split(",")]
    return [t for t in tags if t] or list(DEFAULT_TAGS)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- scanning -----------------------------------------------------------------------------------

def _is_ignored(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def classify_file(rel: str) -> tuple[str, str] | None:
    """(kind, song key) of a relative path, or None for files that are not part of a triplet."""
    lower = rel.lower()
    if lower.endswith(PROMPT_SUFFIX):
        return "prompt", rel[: -len(PROMPT_SUFFIX)]
    if lower.endswith(LYRICS_SUFFIX):
        return "lyrics", rel[: -len(LYRICS_SUFFIX)]
    stem, ext = os.path.splitext(rel)
    if ext.lower() in AUDIO_EXTENSIONS:
        return "audio", stem
    if ext.lower() in UNSUPPORTED_AUDIO:
        return "unsupported", stem
    return None


def list_dataset_files(data_dir: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not _is_ignored(Path(d)))
        for name in sorted(files):
            rel = (Path(root) / name).relative_to(data_dir)
            if not _is_ignored(rel):
                found.append(rel.as_posix())
    return found


def scan_dataset(
    data_dir: str | Path,
    settings: IngestConfig | None = None,
    previous: Iterable[Song] = (),
    progress: bool = True,
) -> ScanReport:
    """Check every triplet under `data_dir` and describe the valid ones as Songs.

    Never raises for dataset problems: they are collected in the report (call
    `raise_for_problems`). `previous` (the last manifest) lets unchanged audio skip decoding.
    """
    settings = settings or IngestConfig()
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(
            f"data folder {data_dir} not found; put your triplets there "
            f"(or run `aceturbo import-zip FILE` / `aceturbo demo`)"
        )
    report = ScanReport(data_dir=data_dir)
    where = lambda rel: data_dir / rel  # noqa: E731  (messages name the full path)

    # Group files by song key and kind.
    groups: dict[str, dict[str, list[str]]] = {}
    for rel in list_dataset_files(data_dir):
        kind_key = classify_file(rel)
        if kind_key is None:
            continue
        kind, key = kind_key
        if kind == "unsupported":
            report.problems.append(
                f"{where(rel)}: unsupported audio format; convert it to {', '.join(AUDIO_EXTENSIONS)}"
            )
            continue
        groups.setdefault(key, {}).setdefault(kind, []).append(rel)

    # Names that differ only by case collide on case-insensitive file systems.
    spellings: dict[str, list[str]] = {}
    for key in groups:
        spellings.setdefault(key.lower(), []).append(key)
    clashing = set()
    for keys in spellings.values():
        if len(keys) > 1:
            files = sorted(rel for k in keys for rels in groups[k].values() for rel in rels)
            report.problems.append(
                f"{data_dir}: names differ only by case ({', '.join(files)}); "
                f"rename them to one spelling (or to different names if they are different songs)"
            )
            clashing.update(keys)

    candidates: list[tuple[str, dict[str, str]]] = []
    for key in sorted(set(groups) - clashing):
        kinds = groups[key]
        doubles = [rels for rels in kinds.values() if len(rels) > 1]
        if doubles:
            report.problems.append(
                f"{data_dir}: several files for one song ({', '.join(doubles[0])}); keep only one"
            )
            continue
        audio = kinds.get("audio", [None])[0]
        prompt = kinds.get("prompt", [None])[0]
        lyrics = kinds.get("lyrics", [None])[0]
        if audio is None:
            for rel in (prompt, lyrics):
                if rel:
                    report.problems.append(
                        f"{where(rel)}: no audio file {key}.mp3 (or .wav/.flac/.ogg) beside it; "
                        f"add the audio or delete this file"
                    )
            continue
        if prompt is None and lyrics is None:
            report.problems.append(
                f"{where(audio)}: no {Path(key).name}{PROMPT_SUFFIX} or {Path(key).name}{LYRICS_SUFFIX} "
                f"beside it; add them (or remove the audio)"
            )
            continue
        if prompt is None:
            report.problems.append(
                f"{where(audio)}: missing prompt file {where(key + PROMPT_SUFFIX)}; "
                f"create it with comma-separated tags (e.g. 'pop, female vocals, 120 bpm')"
            )
            continue
        candidates.append((key, {"audio": audio, "prompt": prompt, "lyrics": lyrics}))

    known = {song.id: song for song in previous}
    for key, files in tqdm(candidates, desc="ingest", unit="song", disable=not progress):
        song = _describe(data_dir, key, files, settings, known.get(key), report)
        if song is not None:
            report.songs.append(song)
    if not report.songs and not report.problems:
        report.problems.append(
            f"{data_dir}: no songs found; add triplets NAME.mp3 + NAME_prompt.txt + NAME_lyrics.txt"
        )
    return report


def _describe(data_dir: Path, key: str, files: dict, settings: IngestConfig, known: Song | None,
              report: ScanReport) -> Song | None:
    """One candidate triplet -> Song, or None with its problems added to the report."""
    audio, prompt, lyrics = files["audio"], files["prompt"], files["lyrics"]
    failed = False
    try:
        tags = parse_tags(read_text(data_dir / prompt))
    except DatasetError as exc:
        report.problems.append(str(exc))
        failed = True
    lyrics_text = INSTRUMENTAL
    if lyrics is None:
        report.warnings.append(
            f"{data_dir / audio}: no {Path(key).name}{LYRICS_SUFFIX}; treated as instrumental ([inst])"
        )
    else:
        try:
            lyrics_text = read_text(data_dir / lyrics).strip() or INSTRUMENTAL
        except DatasetError as exc:
            report.problems.append(str(exc))
            failed = True

    audio_sha = sha256_file(data_dir / audio)
    if known is not None and known.audio_path == audio and known.audio_sha256 == audio_sha:
        # Same bytes as last time: reuse the decoded facts instead of decoding again.
        duration, sample_rate, channels, silence = known.duration, known.sample_rate, known.channels, known.silence_ratio
    else:
        try:
            decoded = read_audio(data_dir / audio)
        except AceTurboError as exc:
            report.problems.append(str(exc))
            return None
        duration, sample_rate, channels = round(decoded.duration, 6), decoded.sample_rate, decoded.channels
        silence = round(decoded.silence_ratio(), 6)
    if silence > settings.max_silence:
        report.problems.append(
            f"{data_dir / audio}: {silence:.1%} digital silence (limit {settings.max_silence:.0%}); "
            f"trim the silence or remove the song"
        )
        return None
    if failed:
        return None
    if duration < settings.min_seconds:
        report.notes.append(
            f"{data_dir / audio}: {duration:.2f} s long; padded with silence to {settings.min_seconds:g} s when encoded"
        )
    return Song(
        id=key,
        audio_path=audio,
        prompt_path=prompt,
        lyrics_path=lyrics,
        audio_sha256=audio_sha,
        prompt_sha256=sha256_file(data_dir / prompt),
        lyrics_sha256=sha256_file(data_dir / lyrics) if lyrics else None,
        duration=duration,
        sample_rate=sample_rate,
        channels=channels,
        silence_ratio=silence,
        tags=tags,
        lyrics=lyrics_text,
        recaption={},
    )


# --- the manifest -------------------------------------------------------------------------------

def manifest_text(songs: Iterable[Song]) -> str:
    """The manifest's exact content: one JSON object per line, sorted by id (deterministic)."""
    rows = sorted((s.to_row() for s in songs), key=lambda r: r["id"])
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_manifest(path: str | Path, songs: Iterable[Song]) -> bool:
    """Write the manifest unless it already holds exactly this content; True if it was written.

    Leaving an unchanged file alone keeps its mtime, so DVC and make-like tools see no change.
    """
    path = Path(path)
    text = manifest_text(songs)
    if path.is_file() and path.read_bytes() == text.encode("utf-8"):
        return False
    _write_list(path, text)
    return True


def _write_list(path: Path, text: str) -> None:
    """Atomic and durable (fsync, rename, folder fsync); a full disk is one line keeping the old file."""
    with disk_full_guard(path, len(text.encode("utf-8")), kept=f"the previous {path.name} is intact"):
        write_text_atomic(path, text)


def text_content_hash(song: Song) -> str:
    """What the text stream of a song is computed from (tags, lyrics, recaption)."""
    payload = json.dumps({"tags": song.tags, "lyrics": song.lyrics, "recaption": song.recaption},
                         sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def write_stage_views(songs: Iterable[Song], audio_list: str | Path, text_list: str | Path) -> None:
    """Two narrow views of the manifest, one per kind of DVC stage.

    The audio stages depend on ``audio_list`` (which changes only when audio changes) and the text
    stage on ``text_list``: editing one prompt then reruns only the text step and what follows it.
    """
    songs = sorted(songs, key=lambda s: s.id)
    audio = [{"id": s.id, "audio_path": s.audio_path, "audio_sha256": s.audio_sha256, "duration": s.duration}
             for s in songs]
    text = [{"id": s.id, "tags": s.tags, "lyrics": s.lyrics, "recaption": s.recaption,
             "content_hash": text_content_hash(s)} for s in songs]
    for path, rows in ((audio_list, audio), (text_list, text)):
        body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        path = Path(path)
        if not (path.is_file() and path.read_text(encoding="utf-8") == body):
            _write_list(path, body)


def read_manifest(path: str | Path) -> list[Song]:
    """The songs of a manifest written by `write_manifest` (DatasetError if missing or damaged)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found; run `aceturbo ingest` first")
    songs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            songs.append(Song.from_row(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            raise DatasetError(
                f"{path} line {number} is not a manifest row ({exc}); rerun `aceturbo ingest` to rebuild it"
            ) from None
    return songs


def read_previous_manifest(path: str | Path) -> list[Song]:
    """The last manifest if there is a readable one, else nothing (it only speeds ingest up)."""
    try:
        return read_manifest(path)
    except DatasetError:
        return []
