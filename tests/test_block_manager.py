"""BlockManager (C++, lmdeploy.turbomind._turbomind) against a pure-Python model of the pool.

The extension must be built (``pip install -e .`` or ``python setup.py build_ext --inplace``);
without it this module fails at import on purpose: the suite tests the real build.
"""
import random

import numpy as np
import pytest

try:
    from lmdeploy.turbomind import _turbomind
except ImportError as e:  # fail loudly, never skip
    raise ImportError('cannot import lmdeploy.turbomind._turbomind: install the package and build '
                      'the extension with `pip install -e .` '
                      'or `python setup.py build_ext --inplace` first') from e

BlockManager = _turbomind.BlockManager
OutOfBlocksError = _turbomind.OutOfBlocksError


class PoolModel:
    """What the pool must look like: a reference count per block, 0 = free."""

    def __init__(self, num_blocks):
        self.ref = [0] * num_blocks

    @property
    def num_free(self):
        return self.ref.count(0)

    def take(self, ids):
        assert len(set(ids)) == len(ids), f'allocate returned duplicates: {ids}'
        for i in ids:
            assert 0 <= i < len(self.ref) and self.ref[i] == 0, f'allocate returned block {i} not free'
            self.ref[i] = 1

    def incref(self, ids):
        for i in ids:
            assert self.ref[i] >= 1
            self.ref[i] += 1

    def free(self, ids):
        for i in ids:
            assert self.ref[i] >= 1
            self.ref[i] -= 1


def assert_same(bm, model):
    assert bm.num_free() == model.num_free
    assert bm.num_used() == len(model.ref) - model.num_free
    assert bm.ref_counts().tolist() == model.ref
    bm.check_invariants()


def snapshot(bm):
    return bm.num_free(), bm.ref_counts().tolist()


def as_ids(rng, ids):
    """Pass ids as a list, a tuple or a numpy int32 array: all must be accepted."""
    kind = rng.randrange(3)
    if kind == 0:
        return list(ids)
    if kind == 1:
        return tuple(ids)
    return np.asarray(ids, dtype=np.int32)


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('num_blocks', [1, 7, 64, 257])
def test_random_stream_matches_model(seed, num_blocks):
    rng = random.Random(seed * 1000 + num_blocks)
    bm = BlockManager(num_blocks, 16)
    model = PoolModel(num_blocks)
    seqs = []  # block tables; each entry holds one reference to each of its blocks
    assert_same(bm, model)

    for _ in range(3000):
        op = rng.random()
        if op < 0.35:  # allocate, sometimes more than is free
            n = rng.randint(0, max(1, num_blocks // 4))
            if rng.random() < 0.1:
                n = model.num_free + rng.randint(1, 3)
            if n <= model.num_free:
                ids = bm.allocate(n)
                assert isinstance(ids, list) and len(ids) == n
                model.take(ids)
                seqs.append(ids)
            else:
                before = snapshot(bm)
                assert not bm.can_allocate(n)
                with pytest.raises(OutOfBlocksError):
                    bm.allocate(n)
                assert snapshot(bm) == before
        elif op < 0.55 and seqs:  # fork: share a prefix of a sequence's blocks
            src = rng.choice(seqs)
            prefix = src[:rng.randint(0, len(src))]
            if rng.random() < 0.5:
                shared = bm.share(as_ids(rng, prefix))
                assert shared == prefix
            else:
                bm.incref(as_ids(rng, prefix))
            model.incref(prefix)
            seqs.append(list(prefix))
        elif op < 0.9 and seqs:  # free one sequence, or two at once (ids may repeat)
            ids = seqs.pop(rng.randrange(len(seqs)))
            if seqs and rng.random() < 0.3:
                ids = ids + seqs.pop(rng.randrange(len(seqs)))
            ids = list(ids)
            rng.shuffle(ids)
            bm.free(as_ids(rng, ids))
            model.free(ids)
        else:  # an invalid op: must raise and change nothing
            before = snapshot(bm)
            free_ids = [i for i, r in enumerate(model.ref) if r == 0]
            used_ids = [i for i, r in enumerate(model.ref) if r > 0]
            bad = rng.randrange(5)
            if bad == 0 and free_ids:  # double free, possibly after valid entries
                ids = rng.sample(used_ids, min(len(used_ids), 3)) + [rng.choice(free_ids)]
                with pytest.raises(ValueError, match='double free'):
                    bm.free(ids)
            elif bad == 1 and used_ids:  # more references dropped than the block has
                i = rng.choice(used_ids)
                with pytest.raises(ValueError):
                    bm.free([i] * (model.ref[i] + 1))
            elif bad == 2:  # out-of-range id
                i = rng.choice([-1, num_blocks, num_blocks + 1000, -(2**40)])
                method = rng.choice([bm.free, bm.incref, bm.share])
                with pytest.raises(ValueError, match='out of range'):
                    method(used_ids[:2] + [i])
            elif bad == 3 and free_ids:  # sharing a free block
                with pytest.raises(ValueError):
                    bm.incref(used_ids[:2] + [rng.choice(free_ids)])
            else:
                with pytest.raises(ValueError):
                    bm.allocate(-rng.randint(1, 5))
            assert snapshot(bm) == before
        assert_same(bm, model)
        for i in rng.sample(range(num_blocks), min(3, num_blocks)):
            assert bm.ref_count(i) == model.ref[i]

    for ids in seqs:
        bm.free(ids)
    assert bm.num_free() == num_blocks
    bm.check_invariants()


def test_fresh_pool():
    bm = BlockManager(10, 64)
    assert (bm.num_blocks(), bm.block_size(), bm.num_free(), bm.num_used()) == (10, 64, 10, 0)
    assert bm.ref_counts().dtype == np.int32
    assert bm.allocate(0) == []
    ids = bm.allocate(10)
    assert sorted(ids) == list(range(10))
    assert bm.num_free() == 0 and bm.can_allocate(0) and not bm.can_allocate(1)
    assert 'num_blocks=10' in repr(bm)
    bm.check_invariants()


def test_empty_pool():
    bm = BlockManager(0, 16)
    assert bm.allocate(0) == []
    with pytest.raises(OutOfBlocksError):
        bm.allocate(1)
    bm.free([])
    bm.check_invariants()


def test_constructor_errors():
    with pytest.raises(ValueError, match='num_blocks'):
        BlockManager(-1, 16)
    with pytest.raises(ValueError, match='block_size'):
        BlockManager(4, 0)


def test_allocate_is_all_or_nothing():
    bm = BlockManager(8, 16)
    held = bm.allocate(5)
    free_before = sorted(set(range(8)) - set(held))
    with pytest.raises(OutOfBlocksError, match='requested 4 but only 3 of 8'):
        bm.allocate(4)
    assert issubclass(OutOfBlocksError, RuntimeError)
    assert bm.num_free() == 3
    assert sorted(bm.allocate(3)) == free_before  # exactly the blocks that were free
    bm.check_invariants()


def test_negative_allocate():
    bm = BlockManager(4, 16)
    with pytest.raises(ValueError, match='n must be >= 0'):
        bm.allocate(-1)
    assert bm.num_free() == 4


def test_double_free_rolls_back():
    bm = BlockManager(6, 16)
    a = bm.allocate(3)
    bm.incref(a[:1])
    bm.free([a[2]])
    before = snapshot(bm)
    with pytest.raises(ValueError, match=f'double free of block {a[2]}'):
        bm.free([a[0], a[1], a[2]])  # a[0], a[1] are decremented first, then undone
    assert snapshot(bm) == before
    bm.check_invariants()
    # the free list is intact too: what is free can be allocated, no more
    assert sorted(bm.allocate(bm.num_free())) == sorted(set(range(6)) - {a[0], a[1]})
    with pytest.raises(OutOfBlocksError):
        bm.allocate(1)


def test_free_with_repeats():
    bm = BlockManager(4, 16)
    (a, ) = bm.allocate(1)
    with pytest.raises(ValueError, match='more times than its reference count'):
        bm.free([a, a])
    assert bm.ref_count(a) == 1
    bm.incref([a])
    bm.free([a, a])  # two references, two drops
    assert bm.ref_count(a) == 0 and bm.num_free() == 4
    bm.check_invariants()


def test_shared_block_freed_last_owner():
    bm = BlockManager(4, 16)
    ids = bm.allocate(2)
    fork = bm.share(ids)
    assert fork == ids and [bm.ref_count(i) for i in ids] == [2, 2]
    bm.free(ids)
    assert bm.num_free() == 2 and [bm.ref_count(i) for i in ids] == [1, 1]
    bm.free(fork)
    assert bm.num_free() == 4
    with pytest.raises(ValueError, match='double free'):
        bm.free(fork)
    bm.check_invariants()


def test_incref_errors_leave_pool_unchanged():
    bm = BlockManager(4, 16)
    ids = bm.allocate(2)
    free_id = next(i for i in range(4) if i not in ids)
    before = snapshot(bm)
    with pytest.raises(ValueError, match='is free'):
        bm.incref(ids + [free_id])
    with pytest.raises(ValueError, match='out of range'):
        bm.share(ids + [4])
    assert snapshot(bm) == before


@pytest.mark.parametrize('bad', [-1, 4, 2**31, -(2**40)])
def test_out_of_range_ids(bad):
    bm = BlockManager(4, 16)
    bm.allocate(2)
    before = snapshot(bm)
    for method in (bm.free, bm.incref, bm.share):
        with pytest.raises(ValueError, match='out of range'):
            method([bad])
    with pytest.raises(ValueError, match='out of range'):
        bm.ref_count(bad)
    assert snapshot(bm) == before


def test_numpy_ids():
    bm = BlockManager(8, 16)
    ids = np.asarray(bm.allocate(4), dtype=np.int32)
    bm.incref(ids[:2])
    bm.free(ids)
    assert bm.ref_counts()[ids[:2]].tolist() == [1, 1] and bm.num_free() == 6
    bm.free(ids[:2].astype(np.int64))
    assert bm.num_free() == 8


def test_blocks_for_tokens():
    bm = BlockManager(4, 16)
    assert [bm.blocks_for_tokens(t) for t in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
    assert bm.blocks_for_tokens(10**12) == 10**12 // 16
    with pytest.raises(ValueError):
        bm.blocks_for_tokens(-1)


def test_methods_have_docstrings():
    for name in ('allocate', 'free', 'incref', 'share', 'ref_count', 'ref_counts', 'num_free', 'num_used',
                 'num_blocks', 'block_size', 'can_allocate', 'blocks_for_tokens', 'check_invariants'):
        doc = getattr(BlockManager, name).__doc__
        assert doc and len(doc.splitlines()) >= 2, name
