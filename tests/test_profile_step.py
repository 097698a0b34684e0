"""benchmark/profile_step.py's device idle-time analysis, on made-up kernel intervals."""
from benchmark.profile_step import idle_gaps


def test_idle_gaps_counts_time_no_kernel_ran():
    kernels = [(0, 10, 'a'), (12, 20, 'b'), (20, 25, 'c'), (40, 41, 'd')]
    span, busy, gaps = idle_gaps(kernels)
    assert (span, busy) == (41, 10 + 13 + 1)
    assert gaps == [(15, 'c', 'd'), (2, 'a', 'b')]  # largest first


def test_idle_gaps_overlapping_kernels_and_any_order():
    kernels = [(5, 30, 'long'), (0, 10, 'first'), (12, 14, 'inside'), (35, 36, 'last')]
    span, busy, gaps = idle_gaps(kernels)
    assert (span, busy) == (36, 30 + 1)
    assert gaps == [(5, 'long', 'last')]


def test_idle_gaps_empty():
    assert idle_gaps([]) == (0.0, 0.0, [])
