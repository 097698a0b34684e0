"""SequenceManager (C++, lmdeploy.turbomind._turbomind) against a pure-Python model.

Sessions keyed by id hold tokens, num_cached (tokens with K/V in blocks), blocks, status and a
last-use clock; idle sessions holding blocks are evicted least-recently-used first when a
session needs blocks the pool does not have. The scheduler-level behaviour is in
test_scheduler.py; this drives the manager directly.
"""
import random

import pytest

try:
    from lmdeploy.turbomind import _turbomind
except ImportError as e:  # fail loudly, never skip
    raise ImportError('cannot import lmdeploy.turbomind._turbomind: build the extension with '
                      '`python setup.py build_ext --inplace` first') from e

BS = 4


def nblocks(n):
    return -(-n // BS)


def make(num_blocks):
    bm = _turbomind.BlockManager(num_blocks, BS)
    return bm, _turbomind.SequenceManager(bm)


def test_create_append_cache_truncate_erase():
    bm, sm = make(8)
    assert sm.create(1) is False
    sm.append(1, list(range(10)))
    assert sm.cache(1, 6)
    info = sm.session_info(1)
    assert info['tokens'] == list(range(10)) and info['num_cached'] == 6 and len(info['blocks']) == 2
    assert info['status'] == 'idle' and bm.num_free() == 6
    # v0.0.2 step: truncate tokens, cached = min(cached, step), free blocks past it
    assert sm.truncate(1, 3)
    info = sm.session_info(1)
    assert info['tokens'] == [0, 1, 2] and info['num_cached'] == 3 and len(info['blocks']) == 1
    assert bm.num_free() == 7
    assert not sm.truncate(1, 4) and not sm.truncate(1, -1)  # ignored
    assert sm.session_info(1)['tokens'] == [0, 1, 2]
    assert sm.truncate(1, 3)  # step == stored tokens: nothing to cut
    # START on an existing id replaces it
    assert sm.create(1) is True
    assert sm.session_info(1)['tokens'] == [] and bm.num_free() == 8
    sm.append(1, [5] * 5)
    assert sm.cache(1, 5)
    assert sm.erase(1) and not sm.erase(1) and sm.session_info(1) is None
    assert bm.num_free() == 8
    sm.check_invariants()
    with pytest.raises(ValueError):
        sm.append(9, [1])
    with pytest.raises(ValueError):
        sm.cache(9, 1)


def test_lru_eviction_keeps_tokens_and_spares_active_sessions():
    bm, sm = make(6)
    for sid in (1, 2, 3):
        sm.create(sid)
        sm.append(sid, [sid] * 8)
        sm.activate(sid)
        assert sm.cache(sid, 8)  # 2 blocks each: pool full
        sm.park(sid)
    sm.activate(1)
    sm.park(1)  # 1 is now the most recently used: 2 is the LRU
    sm.create(4)
    sm.append(4, [4] * 8)
    sm.activate(4)
    assert sm.cache(4, 8)
    assert sm.session_info(2)['num_cached'] == 0 and sm.session_info(2)['tokens'] == [2] * 8
    assert sm.session_info(3)['num_cached'] == 8 and sm.num_evictions() == 1
    # active sessions are never evicted
    sm.activate(1)
    sm.activate(3)
    sm.append(4, [4] * 4)
    assert not sm.cache(4, 4)
    assert sm.session_info(1)['num_cached'] == 8 and sm.session_info(4)['num_cached'] == 8
    sm.check_invariants()
    # release (preemption): blocks go, tokens stay
    sm.release(1)
    assert sm.session_info(1)['num_cached'] == 0 and sm.session_info(1)['tokens'] == [1] * 8
    assert sm.cache(4, 4)
    sm.check_invariants()


class Model:

    def __init__(self, num_blocks):
        self.num_blocks = num_blocks
        self.s = {}  # sid -> dict(tokens, cached, active, last_use)
        self.clock = 0
        self.evictions = 0

    def free(self):
        return self.num_blocks - sum(nblocks(x['cached']) for x in self.s.values())

    def create(self, sid):
        existed = sid in self.s
        self.clock += 1
        self.s[sid] = dict(tokens=[], cached=0, active=False, last_use=self.clock)
        return existed

    def lru(self, exclude):
        idle = [(x['last_use'], sid) for sid, x in self.s.items()
                if not x['active'] and x['cached'] > 0 and sid != exclude]
        return min(idle)[1] if idle else None

    def cache(self, sid, n):
        x = self.s[sid]
        need = nblocks(x['cached'] + n) - nblocks(x['cached'])
        if need > 0:
            if not x['active']:
                self.clock += 1
                x['last_use'] = self.clock
            while self.free() < need:
                victim = self.lru(sid)
                if victim is None:
                    return False
                self.s[victim]['cached'] = 0
                self.evictions += 1
        x['cached'] += n
        return True

    def park(self, sid):
        self.clock += 1
        self.s[sid].update(active=False, last_use=self.clock)


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('num_blocks', [4, 16, 64])
def test_random_stream_matches_model(seed, num_blocks):
    rng = random.Random(seed * 100 + num_blocks)
    bm, sm = make(num_blocks)
    m = Model(num_blocks)
    ids = list(range(8))
    for _ in range(3000):
        op = rng.random()
        sid = rng.choice(ids)
        known = sid in m.s
        if op < 0.1:
            assert sm.create(sid) == m.create(sid)
        elif not known:
            assert not sm.erase(sid) and sm.session_info(sid) is None
            continue
        elif op < 0.3:
            toks = [rng.randrange(100) for _ in range(rng.randint(0, 9))]
            sm.append(sid, toks)
            m.s[sid]['tokens'] += toks
        elif op < 0.55:
            x = m.s[sid]
            n = rng.randint(0, len(x['tokens']) - x['cached'])
            assert sm.cache(sid, n) == m.cache(sid, n)
        elif op < 0.65:
            x = m.s[sid]
            step = rng.choice([-1, 0, len(x['tokens']), len(x['tokens']) + 1, rng.randint(0, len(x['tokens']))])
            ok = 0 <= step <= len(x['tokens'])
            assert sm.truncate(sid, step) == ok
            if ok:
                del x['tokens'][step:]
                x['cached'] = min(x['cached'], step)
        elif op < 0.75:
            sm.activate(sid)
            m.s[sid]['active'] = True
        elif op < 0.85:
            sm.park(sid)
            m.park(sid)
        elif op < 0.9:
            sm.release(sid)
            m.s[sid]['cached'] = 0
        elif op < 0.95:
            victim = m.lru(None)
            assert sm.evict_lru() == (victim is not None)
            if victim is not None:
                m.s[victim]['cached'] = 0
                m.evictions += 1
        else:
            assert sm.erase(sid)
            del m.s[sid]
        # compare everything, every op
        sm.check_invariants()
        assert sm.session_ids() == sorted(m.s)
        for k, x in m.s.items():
            info = sm.session_info(k)
            assert info['tokens'] == x['tokens']
            assert info['num_cached'] == x['cached']
            assert len(info['blocks']) == nblocks(x['cached'])
            assert info['status'] == ('active' if x['active'] else 'idle')
            assert info['last_use'] == x['last_use']
        assert bm.num_free() == m.free()
        assert sm.num_evictions() == m.evictions
