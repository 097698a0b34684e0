"""Sampler CUDA graphs (sampler_graphs.py): graph tokens == eager `Sampler` tokens bit for bit
over consecutive steps (counters advancing, the row count changing between calls), also with
bad words of several widths, the fallbacks, one capture per key, no allocation per replay, a
lazy capture that does not wait for the device, the pool within its reserve, and the engine's
tokens (ignore_eos: EOS banned) with and without the sampler graphs. Skips without CUDA. On the
H100:
    python3 -m pytest -q tests/gpu/test_sampler_graphs_gpu.py
"""
import time

import numpy as np
import pytest
import torch

from benchmark.profile_engine_host import cycles_per_ms
from lmdeploy.turbomind.sampler_graphs import COMMON_MODES, MAX_BAD_WIDTH, SamplerGraphs
from lmdeploy.turbomind.sampling import RequestRng, Sampler, SamplingBatch, SamplingParams
from lmdeploy.turbomind.sampling_slots import SamplingSlots
from tests.turbomind.conftest import workspace  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

V = 32000
DEV = 'cuda'
ROW_COUNTS = (1, 3, 4, 17, 64, 3, 17, 1, 64, 4)  # changing between calls: padding must not leak
GREEDY = dict(top_k=1, top_p=1.0, temperature=1.0)
MODES = {
    'temperature': [dict(top_k=0, top_p=1.0, temperature=1.0)],
    'top_p': [dict(top_k=0, top_p=0.9, temperature=1.0)],
    'top_k_top_p': [dict(top_k=40, top_p=0.8, temperature=0.8)],
    'top_k_sort': [dict(top_k=2000, top_p=0.95, temperature=1.2)],  # past the topk fast path
    # some rows greedy, some sampled with their own settings (row 0 samples: S = 1 too)
    'greedy': [GREEDY, dict(top_k=0, top_p=1.0, temperature=0.0)],  # all rows: greedy graphs
    'mixed': [dict(top_k=40, top_p=0.8, temperature=0.8), GREEDY,
              dict(top_k=0, top_p=0.9, temperature=1.0), dict(top_k=0, top_p=1.0, temperature=0.0),
              dict(top_k=0, top_p=1.0, temperature=0.7), dict(top_k=5, top_p=1.0, temperature=1.5)],
}


def make_slots(pattern, n=64, seed=0, **overrides):
    """Slots of n seeded rows whose parameters cycle through `pattern`."""
    slots = SamplingSlots(n)
    idx = []
    for i in range(n):
        params = SamplingParams(random_seed=seed * 1000 + i, **dict(pattern[i % len(pattern)],
                                                                    **overrides))
        history = [7, 8, 9] if params.repetition_penalty != 1.0 else None
        idx.append(slots.add(params, RequestRng(params.random_seed, i), history))
    return slots, np.array(idx, dtype=np.int64)


def random_logits(S, gen, vocab=V):
    return (torch.randn(S, vocab, generator=gen) * 3).to(DEV)


@pytest.mark.parametrize('mode', [m for m in MODES if m != 'greedy'])  # greedy: eager argmax
def test_graph_tokens_equal_eager_over_steps(mode):
    graphs = SamplerGraphs(Sampler(), V, DEV, max_rows=64)
    eager = Sampler()
    slots, idx = make_slots(MODES[mode])
    gen = torch.Generator().manual_seed(1)
    calls = sampled = 0
    for S in ROW_COUNTS:
        rows = idx[:S]
        for _ in range(3):  # consecutive steps, the counters advancing on the device
            batch = slots.batch(rows, DEV)
            logits = random_logits(S, gen)
            want = eager(logits, batch)
            got = graphs(logits, batch)
            assert got.dtype == torch.int64 and got.shape == (S,)
            assert torch.equal(got, want), (mode, S)
            sampled += int((want != logits.argmax(dim=1)).sum())
            slots.advance(rows, batch)
            calls += 1
    assert graphs.fallbacks == 0 and graphs.replays == calls
    assert graphs.captures == len(graphs.graphs) == len({1, 4, 32, 64})  # S 3 -> 4, 17 -> 32
    assert sampled > 0  # the tokens were drawn, not only the argmax


BANNED = (2, 5, 11, 13)


def banned_logits(S, gen):
    """Random logits with the BANNED ids the likeliest, so the bans decide the tokens."""
    logits = random_logits(S, gen)
    logits[:, list(BANNED)] += 12
    return logits


@pytest.mark.parametrize('mode', ['top_k_top_p', 'temperature', 'mixed'])
def test_graph_tokens_equal_eager_with_bad_words(mode):
    """Widths 1 (EOS, as ignore_eos) and 3 (padded to 4) alternate on the same graphs: the
    narrower graph never reads the ids a wider call left in the static buffer."""
    graphs = SamplerGraphs(Sampler(), V, DEV, max_rows=64)
    eager = Sampler()
    sets = {1: (BANNED[:1],) + make_slots(MODES[mode], bad_words=BANNED[:1]),
            3: (BANNED[1:],) + make_slots(MODES[mode], seed=1, bad_words=BANNED[1:])}
    gen = torch.Generator().manual_seed(7)
    calls = 0
    for S in ROW_COUNTS:
        for width in (3, 1):
            banned, slots, idx = sets[width]
            rows = idx[:S]
            for _ in range(2):
                batch = slots.batch(rows, DEV)
                assert batch.bad_ids.shape == (S, 4 if width == 3 else 1)
                logits = banned_logits(S, gen)
                want = eager(logits, batch)
                got = graphs(logits, batch)
                assert torch.equal(got, want), (mode, S, width)
                assert not torch.isin(got, torch.tensor(banned, device=DEV)).any()
                slots.advance(rows, batch)
                calls += 1
    assert graphs.fallbacks == 0 and graphs.replays == calls
    assert {k.bad for k in graphs.graphs} == {1, 4}


def test_all_greedy_batches_sample_eagerly():
    """Greedy rows, with bad words (ignore_eos) or not, are one sample_tokens launch: no
    graph; the tokens are the argmax of the logits without the banned ids."""
    graphs = SamplerGraphs(Sampler(), V, DEV, max_rows=64)
    gen = torch.Generator().manual_seed(9)
    for bad_words in ((), BANNED[:1], BANNED):
        slots, idx = make_slots(MODES['greedy'], bad_words=bad_words)
        batch = slots.batch(idx[:4], DEV)
        logits = banned_logits(4, gen)
        want = logits.clone()
        want[:, list(bad_words)] = float('-inf')
        assert torch.equal(graphs(logits, batch), want.argmax(dim=1))
    assert graphs.fallbacks == 3 and graphs.replays == 0 and not graphs.graphs


def test_unpadded_bad_ids_do_not_see_a_wider_calls_ids():
    """A hand-built batch of width 3 replays the width-4 graph: its 4th column is set to -1,
    not left with the id a width-4 call put there (13, here the likeliest token)."""
    graphs = SamplerGraphs(Sampler(), V, DEV, max_rows=8)
    slots, idx = make_slots(MODES['temperature'], n=4, bad_words=BANNED)
    params = [SamplingParams(random_seed=50 + i, bad_words=BANNED[:3], **MODES['temperature'][0])
              for i in range(4)]
    rngs = [RequestRng(50 + i) for i in range(4)]
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        batch = slots.batch(idx, DEV)
        logits = banned_logits(4, gen)
        assert torch.equal(graphs(logits, batch), Sampler()(logits, batch))
        slots.advance(idx, batch)
        built = SamplingBatch.build(params, rngs, device=DEV)
        assert built.bad_ids.shape == (4, 3)
        logits = banned_logits(4, gen)
        logits[:, 13] += 40
        want = Sampler()(logits, built)
        assert torch.equal(graphs(logits, built), want) and (want == 13).all()
        for r in rngs:
            r.advance()
    assert graphs.replays == 6 and graphs.captures == 1


def test_int32_output_is_a_fresh_tensor():
    graphs = SamplerGraphs(Sampler(), V, DEV, max_rows=8, out_dtype=torch.int32)
    slots, idx = make_slots(MODES['top_p'], n=8)
    gen = torch.Generator().manual_seed(2)
    batch = slots.batch(idx[:3], DEV)
    logits = random_logits(3, gen)
    first = graphs(logits, batch)
    kept = first.clone()
    want = Sampler()(logits, batch).to(torch.int32)
    slots.advance(idx[:3], batch)
    graphs(random_logits(3, gen), batch)  # the next replay does not touch the first tokens
    assert first.dtype == torch.int32 and torch.equal(first, want) and torch.equal(first, kept)


@pytest.mark.parametrize('case', ['penalty', 'bad_words', 'all_greedy', 'too_many_rows'])
def test_fallbacks_are_eager_and_counted(case):
    graphs = SamplerGraphs(Sampler(), V, DEV, max_rows=64)
    S, overrides, pattern = 5, {}, MODES['top_k_top_p']
    if case == 'penalty':
        overrides = dict(repetition_penalty=1.3)
    elif case == 'bad_words':  # wider than the graphs take
        overrides = dict(bad_words=tuple(range(3, 4 + MAX_BAD_WIDTH)))
    elif case == 'all_greedy':
        pattern = [GREEDY]
    else:
        S = 65
    slots, idx = make_slots(pattern, n=S, **overrides)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        batch = slots.batch(idx, DEV)
        logits = random_logits(S, gen)
        assert graphs.key(logits, batch) is None
        assert torch.equal(graphs(logits, batch), Sampler()(logits, batch))
        slots.advance(idx, batch)
    assert (graphs.fallbacks, graphs.replays, graphs.captures) == (2, 0, 0)


def test_capture_once_per_key_and_replays_allocate_nothing():
    graphs = SamplerGraphs(Sampler(), V, DEV, max_rows=64)
    slots, idx = make_slots(MODES['top_k_top_p'])
    gen = torch.Generator().manual_seed(4)
    logits = random_logits(64, gen)
    for S, captures in ((3, 1), (4, 1), (2, 2), (3, 2), (1, 3), (2, 3)):
        batch = slots.batch(idx[:S], DEV)
        graphs(logits[:S], batch)
        assert graphs.captures == captures, S
    batch = slots.batch(idx[:3], DEV)
    graphs(logits[:3], batch)
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    for _ in range(50):
        tokens = graphs(logits[:3], batch)
        slots.advance(idx[:3], batch)
        del tokens
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_reserved() == reserved
    assert graphs.captures == 3 and graphs.fallbacks == 0


def test_ahead_of_time_capture_then_graph_limit():
    graphs = SamplerGraphs(Sampler(), V, DEV, max_rows=16, max_graphs=31)
    keys = graphs.keys(COMMON_MODES)
    assert len(keys) == 5 * 3 * 2  # buckets 1..16, three modes, bad-words widths 0 and 1
    assert graphs.capture(keys) == 30 and graphs.capture(keys) == 0
    slots, idx = make_slots(MODES['top_k_top_p'], n=16)
    gen = torch.Generator().manual_seed(5)
    batch = slots.batch(idx[:9], DEV)
    logits = random_logits(9, gen)
    assert torch.equal(graphs(logits, batch), Sampler()(logits, batch))  # captured ahead
    assert graphs.captures == 30 and graphs.replays == 1
    slots2, idx2 = make_slots([dict(top_k=40, top_p=1.0, temperature=1.0)], n=16)
    for S in (2, 5):  # two new keys (top_k alone): one more graph fits, then the limit
        batch = slots2.batch(idx2[:S], DEV)
        logits = random_logits(S, gen)
        assert torch.equal(graphs(logits, batch), Sampler()(logits, batch))
    assert graphs.captures == 31 and graphs.fallbacks == 1


def test_lazy_capture_does_not_wait_for_the_device():
    """A key met while the device is busy is captured and replayed without waiting for the
    work queued before it: no device synchronize inside the call. The new key (temperature
    only) runs a subset of the kernels of the key captured before it (top_p, same bucket), so
    no kernel module is loaded for the first time and the pool already holds blocks of its
    sizes: what is checked is the capture itself."""
    graphs = SamplerGraphs(Sampler(), V, DEV, max_rows=64)
    gen = torch.Generator().manual_seed(6)
    logits = random_logits(4, gen)
    slots_p, idx_p = make_slots(MODES['top_p'], n=4)
    graphs(logits, slots_p.batch(idx_p, DEV))  # (4, top_p) captured
    slots, idx = make_slots(MODES['temperature'], n=4, seed=1)
    batch = slots.batch(idx, DEV)
    want = Sampler()(logits, batch)  # an eager run: the warm-up's blocks are cached
    cycles = int(300 * cycles_per_ms())
    torch.cuda.synchronize()
    busy = torch.cuda.Event()
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)  # ~300 ms of device work queued ahead of the call
    busy.record()
    got = graphs(logits, batch)  # a new key: captured now
    host_s = time.perf_counter() - t0
    still_busy = not busy.query()
    torch.cuda.synchronize()
    assert graphs.captures == 2 and graphs.replays == 2 and torch.equal(got, want)
    assert still_busy and host_s < 0.2, host_s


@pytest.mark.parametrize('vocab', [32000, 128256])
def test_pool_within_reserve(vocab):
    """The common modes captured ahead of time (largest bucket first, as the runner does),
    then every key of more modes and bad-words widths met later, smallest bucket first: static
    inputs plus pool stay within `reserve_bytes`."""
    torch.cuda.synchronize()
    graphs = SamplerGraphs(Sampler(), vocab, DEV, max_rows=64, max_graphs=256)
    graphs.capture(graphs.keys(COMMON_MODES))
    ahead = graphs.pool_bytes()
    later = ((True, False, 40), (True, True, 2000), (True, False, 5), (True, True, 50))
    more = graphs.keys(later, (0, MAX_BAD_WIDTH)) + graphs.keys(COMMON_MODES, (MAX_BAD_WIDTH,))
    for key in sorted(set(more) - set(graphs.graphs)):
        assert graphs.capture([key]) == 1
    torch.cuda.synchronize()
    used = graphs.input_bytes + graphs.pool_bytes()
    reserve = SamplerGraphs.reserve_bytes(64, vocab)
    print(f'V={vocab}: {graphs.captures} graphs; pool {ahead / 2**20:.1f} MiB after the '
          f'common modes, inputs + pool {used / 2**20:.1f} MiB after all, reserve '
          f'{reserve / 2**20:.1f} MiB')
    assert ahead > 0 and used <= reserve


# ------------------------------------------------------------------------------------ engine

PROMPTS = [[1, 17, 99, 256, 1024, 7], [1, 5] * 20, list(range(3, 70)), [1, 2, 3]]
ROUNDS = (([0, 1, 2, 3], 24), ([0], 12), ([1, 2, 3], 16))  # 4, 1, 3 rows: S changes
ENGINE_PARAMS = {
    'top_k_top_p': dict(top_k=40, top_p=0.8, temperature=0.8),
    'temperature': dict(top_k=0, top_p=1.0, temperature=1.0),
    'top_p': dict(top_k=0, top_p=0.9, temperature=1.0),
    'mixed': dict(top_k=[40, 1, 0, 0], top_p=[0.8, 1.0, 0.9, 1.0],
                  temperature=[0.8, 1.0, 1.0, 0.7]),
}


def sample_rounds(tm, params):
    """Seeded sampled requests, one batch per round (the same schedule on every run),
    ignore_eos (EOS banned: bad words of width 1); per-row parameter lists are picked by the
    round's rows."""
    results = []
    for rows, n in ROUNDS:
        kw = {k: [v[i] for i in rows] if isinstance(v, list) else v for k, v in params.items()}
        out = None
        for out in tm.create_instance().stream_infer(
                [1 + i for i in rows], [PROMPTS[i] for i in rows], request_output_len=n,
                random_seed=[7 + i for i in rows], sequence_start=True, sequence_end=True,
                ignore_eos=True, **kw):
            pass
        results.append([o[0].tolist() for o in out])
    return results


def set_sampler(tm, sampler):
    tm.engine.call(lambda: setattr(tm.engine, 'sampler', sampler))


@pytest.fixture(scope='module')
def tm_llama(workspace):
    from lmdeploy.turbomind import TurboMind
    tm = TurboMind(workspace('llama'), device='cuda', dtype='fp32', block_size=16,
                   max_batch_size=8)
    yield tm
    tm.close()


def test_engine_captures_the_common_modes_at_start(tm_llama):
    graphs = tm_llama.engine.sampler
    assert isinstance(graphs, SamplerGraphs) and graphs is tm_llama.engine.runner.sampler_graphs
    assert graphs.out_dtype == torch.int32 and graphs.buckets == [1, 2, 4, 8]
    assert set(graphs.keys(COMMON_MODES)) <= set(graphs.graphs)
    memory = tm_llama.engine.runner.memory
    print({k: round(v / 2**20, 1) for k, v in memory.items() if 'sampler' in k})
    assert 0 < memory['sampler_graphs'] <= memory['sampler_graph_reserve']


@pytest.mark.parametrize('params', list(ENGINE_PARAMS))
def test_engine_tokens_with_and_without_sampler_graphs(tm_llama, params):
    graphs = tm_llama.engine.sampler
    before = graphs.replays
    on = sample_rounds(tm_llama, ENGINE_PARAMS[params])
    replays = graphs.replays
    assert replays - before >= 24 + 12 + 16 - 3  # every decode step's sampling, at least
    set_sampler(tm_llama, Sampler())
    try:
        off = sample_rounds(tm_llama, ENGINE_PARAMS[params])
    finally:
        set_sampler(tm_llama, graphs)
    assert graphs.replays == replays  # the eager run did not go through the graphs
    assert on == off


def test_engine_timer_reports_sampler_replays(tm_llama):
    from lmdeploy.turbomind.step_timer import StepTimer
    engine = tm_llama.engine
    engine.timer = timer = StepTimer()
    try:
        sample_rounds(tm_llama, ENGINE_PARAMS['top_p'])
        report = engine.call(timer.report)
    finally:
        engine.timer = None
    print({k: v for k, v in report.items() if k.startswith('sampler_')})
    assert report['sampler_replays'] >= 24 + 12 + 16 - 3
    assert report.get('sampler_fallbacks', 0) == 0


def test_engine_without_cuda_graphs_samples_eagerly(workspace):
    from lmdeploy.turbomind import TurboMind
    with TurboMind(workspace('llama'), device='cuda', dtype='fp32', block_size=16,
                   max_batch_size=8, cuda_graph=False) as tm:
        assert type(tm.engine.sampler) is Sampler and tm.engine.runner.sampler_graphs is None
        assert tm.engine.runner.memory.get('sampler_graph_reserve', 0) == 0


def test_requests_after_start_up_compile_no_sampler_kernel(tm_llama):
    """The sampling kernel's variants exist once the engine is up: greedy (eager) and sampled
    requests with 0-8 bad words each (ignore_eos among them) compile nothing in a request."""
    from lmdeploy.turbomind import kernels
    before = kernels.compiled_variants()
    assert before > 0
    for n_bad in (0, 1, 3, 8):
        for params in ({'top_k': 1}, ENGINE_PARAMS['temperature'], ENGINE_PARAMS['top_p']):
            for _ in tm_llama.create_instance().stream_infer(
                    90 + n_bad, PROMPTS[0], request_output_len=4, sequence_start=True,
                    sequence_end=True, random_seed=5, bad_words=list(range(3, 3 + n_bad)),
                    **params):
                pass
    assert kernels.compiled_variants() == before
