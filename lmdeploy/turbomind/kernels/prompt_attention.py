"""Causal attention of one fresh prompt (no cached prefix) over its own new tokens.

    prompt_attention(q, k, v, scale) -> out [T, hq, D]

q: [T, hq, D], k, v: [T, hkv, D] (strided views of the qkv GEMM output are fine), GQA by
``hq // hkv``; token i attends to tokens 0..i. Softmax in fp32, output in q's dtype. This is
`paged_attention` for a step of one row whose kv_len equals its q_len, with K/V taken from the
GEMM output instead of the pool: the model uses it for such steps when a faster dense kernel
exists for the device: on CUDA `prompt_attention_triton` (triton_prompt_attention.py), which
hands prompts of CUDNN_FROM_TOKENS (3072) tokens and more to `prompt_attention_cuda`, torch's
fused SDPA (cuDNN on the H100), faster there; benchmark/NOTES.md, sessions 6 and 10.
"""
import os
import warnings

import torch
import torch.nn.functional as F

# cuDNN's SDPA builds an execution plan per sequence length unless told to take its ragged
# path, which it does for inputs in BSHD layout (contiguous [T, heads, D] here: the model
# passes such tensors): without this, each prompt length met for the first time costs 55-68 ms
# on the H100 (inside that request's step), with it 0.2-0.4 ms after the first
# (benchmark/NOTES.md, session 6). Set before torch's first SDPA call; "0" in the environment
# keeps torch's default.
os.environ.setdefault('TORCH_CUDNN_SDPA_AVOID_RECOMPILE', '1')
warnings.filterwarnings('ignore', message='TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 is currently '
                        'experimental')


def prompt_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float) -> torch.Tensor:
    T, hq, D = q.shape
    group = hq // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)  # [T, hq, D]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum('thd,shd->hts', q.float(), kf) * scale
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float('-inf')), dim=-1)
    return torch.einsum('hts,shd->thd', probs, vf).to(q.dtype)


def prompt_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


try:  # the Triton kernel beside its reference (kernels.select picks it on CUDA)
    from .triton_prompt_attention import prompt_attention_triton  # noqa: E402,F401
except ImportError:  # no triton
    pass
