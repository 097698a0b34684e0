#!/usr/bin/env bash
# BENCHMARKS.md B3 (in-process throughput) and B4 (HTTP serving) on one GPU in one go, plus the
# engine's host overhead without a model (profile_engine_host.py). Results land in $OUT.
#
#   OUT=/tmp/b3b4 bash benchmark/gpu_b3_b4.sh
#
# Environment: SHAPE (llama2-7b), B3_PROMPTS (3000), B3_LIMIT (B3's --time_limit, 0 = none),
# B4_PROMPTS (160 per rate), RATES ("4 8 16"), BUDGET (seconds the whole script may take: a
# phase that would not fit is skipped), BEFORE (a tree with an older lmdeploy/ and
# benchmark/profile_engine_host.py: its host overhead is measured too), HOST_ROWS, HOST_VOCAB,
# DEVICE, VOCAB (of SHAPE, for B4's synthetic prompt ids). The serving packages (fastapi,
# starlette, uvicorn, pydantic, pydantic-core, typing-inspection, annotated-types,
# opentelemetry-api) must be importable: on the lent GPU machines they travel as wheels.
set -u -o pipefail
OUT=$(realpath -m "${OUT:-./b3b4_out}")
SHAPE=${SHAPE:-llama2-7b}
B3_PROMPTS=${B3_PROMPTS:-3000}
B3_LIMIT=${B3_LIMIT:-0}
B4_PROMPTS=${B4_PROMPTS:-160}
RATES=${RATES:-4 8 16}
BUDGET=${BUDGET:-100000}
BEFORE=${BEFORE:-}
HOST_ROWS=${HOST_ROWS:-64,256}
HOST_VOCAB=${HOST_VOCAB:-32000}
VOCAB=${VOCAB:-32000}
DEVICE=${DEVICE:-cuda}
PORT=${PORT:-23333}
. "$(dirname "$0")/gpu_lib.sh"

say "host overhead without a model (${HOST_ROWS} rows, ready-made logits, 12 ms of device time)"
for tree in ${BEFORE:+"$BEFORE"} .; do
  tag=$([ "$tree" = . ] && echo after || echo before)
  for clients in none threads; do
    (cd "$tree" && python3 benchmark/profile_engine_host.py --device "$DEVICE" \
      --vocab "$HOST_VOCAB" --rows "$HOST_ROWS" --steps 60 --device_ms 12 --clients $clients \
      --out "$OUT/host_${tag}_${clients}.json") 2>&1 | grep -v '^$' | tee -a "$OUT/host.log"
  done
done

if [ "$(left)" -gt 200 ]; then
  say "B3: $B3_PROMPTS synthetic prompts, concurrency 256"
  timeout $(($(left) - 120)) python3 benchmark/profile_throughput.py synthetic --dummy "$SHAPE" \
    --concurrency 256 --num_prompts "$B3_PROMPTS" --max_batch_size 256 \
    --cache_max_entry_count 0.9 --no_progress --engine_timing --time_limit "$B3_LIMIT" \
    --out "$OUT/b3.json" 2>&1 | tee "$OUT/b3.log"
else
  say "B3 skipped: $(left)s left"
fi

if [ "$(left)" -gt 90 ]; then
  say "B4: api_server --dummy $SHAPE, rates $RATES, $B4_PROMPTS prompts each"
  python3 -m lmdeploy.serve.openai.api_server --dummy "$SHAPE" --server_port "$PORT" \
    --log_level warning --engine_timing ${SERVER_FLAGS:-} >"$OUT/server.log" 2>&1 &
  server=$!
  wait_for_server $server "$PORT"
  say "server up"
  rates="" need=20
  for r in $RATES; do  # each rate needs about B4_PROMPTS / r seconds plus a tail
    need=$((need + B4_PROMPTS / r + 15))
    [ "$(left)" -gt $need ] && rates="$rates $r"
  done
  [ -n "$rates" ] && timeout $(($(left) - 15)) python3 benchmark/profile_restful_api.py synthetic \
    --base_url "http://127.0.0.1:$PORT" --request_rate $rates --num_prompts "$B4_PROMPTS" \
    --vocab_size "$VOCAB" --no_progress --out "$OUT/b4.json" 2>&1 | tee "$OUT/b4.log"
  kill -INT $server
  wait $server
  grep -E 'engine_timing|Error|error' "$OUT/server.log" | tail -5
else
  say "B4 skipped: $(left)s left"
fi
say done
