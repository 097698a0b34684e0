"""The step timer's per-step tail: each step's wall time split into its wait for the device
(`step_sync`) and the host's part (`step_host`, less any just-in-time wait)."""
import time

from lmdeploy.turbomind.step_timer import StepTimer


def _step(timer, host_s, sync_s, jit_s=0.0):
    timer.begin()
    time.sleep(jit_s)
    timer.lap('jit_wait')
    time.sleep(host_s)
    timer.lap('schedule')
    time.sleep(sync_s)
    timer.lap('sync')
    timer.end(1)


def test_a_slow_device_step_shows_in_sync_and_a_slow_host_step_in_host():
    timer = StepTimer()
    for _ in range(20):
        _step(timer, 0.001, 0.004, jit_s=0.02)
    _step(timer, 0.001, 0.030)  # the device was late once
    _step(timer, 0.030, 0.004)  # the host was late once
    r = timer.report()
    assert r['step_n'] == r['step_sync_n'] == r['step_host_n'] == 22
    assert r['step_ms_max'] >= 30 and r['step_ms_p50'] >= 25  # the 20 ms jit waits count here
    assert r['step_sync_ms_max'] >= 30 and r['step_sync_ms_p50'] < 15
    assert r['step_host_ms_max'] >= 30 and r['step_host_ms_p50'] < 15  # ... but not here
    assert r['step_ms_p50'] <= r['step_ms_p90'] <= r['step_ms_p99'] <= r['step_ms_max']


def test_reset_between_begin_and_end_counts_the_step_from_the_reset():
    timer = StepTimer()
    timer.begin()
    timer.lap('sync')
    timer.reset()
    timer.end(1)
    r = timer.report()
    assert r['steps'] == 1 and r['step_n'] == 1 and r['step_sync_ms_max'] == 0.0
