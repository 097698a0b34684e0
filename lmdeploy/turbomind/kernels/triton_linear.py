"""Triton weight-streaming GEMM for small M (contract: linear.py): out = x @ w.

At decode sizes (M = tokens <= 64) the product is bound by reading the weight once, so the
kernel is shaped to keep HBM busy, not the tensor cores.

Grid ``(cdiv(N, BLOCK_N), split_k, cdiv(M, BLOCK_M))``: program (n, s, m) streams its split's
rows of the weight's column block n as [BLOCK_K, BLOCK_N] tiles (16-byte loads along whichever
dimension is contiguous: N for the [in, out] layer weights, K for the LM head's ``output.t()``),
pipelined ``num_stages`` deep by ``tl.range``, against the [BLOCK_M, BLOCK_K] slice of x.
Two inner products:
* dot-free (``use_dot=False``, M <= 4 in DEFAULTS): acc[BLOCK_M, BLOCK_K, BLOCK_N] += x * w
  in fp32, reduced over K once after the loop, so the loop has no cross-thread reduction;
* ``tl.dot`` (M padded to BLOCK_M >= 16 by masks): at these M the tensor cores idle anyway.
Split-K gives enough programs (~WAVES per SM) when N alone has too few column blocks: every
split stores its fp32 partial to scratch, then takes a ticket from its tile's counter (atomic,
acq_rel); the tile's last split sums the partials in split order (deterministic; 16 loads
per L2 round trip), writes the output and resets the counter to 0. One launch per GEMM, no
memset and no combine kernel: an extra graph node costs ~2 us, times 129 GEMMs per token.
Counters and scratch persist per device (scratch is never freed: captured graphs keep its
address), so launches on one device must not run concurrently on two streams. The grid and
split come from shapes only: capturable.

Launched with PDL (pdl.py) where the GPU has it: each program loads its first weight tile
before waiting for the previous kernel, so a decode step's small kernels (norms, SiLU, the
attention combine) and the launch gaps between them overlap the weight stream, which cuBLAS
launches cannot do.

Configs: only `TUNED` rows (per shape and M bucket, from benchmark/bench_gemm.py on the H100)
run this kernel; a row of None, or a shape without a row, runs torch.matmul (cuBLAS). `DEFAULTS`
by M are untuned starting points for tests, benchmarks and sweeps (`default_config`).
``LMDEPLOY_TRITON_LINEAR=0`` sends every shape to cuBLAS (A/B runs).
"""
import os
from collections import namedtuple
from typing import Optional

import torch
import triton
import triton.language as tl

from .pdl import launch_opts, pdl_enter

Cfg = namedtuple('Cfg', 'use_dot block_m block_n block_k split_k num_warps num_stages')
# split_k 0: chosen from the shape (`_auto_split`)

M_MAX = 64  # DEFAULTS' reach (from ~64 tokens the GEMM stops being weight-bound)
WAVES = 4  # target programs per SM: a split's first tile latency hides behind the others
MIN_ITERS = 4  # K tiles per split at least, so the pipeline has something to stream
MAX_SPLIT = 64
_WS_BYTES = 64 << 20  # split-K scratch cap; larger M x N needs no split anyway
_NUM_COUNTERS = 1 << 16

# (max M, config), first match wins: untuned starting points (tests, sweeps), reasoned from
# the H100's numbers; the model runs only TUNED rows (an untuned tile was up to 3.5x slower):
# - M 1-2 dot-free: 64 x 128 fp16 tiles = 16 KiB per program per stage; ptxas (sm_90) gives
#   118 registers at 4 warps, so 4 programs fit an SM with 2 tiles each in flight (128 KiB,
#   several times the HBM latency-bandwidth product per SM, ~20 KiB); for M 2 BLOCK_K halves
#   to keep the 3-D accumulator in registers (156).
# - M 3-64 tl.dot with BLOCK_M = 16/32/64 (mma needs 16 rows); the weight tile goes through
#   shared memory by cp.async, num_stages deep.
# - LM head (w = output.t(), K contiguous): long rows along K (256 x 2 B = 512 B per row).
_DOT_ROWS = ((16, Cfg(True, 16, 64, 128, 0, 4, 4)),  # both layouts: the tile goes through
             (32, Cfg(True, 32, 64, 128, 0, 4, 4)),  # shared memory either way
             (64, Cfg(True, 64, 64, 64, 0, 4, 4)))
DEFAULTS = {
    'kn': ((1, Cfg(False, 1, 128, 64, 0, 4, 3)),
           (2, Cfg(False, 2, 128, 32, 0, 4, 3)),
           (4, Cfg(False, 4, 64, 32, 0, 4, 3))) + _DOT_ROWS,
    'nk': ((1, Cfg(False, 1, 32, 256, 0, 4, 3)),
           (2, Cfg(False, 2, 32, 128, 0, 4, 3)),
           (4, Cfg(False, 4, 16, 128, 0, 4, 3))) + _DOT_ROWS,
}
# (layout, K, N, M bucket) -> Cfg, or None for cuBLAS; bench_gemm.py prints these rows.
# Llama-2-7B shapes, H100, `bench_gemm.py --ms 1,4 --models llama2-7b` (session 8), us alone
# (Triton / cuBLAS). In B1's decode step (PDL on), Triton for wo, w2 and the LM head and cuBLAS
# for qkv and w13 was fastest: 5.46 ms per step, all-Triton 5.53, all-cuBLAS 5.58 (NOTES.md,
# session 8); the kernels that precede wo and w2 (attention combine, SiLU) overlap their start.
TUNED = {
    ('kn', 4096, 12288, 1): None,  # 37.9 / 35.1: Cfg(False, 1, 128, 64, 3, 4, 3)
    ('kn', 4096, 4096, 1): Cfg(True, 16, 128, 64, 16, 4, 4),  # 14.0 / 13.9
    ('kn', 4096, 22016, 1): None,  # 64.6 / 62.6: Cfg(False, 1, 128, 64, 0, 4, 3)
    ('kn', 11008, 4096, 1): Cfg(False, 1, 128, 64, 16, 4, 1),  # 32.3 / 34.5
    ('nk', 4096, 32000, 1): Cfg(False, 1, 16, 512, 1, 4, 3),  # 85.3 / 96.3
    ('kn', 4096, 12288, 4): None,  # 39.9 / 38.9
    ('kn', 4096, 4096, 4): None,  # 14.3 / 13.8
    ('kn', 4096, 22016, 4): None,  # 66.5 / 61.2
    ('kn', 11008, 4096, 4): None,  # 34.5 / 34.5
    ('nk', 4096, 32000, 4): Cfg(True, 16, 64, 128, 2, 4, 4),  # 92.8 / 98.2
}

_INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
_ENABLED = os.environ.get('LMDEPLOY_TRITON_LINEAR', '1') != '0'


@triton.jit
def _load_x(x_ptrs, mask_m, mask_k, BLOCK_M: tl.constexpr):
    if BLOCK_M == 1:
        xk = tl.load(x_ptrs, mask=mask_k, other=0.0)
    else:
        xk = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    return xk


@triton.jit
def _load_w(w_ptrs, mask_k, mask_n, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    # the weight is read once: evict it first, keep x and the split-K partials in L2
    if EVEN_K and EVEN_N:
        w = tl.load(w_ptrs, eviction_policy='evict_first')
    else:
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0,
                    eviction_policy='evict_first')
    return w


@triton.jit
def _mac(acc, xk, w, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
         PREC: tl.constexpr, FIRST: tl.constexpr):
    """acc + xk @ w in fp32 (acc is ignored when FIRST). Dot-free: acc keeps the K axis
    ([BLOCK_K, BLOCK_N], or [BLOCK_M, BLOCK_K, BLOCK_N]), reduced once after the loop."""
    if USE_DOT:
        if UPCAST:  # the interpreter's bf16 dot is wrong
            xk = xk.to(tl.float32)
            w = w.to(tl.float32)
        if FIRST:
            res = tl.dot(xk, w, input_precision=PREC, out_dtype=tl.float32)
        else:
            res = tl.dot(xk, w, acc, input_precision=PREC)
    else:
        if BLOCK_M == 1:
            res = xk.to(tl.float32)[:, None] * w.to(tl.float32)
        else:
            res = xk.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
        if not FIRST:
            res = acc + res
    return res


@triton.jit(do_not_specialize=['M', 'split_k', 'iters'])
def _linear_kernel(X, W, O, WS, CNT, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
                   stride_om, split_k, iters, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
                   STAGES: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr, USE_PDL: tl.constexpr,
                   RED_GROUP: tl.constexpr = 16):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k0 = pid_k * iters * BLOCK_K
    n_iters = tl.minimum(iters, tl.cdiv(K - k0, BLOCK_K))
    # the split's start in int64; tile offsets fit int32 (the host sends K x N >= 2^31 to torch)
    w_ptrs = (W + k0.to(tl.int64) * stride_wk + offs_k[:, None] * stride_wk
              + offs_n[None, :] * stride_wn)
    if BLOCK_M == 1:
        x_ptrs = X + pid_m * stride_xm + (k0 + offs_k) * stride_xk
    else:
        x_ptrs = X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk
    # The first weight tile is read before waiting for the previous kernel (PDL, pdl.py):
    # weights are constant, so this HBM traffic overlaps the previous kernel and the launch.
    mask_k = k0 + offs_k < K
    w = _load_w(w_ptrs, mask_k, mask_n, EVEN_K, EVEN_N)
    pdl_enter(USE_PDL)
    acc = _mac(None, _load_x(x_ptrs, mask_m, mask_k, BLOCK_M), w, BLOCK_M, USE_DOT, UPCAST,
               PREC, True)
    for i in tl.range(1, n_iters, num_stages=STAGES):
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        mask_k = k0 + i * BLOCK_K + offs_k < K
        xk = _load_x(x_ptrs, mask_m, mask_k, BLOCK_M)
        w = _load_w(w_ptrs, mask_k, mask_n, EVEN_K, EVEN_N)
        acc = _mac(acc, xk, w, BLOCK_M, USE_DOT, UPCAST, PREC, False)
    if USE_DOT:
        res = acc
    elif BLOCK_M == 1:
        res = tl.sum(acc, axis=0)[None, :]
    else:
        res = tl.sum(acc, axis=1)

    o_mask = mask_m[:, None] & mask_n[None, :]
    o_ptrs = O + offs_m[:, None] * stride_om + offs_n[None, :]
    if not SPLIT:
        tl.store(o_ptrs, res.to(O.dtype.element_ty), mask=o_mask)
    else:
        ws_ptrs = WS + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptrs + pid_k * M * N, res, mask=o_mask)
        tl.debug_barrier()  # all threads' partials are written before thread 0's release
        cnt = CNT + pid_m * tl.num_programs(0) + pid_n
        ticket = tl.atomic_add(cnt, 1, sem='acq_rel', scope='gpu')
        if ticket == split_k - 1:  # the tile's last split: sum all partials in split order
            tot = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s0 in range(0, split_k, RED_GROUP):
                for j in tl.static_range(RED_GROUP):  # unrolled: one L2 round trip per group
                    # (a tensor compare: the interpreter rejects tensor & scalar-bool masks)
                    in_split = tl.full([BLOCK_M, BLOCK_N], s0 + j, tl.int32) < split_k
                    tot += tl.load(ws_ptrs + (s0 + j) * M * N, mask=o_mask & in_split,
                                   other=0.0, cache_modifier='.cg')
            tl.store(o_ptrs, tot.to(O.dtype.element_ty), mask=o_mask)
            tl.atomic_xchg(cnt, 0, sem='relaxed', scope='gpu')


# ----------------------------------------------------------------------------- host side
_SMS = {}
_STATE = {}  # device -> {'cnt': int32 counters, 'ws': [fp32 scratch, ...], 'dirty': bool}
_PLANS = {}


def _num_sms(device) -> int:
    if device.type != 'cuda':
        return 8  # the interpreter: small, so tests see split-K
    n = _SMS.get(device)
    if n is None:
        n = _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def _capturing(device) -> bool:
    return device.type == 'cuda' and torch.cuda.is_current_stream_capturing()


def _scratch(device, numel: int):
    """(counters, fp32 scratch of >= numel). Counters are zeroed once; the kernel leaves them
    at 0. If first made inside a graph capture, the zeroing is a graph node that has not run
    yet, so the next eager call zeroes them again."""
    st = _STATE.get(device)
    capturing = _capturing(device)
    if st is None:
        st = _STATE[device] = dict(
            cnt=torch.zeros(_NUM_COUNTERS, dtype=torch.int32, device=device), ws=[],
            dirty=capturing)
    elif st['dirty'] and not capturing:
        st['cnt'].zero_()
        st['dirty'] = False
    ws = st['ws']
    if not ws or ws[-1].numel() < numel:
        # older buffers stay alive: graphs captured over them still write there
        ws.append(torch.empty(max(numel, 2 * ws[-1].numel() if ws else 0),
                              dtype=torch.float32, device=device))
    return st['cnt'], ws[-1]


def weight_layout(w: torch.Tensor) -> Optional[str]:
    """'kn' (N contiguous), 'nk' (K contiguous: a transposed [N, K] matrix) or None."""
    if w.stride(1) == 1:
        return 'kn'
    if w.stride(0) == 1:
        return 'nk'
    return None


def m_bucket(M: int) -> int:
    return 1 << max(0, M - 1).bit_length()


def default_config(M: int, layout: str) -> Optional[Cfg]:
    """The untuned config for M rows (tests and benchmarks; None above M_MAX)."""
    if M > M_MAX or layout not in DEFAULTS:
        return None
    return next((cfg for m_max, cfg in DEFAULTS[layout] if M <= m_max), None)


def get_config(M: int, K: int, N: int, layout: str) -> Optional[Cfg]:
    """TUNED's config for this shape and M bucket, or None: torch.matmul (cuBLAS). Shapes not
    measured go to cuBLAS: an untuned tile can be several times slower (the LM head of a
    prompt graph, M = 2, took ~0.5 ms with DEFAULTS' guess)."""
    if not _ENABLED or layout is None:
        return None
    return TUNED.get((layout, K, N, m_bucket(M)))


def _auto_split(tiles: int, k_iters: int, sms: int) -> int:
    want = triton.cdiv(WAVES * sms, tiles)
    return max(1, min(want, k_iters // MIN_ITERS))


def plan(M: int, K: int, N: int, cfg: Cfg, device) -> tuple:
    """(grid, split_k, iters: K tiles per split) of a launch (host-only arithmetic)."""
    key = (M, K, N, cfg, device)
    p = _PLANS.get(key)
    if p is not None:
        return p
    n_tiles, m_tiles = triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m)
    k_iters = triton.cdiv(K, cfg.block_k)
    split = cfg.split_k or _auto_split(n_tiles * m_tiles, k_iters, _num_sms(device))
    split = max(1, min(split, k_iters, MAX_SPLIT, _WS_BYTES // (4 * M * N)))
    if n_tiles * m_tiles > _NUM_COUNTERS:
        split = 1
    iters = triton.cdiv(k_iters, split)
    split = triton.cdiv(k_iters, iters)  # no empty splits
    p = _PLANS[key] = ((n_tiles, split, m_tiles), split, iters)
    return p


def linear_triton(x: torch.Tensor, w: torch.Tensor, config: Optional[Cfg] = None) -> torch.Tensor:
    """x @ w (see linear.py); `config` overrides the table (benchmarks, tests)."""
    K, N = w.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    layout = weight_layout(w)
    if config is None and layout is not None:
        config = get_config(M, K, N, layout)
    if (config is None or layout is None or M == 0 or x.dtype != w.dtype
            or K * N >= 2 ** 31 or not (x.is_cuda or _INTERPRET)):  # (int32 tile offsets)
        return x @ w
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid, split, iters = plan(M, K, N, config, x.device)
    if split > 1:
        cnt, ws = _scratch(x.device, split * M * N)
    else:
        cnt = ws = out  # unused
    upcast = _INTERPRET and x.dtype == torch.bfloat16 and config.use_dot
    prec = 'ieee' if upcast or x.dtype == torch.float32 else 'tf32'
    _linear_kernel[grid](
        x2, w, out, ws, cnt, M, N, K, x2.stride(0), x2.stride(1), w.stride(0), w.stride(1),
        out.stride(0), split, iters, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT=split > 1, USE_DOT=config.use_dot,
        STAGES=config.num_stages, EVEN_K=K % config.block_k == 0,
        EVEN_N=N % config.block_n == 0, UPCAST=upcast, PREC=prec,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_opts(x.device))
    return out.view(*x.shape[:-1], N)
