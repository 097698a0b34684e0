"""The oracle for the sampler's inverse-CDF draws (kernels/sample.py), on any device.

The Triton kernel sums exp() chunk by chunk in fp32 and the reference with one cumsum, in
another order (triton_sample.py), so a draw that falls within rounding of a boundary between
two ids may land on either side. A drawn id is right when it is a valid inverse-CDF answer for
the row's uniform against the exact (fp64) CDF, within `tol`; a greedy row's id is the argmax.
"""
import torch


def valid_draws(x, bad, temp, greedy, keys, counters, got, tol=1e-5):
    """Bool per row: `got` (int64 [S]) is an answer the sampler may give for these inputs."""
    from lmdeploy.turbomind.kernels.sample import ban_tokens
    from lmdeploy.turbomind.sampling import random_uniform
    z = x.double() if bad is None else ban_tokens(x, bad).double()
    if temp is not None:
        t = temp.double().clamp(min=1e-6)
        z = z / (torch.where(greedy, torch.ones_like(t), t) if greedy is not None else t)[:, None]
    cdf = torch.softmax(z, dim=1).cumsum(dim=1)
    target = random_uniform(keys, counters).to(cdf.device).double() * cdf[:, -1]
    rows = torch.arange(x.shape[0], device=x.device)
    before = torch.where(got > 0, cdf[rows, (got - 1).clamp(min=0)], torch.zeros_like(target))
    ok = (cdf[rows, got] >= target - tol) & (before <= target + tol)
    if greedy is not None:
        ok = torch.where(greedy, got == z.argmax(dim=1), ok)
    return ok
