#!/usr/bin/env bash
# Installs lmdeploy (editable, with the C++ core built by CMake) and its test dependencies into
# the current Python environment. Keeps the torch that is already installed; on a machine
# without torch it takes the CPU build (torch==2.13.0), never the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${LMDEPLOY_EXTRAS:-all}

if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "[install] torch not found: installing the CPU build torch==2.13.0"
    "$PYTHON" -m pip install -q torch==2.13.0
fi
torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')

# Pin the installed torch so that no dependency swaps it for another build.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -v '^torch==' requirements/constraints.txt > "$constraints"
echo "torch==$torch_version" >> "$constraints"

echo "[install] lmdeploy[$EXTRAS] (torch $torch_version kept)"
"$PYTHON" -m pip install -q -c "$constraints" -e ".[$EXTRAS]"
if [ "${LMDEPLOY_BROWSER:-1}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
    # The web UI tests drive Debian's headless Chromium (Playwright's own browser download is
    # not used).
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[install] chromium (LMDEPLOY_BROWSER=0 skips it)"
        apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "[install] chromium not found and cannot apt-get it: the web UI tests will skip"
    fi
fi
if [ "${LMDEPLOY_DEEPSPEED:-1}" = 1 ]; then
    # AutoTP for lmdeploy.pytorch.chat; no DeepSpeed C++/CUDA ops are compiled.
    echo "[install] deepspeed (LMDEPLOY_DEEPSPEED=0 skips it)"
    DS_BUILD_OPS=0 "$PYTHON" -m pip install -q -c "$constraints" --no-build-isolation -r requirements/deepspeed.txt
fi
"$PYTHON" -c 'import lmdeploy, lmdeploy.turbomind._turbomind; print("[install] ok: lmdeploy", lmdeploy.__version__)'
