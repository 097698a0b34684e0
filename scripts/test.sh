#!/usr/bin/env bash
# Installs everything the suite needs, then runs the whole test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pytest tests -q -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "no tests were collected"
    exit 0
fi
exit "$rc"
