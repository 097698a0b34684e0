"""benchmark/profile_engine_host.py and benchmark/profile_throughput.py on tiny shapes (CPU)."""
import json

from benchmark import profile_engine_host, profile_throughput

PHASES = ('jit_wait', 'schedule', 'step_input', 'sample_prep', 'forward', 'sample', 'wake', 'sync',
          'update', 'dispatch')


def test_engine_host_reports_phases_and_callers(tmp_path):
    out = tmp_path / 'host.json'
    # 20 steps: the timed window starts inside a step, whose share of the mean shrinks with more
    profile_engine_host.main(['--rows', '3,6', '--steps', '20', '--vocab', '64',
                              '--device_ms', '1', '--out', str(out)])
    reports = json.loads(out.read_text())
    assert [r['rows'] for r in reports] == [3, 6]
    for r in reports:
        assert r['steps'] >= 20 and r['rows_per_step'] == r['rows']
        assert all(r[f'{p}_us'] >= 0 for p in PHASES)
        assert r['step_us'] >= 900  # the 1 ms stand-in for the device
        assert r['async_schedule'] and r['steps_ahead'] >= r['steps']  # planned ahead
        assert sum(r[f'{p}_us'] for p in PHASES) <= r['step_us'] * 1.01
        assert r['decode_steps'] == r['steps']  # every timed step only decodes
        # one snapshot per step per caller; the counting window is not aligned with the
        # timed steps, so a caller catching up may add one or two
        assert 0 < r['client_wakeups_per_step'] <= 2 * r['rows']


def test_engine_host_arrivals_ttft_by_schedule(tmp_path):
    """Poisson arrivals beside decoding rows on a 10 ms stand-in device: planned ahead at once,
    an arrival waits a whole extra step; just in time it makes the next step, and the device
    still does not wait for the host (as it does in synchronous steps)."""
    out = tmp_path / 'arrivals.json'
    profile_engine_host.main(['--arrival_rate', '40', '--requests', '16', '--rows', '2',
                              '--vocab', '64', '--device_ms', '10', '--arrival_len', '4',
                              '--out', str(out)])
    reports = {r['schedule']: r for r in json.loads(out.read_text())}
    assert set(reports) == {'sync', 'ahead', 'jit'}
    for r in reports.values():
        assert r['requests'] == 16 and r['steps'] > 0 and r['steps_per_s'] > 0
        assert 10 <= r['ttft_ms_p50'] <= r['ttft_ms_p99']  # at least the prefill step
    jit, ahead, sync = reports['jit'], reports['ahead'], reports['sync']
    # the planner's measure of the stand-in device's steps (10 ms each, both kinds)
    for kind in ('decode', 'mixed'):
        assert 9 <= ahead[f'device_{kind}_ms_p50'] <= 13, ahead
    # a first token's step: the step ahead of it on the device, its own, the handover
    for r in (ahead, jit):
        assert 9 <= r['ttft_step_device_ms_p50'] <= 13, r
        assert 0 <= r['ttft_step_ahead_ms_p50'] <= 11 and r['ttft_step_handover_ms_p50'] < 2, r
    assert jit['ttft_step_ahead_ms_mean'] < ahead['ttft_step_ahead_ms_mean'] - 2
    assert jit['jit_waits'] > 0 and ahead['jit_waits'] == sync['jit_waits'] == 0
    assert jit['ttft_ms_p50'] < ahead['ttft_ms_p50'] - 4
    assert jit['device_idle_us_per_step'] < 0.5 * sync['device_idle_us_per_step']


def test_throughput_stamps_equal_streamed_counts(tmp_path):
    common = ['synthetic', '--dummy', 'tiny', '--concurrency', '4', '--num_prompts', '6',
              '--max_batch_size', '4', '--session_len', '400', '--no_progress']
    results = {}
    for mode in ('stamps', 'stream'):
        out = tmp_path / f'{mode}.json'
        extra = ['--stream_output'] if mode == 'stream' else ['--engine_timing']
        assert profile_throughput.main(common + extra + ['--out', str(out)]) == 0
        results[mode] = json.loads(out.read_text())
    a, b = results['stamps'], results['stream']
    assert a['output_tokens'] == b['output_tokens'] > 0  # seeded: the same set and lengths
    for r in (a, b):
        assert 0 < r['ttft_ms_p50'] <= r['ttft_ms_p99'] and 0 < r['itl_ms_p50'] <= r['itl_ms_p99']
    timing = a['engine_timing']
    assert timing['steps'] == timing['decode_steps'] + timing['mixed_steps'] > 0
    # where each request's first token spent its time: every prompt's first step is mixed
    assert timing['ttft_queue_n'] == timing['ttft_step_n'] == 6
    assert 0 <= timing['ttft_queue_ms_p50'] <= timing['ttft_queue_ms_p90']
    assert 0 < timing['ttft_step_ms_p50'] <= timing['ttft_step_ms_p90']
    assert timing['ttft_step_ms_mean'] <= a['ttft_ms_p99']
