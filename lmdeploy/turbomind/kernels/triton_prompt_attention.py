"""Triton causal attention of one fresh prompt over its own tokens (same contract as
`prompt_attention_ref`, see prompt_attention.py).

One launch, no host work besides it: grid ``(hq, ceil(T / BLOCK_M))``, one program per query
head and tile of BLOCK_M tokens, flash-attention style (fp32 running max and sum, exp2 with the
scale folded in, probabilities cast to q's dtype for the P @ V product). A tile's KV loop runs
unmasked over the whole KV tiles left of its diagonal, then masked (causal + length) over the
diagonal ones. Tiles are launched heaviest first (the last query tiles see the most KV), head
fastest, so the final wave is made of the short tiles. GQA: head h reads KV head
``h // (hq // hkv)``; the group's programs meet the same tiles in L2.

Why it exists beside torch's cuDNN SDPA (`prompt_attention_cuda`): torch wraps each cuDNN call
in ~18 small kernels (ragged offsets, a memset, a TMA set-up) and 0.36-0.49 ms of host time
(under the profiler; the first layer's device waits for it). On the H100 (benchmark/NOTES.md,
session 10; CUDA graphs, Llama-2-7B heads) this kernel takes 43 / 63 / 102 / 150 us at 1025 /
1536 / 2048 / 2560 tokens against 64 / 84 / 117 / 157; from ~3072 tokens on cuDNN's own kernel
is faster (325 vs 353 us at 4096), so longer prompts go to it (`CUDNN_FROM_TOKENS`).
"""
import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# H100, the best of 36 tiles at 2048 tokens (benchmark/bench_kernels.py --only dense_prompt
# --sweep)
CFG = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
CUDNN_FROM_TOKENS = 3072  # prompts this long run torch's SDPA (cuDNN) on CUDA


@functools.lru_cache(maxsize=None)
def _device_tiles(dtype: torch.dtype, head_dim: int, device_index: int) -> dict:
    """`tiles` for a CUDA device's shared memory, once per (dtype, head size, device): the
    launch runs once per layer of a prompt's first step."""
    props = torch.cuda.get_device_properties(device_index)
    return tiles(dtype, head_dim,
                 int(getattr(props, 'shared_memory_per_block_optin', 0) or 99 * 1024))


def tiles(dtype: torch.dtype, head_dim: int, limit: int) -> dict:
    """CFG, with the KV tile, then the stages, then the query tile made smaller until the
    pipelined K/V tiles and the query tile (Triton's count) fit `limit` bytes of shared memory:
    fp32, wide heads, GPUs with less shared memory than the H100."""
    c = dict(CFG)
    row = triton.next_power_of_2(head_dim) * torch.empty(0, dtype=dtype).element_size()

    def need(c):
        return (c['num_stages'] * 2 * c['BLOCK_N'] + c['BLOCK_M']) * row

    for key, low in (('BLOCK_N', 16), ('num_stages', 1), ('BLOCK_M', 16)):
        while need(c) > limit and c[key] > low:
            c[key] = c[key] - 1 if key == 'num_stages' else c[key] // 2
    return c


@triton.jit(do_not_specialize=['T'])
def _dense_causal_kernel(Q, K, V, O, T, qk_scale, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_vt, stride_vh, stride_ot, stride_oh, GROUP: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    h = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest first
    kvh = h // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < T
    rows = offs_m.to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    K_h = K + kvh * stride_kh
    V_h = V + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    full_end = (tile * BLOCK_M // BLOCK_N) * BLOCK_N  # KV every token of the tile sees
    for n0 in range(0, full_end, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        if HEAD_DIM == BLOCK_D:  # unmasked: the loads pipeline as asynchronous copies
            k = tl.load(K_h + offs_n[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(V_h + offs_n[:, None] * stride_vt + offs_d[None, :])
        else:
            k = tl.load(K_h + offs_n[:, None] * stride_kt + offs_d[None, :],
                        mask=mask_d[None, :], other=0.0)
            v = tl.load(V_h + offs_n[:, None] * stride_vt + offs_d[None, :],
                        mask=mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    hi = tl.minimum((tile + 1) * BLOCK_M, T)
    for n0 in range(full_end, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        kv_rows = offs_n.to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K_h + kv_rows[:, None] * stride_kt + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        causal = (offs_n[None, :] <= offs_m[:, None]) & mask_n[None, :]
        s = tl.where(causal, s, float('-inf'))
        # every row sees KV 0 (its own diagonal tile starts at or before it), except rows
        # beyond T of a tile whose tokens all lie before this KV tile: keep them finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V_h + kv_rows[:, None] * stride_vt + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def prompt_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            *, cfg=None) -> torch.Tensor:
    """Same contract as `prompt_attention_ref`; `cfg` overrides CFG (tests, benchmarks)."""
    T, hq, D = q.shape
    if T >= CUDNN_FROM_TOKENS and q.is_cuda and cfg is None:
        from .prompt_attention import prompt_attention_cuda
        return prompt_attention_cuda(q, k, v, scale)
    hkv = k.shape[1]
    assert hq % hkv == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    out = torch.empty((T, hq, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    c = (dict(CFG, **cfg) if cfg else
         _device_tiles(q.dtype, D, q.device.index) if q.is_cuda else CFG)
    grid = (hq, triton.cdiv(T, c['BLOCK_M']))
    _dense_causal_kernel[grid](
        q, k, v, out, T, float(scale) * LOG2E, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=hq // hkv, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
        BLOCK_M=c['BLOCK_M'], BLOCK_N=c['BLOCK_N'],
        DOT_PREC='ieee' if q.dtype == torch.float32 else 'tf32',
        num_warps=c['num_warps'], num_stages=c['num_stages'])
    return out
