# Shared by the GPU run scripts (sourced, after OUT and BUDGET are set): a time budget,
# timestamped messages, the GPU's name in $OUT/gpu.txt, and waiting for a local api_server.
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }
say() { echo "[$(($(date +%s) - T0))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1

# wait_for_server PID PORT: until /health answers (0), or the server exits or 2 minutes pass (1)
wait_for_server() {
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$2/health" >/dev/null && return 0
    kill -0 "$1" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}
