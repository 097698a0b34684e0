"""Triton paged attention (same contract as `paged_attention_ref`, see paged_attention.py).

Two kernels, picked on the host without a device sync:

* decode rows (q_len 1): `_decode_kernel`, flash-decoding. When every row is one
  (``T == B``) it is the only launch; otherwise it runs over all rows and returns at once for
  rows with q_len != 1 (no host sync is needed to find the decode rows).
  Grid ``(B, hkv, num_splits)``: one program holds all ``group = hq // hkv`` query heads
  of one KV head (so each K/V tile is read once for the whole group) and walks one
  partition of the row's KV; with ``num_splits > 1`` the partitions' partial results
  (unnormalised output, running max, running sum) go to fp32 scratch and `_combine_kernel`
  merges them. The number of splits and the partition length come from the ``max_kv_len``
  hint (or the block table's width), never from device values, so the launch can be captured
  in a CUDA graph for any kv_lens up to that hint.
* rows with q_len > 1 (prompts, prompt chunks on a cached prefix), only when ``T != B``:
  `_prefill_kernel`, whose programs of q_len-1 rows return at once. The M side of
  a tile packs ``BLOCK_Q`` query tokens x ``group`` heads of one KV head, so GQA again reads
  each K/V tile once. Grid ``(T // BLOCK_Q + B, hkv)``, a host-known upper bound on the number
  of query tiles; each program finds its row by binary search over cu_seqlens (row b's tiles
  start at ``cu_seqlens[b] // BLOCK_Q + b``) and returns at once if it has no tile. The KV loop
  runs unmasked over the part of the prefix every token of the tile sees, then masked
  (causal + length) over the rest.

KV tiles are loaded by `_load_kv` alone, which converts them to the compute dtype (int8
exactly). Softmax statistics and accumulators are fp32 (exp2 with the scale folded in); the
probabilities are cast to the compute dtype for the P @ V product, as flash-attention does.

int8 KV (``kv_qparams``, kv_quant.py; QUANT 1 static, 2 online): the scales are applied outside
the tensor-core products rather than to every loaded element, which is the same arithmetic:
* static per-head (scale s, zero-point z): K's s is folded into the softmax scale and K's z
  dropped (it adds ``z * sum(q)`` to every score of a query, which softmax ignores); for V,
  ``P @ (v s + z) = s (P @ v) + z sum(P)``, applied to the accumulator once at the end
  (`_finish_acc`), before the split-K partials are stored, so the combine pass is unchanged;
* online per-token scales: K's multiply the score columns (after Q K^T), V's the V tile's rows.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .kv_quant import ONLINE, STATIC, qparams_mode
from .pdl import launch_opts, pdl_enter

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv(ptrs, mask, DT: tl.constexpr, FAST_I8: tl.constexpr = False):
    """Load one K or V tile in the compute dtype DT (a no-op cast for float caches; int8
    values convert exactly, the scales are applied by the callers, see the module doc).
    FAST_I8 (int8 cache, fp16 DT): convert by bits instead of the int-to-float instruction,
    which runs at a quarter of the ALU rate: x + 128 as the low byte of the fp16 0x6400
    (1024 + x + 128, exact) minus 1152."""
    x = tl.load(ptrs, mask=mask, other=0)
    if FAST_I8 and x.dtype == tl.int8 and DT == tl.float16:
        u = (x.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16)
        return (u | 0x6400).to(tl.float16, bitcast=True) - 1152.0
    return x.to(DT)


@triton.jit
def _token_scales(QP, kvh, blk, offs_n, mask_n, stride_qpb, stride_qph, PAGE: tl.constexpr):
    """Online int8: the scale of each position of the tile, KV head kvh: [BLOCK_N] fp32
    (a block's scales are [heads, block_size]: contiguous for a tile within one block)."""
    return tl.load(QP + blk * stride_qpb + kvh * stride_qph + offs_n % PAGE, mask=mask_n,
                   other=0.0)


@triton.jit
def _softmax_scale(qk_scale, QP, kvh, QUANT: tl.constexpr):
    if QUANT == 1:  # static int8: K's per-head scale folded in
        qk_scale = qk_scale * tl.load(QP + kvh)
    return qk_scale


@triton.jit
def _scale_scores(s, qk, QP, kvh, blk, offs_n, mask_n, stride_qpb, stride_qph,
                  PAGE: tl.constexpr, QUANT: tl.constexpr):
    if QUANT == 2:
        s = s * _token_scales(QP, kvh, blk, offs_n, mask_n, stride_qpb, stride_qph, PAGE)[None, :]
    return s * qk


@triton.jit
def _scale_v(v, QP, kvh, blk, offs_n, mask_n, stride_qpkv, stride_qpb, stride_qph,
             PAGE: tl.constexpr, QUANT: tl.constexpr):
    """Online int8: the V tile times its per-token scales, in fp32 then v's dtype (scaling
    the probabilities instead would push small ones into fp16's subnormals)."""
    if QUANT == 2:
        vs = _token_scales(QP + stride_qpkv, kvh, blk, offs_n, mask_n, stride_qpb, stride_qph,
                           PAGE)
        v = (v.to(tl.float32) * vs[:, None]).to(v.dtype)
    return v


@triton.jit
def _finish_acc(acc, l_i, QP, kvh, stride_qpkv, QUANT: tl.constexpr):
    """Static int8: acc = P @ q_v becomes P @ (q_v * s + z) = s * acc + z * sum(P)."""
    if QUANT == 1:
        v_s = tl.load(QP + 2 * stride_qpkv + kvh)
        v_z = tl.load(QP + 3 * stride_qpkv + kvh)
        acc = acc * v_s + v_z * l_i[:, None]
    return acc


@triton.jit
def _block_ids(BT_row, offs_n, mask_n, n0, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pool block of each KV position in the tile, as int64."""
    if PAGE % BLOCK_N == 0:
        # the whole tile sits in one pool block: one scalar load
        blk = tl.load(BT_row + n0 // PAGE).to(tl.int64)
        return tl.zeros([BLOCK_N], dtype=tl.int64) + blk
    else:
        return tl.load(BT_row + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)


@triton.jit
def _load_kv_tile(K_h, V_h, BT_row, offs_n, mask_n, n0, offs_d, kv_mask, stride_kb, stride_ks,
                  stride_vb, stride_vs, DT: tl.constexpr, PAGE: tl.constexpr,
                  BLOCK_N: tl.constexpr, FAST_I8: tl.constexpr = False):
    """The K and V tiles of positions offs_n (one KV head) and their pool blocks: (blk, k, v).
    kv_mask: what to load ([BLOCK_N, BLOCK_D]; full tiles pass only the head-dim mask)."""
    blk = _block_ids(BT_row, offs_n, mask_n, n0, PAGE, BLOCK_N)
    off = (offs_n % PAGE)[:, None]
    k = _load_kv(K_h + blk[:, None] * stride_kb + off * stride_ks + offs_d[None, :], kv_mask, DT,
                 FAST_I8)
    v = _load_kv(V_h + blk[:, None] * stride_vb + off * stride_vs + offs_d[None, :], kv_mask, DT,
                 FAST_I8)
    return blk, k, v


# Values that change from step to step are not specialised on (Triton would compile a variant
# per divisibility class, on the first step that meets it: a second of compile inside a
# request's latency); the split count is the grid's third dimension, not a constant.
# `partition` stays specialised: always a multiple of BLOCK_N, it is always the same class.
@triton.jit(do_not_specialize=['stride_bt'])
def _decode_kernel(Q, K, V, BT, CU, KVL, O, TmpO, TmpML, QP, qk_scale, partition,
                   stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                   stride_vh, stride_bt, stride_ot, stride_oh, stride_qpkv, stride_qpb,
                   stride_qph, QUANT: tl.constexpr, SPLIT_K: tl.constexpr,
                   GROUP: tl.constexpr, G_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                   MIXED: tl.constexpr, USE_PDL: tl.constexpr, FAST_I8: tl.constexpr = False):
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if MIXED:  # rows with q_len != 1 belong to the prefill kernel
        tok = tl.load(CU + b)
        if tl.load(CU + b + 1) - tok != 1:
            return
    else:
        tok = b
    kv_len = tl.load(KVL + b)
    start = split * partition
    if start >= kv_len:
        return  # empty partition: the combine kernel skips it
    end = tl.minimum(start + partition, kv_len)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + tok.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    BT_row = BT + b.to(tl.int64) * stride_bt
    K_h = K + kvh * stride_kh
    V_h = V + kvh * stride_vh
    qk = _softmax_scale(qk_scale, QP, kvh, QUANT)
    m_i = tl.full([G_PAD], float('-inf'), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        blk, k, v = _load_kv_tile(K_h, V_h, BT_row, offs_n, mask_n, n0, offs_d,
                                  mask_n[:, None] & mask_d[None, :], stride_kb, stride_ks,
                                  stride_vb, stride_vs, Q.dtype.element_ty, PAGE, BLOCK_N,
                                  FAST_I8)
        if USE_DOT:
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC)
        else:
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = _scale_scores(s, qk, QP, kvh, blk, offs_n, mask_n, stride_qpb, stride_qph, PAGE,
                          QUANT)
        s = tl.where(mask_n[None, :], s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _scale_v(v, QP, kvh, blk, offs_n, mask_n, stride_qpkv, stride_qpb, stride_qph, PAGE,
                     QUANT)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    acc = _finish_acc(acc, l_i, QP, kvh, stride_qpkv, QUANT)

    if not SPLIT_K:
        out = acc / l_i[:, None]
        tl.store(O + tok.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    else:
        # scratch: TmpO [B, hq, splits, BLOCK_D], TmpML [B, hq, splits, 2]
        hq = tl.num_programs(1) * GROUP
        base = (b.to(tl.int64) * hq + heads) * tl.num_programs(2) + split  # [G_PAD]
        tl.store(TmpO + base[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mask_g[:, None])
        tl.store(TmpML + base * 2, m_i, mask=mask_g)
        tl.store(TmpML + base * 2 + 1, l_i, mask=mask_g)


@triton.jit(do_not_specialize=['num_splits'])
def _combine_kernel(TmpO, TmpML, CU, KVL, O, partition, num_splits, stride_ot, stride_oh,
                    CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    MIXED: tl.constexpr, USE_PDL: tl.constexpr):
    """Merge the non-empty partitions of one (row, head), CHUNK of them at a time with a
    running max (any split count, one compiled variant)."""
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    if MIXED:
        tok = tl.load(CU + b)
        if tl.load(CU + b + 1) - tok != 1:
            return
    else:
        tok = b
    hq = tl.num_programs(1)
    kv_len = tl.load(KVL + b)
    n_valid = tl.minimum((kv_len + partition - 1) // partition, num_splits)
    offs_d = tl.arange(0, BLOCK_D)
    row = (b.to(tl.int64) * hq + h) * num_splits
    m_run = float('-inf')
    l_run = 0.0
    acc_run = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, n_valid, CHUNK):
        offs_s = s0 + tl.arange(0, CHUNK)
        mask_s = offs_s < n_valid
        base = row + offs_s
        m = tl.load(TmpML + base * 2, mask=mask_s, other=float('-inf'))
        l = tl.load(TmpML + base * 2 + 1, mask=mask_s, other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))  # finite: a valid split saw tokens
        alpha = tl.exp2(m_run - m_new)
        w = tl.where(mask_s, tl.exp2(m - m_new), 0.0)
        acc = tl.load(TmpO + base[:, None] * BLOCK_D + offs_d[None, :], mask=mask_s[:, None],
                      other=0.0)
        acc_run = acc_run * alpha + tl.sum(acc * w[:, None], axis=0)
        l_run = l_run * alpha + tl.sum(l * w, axis=0)
        m_run = m_new
    out = acc_run / l_run
    tl.store(O + tok.to(tl.int64) * stride_ot + h * stride_oh + offs_d,
             out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=['num_rows', 'stride_bt'])
def _prefill_kernel(Q, K, V, BT, CU, KVL, O, QP, qk_scale, num_rows,
                    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                    stride_vh, stride_bt, stride_ot, stride_oh, stride_qpkv, stride_qpb,
                    stride_qph, QUANT: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                    BLOCK_Q: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAGE: tl.constexpr, DOT_PREC: tl.constexpr, SKIP_DECODE: tl.constexpr,
                    USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    # row b = the last row whose first tile index (cu[b] // BLOCK_Q + b) is <= pid
    lo = pid * 0
    hi = lo + num_rows
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        first = tl.load(CU + mid) // BLOCK_Q + mid
        lo = tl.where(first <= pid, mid, lo)
        hi = tl.where(first <= pid, hi, mid)
    b = lo
    q_start = tl.load(CU + b)
    q_len = tl.load(CU + b + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + b)
    if tile * BLOCK_Q >= q_len:
        return
    if SKIP_DECODE:
        if q_len == 1:  # done by the decode kernel
            return
    kv_len = tl.load(KVL + b)
    prefix = kv_len - q_len  # KV positions before this step's tokens

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok = tile * BLOCK_Q + offs_m // G_PAD  # token index within the row
    g = offs_m % G_PAD
    mask_m = (tok < q_len) & (g < GROUP)
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + g
    row_t = (q_start + tok).to(tl.int64)
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + row_t[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)
    ctx = prefix + tok  # position of each query token: it sees KV 0..ctx

    BT_row = BT + b.to(tl.int64) * stride_bt
    K_h = K + kvh * stride_kh
    V_h = V + kvh * stride_vh
    qk = _softmax_scale(qk_scale, QP, kvh, QUANT)
    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # KV every token of the tile sees: positions <= prefix + first token; whole tiles of it
    full_end = ((prefix + tile * BLOCK_Q + 1) // BLOCK_N) * BLOCK_N
    last_tok = tl.minimum((tile + 1) * BLOCK_Q, q_len) - 1
    hi_kv = prefix + last_tok + 1
    for n0 in range(0, full_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi_kv  # always true here; keeps loads in bounds for the compiler
        blk, k, v = _load_kv_tile(K_h, V_h, BT_row, offs_n, mask_n, n0, offs_d,
                                  mask_d[None, :], stride_kb, stride_ks, stride_vb, stride_vs,
                                  Q.dtype.element_ty, PAGE, BLOCK_N)
        s = _scale_scores(tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC), qk, QP,
                          kvh, blk, offs_n, mask_n, stride_qpb, stride_qph, PAGE, QUANT)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _scale_v(v, QP, kvh, blk, offs_n, mask_n, stride_qpkv, stride_qpb, stride_qph, PAGE,
                     QUANT)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    for n0 in range(full_end, hi_kv, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi_kv
        blk, k, v = _load_kv_tile(K_h, V_h, BT_row, offs_n, mask_n, n0, offs_d,
                                  mask_n[:, None] & mask_d[None, :], stride_kb, stride_ks,
                                  stride_vb, stride_vs, Q.dtype.element_ty, PAGE, BLOCK_N)
        s = _scale_scores(tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC), qk, QP,
                          kvh, blk, offs_n, mask_n, stride_qpb, stride_qph, PAGE, QUANT)
        causal = (offs_n[None, :] <= ctx[:, None]) & mask_n[None, :]
        s = tl.where(causal, s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # rows with nothing seen yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _scale_v(v, QP, kvh, blk, offs_n, mask_n, stride_qpkv, stride_qpb, stride_qph, PAGE,
                     QUANT)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    acc = _finish_acc(acc, l_i, QP, kvh, stride_qpkv, QUANT)

    l_i = tl.where(mask_m, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(O + row_t[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=q_mask)


_NUM_SMS = {}


def _num_sms(device: torch.device) -> int:
    if device.type != 'cuda':
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Tunables (benchmark/bench_kernels.py sweeps them; see benchmark/NOTES.md).
# min_partition 128 / waves 8 (was 256 / 4): a CUDA graph launches with max_kv_len =
# session_len, so at small batch only more waves shorten the partition and put more programs
# on one row's context: B1 ctx 1100 10.7 -> 9.3 us, ctx 300 9.4 -> 7.4 (hint 4096); B64/B146
# unchanged (H100, bench_kernels.py --only decode --sweep, benchmark/NOTES.md session 4).
DECODE_CFG = dict(BLOCK_N=64, num_warps=4, num_stages=3, min_partition=128, waves=8,
                  use_dot=True, fast_i8=False)  # fast_i8: int8 caches only, see _load_kv
PREFILL_CFG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
COMBINE_CHUNK = 16  # partitions the combine kernel merges per iteration
# Overrides of DECODE_CFG for int8 caches. An int8 tile is half the bytes of an fp16 one, so a
# deeper pipeline (2 tiles in flight instead of 1) keeps as many bytes in flight: static scales
# 882 -> 843 us at B64 ctx4096 MHA on the H100 (benchmark/NOTES.md). fast_i8 (int8 -> fp16 by
# bits, exact) on top: 857 -> 799 us, 2.50 -> 2.69 TB/s (session 5 sweep); 6 stages over 5 at
# the B2 int8 rows' own shapes: B118 ctx1152 413 -> 407 us, B64 ctx3072 605 -> 596, B64 ctx4096
# equal (session 6 sweep). Online not swept.
INT8_DECODE_CFG = {STATIC: dict(num_stages=6, fast_i8=True), ONLINE: dict()}


def decode_splits(batch: int, hkv: int, max_kv: int, device, cfg=None):
    """(num_splits, partition length) for a decode launch, from host-known values only.

    Fewer (row, KV head) pairs than SMs: partitions of `min_partition` tokens. A graph launches
    with max_kv = session_len, so `waves` programs per SM would still leave long partitions
    holding a short context on a few SMs: B4's steps (4 rows, hint 4096) at ctx 300 / 600 /
    1100 take 9.9 / 15.8 / 32.9 us per layer instead of 12.8 / 21.6 / 31.7 (H100,
    benchmark/NOTES.md session 7). More pairs: `waves` programs per SM, as before (a bs64
    step loses ~9 us per layer to a second partition and the combine)."""
    cfg = cfg or DECODE_CFG
    block_n = cfg['BLOCK_N']
    programs = max(1, batch * hkv)
    sms = _num_sms(device)
    max_splits = max(1, triton.cdiv(max_kv, cfg['min_partition']))
    if programs < sms:
        splits = max_splits
    else:
        splits = max(1, min(triton.cdiv(cfg['waves'] * sms, programs), max_splits))
    partition = triton.cdiv(triton.cdiv(max(max_kv, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(max(max_kv, 1), partition))
    return splits, partition


def _dot_prec(dtype):
    return 'ieee' if dtype == torch.float32 else 'tf32'


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, cu_seqlens: torch.Tensor,
                           kv_lens: torch.Tensor, scale: float, max_q_len: int = 0,
                           max_kv_len: int = 0, kv_qparams: Optional[torch.Tensor] = None, *,
                           num_splits: Optional[int] = None,
                           decode_cfg=None, prefill_cfg=None) -> torch.Tensor:
    """Same contract as `paged_attention_ref`. Keyword-only extras are for tests/benchmarks:
    num_splits forces the decode split count; *_cfg override the tunables."""
    T, hq, D = q.shape
    B = kv_lens.shape[0]
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert hq % hkv == 0
    group = hq // hkv
    out = torch.empty((T, hq, D), dtype=q.dtype, device=q.device)
    if T == 0 or B == 0:
        return out
    block_d = _next_pow2(D)
    max_kv = max_kv_len if max_kv_len and max_kv_len > 0 else block_table.shape[1] * page
    qk_scale = float(scale) * LOG2E
    prec = _dot_prec(q.dtype)
    common_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
                      v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
                      out.stride(0), out.stride(1))
    mode = qparams_mode(kv_qparams)
    quant = {None: 0, STATIC: 1, ONLINE: 2}[mode]
    if mode is None:
        qp, qp_strides = k_cache, (0, 0, 0)
    else:
        assert k_cache.dtype == torch.int8 and v_cache.dtype == torch.int8
        assert kv_qparams.dtype == torch.float32 and kv_qparams.is_contiguous()
        qp = kv_qparams
        qp_strides = (qp.stride(0), 0, 0) if mode == STATIC else qp.stride()[:3]
    common_strides += qp_strides

    # Rows with q_len 1 go to the decode kernel. T == B means every row is one (q_len >= 1);
    # otherwise (mixed or prefill-only) both kernels run: the decode kernel's programs of
    # rows with q_len != 1 and the prefill kernel's programs of rows with q_len == 1 return
    # at once, so decode rows keep split-K without the host knowing which rows they are.
    mixed = T != B
    pdl = launch_opts(q.device)
    cfg = {**DECODE_CFG, **INT8_DECODE_CFG.get(mode, {}), **(decode_cfg or {})}
    block_n = cfg['BLOCK_N']
    if num_splits is None:
        splits, partition = decode_splits(B, hkv, max_kv, q.device, cfg)
    else:
        splits = max(1, int(num_splits))
        partition = triton.cdiv(triton.cdiv(max_kv, splits), block_n) * block_n
        splits = max(1, triton.cdiv(max_kv, partition))
    use_dot = cfg['use_dot']
    g_pad = max(16, _next_pow2(group)) if use_dot else _next_pow2(group)
    if splits > 1:
        tmp_o = torch.empty((B, hq, splits, block_d), dtype=torch.float32, device=q.device)
        tmp_ml = torch.empty((B, hq, splits, 2), dtype=torch.float32, device=q.device)
    else:
        tmp_o = tmp_ml = out
    _decode_kernel[(B, hkv, splits)](
        q, k_cache, v_cache, block_table, cu_seqlens, kv_lens, out, tmp_o, tmp_ml, qp, qk_scale,
        partition, q.stride(0), q.stride(1), *common_strides, QUANT=quant,
        SPLIT_K=splits > 1, GROUP=group, G_PAD=g_pad, HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_N=block_n, PAGE=page, USE_DOT=use_dot, DOT_PREC=prec, MIXED=mixed,
        FAST_I8=bool(cfg.get('fast_i8', False)),
        num_warps=cfg['num_warps'], num_stages=cfg['num_stages'], **pdl)
    if splits > 1:
        _combine_kernel[(B, hq)](tmp_o, tmp_ml, cu_seqlens, kv_lens, out, partition, splits,
                                 out.stride(0), out.stride(1), CHUNK=COMBINE_CHUNK,
                                 HEAD_DIM=D, BLOCK_D=block_d, MIXED=mixed,
                                 num_warps=4 if block_d >= 128 else 2, **pdl)
    if not mixed:
        return out

    cfg = dict(PREFILL_CFG, **(prefill_cfg or {}))
    g_pad = _next_pow2(group)
    block_q = max(1, cfg['BLOCK_M'] // g_pad)
    if block_q * g_pad < 16:
        block_q = triton.cdiv(16, g_pad)
    grid = (T // block_q + B, hkv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_table, cu_seqlens, kv_lens, out, qp, qk_scale, B,
        q.stride(0), q.stride(1), *common_strides, QUANT=quant,
        GROUP=group, G_PAD=g_pad, BLOCK_Q=block_q, HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_N=cfg['BLOCK_N'], PAGE=page, DOT_PREC=prec, SKIP_DECODE=True,
        num_warps=cfg['num_warps'], num_stages=cfg['num_stages'], **pdl)
    return out
