"""Triton sampler tail (contract: sample.py): banned ids, argmax or one inverse-CDF draw.

One program per row walks the vocabulary in BLOCK-wide chunks twice: first the argmax of the
logits and an online max / sum of exp(logit / temperature - max); then, for a drawing row,
the running sum again until it reaches ``u x sum``, u being the row's draw
(`sampling.random_uniform`'s SplitMix64 hash, here in uint64 arithmetic: the same bits). The
chunk sums are fp32 like the reference's cumsum, in another order, so a draw within ~1e-6 of
a boundary may differ; a draw past the last id (rounding between the two passes) takes the
last id with probability > 0.
"""
import inspect
from typing import Optional

import torch
import triton
import triton.language as tl

MIN_W_BLOCK = 8  # bad-word widths 1..8 (ignore_eos's 1 among them) share one compiled kernel


@triton.jit
def _banned(offs, BAD, W, W_BLOCK: tl.constexpr):
    ids = tl.load(BAD + tl.arange(0, W_BLOCK), mask=tl.arange(0, W_BLOCK) < W, other=-1)
    return tl.max((offs[:, None] == ids[None, :]).to(tl.int32), axis=1) > 0


@triton.jit
def _uniform(key, counter):
    """sampling.random_uniform for one row: int64 key and counter -> fp32 in (0, 1)."""
    z = (key.to(tl.uint64, bitcast=True)
         + (counter.to(tl.uint64, bitcast=True) + 1) * 0x9E3779B97F4A7C15)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return ((z >> 41).to(tl.float32) + 0.5) * (1.0 / 8388608)  # the top 23 bits


# Not specialised, so that no request compiles a variant of its own inside its latency: W and
# its stride vary with the request's bad words (an int equal to 1, or a multiple of 16, is a
# variant otherwise), and the keys / counters are rows of a packed [3, S] tensor (16-byte
# aligned or not with S). Triton versions without the alignment switch specialise on it.
_UNSPECIALISED = {'do_not_specialize': ['stride_bad', 'W']}
if 'do_not_specialize_on_alignment' in inspect.signature(triton.jit).parameters:
    _UNSPECIALISED['do_not_specialize_on_alignment'] = ['stride_bad', 'W', 'KEYS', 'COUNTERS']


@triton.jit(**_UNSPECIALISED)
def _sample_kernel(X, stride_x, V, BAD, stride_bad, W, TEMP, GREEDY, KEYS, COUNTERS, OUT,
                   HAS_BAD: tl.constexpr, DRAW: tl.constexpr, HAS_TEMP: tl.constexpr,
                   HAS_GREEDY: tl.constexpr, W_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    bad_row = BAD + row * stride_bad
    t = 1.0
    if HAS_TEMP:
        t = tl.maximum(tl.load(TEMP + row), 1e-6)
    is_greedy = 0
    if HAS_GREEDY:
        is_greedy = tl.load(GREEDY + row).to(tl.int32)
        t = tl.where(is_greedy != 0, 1.0, t)
    best_val = -float('inf')
    best_idx = 0
    m = -3.0e38  # finite: exp(m - m_new) stays defined while every logit so far is -inf
    s = 0.0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < V, other=-float('inf')).to(tl.float32)
        if HAS_BAD:
            x = tl.where(_banned(offs, bad_row, W, W_BLOCK), -float('inf'), x)
        c_max = tl.max(x, axis=0)
        take = c_max > best_val  # strictly: the first index on ties
        best_idx = tl.where(take, start + tl.argmax(x, axis=0), best_idx)
        best_val = tl.where(take, c_max, best_val)
        if DRAW:
            y = x / t if HAS_TEMP else x
            m_new = tl.maximum(m, tl.max(y, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), axis=0)
            m = m_new
    tok = best_idx.to(tl.int64)
    if DRAW:
        if is_greedy == 0:
            target = _uniform(tl.load(KEYS + row), tl.load(COUNTERS + row)) * s
            acc = 0.0
            found = V
            last = 0
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < V
                x = tl.load(x_row + offs, mask=mask, other=-float('inf')).to(tl.float32)
                if HAS_BAD:
                    x = tl.where(_banned(offs, bad_row, W, W_BLOCK), -float('inf'), x)
                y = x / t if HAS_TEMP else x
                e = tl.where(mask, tl.exp(y - m), 0.0)
                cs = tl.cumsum(e, axis=0) + acc
                found = tl.minimum(found, tl.min(tl.where(cs >= target, offs, V), axis=0))
                last = tl.maximum(last, tl.max(tl.where(e > 0, offs, 0), axis=0))
                acc += tl.sum(e, axis=0)
            tok = tl.where(found < V, found, last).to(tl.int64)
    tl.store(OUT + row, tok)


def sample_tokens_triton(logits: torch.Tensor, bad_ids: Optional[torch.Tensor] = None,
                         temperature: Optional[torch.Tensor] = None,
                         greedy: Optional[torch.Tensor] = None,
                         keys: Optional[torch.Tensor] = None,
                         counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    S, V = logits.shape
    out = torch.empty(S, dtype=torch.int64, device=logits.device)
    if S == 0:
        return out
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    has_bad = bad_ids is not None and bad_ids.numel() > 0
    if has_bad:
        bad = bad_ids.to(torch.int64) if bad_ids.stride(1) == 1 else bad_ids.to(
            torch.int64).contiguous()
        W = bad.shape[1]
    else:
        bad, W = out, 0  # never read
    draw = keys is not None
    if draw:
        keys, counters = keys.to(torch.int64), counters.to(torch.int64)
    has_temp = draw and temperature is not None
    has_greedy = draw and greedy is not None
    _sample_kernel[(S,)](
        x, x.stride(0), V, bad, bad.stride(0) if has_bad else 0, W,
        temperature if has_temp else out, greedy if has_greedy else out,
        keys if draw else out, counters if draw else out, out,
        HAS_BAD=has_bad, DRAW=draw, HAS_TEMP=has_temp, HAS_GREEDY=has_greedy,
        W_BLOCK=max(MIN_W_BLOCK, triton.next_power_of_2(W)), BLOCK=2048 if V >= 2048 else
        max(16, triton.next_power_of_2(V)), num_warps=8 if V >= 2048 else 4)
    return out
