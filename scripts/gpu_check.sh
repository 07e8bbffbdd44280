#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU and nothing else prepared:
#   1. checks for a CUDA GPU before anything else: without one it FAILS (exit 1, one line), never skips;
#   2. installs the project (bash scripts/setup.sh, as the README says) unless GPU_CHECK_PYTHON names
#      an environment that already has it;
#   3. runs the CUDA-only tests (every test with "cuda" in its name; they skip on a CPU): a skip or a
#      failure here fails the check;
#   4. runs the full-size bench, 3-minute song, bf16-true, writing docs/benchmarks.{md,json}:
#        r = 16, 64, 256 × floor / cached / live / paired, gradient checkpointing on;
#        r = 64 × floor / cached / paired without checkpointing;
#        r = 64 paired, compiled, with and without checkpointing (only when TrainConfig has a
#        `compile` setting).
#      One feature build (checkpoint, song, cache) in GPU_CHECK_WORKDIR serves every run; each mode
#      is one process with one model load; 2 warm-up + 5 timed steps. Rows the memory model says
#      cannot fit this GPU are skipped with one line.
#   bash scripts/gpu_check.sh        # then commit docs/benchmarks.md and docs/benchmarks.json
# Environment: GPU_CHECK_PYTHON=/path/bin/python  use that interpreter (no install)
#              GPU_CHECK_WORKDIR=DIR              checkpoint/songs/cache (default .gpu_check/, reused)
#              GPU_CHECK_STEPS=5 GPU_CHECK_WARMUP=2
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
say() { echo "gpu_check [$(( $(date +%s) - started )) s]: $*"; }
fail() { echo "gpu_check FAILED: $*" >&2; exit 1; }

# 1. A CUDA GPU, before installing anything.
command -v nvidia-smi >/dev/null 2>&1 \
  || fail "no CUDA GPU here: nvidia-smi is not on PATH. This check needs an NVIDIA GPU and its driver; it does not fall back to the CPU (use 'aceturbo bench --size small' there)."
gpus=$(nvidia-smi -L 2>/dev/null || true)
[ -n "$gpus" ] || fail "no CUDA GPU here: nvidia-smi lists no device."
say "found $gpus"

# 2. The environment.
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON
else
  say "installing (bash scripts/setup.sh)"
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False DVC_NO_ANALYTICS=1
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '(not importable)') sees no CUDA device although nvidia-smi lists one: check that the driver supports torch's CUDA build."

# 3. The CUDA-only tests: each must run and pass here.
say "CUDA-only tests"
report=$(mktemp)
"$PY" -m pytest -q -p no:cacheprovider -k cuda -rs --junitxml="$report" tests/ \
  || fail "CUDA-only tests failed (see above)."
"$PY" - "$report" <<'EOF' || fail "CUDA-only tests were skipped on a CUDA machine (see above)."
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
ran = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(f"gpu_check: {ran} CUDA-only test(s), {skipped} skipped")
sys.exit(1 if skipped or not ran else 0)
EOF
rm -f "$report"

# 4. The full-size bench. gradient_checkpointing is spelled true/false: every TrainConfig accepts it.
work=${GPU_CHECK_WORKDIR:-.gpu_check}
common=(--size full --song-seconds 180 --precision bf16-true --steps "${GPU_CHECK_STEPS:-5}"
        --warmup "${GPU_CHECK_WARMUP:-2}" --workdir "$work")
say "bench: r=16/64/256 x floor, cached, live, paired, checkpointing on"
"$PY" -m stages bench "${common[@]}" --rank 16 --rank 64 --rank 256 --modes floor,cached,live,paired \
  --set gradient_checkpointing=true
say "bench: r=64 x floor, cached, paired, checkpointing off"
"$PY" -m stages bench "${common[@]}" --rank 64 --modes floor,cached,paired --set gradient_checkpointing=false
if "$PY" -c "import sys; from pipeline.train_config import TrainConfig; sys.exit(0 if 'compile' in TrainConfig.__dataclass_fields__ else 1)"; then
  say "bench: r=64 paired, compiled, checkpointing on and off"
  "$PY" -m stages bench "${common[@]}" --rank 64 --modes paired --set compile=true \
    --matrix gradient_checkpointing=true,false
else
  say "bench: no 'compile' train setting in this version: compiled runs skipped"
fi
say "done: docs/benchmarks.md has the GPU table and the targets (commit it with docs/benchmarks.json)"
