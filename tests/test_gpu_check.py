"""scripts/gpu_check.sh fails loudly (non-zero, one clear line) where there is no CUDA GPU: it never
skips and never installs anything first. The script runs from a copy in a temporary folder, so it
can reach neither this checkout's setup.sh nor its .venv."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _run(tmp_path: Path, extra_path: str = "", **env) -> subprocess.CompletedProcess:
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(SCRIPT, tmp_path / "scripts" / "gpu_check.sh")
    path = os.pathsep.join(p for p in (extra_path, "/usr/bin", "/bin") if p)
    return subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": path, "HOME": str(tmp_path), **env}, timeout=120)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_fails_loudly_without_a_gpu(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode != 0
    assert "gpu_check FAILED: no CUDA GPU here" in proc.stderr
    assert not (tmp_path / ".venv").exists()  # nothing was installed


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here")
def test_fails_loudly_when_torch_sees_no_cuda(tmp_path):
    """nvidia-smi lists a GPU (a stand-in), torch does not: the check stops before any test or bench."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = _run(tmp_path, str(fake), GPU_CHECK_PYTHON=sys.executable)
    assert proc.returncode != 0
    assert "gpu_check FAILED: torch" in proc.stderr and "sees no CUDA device" in proc.stderr
    assert "CUDA-only tests" not in proc.stdout
