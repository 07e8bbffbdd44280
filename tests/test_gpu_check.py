"""scripts/gpu_check.sh fails loudly (non-zero, one clear line) where there is no CUDA GPU: it never
skips and never installs anything first. The script runs from a copy in a temporary folder, so it
can reach neither this checkout's setup.sh nor its .venv."""
from __future__ import annotations

import os
import re
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here (gpu_check.sh runs these)")
def test_cuda_selection_is_the_cuda_marker(tmp_path):
    """The script's selection (``-m cuda``) is exactly the tests that need CUDA: here each one skips
    for that reason, and the no-CUDA test above (skipped where CUDA exists) is not among them, nor
    any test merely named after CUDA. Every file that mentions CUDA is collected (the rest cannot
    hold a CUDA-only test: a skip on ``torch.cuda`` would name it)."""
    tests = Path(__file__).resolve().parent
    files = sorted(str(f) for f in tests.glob("test_*.py") if "cuda" in f.read_text(encoding="utf-8").lower())
    for f in files:  # a CUDA-only test uses the marker, never its own skipif on torch.cuda
        assert not re.search(r"skipif\(\s*not\s+torch\.cuda\.is_available", Path(f).read_text(encoding="utf-8")), f
    report = tmp_path / "report.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs",
                           f"--junitxml={report}", *files], capture_output=True, text=True, cwd=tests.parent, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import xml.etree.ElementTree as ET

    cases = {c.get("name"): c for c in ET.parse(report).getroot().iter("testcase")}
    assert {"test_cuda_bf16_matches_cpu_fp32", "test_one_cuda_sync_per_optimizer_step",
            "test_fp32_out_matmul_matches_fp32_on_cuda", "test_cuda_moves_weights_only_while_used",
            "test_cuda_offload"} <= set(cases)
    assert "test_fails_loudly_when_torch_sees_no_cuda" not in cases
    assert "test_cuda_without_a_gpu_or_beyond_the_count" not in cases  # about CUDA, runs on the CPU
    for name, case in cases.items():
        skipped = case.find("skipped")
        assert skipped is not None and "needs a CUDA device" in skipped.get("message", ""), name


def _stand_ins(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in nvidia-smi listing a GPU and a stand-in interpreter that logs its arguments and
    succeeds: what the script runs, in which order, without a GPU."""
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls.log"
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n")
    (fake / "python").write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    return fake, log


def test_phases_run_only_the_chosen_parts_with_a_prepared_python(tmp_path):
    fake, log = _stand_ins(tmp_path)
    proc = _run(tmp_path, str(fake), GPU_CHECK_PYTHON=str(fake / "python"), GPU_CHECK_PHASES="bench-none,bench-auto")
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    benches = [c for c in calls if c.startswith("-m stages bench")]
    assert len(benches) == 2 and "gradient_checkpointing=none" in benches[0] and "gradient_checkpointing=auto" in benches[1]
    assert not any(c.startswith(("-m pytest", "-m stages train")) for c in calls)
    assert not (tmp_path / ".venv").exists()  # GPU_CHECK_PYTHON: nothing installed
    proc = _run(tmp_path, str(fake), GPU_CHECK_PYTHON=str(fake / "python"), GPU_CHECK_PHASES="tests")
    assert proc.returncode == 0, proc.stderr
    assert "-m pytest -q -p no:cacheprovider -m cuda" in log.read_text()


def test_an_unknown_phase_fails_in_one_line(tmp_path):
    proc = _run(tmp_path, GPU_CHECK_PHASES="tests,benchmark")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "gpu_check FAILED: GPU_CHECK_PHASES: unknown phase 'benchmark'" in proc.stderr
