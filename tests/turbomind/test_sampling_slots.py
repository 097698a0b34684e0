"""SamplingSlots: per-slot sampling state gives the same batch (and tokens) as building it from
the request objects, across slot reuse, growth and the cached steady-state path."""
import random

import numpy as np
import torch

from lmdeploy.turbomind.sampling import RequestRng, Sampler, SamplingBatch, SamplingParams
from lmdeploy.turbomind.sampling_slots import SamplingSlots

V = 97
FIELDS = ('temperature', 'top_k', 'top_p', 'repetition_penalty', 'keys', 'counters')
HINTS = ('all_greedy', 'any_top_k', 'any_top_p', 'any_penalty', 'max_top_k')


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(top_k=rng.choice([0, 1, 5, 40]), top_p=rng.choice([1.0, 0.9, 0.5]),
                          temperature=rng.choice([0.0, 0.7, 1.0, 1.3]),
                          repetition_penalty=rng.choice([1.0, 1.0, 1.2, 0.8]),
                          bad_words=tuple(rng.sample(range(V), rng.choice([0, 0, 1, 3]))),
                          random_seed=rng.randrange(2 ** 64))


class Row:
    def __init__(self, rng: random.Random, slots: SamplingSlots):
        self.params = random_params(rng)
        self.rng = RequestRng(self.params.random_seed, rng.randrange(5))
        self.history = [rng.randrange(V) for _ in range(rng.randrange(1, 9))]
        penalised = self.params.repetition_penalty != 1.0
        self.slot = slots.add(self.params, self.rng, self.history if penalised else None)


def reference(rows):
    seen = [r.history if r.params.repetition_penalty != 1.0 else [] for r in rows]
    return SamplingBatch.build([r.params for r in rows], [r.rng for r in rows], seen_ids=seen)


def assert_same(batch, ref, logits):
    for f in FIELDS:
        assert torch.equal(getattr(batch, f).to(getattr(ref, f).dtype), getattr(ref, f)), f
    for h in HINTS:
        assert getattr(batch, h) == getattr(ref, h), h
    assert torch.equal(Sampler()(logits, batch), Sampler()(logits, ref))


def test_slots_match_build_across_steps_reuse_and_growth():
    rng = random.Random(0)
    slots = SamplingSlots(capacity=2)  # grows
    rows = [Row(rng, slots) for _ in range(7)]
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        if step in (3, 7):  # two rows finish, new ones take their slots
            for r in rng.sample(rows, 2):
                assert slots.remove(r.slot) == r.rng.counter
                rows.remove(r)
            rows += [Row(rng, slots) for _ in range(2)]
        if step == 9:
            rng.shuffle(rows)  # another row order: not the cached batch
        idx = np.array([r.slot for r in rows], dtype=np.int64)
        batch = slots.batch(idx, 'cpu')
        logits = torch.randn(len(rows), V, generator=g) * 3
        assert_same(batch, reference(rows), logits)
        tokens = Sampler()(logits, batch)
        slots.advance(idx, batch)
        for r, t in zip(rows, tokens.tolist()):
            r.rng.counter += 1
            if r.params.repetition_penalty != 1.0:
                r.history.append(t)
                slots.extend_history(r.slot, [t])
    assert len(slots) == len(rows)


def test_all_greedy_and_no_bad_words():
    slots = SamplingSlots()
    rows = [SamplingParams(top_k=1), SamplingParams(temperature=0.0, top_k=0)]
    idx = np.array([slots.add(p, RequestRng(i)) for i, p in enumerate(rows)], dtype=np.int64)
    batch = slots.batch(idx, 'cpu')
    assert batch.all_greedy and batch.bad_ids is None and not batch.any_penalty
    x = torch.randn(2, V)
    assert torch.equal(Sampler()(x, batch), x.argmax(1))


def test_long_history_grows():
    slots = SamplingSlots()
    s = slots.add(SamplingParams(repetition_penalty=1.5), RequestRng(1), [3] * 10)
    for i in range(200):
        slots.extend_history(s, [i % V])
    ids = slots.batch(np.array([s]), 'cpu').seen_ids
    assert ids.shape == (1, 210) and ids[0, :10].tolist() == [3] * 10
    assert ids[0, 10:].tolist() == [i % V for i in range(200)]
