"""benchmark/profile_step.py's device idle-time analysis and trace_request.py's attribution of
a gap to host ops, on made-up intervals; trace_request.py end to end on the CPU."""
import json

from benchmark.profile_step import idle_gaps
from benchmark.trace_request import host_ops_during


def test_idle_gaps_counts_time_no_kernel_ran():
    kernels = [(0, 10, 'a'), (12, 20, 'b'), (20, 25, 'c'), (40, 41, 'd')]
    span, busy, gaps = idle_gaps(kernels)
    assert (span, busy) == (41, 10 + 13 + 1)
    assert gaps == [(15, 'c', 'd', 25), (2, 'a', 'b', 10)]  # largest first, with where


def test_idle_gaps_overlapping_kernels_and_any_order():
    kernels = [(5, 30, 'long'), (0, 10, 'first'), (12, 14, 'inside'), (35, 36, 'last')]
    span, busy, gaps = idle_gaps(kernels)
    assert (span, busy) == (36, 30 + 1)
    assert gaps == [(5, 'long', 'last', 30)]


def test_idle_gaps_empty():
    assert idle_gaps([]) == (0.0, 0.0, [])


def test_host_ops_during_a_gap():
    ops = [(0, 10, 'aten::to'), (12, 30, 'aten::matmul'), (31, 33, 'cuLaunchKernelEx')]
    hits, python_us = host_ops_during(ops, 8, 32)
    assert hits == [dict(name='aten::matmul', us=18), dict(name='aten::to', us=2),
                    dict(name='cuLaunchKernelEx', us=1)]
    assert python_us == 24 - 21  # 10..12 and 30..31: no op ran


def test_trace_request_runs_on_cpu(tmp_path):
    from benchmark.trace_request import main
    main(['--dummy', 'tiny', '--device', 'cpu', '--input_seqlen', '16', '--warmup', '1',
          '--out_dir', str(tmp_path)])
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['ttft_ms'] > 0
    assert summary['summary'] is None  # no device kernels on the CPU
    trace = json.loads((tmp_path / 'trace.json').read_text())
    assert any(e.get('name', '').startswith('aten::') for e in trace['traceEvents'])
