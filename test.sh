#!/usr/bin/env bash
# Set up on a fresh machine (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False DVC_NO_ANALYTICS=1
# pytest exits 5 when it collects nothing: that is a failure here, never a silent pass.
.venv/bin/python -m pytest "$@"
