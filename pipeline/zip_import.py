"""Importing a ZIP of song triplets into the data folder, safely.

An archive from the internet can be hostile (paths escaping the folder, symlinks, decompression
bombs) or just broken. So the import is all-or-nothing:
1. the central directory is checked first (names, member types, count, announced sizes, ratios);
2. every member is streamed into a temporary folder beside the data folder, counting the bytes
   really produced (headers can lie) and checking the CRC;
3. only when the whole archive checked out are the files moved into the data folder.
Any refusal raises ZipImportError with nothing written (the temporary folder is removed).
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.errors import ZipImportError

GB = 1000**3
MB = 1000**2


@dataclass
class ZipLimits:
    """What an archive may contain. The defaults suit a few hundred songs."""

    max_members: int = 10_000
    max_total_bytes: int = 20 * GB  # uncompressed
    max_ratio: float = 100.0  # uncompressed/compressed; above this on a big member it is a bomb
    ratio_min_bytes: int = 1 * MB  # small members may compress well legitimately (text files)


@dataclass
class ImportResult:
    files: list[Path] = field(default_factory=list)  # written into the data folder
    skipped: list[str] = field(default_factory=list)  # __MACOSX entries and dotfiles
    replaced: list[Path] = field(default_factory=list)  # existing files overwritten (--overwrite)


def _is_junk(parts: tuple[str, ...]) -> bool:
    """macOS resource forks and hidden files: never part of a dataset."""
    return any(part == "__MACOSX" or part.startswith(".") for part in parts)


def _safe_parts(zip_path: Path, name: str) -> tuple[str, ...]:
    """The member's path components, refusing anything that could land outside the target."""
    posix = name.replace("\\", "/")  # some Windows tools store backslashes
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise ZipImportError(f"{zip_path}: member {name!r} has an absolute path; refusing the archive (nothing written)")
    parts = tuple(p for p in PurePosixPath(posix).parts if p not in ("", "."))
    if ".." in parts:
        raise ZipImportError(f"{zip_path}: member {name!r} points outside the folder ('..'); refusing the archive (nothing written)")
    return parts


def _check_member_type(zip_path: Path, info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16  # Unix mode bits, when the archiver was on Unix
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        raise ZipImportError(f"{zip_path}: member {info.filename!r} is a symbolic link; refusing the archive (nothing written)")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ZipImportError(f"{zip_path}: member {info.filename!r} is not a regular file; refusing the archive (nothing written)")


def _ratio_error(zip_path: Path, what: str, size: int, compressed: int, limits: ZipLimits) -> ZipImportError | None:
    if size > limits.ratio_min_bytes and size > limits.max_ratio * max(compressed, 1):
        return ZipImportError(
            f"{zip_path}: {what} expands {size / max(compressed, 1):.0f}:1 (limit {limits.max_ratio:.0f}:1), "
            f"which marks a ZIP bomb; refusing the archive (nothing written)"
        )
    return None


def _plan(zip_path: Path, zf: zipfile.ZipFile, limits: ZipLimits) -> tuple[list[tuple[zipfile.ZipInfo, PurePosixPath]], list[str]]:
    """Check the central directory; return (member, target path below the data folder) pairs."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise ZipImportError(
            f"{zip_path}: {len(infos)} members (limit {limits.max_members}); split it into smaller archives"
        )
    kept: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    skipped: list[str] = []
    total = compressed = 0
    for info in infos:
        parts = _safe_parts(zip_path, info.filename)  # checked for junk too: a '..' is never harmless
        _check_member_type(zip_path, info)
        if info.is_dir() or not parts:
            continue
        if _is_junk(parts):
            skipped.append(info.filename)
            continue
        error = _ratio_error(zip_path, f"member {info.filename!r}", info.file_size, info.compress_size, limits)
        if error:
            raise error
        total += info.file_size
        compressed += info.compress_size
        kept.append((info, parts))
    if total > limits.max_total_bytes:
        raise ZipImportError(
            f"{zip_path}: {total / GB:.1f} GB uncompressed (limit {limits.max_total_bytes / GB:g} GB); "
            f"raise --max-total-gb or split the archive"
        )
    error = _ratio_error(zip_path, "the archive", total, compressed, limits)
    if error:
        raise error
    if not kept:
        raise ZipImportError(f"{zip_path}: contains no files to import")

    # A ZIP made by zipping a folder has one top folder: drop it, keep the layout below.
    tops = {parts[0] for _, parts in kept}
    strip = 1 if len(tops) == 1 and all(len(parts) > 1 for _, parts in kept) else 0
    plan = [(info, PurePosixPath(*parts[strip:])) for info, parts in kept]

    seen: dict[str, str] = {}
    for info, rel in plan:
        if str(rel) in seen:
            raise ZipImportError(f"{zip_path}: {rel} appears twice in the archive; remove one copy")
        seen[str(rel)] = info.filename
    return plan, skipped


def _extract_member(zip_path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path,
                    limits: ZipLimits, budget: int) -> int:
    """Stream one member to `dest`, counting real bytes; returns how many were written."""
    written = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, dest.open("wb") as out:
        while True:
            block = src.read(1 << 20)
            if not block:
                break
            written += len(block)
            if written > info.file_size:  # more data than announced: do not trust the rest
                raise ZipImportError(f"{zip_path}: member {info.filename!r} is larger than its header says; refusing the archive (nothing written)")
            if written > budget:
                raise ZipImportError(
                    f"{zip_path}: uncompressed data exceeds {limits.max_total_bytes / GB:g} GB; "
                    f"raise --max-total-gb or split the archive (nothing written)"
                )
            error = _ratio_error(zip_path, f"member {info.filename!r}", written, info.compress_size, limits)
            if error:
                raise error
            out.write(block)
    return written


def import_zip(
    zip_path: str | Path,
    data_dir: str | Path,
    overwrite: bool = False,
    limits: ZipLimits | None = None,
    progress: bool = True,
) -> ImportResult:
    """Unpack a ZIP of triplets into `data_dir` (all or nothing; see the module docstring)."""
    from tqdm import tqdm

    zip_path, data_dir = Path(zip_path), Path(data_dir)
    limits = limits or ZipLimits()
    if not zip_path.is_file():
        raise ZipImportError(f"{zip_path}: file not found")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ZipImportError(f"{zip_path}: not a readable ZIP archive ({exc}); re-download or re-create it") from None

    with zf:
        plan, skipped = _plan(zip_path, zf, limits)

        targets = [(info, data_dir.joinpath(*rel.parts)) for info, rel in plan]
        existing = sorted(t for _, t in targets if t.exists() or t.is_symlink())
        if existing and not overwrite:
            shown = ", ".join(str(t) for t in existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
            raise ZipImportError(
                f"{zip_path}: {len(existing)} file(s) already exist in {data_dir} ({shown}); "
                f"pass --overwrite to replace them (nothing written)"
            )
        blocked = [t for _, t in targets if t.is_dir()]
        if blocked:
            raise ZipImportError(f"{zip_path}: {blocked[0]} is a folder in {data_dir}, the archive has a file there (nothing written)")

        # The temporary folder sits beside the data folder: same file system, so the final moves
        # are renames, and a half-extracted archive never appears inside the data folder.
        parent = data_dir.resolve().parent
        made = [p for p in [parent, *parent.parents] if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{data_dir.name}.zip-import-"))
        try:
            budget = limits.max_total_bytes
            total_written = total_compressed = 0
            for info, rel in tqdm(plan, desc="unzip", unit="file", disable=not progress):
                n = _extract_member(zip_path, zf, info, staging.joinpath(*rel.parts), limits, budget)
                budget -= n
                total_written += n
                total_compressed += info.compress_size
            error = _ratio_error(zip_path, "the archive", total_written, total_compressed, limits)
            if error:
                raise error
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(made)
            raise ZipImportError(f"{zip_path}: corrupt or unsupported archive ({exc}); re-download or re-create it (nothing written)") from None
        except OSError as exc:  # disk full, permissions...
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(made)
            raise ZipImportError(f"{zip_path}: extraction failed ({exc}); free space or fix permissions beside {data_dir} (nothing written)") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(made)
            raise

    # Everything checked out: move the files in.
    result = ImportResult(skipped=skipped)
    try:
        for (info, rel), (_, target) in zip(plan, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                result.replaced.append(target)
            os.replace(staging.joinpath(*rel.parts), target)
            result.files.append(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _remove_empty(folders: list[Path]) -> None:
    """Undo the parent folders this import created (deepest first), if still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass
