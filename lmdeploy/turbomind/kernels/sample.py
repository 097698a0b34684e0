"""The sampler's last step: banned ids, then a greedy argmax or one inverse-CDF draw per row.

    sample_tokens(logits, bad_ids=None, temperature=None, greedy=None, keys=None,
                  counters=None) -> int64 [S]

logits: [S, V], any float dtype, read as fp32. bad_ids: optional [S, W] integer ids, those
< 0 or >= V ignored (padding). keys, counters: int64 [S], each row's random stream and which
draw of it to take (`sampling.random_uniform`: u in (0, 1)); None: every row is greedy.
greedy: optional bool [S], rows that take the argmax although they have a stream.
temperature: optional fp32 [S] (None: 1), clamped to >= 1e-6, for the rows that draw.

Per row: banned ids become -inf. A greedy row takes the argmax (the first index on ties). A
drawing row divides by its temperature and takes the first index, in vocabulary order, whose
cumulative softmax reaches ``u x`` the total (so never a zero-probability id; sampling.py
explains why vocabulary order). The Triton kernel (`triton_sample.py`) does this, the draw's
hash included, in one launch where the torch reference below takes ~30 small ops; its sums
are blocked, so a draw within ~1e-6 of a boundary between two ids may take the other one.
"""
from typing import Optional

import torch


def ban_tokens(x: torch.Tensor, bad_ids: torch.Tensor) -> torch.Tensor:
    """Out of place: `x` [S, V] with ``x[r, bad_ids[r, j]] = -inf`` for every id in range."""
    V = x.shape[1]
    ids = bad_ids.to(device=x.device, dtype=torch.int64)
    valid = (ids >= 0) & (ids < V)
    # counts, not booleans: duplicate ids (and the redirected padding) add, so the scatter is
    # deterministic
    hits = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    hits.scatter_add_(1, torch.where(valid, ids, torch.zeros_like(ids)), valid.to(torch.int32))
    return x.masked_fill(hits > 0, float('-inf'))


def sample_tokens_ref(logits: torch.Tensor, bad_ids: Optional[torch.Tensor] = None,
                      temperature: Optional[torch.Tensor] = None,
                      greedy: Optional[torch.Tensor] = None,
                      keys: Optional[torch.Tensor] = None,
                      counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    from ..sampling import random_uniform  # the sampler's counter-based streams
    x = logits.to(torch.float32)
    if bad_ids is not None and bad_ids.numel():
        x = ban_tokens(x, bad_ids)
    best = x.argmax(dim=1)
    if keys is None:
        return best
    uniform = random_uniform(keys, counters)
    if temperature is not None:
        temp = temperature.to(device=x.device, dtype=torch.float32).clamp(min=1e-6)
        if greedy is not None:  # their draw is discarded: keep it finite
            temp = torch.where(greedy, torch.ones_like(temp), temp)
        x = x / temp[:, None]
    cdf = torch.cumsum(torch.softmax(x, dim=1), dim=1)
    target = (uniform.to(cdf.device) * cdf[:, -1]).unsqueeze(1).contiguous()
    # the first index with cdf >= target: target > 0 and cdf is flat over zero-probability ids
    tok = torch.searchsorted(cdf.contiguous(), target, right=False).squeeze(1)
    tok = tok.clamp(max=x.shape[1] - 1)
    return tok if greedy is None else torch.where(greedy, best, tok)


try:  # the Triton kernel beside its reference (kernels.select picks it on CUDA)
    from .triton_sample import sample_tokens_triton  # noqa: E402,F401
except ImportError:  # no triton
    pass
