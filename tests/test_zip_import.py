"""ZIP import: good layouts land in the data folder; every hostile or broken archive is refused whole."""
from __future__ import annotations

import io
import stat
import zipfile

import pytest
from click.testing import CliRunner

from pipeline.errors import ZipImportError
from pipeline.zip_import import ZipLimits, import_zip
from stages.cli import group


def _zip(path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tree(root):
    """Every path under root (files and folders), relative, for 'nothing written' checks."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _refused(tmp_path, archive, match, **kw):
    """Import must fail with a one-line ZipImportError and leave the workspace as it was."""
    workspace = tmp_path / "ws"
    workspace.mkdir(exist_ok=True)
    before = _tree(workspace)
    with pytest.raises(ZipImportError) as err:
        import_zip(archive, workspace / "data", progress=False, **kw)
    message = str(err.value)
    assert match in message and str(archive) in message and "\n" not in message, message
    assert _tree(workspace) == before  # no data folder, no staging folder left behind
    return message


TRIPLET = {"s.mp3": b"ID3 fake audio", "s_prompt.txt": b"pop", "s_lyrics.txt": b"[verse]\nla"}


def test_flat_archive(tmp_path):
    archive = _zip(tmp_path / "flat.zip", TRIPLET)
    result = import_zip(archive, tmp_path / "ws" / "data", progress=False)
    assert sorted(p.name for p in result.files) == ["s.mp3", "s_lyrics.txt", "s_prompt.txt"]
    assert (tmp_path / "ws" / "data" / "s_prompt.txt").read_bytes() == b"pop"
    assert _tree(tmp_path / "ws") == ["data", "data/s.mp3", "data/s_lyrics.txt", "data/s_prompt.txt"]


def test_nested_archive_strips_common_top_and_skips_junk(tmp_path):
    members = {f"My Songs/album/{k}": v for k, v in TRIPLET.items()}
    members["My Songs/other_prompt.txt"] = b"rock"
    members["__MACOSX/My Songs/album/._s.mp3"] = b"resource fork"
    members["My Songs/.DS_Store"] = b"finder"
    archive = _zip(tmp_path / "nested.zip", members)
    result = import_zip(archive, tmp_path / "data", progress=False)
    assert _tree(tmp_path / "data") == [
        "album", "album/s.mp3", "album/s_lyrics.txt", "album/s_prompt.txt", "other_prompt.txt",
    ]
    assert len(result.skipped) == 2


def test_parent_traversal_refused(tmp_path):
    archive = _zip(tmp_path / "evil.zip", {"ok.txt": b"x", "../x": b"escape"})
    _refused(tmp_path, archive, "outside the folder")


def test_nested_traversal_refused(tmp_path):
    archive = _zip(tmp_path / "evil.zip", {"a/../../x": b"escape"})
    _refused(tmp_path, archive, "outside the folder")


def test_absolute_path_refused(tmp_path):
    archive = _zip(tmp_path / "abs.zip", {"/etc/evil": b"x"})
    _refused(tmp_path, archive, "absolute path")
    archive = _zip(tmp_path / "drive.zip", {"C:\\evil.txt": b"x"})
    _refused(tmp_path, archive, "absolute path")


def test_symlink_member_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("s_prompt.txt", b"pop")
        link = zipfile.ZipInfo("s.mp3")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    _refused(tmp_path, archive, "symbolic link")


def test_bomb_refused(tmp_path):
    archive = _zip(tmp_path / "bomb.zip", {"s_prompt.txt": b"pop", "s.wav": bytes(20_000_000)})
    _refused(tmp_path, archive, "ZIP bomb")


def test_small_compressible_text_is_fine(tmp_path):
    archive = _zip(tmp_path / "text.zip", {"s_lyrics.txt": b"la " * 100_000})  # 300 KB, ~1000:1
    assert len(import_zip(archive, tmp_path / "data", progress=False).files) == 1


def test_too_many_members_refused(tmp_path):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(10_001):
            zf.writestr(f"f{i}.txt", b"")
    _refused(tmp_path, archive, "10001 members (limit 10000)")


def test_total_size_limit(tmp_path):
    archive = _zip(tmp_path / "big.zip", {"a.bin": b"x" * 5000, "b.bin": b"y" * 5000}, zipfile.ZIP_STORED)
    _refused(tmp_path, archive, "uncompressed", limits=ZipLimits(max_total_bytes=8000))


def test_corrupt_archive_refused(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 this is not really a zip" * 10)
    _refused(tmp_path, tmp_path / "junk.zip", "not a readable ZIP")


def test_corrupt_member_data_refused(tmp_path):
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("s_prompt.txt", b"pop")
        zf.writestr("s.mp3", b"A" * 4000)
    data = bytearray(raw.getvalue())
    at = data.index(b"A" * 4000)
    data[at + 100 : at + 110] = b"B" * 10  # flip payload bytes: the CRC no longer matches
    (tmp_path / "crc.zip").write_bytes(bytes(data))
    _refused(tmp_path, tmp_path / "crc.zip", "corrupt")


def test_existing_files_need_overwrite(tmp_path):
    data = tmp_path / "ws" / "data"
    data.mkdir(parents=True)
    (data / "s_prompt.txt").write_bytes(b"old")
    archive = _zip(tmp_path / "again.zip", TRIPLET)
    message = _refused(tmp_path, archive, "already exist")
    assert "s_prompt.txt" in message and "--overwrite" in message
    assert (data / "s_prompt.txt").read_bytes() == b"old"
    result = import_zip(archive, data, overwrite=True, progress=False)
    assert (data / "s_prompt.txt").read_bytes() == b"pop" and result.replaced == [data / "s_prompt.txt"]


def test_cli_import_zip(tmp_path):
    archive = _zip(tmp_path / "songs.zip", TRIPLET)
    data = tmp_path / "data"
    runner = CliRunner()
    ok = runner.invoke(group, ["import-zip", str(archive), "--data-dir", str(data)])
    assert ok.exit_code == 0, ok.output
    assert "Imported 3 files" in ok.output
    again = runner.invoke(group, ["import-zip", str(archive), "--data-dir", str(data)])
    assert isinstance(again.exception, ZipImportError) and "\n" not in str(again.exception)
    forced = runner.invoke(group, ["import-zip", str(archive), "--data-dir", str(data), "--overwrite"])
    assert forced.exit_code == 0 and "replaced 3" in forced.output
    tiny = runner.invoke(group, ["import-zip", str(archive), "--data-dir", str(tmp_path / "d2"),
                                 "--max-total-gb", "0.00000001"])
    assert isinstance(tiny.exception, ZipImportError) and not (tmp_path / "d2").exists()
