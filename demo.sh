#!/usr/bin/env bash
# Set up on a fresh machine and run the whole pipeline on the built-in demo (random tiny weights).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False DVC_NO_ANALYTICS=1
.venv/bin/aceturbo demo "$@"
