#!/usr/bin/env bash
# The GPU checks and A/B runs that CPU-side work left pending (benchmark/NOTES.md, "Not
# measured on the GPU"), in priority order, each phase skipped when BUDGET would not cover it.
# One device call runs at most 10 minutes: pick phases with PHASES.
#
#   OUT=$OUT PHASES="tests layout int8 b1 b2long" BUDGET=560 bash benchmark/gpu_checks.sh
#   OUT=$OUT PHASES="b4 prefill" BUDGET=560 bash benchmark/gpu_checks.sh
#   OUT=$OUT PHASES="c128" BUDGET=560 bash benchmark/gpu_checks.sh
#
# Phases (about how long each takes on the H100):
#   tests   engine + int8 GPU tests, with the fast_i8 equality test (~150 s)
#   layout  bench_gemm_layout.py: cuBLAS with [in, out] vs [out, in] weights (~60 s)
#   int8    bench_kernels.py --only int8 --sweep (fast_i8 among the candidates) (~90 s)
#   b1      B1 128->2048 bs1 (~40 s)
#   b2long  B2 64:2048:2048 fp16 and int8 under the scheduler's admission check (~200 s)
#   b4      B4 rate 4 against api_server with --no-jit_schedule and without (~150 s; the serving
#           wheels must be installed, see gpu_b3_b4.sh); B4_RUNS="off on uv" adds a JIT run
#           with uvloop + httptools (build/wheels-uvloop, carried) installed; the client is
#           aiohttp, installed from build/wheels-aiohttp (carried) when that folder is there
#   prefill profile_step.py on a lone 2048- and 512-token prompt: device idle inside the eager
#           forward and its largest gaps; bench_kernels.py --only prefill, with the setup
#           cost of a prompt length met for the first time (~90 s)
#   c128    B2 128:2048:2048 fp16, the row never run (pool-bound: ~57 sessions fit) (~250 s)
#   fresh   GPU tests of the dense (fresh prompt) path and of graphs == eager (~120 s)
#   mixed   profile_step.py on mixed steps around the largest mixed graph and lone prompts of
#           600 / 1000 tokens: graph or eager, device time against the kernel sum (~40 s)
#   ttft    B1 TTFT of a 2048-token prompt, 3 rounds (~30 s)
#   b1nojit B1 128->2048 bs1 with --no-jit_schedule (phase b1 runs the default, JIT) (~40 s)
#   bs64    B2 1/128 and 128/128 at bs64, GEN_FLAGS added (e.g. --no-jit_schedule) (~60 s)
#   sampler GPU tests of the sampler kernel and graphs (SKIP_TESTS=1: not); bench_sampler.py on
#           B1/B4's modes (~60 s)
#   decode4 bench_kernels.py decode sweep at B4's (4 rows), B1's and bs64's steps as their graphs
#           launch them (hint = session_len) (~90 s)
#   rows14  profile_step.py on decode-only steps of 1 and 4 rows (B1's and B4's) (~40 s)
#   b3      B3 in-process, 3000 synthetic prompts at concurrency 256, B3_LIMIT s (90) (~140 s)
#   pdltests GPU tests of the kernels PDL touches: test_pdl_gpu, test_kv_int8_gpu,
#           test_kernels_gpu (~150 s)
#   gemv    bench_gemm.py at M 1-64 with the layer weights also stored [out, in] (K
#           contiguous): does the Triton GEMV beat cuBLAS there? (~120 s)
#   mid     bench_gemm.py at M 224 and 256 (B4's mixed steps): tensor-core tiles vs cuBLAS
#           (~100 s)
#
# TREE=build/snap runs every phase from a snapshot of another branch (git archive BRANCH
# lmdeploy benchmark tests | tar -x -C build/snap; carry it): the C++ extension built here is
# copied into it, and phases run with it as the working directory (its results next to main's
# from the same call).
set -u -o pipefail
OUT=$(realpath -m "${OUT:-./gpu_checks_out}")
ROOT=$PWD  # the checkout (phases may run from TREE)
PHASES=${PHASES:-tests layout int8 b1 b2long}
BUDGET=${BUDGET:-560}
PORT=${PORT:-23333}
. "$(dirname "$0")/gpu_lib.sh"
want() { [[ " $PHASES " == *" $1 "* ]] && { [ "$(left)" -gt "$2" ] || { say "$1 skipped: $(left)s left"; false; }; }; }
t() { timeout $(($(left) - 10)) "$@"; }  # a phase's command, within what is left of BUDGET
# variables, not functions: timeout cannot run a function
GEN="python3 benchmark/profile_generation.py --dummy llama2-7b"
STEP="python3 benchmark/profile_step.py --session_len 4096 --iters 10"

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 ||
  { tail -20 "$OUT/install.log"; exit 1; }
say installed
if [ -n "${TREE:-}" ]; then
  cp lmdeploy/turbomind/_turbomind*.so "$TREE/lmdeploy/turbomind/" && cd "$TREE" &&
    export PYTHONPATH="$PWD" && say "phases run from $TREE" || exit 1
fi
if want tests 150; then
  t python3 -m pytest -q tests/gpu/test_engine_gpu.py \
    tests/gpu/test_kv_int8_gpu.py >"$OUT/tests.log" 2>&1
  tail -3 "$OUT/tests.log"; say tests
fi
if want layout 60; then
  t python3 benchmark/bench_gemm_layout.py --tokens 1,4,16,64,256 \
    --out "$OUT/gemm_layout.json" 2>&1 | tee "$OUT/gemm_layout.log" | tail -40; say layout
fi
if want int8 90; then
  t python3 benchmark/bench_kernels.py --only int8 --sweep \
    --out "$OUT/int8_sweep.json" >"$OUT/int8_sweep.log" 2>&1
  grep -E "fast_i8|best|^decode_attn" "$OUT/int8_sweep.log" | tail -20; say int8
fi
if want b1 80; then
  t $GEN --rows 1:128:2048 --test_round 2 --out "$OUT/b1.json" 2>&1 |
    tail -3
  say b1
fi
if want b2long 200; then
  t $GEN --rows 64:2048:2048 --test_round 1 --out "$OUT/b2_2048.json" \
    2>&1 | tail -3
  t $GEN --rows 64:2048:2048 --test_round 1 --quant_policy 4 \
    --kv_int8_scales per_tensor --cache_max_entry_count 1.0 --max_prefill_tokens 4096 \
    --out "$OUT/b2_2048_int8.json" 2>&1 | tail -3
  say b2long
fi
if want b4 150; then
  # profile_restful_api.py's default client (httpx when it is missing); no index on the device
  [ -d "$ROOT/build/wheels-aiohttp" ] && { python3 -m pip install -q --no-index \
    --find-links "$ROOT/build/wheels-aiohttp" aiohttp || say "aiohttp not installed: httpx"; }
  for jit in ${B4_RUNS:-off on}; do
    # "uv": JIT (the default) with uvloop + httptools installed (uvicorn's "auto" takes them)
    [ $jit = uv ] && { python3 -m pip install -q --no-index --find-links "$ROOT/build/wheels-uvloop" \
      uvloop httptools || break; }
    flag=$([ $jit = off ] && echo --no-jit_schedule)
    python3 -m lmdeploy.serve.openai.api_server --dummy llama2-7b --server_port "$PORT" \
      --log_level warning --engine_timing $flag >"$OUT/server_jit_$jit.log" 2>&1 &
    server=$!
    wait_for_server $server "$PORT"
    t python3 benchmark/profile_restful_api.py synthetic \
      --base_url "http://127.0.0.1:$PORT" --request_rate 4 --num_prompts 120 --vocab_size 32000 \
      --no_progress --out "$OUT/b4_jit_$jit.json" 2>&1 | tail -12
    kill -INT $server
    wait $server
    grep -m3 -iE "falling back|error|traceback" "$OUT/server_jit_$jit.log"
  done
  say b4
fi
if want prefill 90; then
  t $STEP --cases '/2048;/512' --out "$OUT/prefill_step.json" 2>&1 |
    grep -E "^step|^runner|idle|  [0-9]+ us"
  t python3 benchmark/bench_kernels.py --only prefill \
    --out "$OUT/prefill_kernels.json" 2>&1 | grep -E "prefill_attn|prompt_attn"
  say prefill
fi
if want c128 250; then
  t $GEN --rows 128:2048:2048 --test_round 1 --engine_timing \
    --out "$OUT/b2_c128_2048.json" 2>&1 | grep -E "^\| [0-9]|engine_timing|compiled" | cut -c1-400
  say c128
fi
if want fresh 120; then
  t python3 -m pytest -q tests/gpu/test_engine_gpu.py \
    tests/gpu/test_cuda_graph_gpu.py >"$OUT/fresh_tests.log" 2>&1
  tail -3 "$OUT/fresh_tests.log"; say fresh
fi
if want mixed 40; then
  t $STEP --cases '4:300/220;4:300/512;4:300/700;/600;/1000' \
    --out "$OUT/mixed_steps.json" 2>&1 | grep -E "^step|^runner"
  say mixed
fi
if want ttft 30; then
  t $GEN --rows 1:2048:32 --test_round 3 --engine_timing \
    --out "$OUT/ttft2048.json" 2>&1 | grep -E "^\| [0-9]" | cut -c1-250
  say ttft
fi
if want b1nojit 80; then
  t $GEN --rows 1:128:2048 --test_round 2 --no-jit_schedule \
    --out "$OUT/b1_nojit.json" 2>&1 | tail -3
  say b1nojit
fi
if want bs64 60; then
  t $GEN --rows 64:1:128,64:128:128 --test_round 2 ${GEN_FLAGS:-} \
    --out "$OUT/bs64.json" 2>&1 | grep -E "^\| [0-9]" | cut -c1-250
  say bs64
fi
if want sampler 60; then
  [ -n "${SKIP_TESTS:-}" ] || { t python3 -m pytest -q \
    tests/gpu/test_sampler_graphs_gpu.py tests/gpu/test_kernels_gpu.py -k "sample or graph" \
    >"$OUT/sampler_tests.log" 2>&1; tail -2 "$OUT/sampler_tests.log"; }
  t python3 benchmark/bench_sampler.py --rows 1,4,64,256 \
    --vocab 32000 --modes greedy+bad,temperature+bad,top_k40+top_p \
    --out "$OUT/bench_sampler.json" 2>&1 | tail -14
  say sampler
fi
if want decode4 90; then
  t python3 benchmark/bench_kernels.py --only decode --sweep \
    --decode_cases 4:300:4096,4:600:4096,4:1100:4096,1:300:4096,64:128:2048 \
    --out "$OUT/decode4.json" >"$OUT/decode4.log" 2>&1
  grep -E "^decode_attn" "$OUT/decode4.log" | cut -c1-200
  say decode4
fi
if want rows14 40; then
  t $STEP --cases '1:300/;4:300/;1:1100/;4:1100/' --max_batch_size 32 \
    --out "$OUT/decode_rows.json" 2>&1 | grep -E "^step|^runner"
  say rows14
fi
if want b3 $((${B3_LIMIT:-90} + 50)); then
  t python3 benchmark/profile_throughput.py synthetic --dummy llama2-7b \
    --concurrency 256 --num_prompts 3000 --max_batch_size 256 --cache_max_entry_count 0.9 \
    --no_progress --engine_timing --time_limit "${B3_LIMIT:-90}" --out "$OUT/b3.json" 2>&1 |
    grep -E "Throughput|elapsed|time limit|steps" | cut -c1-300
  say b3
fi
if want pdltests 150; then
  # the GPU tests of the kernels PDL touches, int8 included (not yet run with PDL on)
  t python3 -m pytest -q tests/gpu/test_pdl_gpu.py tests/gpu/test_kv_int8_gpu.py \
    tests/gpu/test_kernels_gpu.py >"$OUT/pdl_tests.log" 2>&1
  tail -3 "$OUT/pdl_tests.log"; say pdltests
fi
if want gemv 120; then
  t python3 benchmark/bench_gemm.py --ms 1,4,16,64 --models llama2-7b --layer_layouts kn,nk \
    --no-total --budget 80 --out "$OUT/gemv_layouts.json" >"$OUT/gemv_layouts.log" 2>&1
  sed -n '/^shape /,$p' "$OUT/gemv_layouts.log" | cut -c1-160 | head -50; say gemv
fi
if want mid 100; then
  t python3 benchmark/bench_gemm.py --ms 224,256 --models llama2-7b --no-total --budget 70 \
    --out "$OUT/gemm_mid.json" >"$OUT/gemm_mid.log" 2>&1
  sed -n '/^shape /,$p' "$OUT/gemm_mid.log" | cut -c1-160 | head -20; say mid
fi
say done
