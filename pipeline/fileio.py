"""Atomic file writes: a temp file in the same folder, then os.replace.

A crash or Ctrl-C leaves either the old file or the new one, never half of one, and a unique temp
name means two processes never write into the same temp file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """A UTF-8 text file with LF line ends."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data, **dump_options) -> Path:
    options = {"indent": 2, "ensure_ascii": False, **dump_options}
    return write_text_atomic(path, json.dumps(data, **options) + "\n")
