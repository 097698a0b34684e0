#!/usr/bin/env bash
# Quick start: install, convert the embedded MiniChat model into ./workspace with deploy, then
# run one scripted chat turn through the TurboMind engine and print the reply and the speed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LMDEPLOY_EXTRAS=${LMDEPLOY_EXTRAS:-test} LMDEPLOY_DEEPSPEED=${LMDEPLOY_DEEPSPEED:-0} LMDEPLOY_BROWSER=${LMDEPLOY_BROWSER:-0} \
    bash scripts/install.sh
"$PYTHON" -m lmdeploy.serve.turbomind.deploy minichat assets/minichat --dst_path ./workspace
"$PYTHON" tools/demo.py ./workspace "$@"
