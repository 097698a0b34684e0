#!/usr/bin/env bash
# The int8 KV (quant_policy 4) GPU runs recorded in benchmark/NOTES.md, in two parts that each
# fit one device call. Results (logs, JSON) go to $OUT (default ./kv_int8_out).
#   bash benchmark/kv_int8_h100.sh 1   # install, GPU tests, B2 128/2048 max batch, kernels, capacity
#   bash benchmark/kv_int8_h100.sh 2   # install, GPU tests, int8 decode sweep, B2 2048/2048 bs64
#                                      # and 128/2048 max batch
# (The recorded part-2 run applied the sweep's best config, num_stages 5, through a wrapper;
# it is now triton_paged_attention.INT8_DECODE_CFG's default for static scales.)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-./kv_int8_out}
mkdir -p "$OUT"
part=${1:-1}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 \
    || { echo "install failed"; tail -20 /tmp/install.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

if [ "$part" = 1 ]; then
    timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_kv_int8_gpu.py \
        >"$OUT/tests.txt" 2>&1
    echo "gpu tests rc $?"; tail -4 "$OUT/tests.txt"
    timeout 100 python3 benchmark/profile_generation.py --dummy llama2-7b --rows max:128:2048 \
        --test_round 1 --quant_policy 4 --kv_int8_scales per_tensor \
        --out "$OUT/b2_128_2048_int8.json" >"$OUT/b2_128_2048.txt" 2>&1
    echo "b2 128/2048 rc $?"; grep -E "KV pool|max batch|^\|" "$OUT/b2_128_2048.txt"
    timeout 70 python3 benchmark/bench_kernels.py --only int8 --sweep \
        --out "$OUT/kernels_int8.json" >"$OUT/kernels.txt" 2>&1
    echo "bench_kernels rc $?"; sed -n '/^kernel /,$p' "$OUT/kernels.txt" | tail -16
    grep "cfg " "$OUT/kernels.txt"
    timeout 40 python3 benchmark/kv_capacity.py --dummy llama2-7b --session_tokens 2048 \
        --out "$OUT/capacity.json" >"$OUT/capacity.txt" 2>&1
    echo "capacity rc $?"; grep -v Warn "$OUT/capacity.txt" | tail -5
else
    timeout 75 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kv_int8_gpu.py \
        -k "not 7b_int8_graphs_equal_eager[online]" >"$OUT/tests.txt" 2>&1
    echo "gpu tests rc $?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.txt" | tail -8
    timeout 55 python3 benchmark/bench_kernels.py --only int8 --sweep \
        --out "$OUT/kernels_int8.json" >"$OUT/kernels.txt" 2>&1
    echo "bench_kernels rc $?"; sed -n '/^kernel /,$p' "$OUT/kernels.txt" | tail -16
    grep "cfg " "$OUT/kernels.txt"
    int8="--dummy llama2-7b --test_round 1 --quant_policy 4 --kv_int8_scales per_tensor"
    timeout 105 python3 benchmark/profile_generation.py $int8 --rows 64:2048:2048 \
        --cache_max_entry_count 1.0 --max_prefill_tokens 4096 \
        --out "$OUT/b2_2048_2048_int8.json" >"$OUT/b2_2048.txt" 2>&1
    echo "b2 2048/2048 rc $?"; grep -E "KV pool|^\|" "$OUT/b2_2048.txt"
    timeout 90 python3 benchmark/profile_generation.py $int8 --rows max:128:2048 \
        --out "$OUT/b2_128_2048_int8.json" >"$OUT/b2_128.txt" 2>&1
    echo "b2 128/2048 rc $?"; grep -E "KV pool|max batch|^\|" "$OUT/b2_128.txt"
fi
