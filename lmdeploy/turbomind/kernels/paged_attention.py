"""Causal attention of each row's new queries over its KV in the paged pool.

    paged_attention(q, k_cache, v_cache, block_table, cu_seqlens, kv_lens, scale,
                    max_q_len=0, max_kv_len=0, kv_qparams=None) -> out [T, hq, D]

q: [T, hq, D] (rows packed as in StepInput); k_cache, v_cache: [num_blocks, block_size, hkv, D];
block_table [B, max_blocks] int32; cu_seqlens [B+1] int32; kv_lens [B] int32 (KV length after
this step's writes, which must already be in the pool: call store_kv first); scale: softmax
scale (1/sqrt(D)). GQA: query head h reads KV head ``h // (hq // hkv)``. Any D.

Row b's i-th new token sits at position ``kv_lens[b] - q_len[b] + i`` and attends to KV
positions 0..that position inclusive, so one call serves decode rows (q_len 1), whole prompts,
and prompt chunks over a cached prefix alike. Softmax in fp32; output in q's dtype.
max_q_len / max_kv_len are hints for kernels (0 = unknown); the reference ignores them.
kv_qparams: None for caches in a float dtype; for int8 caches the layer's quantisation
parameters (kv_quant.py), with which K/V are dequantised before use.
"""
import torch

from .kv_quant import STATIC, dequantize, qparams_mode


def gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of a sequence from its blocks: [length, hkv, D]."""
    return cache[block_ids].flatten(0, 1)[:length]


def _gather_fp32(cache, kv_qparams, row: int, block_ids, length: int) -> torch.Tensor:
    """K (row 0) or V (row 1) of a sequence, dequantised when int8: fp32 [length, hkv, D]."""
    x = gather_kv(cache, block_ids, length)
    mode = qparams_mode(kv_qparams)
    if mode is None:
        return x.float()
    if mode == STATIC:
        return dequantize(x, kv_qparams[2 * row][:, None], kv_qparams[2 * row + 1][:, None])
    scales = kv_qparams[row][block_ids].transpose(1, 2).flatten(0, 1)[:length]  # [L, hkv]
    return dequantize(x, scales[..., None])


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_table: torch.Tensor, cu_seqlens: torch.Tensor,
                        kv_lens: torch.Tensor, scale: float, max_q_len: int = 0,
                        max_kv_len: int = 0, kv_qparams: torch.Tensor = None) -> torch.Tensor:
    T, hq, D = q.shape
    hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    group = hq // hkv
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    lens = kv_lens.tolist()
    for b, kv_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        n = end - start
        blocks = block_table[b, :(kv_len + block_size - 1) // block_size].long()
        k = _gather_fp32(k_cache, kv_qparams, 0, blocks, kv_len)  # [L, hkv, D]
        v = _gather_fp32(v_cache, kv_qparams, 1, blocks, kv_len)
        qb = q[start:end].float().view(n, hkv, group, D)
        scores = torch.einsum('nhgd,lhd->hgnl', qb, k) * scale  # [hkv, group, n, L]
        q_pos = torch.arange(kv_len - n, kv_len, device=q.device)
        k_pos = torch.arange(kv_len, device=q.device)
        masked = k_pos[None, :] > q_pos[:, None]  # [n, L]
        scores = scores.masked_fill(masked, float('-inf'))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum('hgnl,lhd->nhgd', probs, v).reshape(n, hq, D)
        out[start:end] = o.to(q.dtype)
    return out


try:  # the Triton kernel beside its reference (kernels.select picks it on CUDA)
    from .triton_paged_attention import paged_attention_triton  # noqa: E402,F401
except ImportError:  # no triton
    pass
