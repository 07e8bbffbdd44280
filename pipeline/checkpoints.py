"""Where the model checkpoints live, and the clear error when one is missing.

Nothing is ever downloaded at run time: users download the folders once and point the project at
them (``params.yaml`` → ``models``). A missing or incomplete folder raises ``CheckpointError`` naming
what to download and where to put it.
"""
from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import CheckpointError

# Sub-folders of an ACE-Step v1 checkpoint root (spec §1) and the file each must hold.
ACESTEP_PARTS = {
    "ace_step_transformer": ("config.json", "diffusion_pytorch_model.safetensors"),
    "music_dcae_f8c8": ("config.json", "diffusion_pytorch_model.safetensors"),
    "music_vocoder": ("config.json", "diffusion_pytorch_model.safetensors"),
    "umt5-base": ("config.json", "model.safetensors"),
}

DOWNLOAD_HINTS = {
    "acestep": "ACE-Step/ACE-Step-v1-3.5B (https://huggingface.co/ACE-Step/ACE-Step-v1-3.5B)",
    "mert": "m-a-p/MERT-v1-330M (https://huggingface.co/m-a-p/MERT-v1-330M)",
    "mhubert": "utter-project/mHuBERT-147 (https://huggingface.co/utter-project/mHuBERT-147)",
}


def require_model_dir(path: str | Path, files: tuple[str, ...], what: str, hint_key: str) -> Path:
    """Return ``path`` if it is a folder holding ``files``; else raise a CheckpointError that says
    what to download (``DOWNLOAD_HINTS[hint_key]``) and where to put it."""
    path = Path(path)
    hint = DOWNLOAD_HINTS.get(hint_key, hint_key)
    if not path.is_dir():
        raise CheckpointError(
            f"{what} not found at '{path}'. Download {hint} and put it there "
            f"(or set its path in params.yaml → models). Nothing is downloaded automatically."
        )
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise CheckpointError(
            f"{what} at '{path}' is incomplete: missing {', '.join(missing)}. "
            f"Re-download {hint} into that folder."
        )
    return check_weight_files(path, what, hint_key)


def check_weight_files(path: str | Path, what: str, hint_key: str) -> Path:
    """Raise a CheckpointError naming the first weight file of the folder ``path`` that is truncated
    or corrupt (``weight_file_problem``), before any loader meets it; return ``path``."""
    path = Path(path)
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        problem = weight_file_problem(weights)
        if problem:
            raise CheckpointError(f"{what}: weight file '{weights}' is {problem}. Re-download "
                                  f"{DOWNLOAD_HINTS.get(hint_key, hint_key)} into '{path}' (a download or copy "
                                  "was probably cut short).")
    return path


def weight_file_problem(path: str | Path) -> str | None:
    """What is wrong with a weight file, from its header and size alone (no tensor is read); None
    when it looks whole. Loaders meet a truncated file as SafetensorError / OSError chains deep in
    transformers or diffusers; this check turns it into one line naming the file.

    safetensors: an 8-byte header length, the JSON header, then data up to the largest end offset,
    which must be the file's end. PyTorch ``.bin``: a zip archive whose directory (at the end of
    the file) must be readable; the older pickle-only format is not checked.
    """
    path = Path(path)
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                return f"truncated ({size} bytes; its header alone claims {8 + header_len})"
            try:
                header = json.loads(handle.read(header_len))
            except ValueError:
                return "corrupt (unreadable header)"
        problem = _safetensors_header_problem(header)
        if problem:
            return f"corrupt ({problem})"
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        expected = 8 + header_len + max(ends, default=0)
        if size != expected:
            return f"{'truncated' if size < expected else 'corrupt'} ({size} bytes, its header says {expected})"
        return None
    if path.suffix == ".bin":
        with open(path, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":
                return None  # legacy pickle format: nothing cheap to check
        try:
            with zipfile.ZipFile(path):
                return None
        except (zipfile.BadZipFile, OSError) as exc:
            return f"truncated or corrupt ({size} bytes: {exc})"
    return None


def _safetensors_header_problem(header) -> str | None:
    """What is wrong with the shape of a parsed safetensors header: an object mapping each tensor
    name to {dtype, shape, data_offsets [begin, end]}, plus an optional ``__metadata__`` object."""
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object"

    def counts(values, n=None) -> bool:
        return (isinstance(values, list) and (n is None or len(values) == n)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values))

    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                return "its header's __metadata__ is not an object"
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and counts(entry.get("shape"))
                and counts(entry.get("data_offsets"), 2) and entry["data_offsets"][0] <= entry["data_offsets"][1]):
            return f"its header entry {name!r} is not {{dtype, shape, data_offsets}}"
    return None


@dataclass(frozen=True)
class CheckpointPaths:
    """The model folders one run uses."""

    acestep: Path  # root with ace_step_transformer/, music_dcae_f8c8/, music_vocoder/, umt5-base/
    mert: Path
    mhubert: Path

    @property
    def transformer(self) -> Path:
        return self.acestep / "ace_step_transformer"

    @property
    def dcae(self) -> Path:
        return self.acestep / "music_dcae_f8c8"

    @property
    def vocoder(self) -> Path:
        return self.acestep / "music_vocoder"

    @property
    def umt5(self) -> Path:
        return self.acestep / "umt5-base"

    def require(self, part: str) -> Path:
        """Check one part ("ace_step_transformer", "music_dcae_f8c8", "music_vocoder",
        "umt5-base", "mert" or "mhubert") and return its folder."""
        if part in ACESTEP_PARTS:
            return require_model_dir(
                self.acestep / part, ACESTEP_PARTS[part], f"ACE-Step part '{part}'", "acestep"
            )
        if part == "mert":
            return require_model_dir(self.mert, ("config.json",), "MERT model", "mert")
        if part == "mhubert":
            return require_model_dir(self.mhubert, ("config.json",), "mHuBERT model", "mhubert")
        raise ValueError(f"unknown checkpoint part {part!r}")


def lyric_embedding_rows(transformer_dir: str | Path) -> int | None:
    """Rows of the transformer's lyric embedding, from its config.json (None when unreadable)."""
    try:
        config = json.loads((Path(transformer_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return int(config.get("lyric_encoder_vocab_size", 6693))  # 6693: the released model (spec §1.1)
