"""The TurboMind engine end to end through its public API (CPU, fp32, tiny deployed fixtures).

Exactness oracle: transformers on the same (fp16-rounded) weights, and the engine's own solo /
fresh runs: every optimisation (batching, chunked prefill, session reuse, eviction,
preemption, rewind) must give the same greedy tokens as the plain path.
"""
import itertools
import os
import random
import shutil
import threading
import time

import pytest
import torch

from lmdeploy.turbomind import TurboMind
from lmdeploy.turbomind.errors import (EngineError, InvalidRequest, NoCapacity, RequestError,
                                       SessionBusy, SessionConflict, SessionInactive,
                                       SessionTooLong)
from lmdeploy.turbomind.weights import WeightError

VARIANTS = ['llama', 'gqa', 'internlm', 'baichuan', 'head128', 'rope']
VOCAB = 2048
EOS = 2
ATOL = 1e-4
BASE = dict(device='cpu', dtype='fp32', block_size=8, num_blocks=256)

_session_ids = itertools.count(1000)


def new_sid() -> int:
    return next(_session_ids)


def prompt(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()


@pytest.fixture(scope='module')
def engines(workspace):
    """`engines(variant='gqa', fmt='safetensors', **overrides) -> TurboMind`, one per key,
    closed when the module ends."""
    made = {}

    def get(variant: str = 'gqa', fmt: str = 'safetensors', **overrides) -> TurboMind:
        key = (variant, fmt, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = TurboMind(workspace(variant, fmt), **{**BASE, **overrides})
        return made[key]

    yield get
    for tm in made.values():
        tm.close()


def infer(tm, ids, n, sid=None, start=True, step=0, end=False, instance=None, **kw):
    """One stream_infer call; returns this turn's generated ids. Greedy, ignore_eos unless
    told otherwise."""
    kw.setdefault('top_k', 1)
    kw.setdefault('ignore_eos', True)
    instance = instance or tm.create_instance()
    outputs = list(instance.stream_infer(new_sid() if sid is None else sid, ids,
                                         request_output_len=n, sequence_start=start,
                                         sequence_end=end, step=step, **kw))
    assert outputs and len(outputs[-1]) == 1
    out, count = outputs[-1][0]
    assert out.dtype == torch.int32 and count == len(out)
    return out.tolist()


def fresh(tm, ids, n, **kw):
    """A one-shot session (ended at once) on `ids`."""
    return infer(tm, ids, n, end=True, **kw)


class Chat:
    """A multi-turn session following v0.0.2's client contract (step = tokens so far)."""

    def __init__(self, tm, sid=None):
        self.tm, self.sid, self.history = tm, new_sid() if sid is None else sid, []
        self.instance = tm.create_instance()

    def turn(self, ids, n, step=None, **kw):
        if step is not None:
            self.history = self.history[:step]
        out = infer(self.tm, ids, n, sid=self.sid, start=not self.history,
                    step=len(self.history), instance=self.instance, **kw)
        self.history = self.history + list(ids) + out
        return out


def on_engine(tm, fn):
    """Run `fn(scheduler)` on the engine thread (the scheduler is not thread-safe)."""
    return tm.engine.call(lambda: fn(tm.engine.scheduler))


def session_tokens(tm, sid):
    info = on_engine(tm, lambda s: s.session_info(sid))
    return None if info is None else list(info['tokens'])


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=EOS, pad_token_id=0)
    return out[0, len(ids):].tolist()


def run_threads(targets):
    """Run callables on their own threads; re-raise the first failure."""
    errors = []

    def wrap(fn):
        def body():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the test
                errors.append(e)
        return body

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), 'a request hung'
    if errors:
        raise errors[0]


class Background:
    """A long streaming generation on another thread; `wait_tokens(k)` blocks until it has k."""

    def __init__(self, tm, ids, n, sid=None, **kw):
        self.sid = new_sid() if sid is None else sid
        self.tokens, self.count, self.error = [], 0, None
        self.progress = threading.Condition()
        kw.setdefault('top_k', 1)
        kw.setdefault('ignore_eos', True)
        instance = tm.create_instance()

        def body():
            try:
                for outputs in instance.stream_infer(self.sid, ids, request_output_len=n,
                                                     stream_output=True, step=0, **kw):
                    with self.progress:
                        self.tokens = outputs[0][0].tolist()
                        self.count += 1
                        self.progress.notify_all()
            except BaseException as e:  # noqa: BLE001
                self.error = e
            with self.progress:
                self.done = True
                self.progress.notify_all()

        self.done = False
        self.thread = threading.Thread(target=body)
        self.thread.start()

    def wait_tokens(self, k):
        with self.progress:
            assert self.progress.wait_for(lambda: len(self.tokens) >= k or self.done, 60)
        assert not self.done, f'finished too early: {self.error!r}'

    def join(self):
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error
        return self.tokens


# ------------------------------------------------------------------------------------------
# 1. Greedy equals transformers on every fixture variant

@pytest.mark.parametrize('variant,fmt', [(v, 'safetensors') for v in VARIANTS] + [('gqa', 'meta')])
def test_greedy_matches_transformers(engines, hf_model, variant, fmt):
    tm = engines(variant, fmt)
    model = hf_model(variant)  # baichuan: its plain-Llama twin
    for n_prompt, seed in ((7, 1), (20, 2)):
        ids = prompt(n_prompt, seed)
        assert fresh(tm, ids, 12) == hf_greedy(model, ids, 12)


def test_greedy_without_ignore_eos_stops_where_transformers_does(engines, hf_model):
    tm, model = engines('llama'), hf_model('llama')
    ids = prompt(9, 3)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             eos_token_id=EOS, pad_token_id=0)[0, len(ids):].tolist()
    got = fresh(tm, ids, 24, ignore_eos=False)
    assert got == ref[:len(got)] and (len(got) == 24 or got[-1] == EOS)


def test_repetition_penalty_matches_transformers(engines, hf_model):
    tm, model = engines('llama'), hf_model('llama')
    ids = prompt(9, 9)  # plain greedy repeats a token three times after it
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, repetition_penalty=1.5, eos_token_id=EOS,
                             pad_token_id=0)[0, len(ids):].tolist()
    assert ref != hf_greedy(model, ids, 12)  # the penalty matters here
    assert fresh(tm, ids, 12, repetition_penalty=1.5) == ref
    # on a later turn the penalty covers the whole session history
    chat = Chat(tm)
    chat.turn(ids[:5], 3, repetition_penalty=1.5)
    more = ids[5:]
    assert chat.turn(more, 8, repetition_penalty=1.5) == fresh(
        tm, chat.history[:-8], 8, repetition_penalty=1.5)


# ------------------------------------------------------------------------------------------
# 2. Concurrent staggered requests equal their solo runs

@pytest.mark.parametrize('overrides', [
    dict(max_batch_size=5),
    # a pool too small for everyone, greedy admission: preemption; a small prefill budget:
    # chunked prefill
    dict(max_batch_size=8, block_size=4, num_blocks=26, max_prefill_tokens=16, admit_horizon=-1),
], ids=['batch5', 'preempt+chunked'])
def test_concurrent_staggered_requests_equal_solo(engines, overrides):
    tm = engines('gqa', **overrides)
    rng = random.Random(7)
    jobs = [(prompt(rng.randint(2, 40), 100 + i), rng.randint(3, 12)) for i in range(16)]
    solo = [fresh(tm, ids, n) for ids, n in jobs]
    got = [None] * len(jobs)
    preempted = on_engine(tm, lambda s: s.num_preemptions())

    def job(i):
        def body():
            ids, n = jobs[i]
            time.sleep(rng_sleep[i])
            got[i] = fresh(tm, ids, n, stream_output=bool(i % 2))
        return body

    burst = 'num_blocks' in overrides
    rng_sleep = [0.0 if burst else random.Random(i).uniform(0, 0.03) for i in range(len(jobs))]
    gate = threading.Event()
    if burst:  # hold the loop until all 16 are queued, so that the pool surely runs short
        tm.engine._post(lambda: gate.wait(30))
    peak, waited, stop = [0], [0], threading.Event()

    def watch():  # how many requests the persistent batch held at once, and how many waited
        while not stop.is_set():
            running, waiting = on_engine(tm, lambda s: (s.num_running(), s.num_waiting()))
            peak[0], waited[0] = max(peak[0], running), max(waited[0], waiting)
            time.sleep(0.0005)

    def release():
        deadline = time.time() + 30
        while burst and tm.engine._commands.qsize() < len(jobs) and time.time() < deadline:
            time.sleep(0.001)
        gate.set()

    watcher = threading.Thread(target=lambda: (release(), watch()))
    watcher.start()
    try:
        run_threads([job(i) for i in range(len(jobs))])
    finally:
        stop.set()
        watcher.join()
    assert got == solo
    assert 1 < peak[0] <= overrides['max_batch_size']
    assert waited[0] > 0
    if burst:
        assert on_engine(tm, lambda s: s.num_preemptions()) > preempted
    assert on_engine(tm, lambda s: (s.num_running(), s.num_waiting())) == (0, 0)


def test_stream_output_yields_growing_prefixes(engines):
    tm = engines('gqa')
    ids = prompt(6, 11)
    steps = [o[0][0].tolist() for o in tm.create_instance().stream_infer(
        new_sid(), ids, request_output_len=10, top_k=1, ignore_eos=True, stream_output=True,
        sequence_end=True)]
    assert len(steps) >= 2 and steps[-1] == fresh(tm, ids, 10)
    for a, b in zip(steps, steps[1:]):
        assert b[:len(a)] == a and len(b) > len(a)


def test_batched_call_rows(engines):
    """One stream_infer call may carry several sessions (v0.0.2 lists)."""
    tm = engines('gqa')
    rows = [prompt(5, 21), prompt(12, 22), prompt(3, 23)]
    sids = [new_sid() for _ in rows]
    outs = list(tm.create_instance().stream_infer(sids, rows, request_output_len=6, top_k=1,
                                                  ignore_eos=True, sequence_end=True))[-1]
    assert [o[0].tolist() for o in outs] == [fresh(tm, r, 6) for r in rows]
    assert [o[1] for o in outs] == [6, 6, 6]


# ------------------------------------------------------------------------------------------
# 3. Multi-turn sessions: cached KV, eviction, chunked prefill, rewind

def _conversation(tm, ref, turns=3, n=6, seed=30):
    """Turns on one session of `tm`, each checked against a fresh run on `ref`."""
    chat = Chat(tm)
    for t in range(turns):
        ids = prompt(9 if t == 0 else 5, seed + t)[0 if t == 0 else 1:]
        expected = fresh(ref, chat.history + ids, n)
        assert chat.turn(ids, n) == expected, f'turn {t}'
    assert session_tokens(tm, chat.sid) == chat.history
    return chat


def test_multi_turn_equals_fresh_run(engines):
    tm = engines('gqa')
    chat = _conversation(tm, tm)
    info = on_engine(tm, lambda s: s.session_info(chat.sid))
    assert info['status'] == 'idle' and info['num_cached'] >= len(chat.history) - 1


def test_multi_turn_after_eviction(engines):
    ref = engines('gqa')
    tm = engines('gqa', block_size=4, num_blocks=12)  # room for about one session at a time
    a, b = Chat(tm), Chat(tm)
    for t in range(3):
        for k, chat in enumerate((a, b)):
            ids = prompt(9 if t == 0 else 5, 40 + 10 * k + t)[0 if t == 0 else 1:]
            expected = fresh(ref, chat.history + ids, 6)
            assert chat.turn(ids, 6) == expected, f'session {k} turn {t}'
    assert on_engine(tm, lambda s: s.num_evictions()) > 0
    for chat in (a, b):
        assert session_tokens(tm, chat.sid) == chat.history
    # a request that could never fit in the whole pool is rejected up front
    with pytest.raises(NoCapacity, match='needs 15 KV blocks but the pool holds only 12'):
        fresh(tm, prompt(40, 49), 20)
    assert chat.turn(prompt(3, 48)[1:], 2) == fresh(ref, chat.history[:-2], 2)


@pytest.mark.parametrize('overrides', [dict(max_prefill_tokens=3),
                                       dict(max_prefill_tokens=3, chunked_prefill=False)],
                         ids=['chunked', 'whole'])
def test_multi_turn_with_small_prefill_budget(engines, overrides):
    _conversation(engines('gqa', **overrides), engines('gqa'), seed=50)


def test_step_rewinds_history(engines):
    tm = engines('gqa')
    chat = Chat(tm)
    a, b, c = prompt(10, 60), prompt(6, 61)[1:], prompt(4, 62)[1:]
    o1 = chat.turn(a, 5)
    chat.turn(b, 5)
    after_turn1 = len(a) + len(o1)
    # regenerate turn 2 with another input
    assert chat.turn(c, 5, step=after_turn1) == fresh(tm, a + o1 + c, 5)
    assert session_tokens(tm, chat.sid) == chat.history
    # rewind into the first prompt (KV beyond step is dropped)
    assert chat.turn(c, 5, step=4) == fresh(tm, a[:4] + c, 5)
    assert session_tokens(tm, chat.sid) == chat.history
    # a step beyond the stored tokens is ignored (v0.0.2: 'Skipping invalid step')
    history = list(chat.history)
    out = infer(tm, b, 5, sid=chat.sid, start=False, step=len(history) + 100)
    assert out == fresh(tm, history + b, 5)


# ------------------------------------------------------------------------------------------
# 4. decode()

@pytest.mark.parametrize('variant', ['gqa', 'internlm'])
def test_decode_logits_match_transformers(engines, hf_model, variant):
    tm, model = engines(variant), hf_model(variant)
    rows = [prompt(5, 70), prompt(13, 71), prompt(1, 72), prompt(9, 73)]
    before = [list(r) for r in rows]
    logits = tm.create_instance().decode(rows)
    assert rows == before  # v0.0.2 appended a dummy token in place; we do not
    assert logits.dtype == torch.float32 and logits.shape == (4, 13, VOCAB)
    for b, ids in enumerate(rows):
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float()
        diff = (logits[b, :len(ids)] - ref).abs().max().item()
        assert diff < ATOL, f'row {b}: {diff}'
        assert not logits[b, len(ids):].any()


def test_decode_with_chunked_prefill(engines):
    rows = [prompt(11, 74), prompt(4, 75)]
    want = engines('gqa').create_instance().decode(rows)
    got = engines('gqa', max_prefill_tokens=3).create_instance().decode(rows)
    assert (got - want).abs().max().item() < ATOL  # other GEMM shapes: rounding only


def test_decode_does_not_disturb_sessions(engines):
    tm = engines('gqa', max_batch_size=4)
    chat = Chat(tm)
    a, b = prompt(8, 80), prompt(5, 81)[1:]
    o1 = chat.turn(a, 6)
    expected = fresh(tm, a + o1 + b, 6)
    # session ids 0..B-1 (v0.0.2's decode ids) are live too
    low = [Chat(tm, sid=i) for i in range(2)]
    low_out = [c.turn(prompt(4, 82 + i), 3) for i, c in enumerate(low)]
    running = Background(tm, prompt(6, 85), 120)
    running.wait_tokens(2)
    tm.create_instance().decode([prompt(7, 83), prompt(3, 84)])
    tokens = running.join()
    assert tokens == fresh(tm, prompt(6, 85), 120)
    assert chat.turn(b, 6) == expected
    for c, out in zip(low, low_out):
        assert session_tokens(tm, c.sid) == c.history and c.history[-3:] == out


# ------------------------------------------------------------------------------------------
# 5. Seeded sampling

SAMPLING = dict(top_k=40, top_p=0.8, temperature=0.8, ignore_eos=True)


def test_seeded_sampling_is_reproducible_alone_and_in_a_full_batch(engines):
    tm = engines('gqa', max_batch_size=4)
    ids = prompt(7, 90)
    alone = fresh(tm, ids, 16, random_seed=1234, **SAMPLING)
    assert fresh(tm, ids, 16, random_seed=1234, **SAMPLING) == alone
    assert fresh(tm, ids, 16, random_seed=1235, **SAMPLING) != alone
    assert alone != fresh(tm, ids, 16)  # it did sample
    # the same request inside a full batch of three other (unseeded) samplers
    others = [Background(tm, prompt(4 + 3 * i, 91 + i), 150, **SAMPLING) for i in range(3)]
    for o in others:
        o.wait_tokens(1)
    in_batch = fresh(tm, ids, 16, random_seed=1234, **SAMPLING)
    still_running = on_engine(tm, lambda s: s.num_running())
    for o in others:
        o.join()
    assert in_batch == alone
    assert still_running == 3  # the others were still generating around it


def test_unseeded_requests_differ(engines):
    tm = engines('gqa')
    ids = prompt(7, 92)
    outs = [tuple(fresh(tm, ids, 16, **SAMPLING)) for _ in range(4)]
    assert len(set(outs)) == 4


def test_seeded_session_continues_its_stream(engines):
    """A later turn continues the session's random stream: two identical seeded
    conversations give identical turns."""
    tm = engines('gqa')
    convs = []
    for _ in range(2):
        chat = Chat(tm)
        convs.append([chat.turn(prompt(6, 93), 8, random_seed=99, **SAMPLING),
                      chat.turn(prompt(4, 94)[1:], 8, **SAMPLING)])
    assert convs[0] == convs[1]


# ------------------------------------------------------------------------------------------
# 6. Bad requests fail alone, the engine keeps serving

GOOD = prompt(6, 100)


@pytest.fixture(scope='module')
def serving(engines):
    tm = engines('gqa')
    expected = fresh(tm, GOOD, 4)

    def check():
        assert fresh(tm, GOOD, 4) == expected

    return tm, check


BAD_REQUESTS = [
    (dict(input_ids=[]), InvalidRequest, 'empty input_ids'),
    (dict(input_ids=[1, -1]), InvalidRequest, r'input_ids\[1\] = -1 is outside the vocabulary'),
    (dict(input_ids=[1, VOCAB]), InvalidRequest, 'outside the vocabulary'),
    (dict(sequence_start=False, session_id=987654), InvalidRequest, 'unknown session 987654'),
    (dict(top_p=0.0), InvalidRequest, 'top_p'),
    (dict(top_p=1.5), InvalidRequest, 'top_p'),
    (dict(top_p=float('nan')), InvalidRequest, 'top_p'),
    (dict(top_k=-1), InvalidRequest, 'top_k'),
    (dict(temperature=-0.5), InvalidRequest, 'temperature'),
    (dict(temperature=float('nan')), InvalidRequest, 'temperature'),
    (dict(repetition_penalty=0.0), InvalidRequest, 'repetition_penalty'),
    (dict(repetition_penalty=-1.0), InvalidRequest, 'repetition_penalty'),
    (dict(request_output_len=-1), InvalidRequest, 'request_output_len'),
    (dict(input_ids=[1, 2.5]), InvalidRequest, 'integers'),
    (dict(input_ids=[1, '7']), InvalidRequest, 'integers'),
    (dict(input_ids=[1, None]), InvalidRequest, 'integers'),
    (dict(input_ids=[[1, 5], [1, 0.5]], session_id=[1, 2]), InvalidRequest, 'integers'),
    (dict(session_id=-3), InvalidRequest, 'session_id'),
    (dict(session_id=2**64), InvalidRequest, 'session_id'),  # used to kill the engine thread
    (dict(input_ids=[1, 2**63]), InvalidRequest, 'outside the vocabulary'),  # same
    (dict(random_seed=-1), InvalidRequest, 'random_seed'),
    (dict(stop_words=[VOCAB]), InvalidRequest, 'stop word'),
    (dict(bad_words=[-1]), InvalidRequest, 'bad_words'),
]


@pytest.mark.parametrize('bad,exc,match', BAD_REQUESTS,
                         ids=[f'{i}-{list(b)[0]}' for i, (b, _, _) in enumerate(BAD_REQUESTS)])
def test_bad_request_fails_alone(serving, bad, exc, match):
    tm, check = serving
    args = dict(session_id=new_sid(), input_ids=GOOD, request_output_len=4, top_k=1)
    args.update(bad)
    with pytest.raises(exc, match=match) as info:
        list(tm.create_instance().stream_infer(**args))
    assert isinstance(info.value, RequestError) and info.value.code == exc.code
    check()


def test_busy_and_conflicting_sessions(serving, engines):
    tm, check = serving
    # one call, the same session twice (queued: conflict; already admitted: busy)
    with pytest.raises((SessionConflict, SessionBusy), match='session 77'):
        list(tm.create_instance().stream_infer([77, 77], [GOOD, GOOD], request_output_len=3))
    check()
    running = Background(tm, GOOD, 400)
    running.wait_tokens(1)
    for start in (True, False):
        with pytest.raises(SessionBusy, match='is generating'):
            infer(tm, GOOD, 4, sid=running.sid, start=start, step=len(GOOD))
    check()
    tm.create_instance().cancel(running.sid)
    assert 0 < len(running.join()) < 400
    # a request queued behind a full batch, and a second one for the same session
    one = engines('gqa', max_batch_size=1)
    blocker = Background(one, GOOD, 400)
    blocker.wait_tokens(1)
    queued_sid = new_sid()
    queued = Background(one, GOOD, 3, sid=queued_sid)
    deadline = time.time() + 10
    while on_engine(one, lambda s: s.num_waiting()) < 1 and time.time() < deadline:
        time.sleep(0.001)
    with pytest.raises(SessionConflict, match='queued'):
        infer(one, GOOD, 4, sid=queued_sid)
    # cancelling a queued request (of a new session) drops it without creating the session
    dropped = Background(one, GOOD, 3)
    while on_engine(one, lambda s: s.num_waiting()) < 2 and time.time() < deadline:
        time.sleep(0.001)
    one.create_instance().cancel(dropped.sid)
    assert dropped.join() == [] and session_tokens(one, dropped.sid) is None
    one.create_instance().cancel(blocker.sid)
    blocker.join()
    assert queued.join() == fresh(one, GOOD, 3)
    check()


def test_submit_the_binding_rejects_fails_alone(serving):
    """Defense in depth: arguments the C++ binding cannot convert fail their request on the
    engine thread instead of ending the loop (and hanging the caller)."""
    from lmdeploy.turbomind.engine import Request
    from lmdeploy.turbomind.sampling import SamplingParams
    tm, check = serving
    request = Request(new_sid(), SamplingParams(top_k=1), threading.Condition())
    tm.engine.submit(request, input_ids=[1, 5], request_output_len=2, step=2**70)
    with request.cond:
        assert request.cond.wait_for(lambda: request.finished, 10)
    assert isinstance(request.error, InvalidRequest)
    check()
    for bad in (-1, 2**64, 'x'):
        with pytest.raises(InvalidRequest, match='session_id'):
            tm.create_instance().cancel(bad)
        with pytest.raises(InvalidRequest, match='session_id'):
            tm.create_instance().end(bad)
    check()


def test_cancel_inactive_session(serving):
    tm, check = serving
    sid = new_sid()
    with pytest.raises(SessionInactive, match='not generating'):
        tm.create_instance().cancel(sid)
    infer(tm, GOOD, 3, sid=sid)  # an idle session: nothing to cancel either
    with pytest.raises(SessionInactive):
        tm.create_instance().cancel(sid)
    with pytest.raises(SessionInactive):  # v0.0.2's stop=True form
        list(tm.create_instance().stream_infer(sid, [], stop=True))
    assert session_tokens(tm, sid) is not None  # still there
    check()


def test_too_long_turn_leaves_session_intact(engines):
    tm = engines('gqa', session_len=48)
    chat = Chat(tm)
    chat.turn(prompt(20, 110), 6)
    history = list(chat.history)
    with pytest.raises(SessionTooLong, match='exceed session_len 48'):
        chat.turn(prompt(30, 111)[1:], 4)
    chat.history = history  # the failed turn did not happen
    assert session_tokens(tm, chat.sid) == history
    ids = prompt(8, 112)[1:]
    assert chat.turn(ids, 4) == fresh(tm, history + ids, 4)
    with pytest.raises(SessionTooLong):  # a new session that does not fit either
        fresh(tm, prompt(60, 113), 4)
    # request_output_len is clamped so that the session stays within session_len - 1
    ids = prompt(10, 114)
    out = fresh(tm, ids, 1000)
    assert len(ids) + len(out) == 48 - 1
    assert out == fresh(engines('gqa'), ids, len(out))
    out = chat.turn(prompt(3, 115)[1:], 2**63)  # beyond int64 too
    assert len(chat.history) == 48 - 1


# ------------------------------------------------------------------------------------------
# 8. Weights: missing or short files are load errors; a trimmed vocab_size (v0.0.2) works

def _copy_ws(ws, dst):
    shutil.copytree(ws, dst, symlinks=True)
    return dst, os.path.join(dst, 'triton_models', 'weights')


def _set_ini(wdir, key, value):
    path = os.path.join(wdir, 'config.ini')
    with open(path) as f:
        lines = f.read().splitlines()
    lines = [f'{key} = {value}' if line.split('=')[0].strip() == key else line for line in lines]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def test_missing_or_short_weight_file_fails_at_load(workspace, tmp_path):
    ws, wdir = _copy_ws(workspace('gqa'), str(tmp_path / 'ws'))
    name = 'layers.1.attention.wo.0.weight'
    path = os.path.join(wdir, name)
    data = open(path, 'rb').read()
    os.remove(path)
    with pytest.raises(WeightError, match=rf'{name} is missing'):
        TurboMind(ws, **BASE)
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(WeightError, match=rf'{name} has {len(data) // 2} bytes'):
        TurboMind(ws, **BASE)
    with open(path, 'wb') as f:
        f.write(data)
    TurboMind(ws, **BASE).close()


def test_trimmed_vocab_size_reads_first_rows(workspace, engines, tmp_path):
    """A v0.0.2 workspace: config.ini vocab_size (sentencepiece) < embedding rows."""
    ws, wdir = _copy_ws(workspace('gqa'), str(tmp_path / 'ws'))
    _set_ini(wdir, 'vocab_size', 2000)
    ids = [prompt(9, 120), prompt(4, 121)]
    full = engines('gqa').create_instance().decode(ids)
    with TurboMind(ws, **BASE) as tm:
        assert tm.config.vocab_size == 2000
        trimmed = tm.create_instance().decode(ids)
        assert trimmed.shape == (2, 9, 2000)
        assert (trimmed - full[..., :2000]).abs().max().item() < 1e-5
        out = fresh(tm, ids[0], 8)
        assert all(0 <= t < 2000 for t in out)
        # greedy over the first 2000 logits of the full model
        logits = engines('gqa').create_instance().decode([ids[0] + out])[0, len(ids[0]) - 1:-1]
        assert out == logits[:, :2000].argmax(-1).tolist()
        with pytest.raises(InvalidRequest, match='outside the vocabulary'):
            fresh(tm, [1, 2000], 2)
    # fewer rows than vocab_size, or a partial row, is still an error
    _set_ini(wdir, 'vocab_size', 2100)
    with pytest.raises(WeightError, match=r'tok_embeddings\.weight .*at least vocab_size 2100'):
        TurboMind(ws, **BASE)
    _set_ini(wdir, 'vocab_size', 2000)
    with open(os.path.join(wdir, 'output.weight'), 'ab') as f:
        f.write(b'\0\0')
    with pytest.raises(WeightError, match=r'output\.weight has'):
        TurboMind(ws, **BASE)


# ------------------------------------------------------------------------------------------
# 9. Length, stop words, EOS, cancel, end

def test_ignore_eos_generates_exactly_request_output_len(engines):
    tm = engines('gqa')
    ids = prompt(5, 130)
    for n in (1, 7, 33):
        assert len(fresh(tm, ids, n)) == n
    assert fresh(tm, ids, 0) == []  # prefill only


def test_stop_words_and_eos_end_generation(engines):
    tm = engines('gqa')
    ids = prompt(8, 131)
    free = fresh(tm, ids, 20, ignore_eos=False, stop_words=[])
    k = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    stop = free[k]
    got = fresh(tm, ids, 20, ignore_eos=False, stop_words=[stop])
    assert got == free[:k + 1] and got[-1] == stop  # the stop token is included
    # ignore_eos sends no stop words (v0.0.2)
    assert fresh(tm, ids, 20, ignore_eos=True, stop_words=[stop]) == fresh(tm, ids, 20)
    # the same token as EOS
    with TurboMind(tm.model_path, eos_id=stop, **BASE) as tm2:
        assert fresh(tm2, ids, 20, ignore_eos=False) == free[:k + 1]
        assert len(fresh(tm2, ids, 20)) == 20
    # the stop token is part of the session history
    chat = Chat(tm)
    assert chat.turn(ids, 20, ignore_eos=False, stop_words=[stop]) == free[:k + 1]
    assert session_tokens(tm, chat.sid) == ids + free[:k + 1]


def test_cancel_from_another_thread(engines):
    tm = engines('gqa')
    ids = prompt(6, 140)
    running = Background(tm, ids, 1500)
    running.wait_tokens(3)
    tm.create_instance().cancel(running.sid)
    partial = running.join()
    assert 3 <= len(partial) < 1500
    assert partial == fresh(tm, ids, len(partial))
    history = session_tokens(tm, running.sid)
    assert history == ids + partial  # the session is kept with what it generated
    more = prompt(4, 141)[1:]
    out = infer(tm, more, 5, sid=running.sid, start=False, step=len(history))
    assert out == fresh(tm, history + more, 5)


def test_abandoned_stream_cancels_its_request(engines):
    tm = engines('gqa')
    sid = new_sid()
    gen = tm.create_instance().stream_infer(sid, prompt(5, 142), request_output_len=1500,
                                            top_k=1, ignore_eos=True, stream_output=True)
    next(gen)
    gen.close()
    assert on_engine(tm, lambda s: s.num_running()) == 0
    assert session_tokens(tm, sid) is not None


def test_end_frees_the_session(engines):
    tm = engines('gqa')
    chat = Chat(tm)
    chat.turn(prompt(6, 150), 4)
    free_before = on_engine(tm, lambda s: s.num_free_blocks())
    tm.create_instance().end(chat.sid)
    assert session_tokens(tm, chat.sid) is None
    assert on_engine(tm, lambda s: s.num_free_blocks()) > free_before
    with pytest.raises(InvalidRequest, match='unknown session'):
        infer(tm, [5], 2, sid=chat.sid, start=False, step=len(chat.history))
    # sequence_end=True on a turn does the same
    sid = new_sid()
    infer(tm, prompt(6, 151), 3, sid=sid, end=True)
    assert session_tokens(tm, sid) is None
    with pytest.raises(InvalidRequest, match='unknown session'):
        infer(tm, [5], 2, sid=sid, start=False, step=9)
    # ending a running session stops it and frees it
    running = Background(tm, prompt(5, 152), 1500)
    running.wait_tokens(2)
    tm.create_instance().end(running.sid)
    assert len(running.join()) < 1500
    assert session_tokens(tm, running.sid) is None
    assert len(fresh(tm, GOOD, 2)) == 2  # still serving


def test_close_fails_running_and_queued_requests(workspace):
    tm = TurboMind(workspace('gqa'), **BASE)
    running = Background(tm, GOOD, 1500)
    running.wait_tokens(1)
    gate = threading.Event()
    tm.engine._post(lambda: gate.wait(10))  # hold the loop between steps
    tm.engine._commands.put(None)  # what close() sends, while the loop is busy
    failed = []

    def caller():
        try:
            fresh(tm, GOOD, 3)
        except EngineError as e:
            failed.append(e)

    late = threading.Thread(target=caller)
    late.start()
    deadline = time.time() + 10
    while tm.engine._commands.qsize() < 2 and late.is_alive() and time.time() < deadline:
        time.sleep(0.001)
    gate.set()  # the request queued behind close() must fail, not hang
    late.join(10)
    assert not late.is_alive() and len(failed) == 1
    with pytest.raises(EngineError, match='stopped'):
        running.join()
    tm.close()
    with pytest.raises(EngineError, match='closed'):
        fresh(tm, GOOD, 3)
