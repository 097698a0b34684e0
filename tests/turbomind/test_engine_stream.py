"""What stream_infer / submit hand back besides the ids: the engine's finish reason, the token
stamps, and one wake-up per caller per step (tiny dummy model, CPU)."""
import threading
import time

import pytest
import torch

from lmdeploy.turbomind import TurboMind
from lmdeploy.turbomind.turbomind import StreamOutput

PROMPT = [1, 17, 99, 42, 7, 150]


@pytest.fixture(scope='module')
def tm():
    tm = TurboMind(dummy='tiny', device='cpu', dtype='fp32', max_batch_size=4, num_blocks=64,
                   block_size=16)
    yield tm
    tm.close()


def run(tm, n, **kw):
    kw.setdefault('top_k', 1)
    return list(tm.create_instance().stream_infer(
        kw.pop('sid', 1), PROMPT, request_output_len=n, sequence_end=True, **kw))


def test_finish_reason_length_and_v002_pair(tm):
    outputs = run(tm, 5, ignore_eos=True, stream_output=True)
    ids, n = outputs[-1][0]  # still v0.0.2's pair
    assert isinstance(outputs[-1][0], StreamOutput) and len(outputs[-1][0]) == 2
    assert n == 5 and ids.dtype == torch.int32 and len(ids) == 5
    assert outputs[-1][0].finish_reason == 'length'
    assert all(o[0].finish_reason == '' for o in outputs[:-1]) and len(outputs) >= 2


def test_finish_reason_stop(tm):
    first = run(tm, 4, ignore_eos=True)[-1][0][0].tolist()
    out = run(tm, 4, stop_words=[first[1]])[-1][0]
    assert out[0].tolist() == first[:2] and out.finish_reason == 'stop'


def test_finish_reason_cancel(tm):
    got = {}

    def long():
        got['out'] = run(tm, 400, sid=7, ignore_eos=True, stream_output=True)[-1][0]

    t = threading.Thread(target=long)
    t.start()
    deadline = time.time() + 30
    while tm.engine.call(lambda: tm.engine.scheduler.num_running()) == 0:
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(0.05)
    tm.create_instance().cancel(7)
    t.join(30)
    assert got['out'].finish_reason == 'cancel' and 0 < got['out'][1] < 400


def test_stamps_time_every_token_without_streaming(tm):
    t0 = time.perf_counter()
    out = run(tm, 6, ignore_eos=True)
    assert len(out) == 1  # not streamed: one yield
    stamps = out[0][0].stamps
    assert [n for _, n in stamps] == [1, 2, 3, 4, 5, 6]  # one token per step
    times = [t for t, _ in stamps]
    assert t0 < times[0] and times == sorted(times) and times[-1] <= time.perf_counter()


class CountingCond:
    """Any object of this shape can be a request's cond; it counts the engine's wake-ups."""

    def __init__(self):
        self.notified = 0
        self.event = threading.Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def notify_all(self):
        self.notified += 1
        self.event.set()


def test_submit_wakes_each_cond_once_per_step(tm):
    cond = CountingCond()
    inst = tm.create_instance()
    requests = inst.submit([11, 12, 13], [PROMPT, PROMPT[:3], PROMPT[:4]],
                           request_output_len=6, sequence_end=True, top_k=1, ignore_eos=True,
                           cond=cond)
    deadline = time.time() + 30
    while not all(r.finished for r in requests):
        assert cond.event.wait(max(0.0, deadline - time.time()))
        cond.event.clear()
    assert [len(r.output_ids) for r in requests] == [6, 6, 6]
    assert [r.reason for r in requests] == ['length'] * 3
    ref = run(tm, 6, ignore_eos=True)[-1][0][0].tolist()
    assert requests[0].output_ids == ref
    # 3 rows, 6 tokens each, at most a step or two apart: one wake-up per step, not per row
    assert 6 <= cond.notified <= 8


def test_a_request_that_does_not_stream_wakes_its_caller_once(tm):
    from lmdeploy.turbomind.engine import Request
    from lmdeploy.turbomind.sampling import SamplingParams
    cond = CountingCond()
    request = Request(21, SamplingParams(top_k=1), cond, stream=False)
    tm.engine.submit(request, input_ids=PROMPT, request_output_len=6, sequence_end=True)
    assert cond.event.wait(30) and request.finished
    assert cond.notified == 1 and len(request.output_ids) == 6 and len(request.stamps) == 6


def test_a_late_streaming_caller_still_gets_every_step(tm):
    """The caller sleeps while the engine runs many steps: it still sees one snapshot per
    step (v0.0.2 could skip intermediate states), each a prefix of the final output."""
    snapshots = []
    for outputs in tm.create_instance().stream_infer([9, 10], [PROMPT, PROMPT[:3]],
                                                     request_output_len=24, top_k=1,
                                                     ignore_eos=True, stream_output=True,
                                                     sequence_end=True):
        snapshots.append([(o[0].tolist(), o[1]) for o in outputs])
        if len(snapshots) == 2:
            time.sleep(0.5)  # dozens of steps run meanwhile
    lengths = [[n for _, n in snap] for snap in snapshots]
    assert lengths == [[k, k] for k in range(1, 25)]
    final = [ids for ids, _ in snapshots[-1]]
    for snap in snapshots:
        for (ids, n), full in zip(snap, final):
            assert ids == full[:n]
