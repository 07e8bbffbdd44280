"""Every `aceturbo` subcommand loads and has --help; a user error is one line with no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from stages.cli import COMMANDS, LazyGroup, group, main


def test_every_command_is_registered_and_loads():
    missing = [name for name in COMMANDS if LazyGroup._load(name) is None]
    assert missing == []


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name):
    result = CliRunner().invoke(group, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(group, ["--help"])
    assert result.exit_code == 0
    for name in ("ingest", "train", "generate", "ui", "bench"):
        assert name in result.output


def test_user_error_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--data-dir", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and "Traceback" not in err


def test_console_script_help_starts_without_torch():
    code = "import sys; from stages.cli import main; sys.argv=['aceturbo','--help'];\n" \
           "try:\n    main()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
