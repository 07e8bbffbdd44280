#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU and nothing else prepared:
#   1. checks for a CUDA GPU before anything else: without one it FAILS (exit 1, one line), never skips;
#   2. installs the project (bash scripts/setup.sh, as the README says) unless GPU_CHECK_PYTHON names
#      an environment that already has it;
#   3. runs the CUDA-only tests (the ones marked `cuda`, pytest -m cuda; they skip on a CPU): a skip
#      or a failure here fails the check;
#   4. runs the full-size bench, 3-minute song, bf16-true, writing docs/benchmarks.{md,json}:
#        r = 16, 64, 256 × floor / cached / live / paired, gradient checkpointing all;
#        r = 64 × floor / cached / paired without checkpointing;
#        r = 64 paired with the default gradient_checkpointing auto;
#        r = 64 paired, compiled, checkpointing all, none and auto.
#      One feature build (checkpoint, song, cache) in GPU_CHECK_WORKDIR serves every run; each mode
#      is one process with one model load; 2 warm-up + 5 timed steps. Rows the memory model says
#      cannot fit this GPU are skipped with one line.
#   5. trains for real on that checkpoint and cache (`aceturbo train`, compile on, validation; see
#      step 5 below for what it checks and what it costs).
#   bash scripts/gpu_check.sh        # then commit docs/benchmarks.md and docs/benchmarks.json
# Environment: GPU_CHECK_PYTHON=/path/bin/python  use that interpreter, which already has the project
#                                                 and its packages (a prepared or offline machine):
#                                                 scripts/setup.sh is not run
#              GPU_CHECK_PHASES=tests,bench,train run only these phases (default: all; always in the
#                                                 script's order; steps 1-2 always run).
#                                                 bench is bench-all,bench-none,bench-auto,bench-compiled
#                                                 (the four bench commands of step 4, in that order);
#                                                 e.g. GPU_CHECK_PHASES=tests,bench-all in one session,
#                                                 then bench-none,bench-auto,bench-compiled,train in the
#                                                 next with the same GPU_CHECK_WORKDIR (the feature
#                                                 build is reused; each bench command adds its rows to
#                                                 docs/benchmarks.{md,json})
#              GPU_CHECK_WORKDIR=DIR              checkpoint/songs/cache (default .gpu_check/, reused)
#              GPU_CHECK_STEPS=5 GPU_CHECK_WARMUP=2
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
say() { echo "gpu_check [$(( $(date +%s) - started )) s]: $*"; }
fail() { echo "gpu_check FAILED: $*" >&2; exit 1; }
# GPU_CHECK_PHASES: the phases to run (always in the script's order); "bench" is its four commands.
phases=" "
IFS=', ' read -r -a asked <<< "${GPU_CHECK_PHASES:-tests,bench,train}"  # no word splitting/globbing of '*'
for phase in "${asked[@]}"; do
  case $phase in
    bench) phases+="bench-all bench-none bench-auto bench-compiled " ;;
    tests|bench-all|bench-none|bench-auto|bench-compiled|train) phases+="$phase " ;;
    *) fail "GPU_CHECK_PHASES: unknown phase '$phase' (comma-separated: tests, bench, train; bench is bench-all, bench-none, bench-auto, bench-compiled)." ;;
  esac
done
[ "$phases" != " " ] || fail "GPU_CHECK_PHASES is empty (comma-separated: tests, bench, train)."
wanted() { case "$phases" in *" $1 "*) return 0 ;; esac; return 1; }

# 1. A CUDA GPU, before installing anything.
command -v nvidia-smi >/dev/null 2>&1 \
  || fail "no CUDA GPU here: nvidia-smi is not on PATH. This check needs an NVIDIA GPU and its driver; it does not fall back to the CPU (use 'aceturbo bench --size small' there)."
gpus=$(nvidia-smi -L 2>/dev/null || true)
[ -n "$gpus" ] || fail "no CUDA GPU here: nvidia-smi lists no device."
say "found $gpus"

# 2. The environment.
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON
  say "using $PY (GPU_CHECK_PYTHON: no install)"
  needs="pipeline.bench, stages"; wanted tests && needs+=", pytest"
  "$PY" -c "import $needs" 2>/dev/null \
    || fail "GPU_CHECK_PYTHON=$PY cannot import $needs: install the project into that environment (scripts/setup.sh does) or unset GPU_CHECK_PYTHON."
else
  say "installing (bash scripts/setup.sh)"
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False DVC_NO_ANALYTICS=1
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '(not importable)') sees no CUDA device although nvidia-smi lists one: check that the driver supports torch's CUDA build."

# 3. The CUDA-only tests: each must run and pass here.
if wanted tests; then
say "CUDA-only tests"
report=$(mktemp)
"$PY" -m pytest -q -p no:cacheprovider -m cuda -rs --junitxml="$report" tests/ \
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
fi

# 4. The full-size bench.
work=${GPU_CHECK_WORKDIR:-.gpu_check}
common=(--size full --song-seconds 180 --precision bf16-true --steps "${GPU_CHECK_STEPS:-5}"
        --warmup "${GPU_CHECK_WARMUP:-2}" --workdir "$work")
if wanted bench-all; then
  say "bench: r=16/64/256 x floor, cached, live, paired, checkpointing all"
  "$PY" -m stages bench "${common[@]}" --rank 16 --rank 64 --rank 256 --modes floor,cached,live,paired \
    --set gradient_checkpointing=all
fi
if wanted bench-none; then
  say "bench: r=64 x floor, cached, paired, checkpointing none"
  "$PY" -m stages bench "${common[@]}" --rank 64 --modes floor,cached,paired --set gradient_checkpointing=none
fi
if wanted bench-auto; then
  say "bench: r=64 paired, checkpointing auto (the default)"
  "$PY" -m stages bench "${common[@]}" --rank 64 --modes paired --set gradient_checkpointing=auto
fi
if wanted bench-compiled; then
  say "bench: r=64 paired, compiled, checkpointing all, none and auto"
  "$PY" -m stages bench "${common[@]}" --rank 64 --modes paired --set compile=true \
    --matrix gradient_checkpointing=all,none,auto
fi

# 5. A real training run on the bench's full-size random checkpoint and feature cache, as a user
#    starts one: the start-up checks (weights, LoRA targets, memory model, cache fingerprints),
#    compiled steps at the default gradient_checkpointing auto and r=64, validation every 2 steps
#    (on the one song: none held out) run eagerly beside the compiled blocks, a checkpoint every 3
#    steps, the best checkpoint. Cost on an H100/H200 (estimated, not yet measured): ~15 s to start
#    and load the transformer, 20-60 s of Dynamo + Inductor for the one shape bucket (the compiled
#    bench rows just compiled the same r=64 block: Inductor's cache is warm), then 6 steps, 3
#    validations (8 noise levels of the 3-minute song, forward only) and 2 checkpoints in ~10 s:
#    1-1.5 minutes of the script's 8-minute budget.
if wanted train; then
  say "train: full size, compile on, validation every 2 steps"
  check="$work/train-check"
  rm -rf "$check" && mkdir -p "$check"
  "$PY" - "$work" "$check" <<'EOF' || exit 1
import dataclasses
import sys
from pathlib import Path

import yaml

from pipeline.bench import BenchSettings, prepare_workspace

work, check = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
project, ckpt = prepare_workspace(BenchSettings(size="full", song_seconds=180), work)  # the bench's paths
if not ((ckpt / "COMPLETE-full").exists() and Path(project.paths.cache).is_dir()):
    sys.exit(f"gpu_check FAILED: no full-size checkpoint and feature cache in {work} yet: run a bench phase "
             "first with this GPU_CHECK_WORKDIR (e.g. GPU_CHECK_PHASES=bench-auto,train).")
paths = {**dataclasses.asdict(project.paths), "exps": str(check / "exps")}
params = {"paths": paths, "models": dataclasses.asdict(project.models)}
(check / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
EOF
  "$PY" -m stages train --params "$check/params.yaml" --experiment gpu-check --compile --max-steps 6 --warmup-steps 2 \
    --save-every 3 --val-every 2 --plot-every 0 2>&1 | tee "$check/train.log" \
    || fail "aceturbo train (full size, compile, validation) failed (see above)."
  grep -q "compile on" "$check/train.log" && grep -q "^best: val_loss" "$check/train.log" \
    || fail "aceturbo train reported no compiled steps or no best validation checkpoint (see $check/train.log)."
fi
case "$phases" in
  *bench-*) say "done (phases:$phases): docs/benchmarks.md has the GPU table and the targets (commit it with docs/benchmarks.json)" ;;
  *) say "done (phases:$phases)" ;;
esac
