"""The Llama-family forward over one flat step (see step_input.py), from workspace weights.

    h = embed(input_ids)                                   [T, H]
    per layer:
        x, h  = rms_norm(h, attention_norm, residual)     (fused residual add from layer 2 on)
        qkv   = x @ w_qkv (+ b_qkv)                        [T, (hq + 2 hkv) D], this rank's heads
        q     = rotary_store_kv(q, k, v -> pool[layer])    rotary (interleaved pairs, theta,
                                                           rotary_dim) of q, k; store k, v at
                                                           slot_mapping (int8 KV: quantised)
        o     = paged_attention(q, pool[layer], ...)       [T, hq, D] (int8: dequantised inside)
                (one fresh prompt over 1024 tokens, on CUDA: q, k, v as three GEMMs, rotary,
                 store_kv, then prompt_attention(q, k, v), a dense causal kernel;
                 kernels/prompt_attention.py)
        h'    = all_reduce(o @ wo) (+ b_o)                 b_o added once, after the reduce
        x, h  = rms_norm(h', ffn_norm, residual=h)
        h'    = all_reduce(silu_and_mul(x @ w13) @ w2)
    x = rms_norm(h' + h, norm)[sample_idx]
    logits = all_gather(x @ output_r.T)  fp32            [S, V]
Every `x @ w` is `kernels.linear` (on CUDA: the Triton weight-streaming GEMV for the shapes
triton_linear.TUNED measured faster, cuBLAS otherwise). Decode-only steps launch the Triton
kernels with PDL (kernels/pdl.py).

Tensor parallel (`comm`, see distributed.py; default: one rank, identities): `weights` holds one
rank's heads, FFN slice and vocab slice of the LM head (`output_r` = rows [r V/tp, (r+1) V/tp),
as v0.0.2 split it); the embedding is whole on every rank.
"""

import torch
import torch.nn.functional as F

from ..config import EngineConfig
from ..cuda_graph import MAX_MIXED_TOKENS
from ..distributed import SingleRank
from ..kernels.pdl import decode_scope
from ..kv_cache import KVCache
from ..step_input import StepInput
from ..weights import ModelWeights


# Fresh prompts at least this long take the dense attention path: longer than any CUDA graph
# (lone prompts replay the prompt graphs up to 512 tokens, then the mixed graphs up to
# MAX_MIXED_TOKENS), so such a prompt runs the same kernels with graphs on and off; below it
# the Triton paged kernel is fast enough (at 2048 tokens the dense kernel takes 102 us per
# layer against its 139 on the H100, at 1024 the difference is ~0.5 ms a prompt).
DENSE_PROMPT_MIN_TOKENS = MAX_MIXED_TOKENS + 1


class LlamaModel:

    def __init__(self, cfg: EngineConfig, weights: ModelWeights, kernels, comm=None):
        self.cfg = cfg
        self.w = weights
        self.k = kernels
        tp = weights.tp
        self.hq = cfg.head_num // tp
        self.hkv = cfg.kv_head_num // tp
        self.head_dim = cfg.size_per_head
        self.scale = self.head_dim ** -0.5
        self.rotary_dim = cfg.rotary_embedding
        self.theta = cfg.rope_theta
        self.eps = cfg.norm_eps
        self.comm = comm or SingleRank()
        self.dense_prompts = getattr(kernels, 'impl', {}).get('prompt_attention') in ('cuda',
                                                                                       'triton')

    def forward(self, step: StepInput, kv: KVCache) -> torch.Tensor:
        with decode_scope(step.max_q_len == 1):  # PDL launches (kernels/pdl.py)
            return self._forward(step, kv)

    def _forward(self, step: StepInput, kv: KVCache) -> torch.Tensor:
        k, w = self.k, self.w
        D, hq, hkv = self.head_dim, self.hq, self.hkv
        T = step.num_tokens
        # One long prompt without a cached prefix (host-known: one row whose kv_len is T),
        # float KV: dense causal attention over its own K/V when the device has a faster
        # kernel for it.
        fresh_prompt = (self.dense_prompts and step.batch_size == 1
                        and T >= DENSE_PROMPT_MIN_TOKENS and step.max_kv_len == T
                        and kv.qparams(0) is None)
        h = F.embedding(step.token_ids(), w.tok_embeddings)
        residual = None
        for i, lw in enumerate(w.layers):
            if residual is None:
                residual = h
                x = k.rms_norm(h, lw.attention_norm, self.eps)
            else:
                x, residual = k.rms_norm(h, lw.attention_norm, self.eps, residual)
            widths = [hq * D, hkv * D, hkv * D]
            if fresh_prompt:
                # q, k and v from three GEMMs over w_qkv's column blocks: contiguous [T, heads,
                # D], as cuDNN's SDPA needs for its ragged path (one plan for every prompt
                # length instead of one, 55-68 ms on the H100, per length met; see
                # prompt_attention.py), without copying views of one fused output (three
                # copies of ~16 MB per layer at 2048 tokens)
                parts = [k.linear(x, wc) for wc in lw.w_qkv.split(widths, dim=-1)]
                if lw.b_qkv is not None:
                    parts = [p + b for p, b in zip(parts, lw.b_qkv.split(widths))]
            else:
                qkv = k.linear(x, lw.w_qkv)
                if lw.b_qkv is not None:
                    qkv = qkv + lw.b_qkv
                parts = qkv.split(widths, dim=-1)
            q = parts[0].reshape(T, hq, D)
            kk = parts[1].reshape(T, hkv, D)
            v = parts[2].reshape(T, hkv, D)
            k_cache, v_cache = kv.layer(i)
            qp = kv.qparams(i)  # int8 KV scales (None for float KV)
            if fresh_prompt:
                q, kk = k.rotary_embedding(q, kk, step.positions, self.rotary_dim, self.theta)
                k.store_kv(kk, v, k_cache, v_cache, step.slot_mapping, qp)
                o = k.prompt_attention(q, kk, v, self.scale)
            else:
                q = k.rotary_store_kv(q, kk, v, step.positions, self.rotary_dim, self.theta,
                                      k_cache, v_cache, step.slot_mapping, qp)
                o = k.paged_attention(q, k_cache, v_cache, step.block_table, step.cu_seqlens,
                                      step.kv_lens, self.scale, step.max_q_len,
                                      step.max_kv_len, qp)
            h = self.comm.all_reduce(k.linear(o.reshape(T, hq * D), lw.wo))
            if lw.b_o is not None:
                h = h + lw.b_o
            x, residual = k.rms_norm(h, lw.ffn_norm, self.eps, residual)
            h = self.comm.all_reduce(k.linear(k.silu_and_mul(k.linear(x, lw.w13)), lw.w2))
        h = (h + residual).index_select(0, step.sample_idx)
        x = k.rms_norm(h, w.norm, self.eps)
        logits = k.linear(x, w.output.t()).float()
        return self.comm.all_gather(logits)

    __call__ = forward
