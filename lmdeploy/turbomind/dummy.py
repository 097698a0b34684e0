"""Dummy models: an EngineConfig for a named shape and random weights made on the device.

No files are read or written: benchmarks on a machine without checkpoints (the lent H100
cannot download any) use these, and speed does not depend on the weights' values.

    cfg = dummy_config('llama2-7b', device='cuda', max_batch_size=64)
    runner = ModelRunner(cfg, weights_init=dummy_weights)        # or
    tm = TurboMind(dummy='llama2-7b', max_batch_size=64)

Weights are drawn N(0, 1/fan_in) (std 1/sqrt(fan_in)) for every linear layer, N(0, 1) for
the embedding, ones for the norms, straight into the engine dtype on the target device with a
seeded generator, so a forward's activations stay O(1) through all layers (fp16 stays finite)
and logits are ~N(0, 1). They use the workspace layout (`weights.py`): ``[in, out]``, fused
``w_qkv`` with q/k columns in interleaved-rotary order, fused ``w13``; `to_hf_state_dict` turns
them into a transformers ``LlamaForCausalLM`` state dict (views where possible) for the
``--compare hf`` benchmarks and the exactness tests.
"""
from typing import Dict, Optional

import torch

from .config import EngineConfig
from .weights import LayerWeights, ModelWeights

# name -> config.ini keys (the model part); engine keys come from EngineConfig defaults or
# the caller's overrides.
SHAPES: Dict[str, dict] = {
    'llama2-7b': dict(model_name='llama2', head_num=32, kv_head_num=32, size_per_head=128,
                      vocab_size=32000, num_layer=32, rotary_embedding=128, inter_size=11008,
                      norm_eps=1e-5, start_id=1, end_id=2, rope_theta=10000.0,
                      session_len=4096),
    'llama3-8b': dict(model_name='llama3', head_num=32, kv_head_num=8, size_per_head=128,
                      vocab_size=128256, num_layer=32, rotary_embedding=128, inter_size=14336,
                      norm_eps=1e-5, start_id=128000, end_id=128001, rope_theta=500000.0,
                      session_len=8192),
    'llama2-13b': dict(model_name='llama2', head_num=40, kv_head_num=40, size_per_head=128,
                       vocab_size=32000, num_layer=40, rotary_embedding=128, inter_size=13824,
                       norm_eps=1e-5, start_id=1, end_id=2, rope_theta=10000.0,
                       session_len=4096),
    # tiny shapes for CPU tests
    'tiny': dict(model_name='llama2', head_num=4, kv_head_num=2, size_per_head=16,
                 vocab_size=256, num_layer=2, rotary_embedding=16, inter_size=96,
                 norm_eps=1e-5, start_id=1, end_id=2, rope_theta=10000.0, session_len=512),
    'tiny-mha': dict(model_name='llama2', head_num=4, kv_head_num=4, size_per_head=32,
                     vocab_size=512, num_layer=3, rotary_embedding=32, inter_size=256,
                     norm_eps=1e-5, start_id=1, end_id=2, rope_theta=10000.0,
                     session_len=1024),
}


def dummy_config(name: str, defaults: Optional[dict] = None, **overrides) -> EngineConfig:
    """EngineConfig of the named shape; `defaults` and `overrides` are EngineConfig keys (as
    in `EngineConfig.from_workspace`: the shape's own values win over `defaults`)."""
    if name not in SHAPES:
        raise ValueError(f'unknown dummy shape {name!r}; known: {", ".join(SHAPES)}')
    values = {**(defaults or {}), **SHAPES[name]}
    values['weight_dir'] = ''
    # No workspace, so no v0.0.2 session count to honour: the KV pool takes 90% of free memory.
    values.setdefault('cache_max_entry_count', 0.9)
    cfg = EngineConfig.from_dict(values, source=f'dummy {name}', **overrides)
    cfg.extra['dummy'] = name
    return cfg


def weight_bytes(cfg: EngineConfig, tp: int = 1, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of one rank's weights (what `load_weights` / `dummy_weights` allocate)."""
    dtype = dtype if dtype is not None else cfg.torch_dtype
    elem = torch.empty((), dtype=dtype).element_size()
    H, I, V = cfg.hidden_size, cfg.inter_size // tp, cfg.vocab_size
    qkv = (cfg.q_dim + 2 * cfg.kv_dim) // tp
    per_layer = 2 * H + H * qkv + (cfg.q_dim // tp) * H + H * 2 * I + I * H
    if cfg.attn_bias:
        per_layer += qkv + H
    return elem * (cfg.num_layer * per_layer + V * H + (V // tp) * H + H)


def _shard(t: torch.Tensor, dim: int, rank: int, tp: int, groups=None) -> torch.Tensor:
    """Rank `rank`'s contiguous slice of `t` along `dim`; with `groups` (sizes of fused parts,
    e.g. q | k | v), the slice of every part, fused again."""
    if tp == 1:
        return t
    parts = t.split(groups, dim=dim) if groups else [t]
    return torch.cat([p.chunk(tp, dim=dim)[rank] for p in parts], dim=dim).contiguous()


def dummy_weights(cfg: EngineConfig, rank: int = 0, tp: Optional[int] = None, device=None,
                  dtype: Optional[torch.dtype] = None, seed: int = 0) -> ModelWeights:
    """Random weights of cfg's shape for rank `rank` of `tp`, made on `device` (same signature
    as `weights.load_weights`, plus `seed`). Every tensor is drawn whole from its own seeded
    generator and then sliced as deploy splits it, so the ranks of any `tp` together hold the
    tp=1 model (tp=N output == tp=1 output). Deterministic for a (seed, device) pair."""
    tp = cfg.tensor_para_size if tp is None else int(tp)
    device = torch.device(device if device is not None else cfg.device)
    dtype = dtype if dtype is not None else cfg.torch_dtype
    H, I, V = cfg.hidden_size, cfg.inter_size, cfg.vocab_size
    qd, kvd = cfg.q_dim, cfg.kv_dim
    tensor_index = iter(range(1 << 30))

    def normal(*shape, std):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed * 1000003 + next(tensor_index))
        t = torch.empty(shape, dtype=dtype, device=device)
        t.normal_(0.0, std, generator=gen)
        return t

    def ones(n):
        return torch.ones(n, dtype=dtype, device=device)

    def shard(t, dim, groups=None):
        return _shard(t, dim, rank, tp, groups)

    qkv_groups = [qd, kvd, kvd]
    layers = []
    for _ in range(cfg.num_layer):
        layers.append(LayerWeights(
            attention_norm=ones(H), ffn_norm=ones(H),
            w_qkv=shard(normal(H, qd + 2 * kvd, std=H ** -0.5), 1, qkv_groups),
            b_qkv=shard(normal(qd + 2 * kvd, std=0.02), 0, qkv_groups) if cfg.attn_bias
            else None,
            wo=shard(normal(qd, H, std=cfg.q_dim ** -0.5), 0),
            b_o=normal(H, std=0.02) if cfg.attn_bias else None,
            w13=shard(normal(H, 2 * I, std=H ** -0.5), 1, [I, I]),
            w2=shard(normal(I, H, std=cfg.inter_size ** -0.5), 0)))
    return ModelWeights(tok_embeddings=normal(V, H, std=1.0), norm=ones(H),
                        output=shard(normal(V, H, std=H ** -0.5), 0), layers=layers, rank=rank,
                        tp=tp)


def _deinterleave(w_out_in: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rows [out, ...] in the engine's interleaved rotary-pair order back to HF's rotate-half
    order (inverse of deploy's `interleave_rows`): engine row 2j -> HF j, 2j+1 -> d/2 + j."""
    rest = w_out_in.shape[1:]
    return (w_out_in.reshape(heads, head_dim // 2, 2, *rest).transpose(1, 2)
            .reshape(heads * head_dim, *rest))


def hf_config(cfg: EngineConfig):
    """A transformers LlamaConfig of cfg's shape."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.inter_size, num_hidden_layers=cfg.num_layer,
                       num_attention_heads=cfg.head_num, num_key_value_heads=cfg.kv_head_num,
                       head_dim=cfg.size_per_head, rms_norm_eps=cfg.norm_eps,
                       rope_theta=cfg.rope_theta, max_position_embeddings=cfg.session_len,
                       bos_token_id=cfg.start_id, eos_token_id=cfg.end_id, pad_token_id=0,
                       attention_bias=cfg.attn_bias, tie_word_embeddings=False)


def to_hf_state_dict(cfg: EngineConfig, w: ModelWeights) -> Dict[str, torch.Tensor]:
    """The same weights as a LlamaForCausalLM state dict (tp=1). Linear weights are transposed
    views; only q and k (re-ordered rows) are copies."""
    if w.tp != 1:
        raise ValueError('to_hf_state_dict needs tp=1 weights')
    D, hq, hkv = cfg.size_per_head, cfg.head_num, cfg.kv_head_num
    qd, kvd, I = cfg.q_dim, cfg.kv_dim, cfg.inter_size
    sd = {'model.embed_tokens.weight': w.tok_embeddings, 'model.norm.weight': w.norm,
          'lm_head.weight': w.output}
    for i, lw in enumerate(w.layers):
        p = f'model.layers.{i}.'
        qkv = lw.w_qkv.t()  # [out, in]
        q, k, v = qkv.split([qd, kvd, kvd], dim=0)
        sd[p + 'self_attn.q_proj.weight'] = _deinterleave(q, hq, D)
        sd[p + 'self_attn.k_proj.weight'] = _deinterleave(k, hkv, D)
        sd[p + 'self_attn.v_proj.weight'] = v
        sd[p + 'self_attn.o_proj.weight'] = lw.wo.t()
        if lw.b_qkv is not None:
            bq, bk, bv = lw.b_qkv.split([qd, kvd, kvd])
            sd[p + 'self_attn.q_proj.bias'] = _deinterleave(bq, hq, D)
            sd[p + 'self_attn.k_proj.bias'] = _deinterleave(bk, hkv, D)
            sd[p + 'self_attn.v_proj.bias'] = bv
            sd[p + 'self_attn.o_proj.bias'] = lw.b_o
        sd[p + 'mlp.gate_proj.weight'] = lw.w13[:, :I].t()
        sd[p + 'mlp.up_proj.weight'] = lw.w13[:, I:].t()
        sd[p + 'mlp.down_proj.weight'] = lw.w2.t()
        sd[p + 'input_layernorm.weight'] = lw.attention_norm
        sd[p + 'post_attention_layernorm.weight'] = lw.ffn_norm
    return sd


def hf_model(cfg: EngineConfig, w: ModelWeights):
    """A transformers LlamaForCausalLM (eval) sharing `w`'s memory where it can (no second
    copy of the big matrices; q/k are re-ordered copies). dtype/device are w's."""
    from transformers import LlamaForCausalLM
    hcfg = hf_config(cfg)
    with torch.device('meta'):
        model = LlamaForCausalLM(hcfg)
    sd = to_hf_state_dict(cfg, w)
    for name, tensor in sd.items():
        mod_name, _, attr = name.rpartition('.')
        mod = model.get_submodule(mod_name)
        setattr(mod, attr, torch.nn.Parameter(tensor, requires_grad=False))
    # buffers (the rotary inv_freq) were made on meta: rebuild those modules on the device
    device = w.tok_embeddings.device
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            parent_name, _, attr = name.rpartition('.')
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device(device):
                setattr(parent, attr, type(mod)(config=hcfg))
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


# Dummy activations are ~N(0, 1) (see the module doc), so |K|, |V| stay below ~6: the synthetic
# per-tensor scale of a dummy shape with quant_policy 4 and static (per_tensor / per_head) scales.
DUMMY_KV_ABSMAX = 6.0


def dummy_kv_scales(cfg: EngineConfig, rank: int = 0, tp: Optional[int] = None) -> torch.Tensor:
    """Synthetic symmetric int8 KV scales (DUMMY_KV_ABSMAX / 127 for every head, zero-points 0)
    in `kv_scales.load_kv_scales`' layout: [num_layer, 4, kv_head_num // tp] fp32."""
    tp = cfg.tensor_para_size if tp is None else int(tp)
    out = torch.zeros(cfg.num_layer, 4, cfg.kv_head_num // tp)
    out[:, 0] = out[:, 2] = DUMMY_KV_ABSMAX / 127
    return out
