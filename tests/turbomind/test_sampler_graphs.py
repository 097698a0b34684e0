"""SamplerGraphs on the CPU: every call falls back to the eager sampler (same tokens); the key
function sends the cases graphs cannot serve to the eager sampler and normalises the branch
flags and the bad-words width; the packed batch and the padded bad ids `SamplingSlots` builds.
The GPU side: tests/gpu/test_sampler_graphs_gpu.py."""
import numpy as np
import pytest
import torch

from lmdeploy.turbomind.sampler_graphs import (COMMON_MODES, MAX_BAD_WIDTH, GraphKey,
                                               SamplerGraphs, bad_width, graph_key, mode_key,
                                               sampler_buckets)
from lmdeploy.turbomind.sampling import RequestRng, Sampler, SamplingBatch, SamplingParams
from lmdeploy.turbomind.sampling_slots import SamplingSlots

V = 300
BUCKETS = sampler_buckets(64)
MODES = {
    'temperature': dict(top_k=0, top_p=1.0, temperature=1.0),
    'top_p': dict(top_k=0, top_p=0.9, temperature=1.0),
    'top_k_top_p': dict(top_k=40, top_p=0.8, temperature=0.8),
    'top_k': dict(top_k=40, top_p=1.0, temperature=0.8),
    'greedy': dict(top_k=1, top_p=1.0, temperature=1.0),
}


def slots_batch(rows, device='cpu', **overrides):
    """A SamplingSlots batch of `rows` (mode names, or SamplingParams keyword dicts), seeded."""
    slots = SamplingSlots(4)
    idx = []
    for i, row in enumerate(rows):
        kw = dict(MODES[row] if isinstance(row, str) else row, **overrides)
        penalised = kw.get('repetition_penalty', 1.0) != 1.0
        idx.append(slots.add(SamplingParams(random_seed=1000 + i, **kw), RequestRng(1000 + i, i),
                             history=[1, 2, 3] if penalised else None))
    idx = np.array(idx, dtype=np.int64)
    return slots, idx, slots.batch(idx, device)


def key_of(rows, width=V, **overrides):
    _, _, batch = slots_batch(rows, **overrides)
    return graph_key(batch, len(rows), width, BUCKETS, V, Sampler().topk_fast_path)


def test_buckets():
    assert sampler_buckets(256) == [1, 2, 4, 8, 16, 32, 64]
    assert sampler_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert sampler_buckets(8) == [1, 2, 4, 8]
    assert sampler_buckets(1) == [1] and sampler_buckets(0) == []
    assert sampler_buckets(256, limit=16) == [1, 2, 4, 8, 16]


def test_keys_pick_the_bucket_and_normalise_the_flags():
    assert key_of(['temperature']) == GraphKey(1, False, False, 0)
    assert key_of(['top_p'] * 3) == GraphKey(4, True, True, 0)
    assert key_of(['top_k_top_p'] * 17) == GraphKey(32, True, True, 40)
    assert key_of(['top_k'] * 64) == GraphKey(64, True, False, 40)
    # greedy rows beside sampled ones: the sampled rows' flags
    assert key_of(['greedy', 'top_k_top_p', 'greedy']) == GraphKey(4, True, True, 40)
    # a row without top_k: forward sorts the whole row (top_k 0 in the key)
    assert key_of(['top_k_top_p', 'top_p']) == GraphKey(2, True, True, 0)
    # top_k beyond the fast path, or as wide as the vocabulary: a full sort as well
    assert key_of([dict(top_k=2000, top_p=0.9, temperature=1.0)]) == GraphKey(1, True, True, 0)
    assert key_of([dict(top_k=V, top_p=1.0, temperature=1.0)]) == GraphKey(1, True, False, 0)
    # a hand-built batch's conservative hints (any_top_k without any_top_p) run the same ops
    assert mode_key(8, True, True, 0, V, 1024) == mode_key(8, False, True, 0, V, 1024)


def test_keys_carry_the_bad_words_width():
    rows = ['top_k_top_p'] * 3
    assert [bad_width(w) for w in range(10)] == [0, 1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert key_of(rows) == GraphKey(4, True, True, 40, 0)
    for words, width in (((5,), 1), ((5, 6), 2), ((5, 6, 7), 4), (tuple(range(8)), 8)):
        assert key_of(rows, bad_words=words) == GraphKey(4, True, True, 40, width), words
    # rows without bad words beside one with them: the widest row's width
    assert key_of(['top_p', dict(MODES['top_p'], bad_words=(9, 8, 7))]) == GraphKey(
        2, True, True, 0, 4)
    # an unpadded batch (SamplingBatch.build: width 3) has the padded batch's key
    built = SamplingBatch.build([SamplingParams(bad_words=(5, 6, 7))] * 3,
                                [RequestRng(i) for i in range(3)])
    assert built.bad_ids.shape == (3, 3)
    assert graph_key(built, 3, V, BUCKETS, V, 1024) == GraphKey(4, True, True, 40, 4)


@pytest.mark.parametrize('case', ['penalty', 'bad_words', 'all_greedy', 'too_many_rows',
                                  'no_rows', 'other_width'])
def test_keys_send_what_graphs_cannot_serve_to_the_eager_sampler(case):
    rows = ['top_k_top_p'] * 3
    if case == 'penalty':
        assert key_of(rows, repetition_penalty=1.2) is None
    elif case == 'bad_words':  # above the cap
        assert key_of(rows, bad_words=tuple(range(MAX_BAD_WIDTH))) is not None
        assert key_of(rows, bad_words=tuple(range(MAX_BAD_WIDTH + 1))) is None
    elif case == 'all_greedy':  # one sample_tokens launch, with or without bad words
        greedy = ['greedy', dict(top_k=0, top_p=1.0, temperature=0.0)]
        assert key_of(greedy) is None
        assert key_of(greedy, bad_words=(2,)) is None
        assert key_of(greedy, bad_words=(2, 5, 9)) is None
    elif case == 'too_many_rows':
        assert key_of(['temperature'] * 64) is not None
        assert key_of(['temperature'] * 65) is None
    elif case == 'no_rows':
        assert key_of([]) is None
    else:
        assert key_of(rows, width=V + 1) is None


def test_packed_batch_follows_the_fields():
    slots, idx, batch = slots_batch(['top_k_top_p', 'top_p', 'temperature'])
    floats, ints = batch.packed()
    assert floats.shape == ints.shape == (3, 3)
    assert torch.equal(floats, torch.stack([batch.temperature, batch.top_p,
                                            batch.repetition_penalty]))
    assert torch.equal(ints, torch.stack([batch.top_k, batch.keys, batch.counters]))
    slots.advance(idx, batch)  # counters move in place: the packed rows see it
    assert torch.equal(ints[2], batch.counters) and ints[2].tolist() == [1, 2, 3]
    assert slots.batch(idx, 'cpu') is batch and batch.packed() is not None
    batch.counters = batch.counters.clone()  # a field that is not a view any more
    assert batch.packed() is None
    built = SamplingBatch.build([SamplingParams()], [RequestRng(1)])
    assert built.packed() is None


def test_slots_pad_bad_ids_to_a_power_of_two():
    """The padded batch samples the tokens of the unpadded one (SamplingBatch.build), with the
    banned ids made the likeliest so the bad words decide the tokens."""
    rows = [dict(MODES['top_k_top_p'], bad_words=(3, 4, 5)), dict(MODES['top_p']),
            dict(MODES['greedy'], bad_words=(7,)), dict(MODES['temperature'], bad_words=(3, 9))]
    slots, idx, batch = slots_batch(rows)
    assert batch.bad_ids.tolist() == [[3, 4, 5, -1], [-1] * 4, [7, -1, -1, -1], [3, 9, -1, -1]]
    slots.add(SamplingParams(bad_words=tuple(range(5))), RequestRng(1))  # a wider row elsewhere
    assert slots.batch(idx, 'cpu').bad_ids.shape == (4, 4)  # widths follow the rows sampled
    params = [SamplingParams(random_seed=1000 + i, **r) for i, r in enumerate(rows)]
    rngs = [RequestRng(1000 + i, i) for i in range(len(rows))]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        built = SamplingBatch.build(params, rngs)
        assert built.bad_ids.shape == (4, 3)
        logits = torch.randn(len(rows), V, generator=gen)
        logits[:, [3, 4, 5, 7, 9]] += torch.tensor([30.0, 20, 20, 20, 20])
        padded = slots.batch(idx, 'cpu')
        tokens = Sampler()(logits, padded)
        assert torch.equal(tokens, Sampler()(logits, built))
        t = tokens.tolist()
        assert t[1] in (3, 4, 5, 7, 9) and t[2] == 3 and t[0] not in (3, 4, 5)
        assert t[3] not in (3, 9)
        slots.advance(idx, padded)
        for r in rngs:
            r.advance()


@pytest.mark.parametrize('out_dtype', [torch.int64, torch.int32])
def test_cpu_wrapper_is_the_eager_sampler(out_dtype):
    graphs = SamplerGraphs(Sampler(), V, 'cpu', max_rows=64, out_dtype=out_dtype)
    assert graphs.buckets == [] and graphs.keys(COMMON_MODES) == []
    gen = torch.Generator().manual_seed(0)
    rows = ['temperature', 'top_p', 'top_k_top_p', 'greedy', 'top_k'] * 4
    calls = 0
    for S in (1, 3, 4, 17, 20):
        slots, idx, batch = slots_batch(rows[:S])
        for _ in range(2):
            logits = torch.randn(S, V, generator=gen) * 3
            assert graphs.key(logits, batch) is None
            want = Sampler()(logits, batch)
            got = graphs(logits, batch)
            assert got.dtype == out_dtype and torch.equal(got.to(torch.int64), want)
            slots.advance(idx, batch)
            calls += 1
    assert (graphs.fallbacks, graphs.replays, graphs.captures) == (calls, 0, 0)
    assert graphs.pool_bytes() == 0


def test_reserve_bytes():
    small = SamplerGraphs.reserve_bytes(64, 32000)
    assert 64 * 32000 * 4 * 17 < small < 200 << 20  # inputs, 16 [64, V] fp32 buffers, slack
    assert SamplerGraphs.reserve_bytes(256, 32000) == small  # buckets stop at 64 rows
    assert SamplerGraphs.reserve_bytes(8, 32000) < small
    assert SamplerGraphs.reserve_bytes(64, 128256) > 2 * small
    assert SamplerGraphs.reserve_bytes(0, 32000) == 0


def test_engine_timer_counts_the_sampler_graphs_calls():
    """The step timer's report says whether the sampler graphs served the timed steps (on the
    CPU every call falls back: only 'sampler_fallbacks'); the eager sampler adds neither."""
    from lmdeploy.turbomind import TurboMind
    from lmdeploy.turbomind.step_timer import StepTimer
    with TurboMind(dummy='tiny', device='cpu', dtype='fp32', max_batch_size=4) as tm:
        engine = tm.engine
        reports = []
        for sampler in (SamplerGraphs(Sampler(), tm.config.vocab_size, 'cpu'), Sampler()):
            engine.call(lambda: setattr(engine, 'sampler', sampler))
            engine.timer = timer = StepTimer()
            for _ in tm.create_instance().stream_infer(1, [1, 5, 9], request_output_len=6,
                                                       sequence_start=True,
                                                       sequence_end=True, ignore_eos=True):
                pass
            reports.append(engine.call(timer.report))
            engine.timer = None
    graphs, eager = reports
    assert graphs['sampler_fallbacks'] == 6 and 'sampler_replays' not in graphs
    assert 'sampler_fallbacks' not in eager and 'sampler_replays' not in eager
