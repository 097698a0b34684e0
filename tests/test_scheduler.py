"""Scheduler (C++, lmdeploy.turbomind._turbomind) against a pure-Python model of the sessions.

A fake sampler makes every sampled token a deterministic function of (session id, position), so
a request's output does not depend on batching, chunking, eviction or preemption, and the
model can predict every token, every stop and every session history. After every step the
harness checks the plan contract (rows, positions, block table, slot mapping, decode rows
first, token budget), that each position's K/V is written exactly once since it was last
invalidated and with the session's token at that position, the events, every session's
history, and the scheduler's invariants.

A simulated KV pool runs every plan in schedule order (the device's stream order): each row
writes (session, position, token) into its slots and then reads its whole KV through its block
table, which must hold its tokens. `Harness(pipelined=True)` drives the pipelined protocol
(schedule(ahead=True) with one plan outstanding, placeholders resolved from that plan's sampled
tokens, update() commits the oldest) under the same checks.
"""
import random

import numpy as np
import pytest

try:
    from lmdeploy.turbomind import _turbomind
except ImportError as e:  # fail loudly, never skip
    raise ImportError('cannot import lmdeploy.turbomind._turbomind: build the extension with '
                      '`python setup.py build_ext --inplace` first') from e

Scheduler = _turbomind.Scheduler
OK, INVALID, CONFLICT, BUSY, INACTIVE = 0, 1, 2, 3, 4
TOO_LONG, NO_CAPACITY = 6, 7

VOCAB = 50
END_ID = 2
START_ID = 1


def fake_token(sid, pos):
    """The token 'sampled' for position `pos` of session `sid` (2 = end_id now and then)."""
    return (sid * 1000003 + pos * 7919 + (pos * pos) % 13 + 12345) % VOCAB


class Req:

    def __init__(self, handle, sid, context, out_len, end, end_id, stop_words, ignore_eos, session_len,
                 logits_all):
        self.handle, self.sid, self.context = handle, sid, list(context)
        self.out_len, self.end, self.end_id = out_len, end, end_id
        self.stop_words, self.ignore_eos = set(stop_words), ignore_eos
        self.limit = min(len(context) + out_len, session_len - 1) if out_len > 0 else len(context)
        self.generated = []
        self.logits_all = logits_all
        self.logit_positions = []
        self.finished = None  # finish reason
        self.cancel_end = False

    @property
    def tokens(self):
        return self.context + self.generated


class Harness:
    """Drives a Scheduler and checks it against a model after every call."""

    def __init__(self, num_blocks=64, block_size=4, max_batch_size=8, max_prefill_tokens=16, session_len=96,
                 chunked_prefill=True, check_every_step=True, pipelined=False, admit_horizon=32,
                 max_mixed_prefill_tokens=0):
        self.s = Scheduler(num_blocks, block_size, max_batch_size, max_prefill_tokens, session_len, VOCAB,
                           start_id=START_ID, end_id=END_ID, chunked_prefill=chunked_prefill,
                           admit_horizon=admit_horizon, max_mixed_prefill_tokens=max_mixed_prefill_tokens)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_batch_size, self.budget = max_batch_size, max_prefill_tokens
        self.mixed_budget = min(max_mixed_prefill_tokens or max_prefill_tokens, max_prefill_tokens)
        self.session_len, self.chunked = session_len, chunked_prefill
        self.sessions = {}  # sid -> token history (as of the last finished request)
        self.shadow = {}  # sid -> token ids whose K/V the plans wrote, position by position
        self.active = {}  # sid -> Req (submitted, not finished)
        self.reqs = {}  # handle -> Req, all accepted requests
        self.stop_handles = {}  # handle of a stop request -> expected code
        self.rejected = {}  # handle -> expected code
        self.done = {}  # handle -> Req, finished
        self.check = check_every_step
        self.steps = 0
        self.prefill_tokens = 0  # tokens of prefill rows over all plans (recomputation included)
        self.pipelined = pipelined
        self.launched = []  # outstanding plans, oldest first: dict(rows, handles, tokens)
        self.pool = {}  # simulated KV pool: slot -> (sid, position, token)

    # ---- requests -------------------------------------------------------------------------
    def expected_code(self, sid, ids, out_len, start, step):
        if out_len < 0 or any(not 0 <= t < VOCAB for t in ids):
            return INVALID
        if sid in self.active:
            state = self.s.request_state(self.active[sid].handle)
            return BUSY if state in ('running', 'preempted') else CONFLICT
        if not start and sid not in self.sessions:
            return INVALID
        if start and not ids:
            return INVALID
        history = 0 if start else len(self.sessions[sid])
        if not start and 0 <= step <= history:
            history = step
        context = max(1, history + len(ids))
        if context > self.session_len - 1 - (1 if out_len > 0 else 0):
            return TOO_LONG
        limit = min(context + out_len, self.session_len - 1) if out_len > 0 else context
        kv_max = limit - 1 if out_len > 0 else context
        if -(-kv_max // self.block_size) > self.num_blocks:
            return NO_CAPACITY
        return OK

    def submit(self, sid, ids, out_len=16, start=True, end=False, step=-1, stop_words=(), ignore_eos=False,
               end_id=-1, logits_all=False):
        code = self.expected_code(sid, ids, out_len, start, step)
        before = self.s.session_info(sid)
        h = self.s.submit(sid, ids, request_output_len=out_len, sequence_start=start, sequence_end=end, step=step,
                          end_id=end_id, stop_words=list(stop_words), ignore_eos=ignore_eos, logits_all=logits_all)
        assert self.s.last_code == code, (self.s.last_code, code, self.s.last_message)
        assert self.s.session_info(sid) == before  # nothing changes until admission
        if code != OK:
            assert self.s.last_message
            self.rejected[h] = code
            return h, code
        if start:
            context = list(ids)
        else:
            hist = self.sessions[sid]
            context = hist[:step] if 0 <= step <= len(hist) else list(hist)
            context += list(ids)
        input_len = len(ids)
        if not context:
            context, input_len = [START_ID], 1
        r = Req(h, sid, context, out_len, end, END_ID if end_id < 0 else end_id, stop_words, ignore_eos,
                self.session_len, logits_all)
        r.input_len = input_len
        self.active[sid] = r
        self.reqs[h] = r
        return h, code

    def cancel(self, sid, end=False, via_submit=False):
        r = self.active.get(sid)
        if r is not None and self.s.request_state(r.handle) == 'finished':
            return None  # finished at admission this step (nothing to compute); event pending
        expected = OK if (r is not None or end) else INACTIVE
        admitted = r is not None and self.s.request_state(r.handle) != 'waiting'
        if via_submit:
            h = self.s.submit(sid, [], sequence_start=False, sequence_end=end, stop=True)
            code = self.s.last_code
            if code == OK:
                self.stop_handles[h] = OK
            else:
                self.rejected[h] = code
        else:
            code = self.s.cancel(sid, end)
        assert code == expected, (code, expected)
        if code != OK:
            return code
        if r is None:  # END for an idle (or unknown) session: erased at once
            self.sessions.pop(sid, None)
            self.shadow.pop(sid, None)
        else:
            r.cancel_end = r.cancel_end or end
            r.cancel_admitted = admitted
            # finished at once (its rows in outstanding plans dropped); the event comes with the
            # next update()
            self.finish(r, 'cancel')
            r.event_pending = True
        return code

    # ---- the step -------------------------------------------------------------------------
    def step(self, rng=None):
        """One engine step. Pipelined: plan while the previous plan is outstanding, then commit
        that one (now and then a synchronous step, as the engine falls back to)."""
        ahead = self.pipelined and (rng is None or rng.random() > 0.1)
        if self.launched and not ahead:
            self.commit()
        plan = self.s.schedule(ahead=bool(self.launched))
        self.steps += 1
        self.prefill_tokens += plan.num_tokens - plan.num_decode
        rec = self.check_plan(plan)
        if plan.batch_size:
            self.launched.append(rec)
        assert self.s.num_outstanding == len(self.launched)
        if rng is not None and rng.random() < 0.05 and self.active:  # cancel mid-step
            self.cancel(rng.choice(sorted(self.active)), end=rng.random() < 0.3, via_submit=rng.random() < 0.5)
        if len(self.launched) == 2 or (self.launched and not (self.pipelined and plan.batch_size)):
            self.commit()
        elif not self.launched:
            self.apply_events(self.s.update())
        if self.check:
            self.check_state()
        return plan

    def commit(self):
        """update() with the oldest outstanding plan's tokens."""
        rec = self.launched.pop(0)
        self.apply_events(self.s.update(np.asarray(rec['tokens'], dtype=np.int32)))

    def flush(self):
        while self.launched:
            self.commit()
            if self.check:
                self.check_state()

    def pending_tokens(self, handle):
        """The request's sampled tokens of the outstanding plans (not yet committed)."""
        return [t for rec in self.launched for h, t in zip(rec['handles'], rec['tokens']) if h == handle]

    def check_plan(self, plan):
        B, T, bs = plan.batch_size, plan.num_tokens, self.block_size
        cu, kv = plan.cu_seqlens.tolist(), plan.kv_lens.tolist()
        ids, pos, slots = plan.input_ids.tolist(), plan.positions.tolist(), plan.slot_mapping.tolist()
        table = plan.block_table
        rows = plan.row_handles.tolist()
        assert len(cu) == B + 1 and cu[0] == 0 and cu[-1] == T
        assert B <= self.max_batch_size
        assert len(set(rows)) == B
        q = [cu[b + 1] - cu[b] for b in range(B)]
        assert all(n >= 1 for n in q)
        assert all(q[b] == 1 for b in range(plan.num_decode)), 'decode rows must come first'
        prefill_tokens = T - plan.num_decode
        budget = self.mixed_budget if plan.num_decode else self.budget
        if self.chunked:
            assert prefill_tokens <= budget
        elif B > plan.num_decode:
            assert prefill_tokens <= budget or B - plan.num_decode == 1
        assert plan.max_q_len == max(q, default=0) and plan.max_kv_len == max(kv, default=0)
        sample_idx, sample_h = plan.sample_idx.tolist(), plan.sample_handles.tolist()
        logits_idx, logits_h = plan.logits_idx.tolist(), plan.logits_handles.tolist()
        expect_samples = []
        prev = self.launched[-1] if self.launched else None
        for b in range(B):
            r = self.reqs[rows[b]]
            info = self.s.session_info(r.sid)
            assert info is not None and info['status'] == 'active'
            assert info['tokens'] == r.tokens  # committed tokens only
            pending = self.pending_tokens(r.handle)
            toks = r.tokens + pending
            assert len(toks) < r.limit or not pending, 'a row for a pending token that reaches the length limit'
            start = kv[b] - q[b]
            row_ids = ids[cu[b]:cu[b + 1]]
            for i, t in enumerate(row_ids):
                if t < 0:  # a placeholder: the previous plan's sample of this very request
                    assert prev is not None and start + i == len(r.tokens) and pending
                    assert prev['handles'][-t - 1] == r.handle
            resolved = [t if t >= 0 else prev['tokens'][-t - 1] for t in row_ids]
            if not self.pipelined:
                # K/V exactly once since its last invalidation: the row starts where the cache ends
                sh = self.shadow.setdefault(r.sid, [])
                assert info['num_cached'] <= len(sh), 'cached length claims K/V that was never written'
                del sh[info['num_cached']:]
                assert sh == toks[:len(sh)], 'cached K/V no longer matches the tokens'
                assert start == len(sh), (start, len(sh))
                sh.extend(toks[start:kv[b]])
            assert resolved == toks[start:kv[b]]
            assert pos[cu[b]:cu[b + 1]] == list(range(start, kv[b]))
            nb = -(-kv[b] // bs)
            assert info['blocks'][:nb] == table[b, :nb].tolist() and len(info['blocks']) == nb
            assert (table[b, nb:] == -1).all()
            for i in range(q[b]):
                p = start + i
                assert slots[cu[b] + i] == table[b, p // bs] * bs + p % bs
                self.pool[slots[cu[b] + i]] = (r.sid, p, toks[p])
            for p in range(kv[b]):  # attention reads the whole KV, in stream order
                got = self.pool.get(int(table[b, p // bs]) * bs + p % bs)
                assert got == (r.sid, p, toks[p]), f'session {r.sid} position {p}: K/V of {got}'
            if kv[b] == len(toks) and r.out_len > 0:
                expect_samples.append((cu[b + 1] - 1, r.handle))
            if r.logits_all:
                mine = [(i, h) for i, h in zip(logits_idx, logits_h) if h == r.handle]
                r.logit_positions.extend(pos[i] for i, _ in mine)
        assert list(zip(sample_idx, sample_h)) == expect_samples
        assert all(h in set(rows) for h in logits_h)
        # the fake sampler
        tokens = []
        for i, h in zip(sample_idx, sample_h):
            tokens.append(fake_token(self.reqs[h].sid, pos[i] + 1))
        return dict(rows=set(rows), handles=sample_h, tokens=tokens)

    def apply_events(self, events):
        lst = events.to_list()
        assert len(lst) == len(events) == len(events.handles)
        assert events.offsets[-1] == len(events.tokens) if len(events) else True
        seen = set()
        for h, toks, finished, reason, code, msg in lst:
            assert h not in seen, 'one event per request per update'
            seen.add(h)
            if h in self.rejected:
                assert finished and reason == 'error' and code == self.rejected.pop(h) and msg
                continue
            if h in self.stop_handles:
                assert finished and reason == 'cancel' and code == 0 and not toks
                del self.stop_handles[h]
                continue
            r = self.reqs[h]
            assert (r.finished is None or getattr(r, 'event_pending', False)) and code == 0
            for t in toks:
                assert t == fake_token(r.sid, len(r.tokens))
                r.generated.append(t)
            expect = ''
            if toks:
                t = toks[-1]
                if (t == r.end_id and not r.ignore_eos) or t in r.stop_words:
                    expect = 'stop'
                elif len(r.tokens) >= r.limit:
                    expect = 'length'
            elif r.out_len == 0 and reason == 'length':
                expect = 'length'
            if reason == 'cancel':
                assert not toks
                expect = 'cancel'
            assert reason == expect, (reason, expect, r.tokens, r.limit)
            assert finished == bool(reason)
            if finished:
                if getattr(r, 'event_pending', False):
                    assert reason == 'cancel' and r.finished == 'cancel'
                    r.event_pending = False
                    continue
                self.finish(r, reason)
        # A stop request's own event comes at once (the next update).
        assert not self.stop_handles
        assert not self.rejected

    def finish(self, r, reason):
        r.finished = reason
        del self.active[r.sid]
        self.done[r.handle] = r
        if r.out_len > 0 and reason in ('stop', 'length'):
            assert len(r.generated) >= 1
        if r.logits_all and reason != 'cancel':
            first = len(r.context) - r.input_len
            assert r.logit_positions == list(range(first, len(r.context)))
        admitted = reason != 'cancel' or getattr(r, 'cancel_admitted', True)
        # a queued request that never ran is removed; its own END does not apply
        if (r.end and admitted) or r.cancel_end:
            self.sessions.pop(r.sid, None)
            self.shadow.pop(r.sid, None)
        elif admitted:
            self.sessions[r.sid] = r.tokens

    def check_state(self):
        s = self.s
        s.check_invariants()
        assert sorted(s.session_ids()) == sorted(set(self.sessions) | {
            sid for sid, r in self.active.items() if s.request_state(r.handle) != 'waiting'})
        for sid in s.session_ids():
            info = s.session_info(sid)
            r = self.active.get(sid)
            state = None if r is None else s.request_state(r.handle)
            if state == 'finished':  # pipelined: finished since the last update(), event pending
                assert info['tokens'] == r.tokens and info['status'] == 'idle'
            elif state is not None and state != 'waiting':
                assert info['tokens'] == r.tokens
                assert info['status'] == 'active'
            else:
                assert info['tokens'] == self.sessions[sid]
                assert info['status'] == 'idle'
            assert info['num_cached'] <= len(info['tokens'])
            if not self.launched:
                assert len(info['blocks']) == -(-info['num_cached'] // self.block_size)
            if not self.pipelined:
                sh = self.shadow.get(sid, [])
                assert info['num_cached'] <= len(sh) and sh[:info['num_cached']] == info['tokens'][:info['num_cached']]
            for p in range(info['num_cached']):  # the pool still holds the cached K/V
                slot = info['blocks'][p // self.block_size] * self.block_size + p % self.block_size
                assert self.pool.get(slot) == (sid, p, info['tokens'][p]), (sid, p)
        assert s.num_running() <= self.max_batch_size
        finished = sum(s.request_state(r.handle) == 'finished' for r in self.active.values())
        assert s.num_running() + s.num_waiting() + finished == len(self.active)

    def run_until_idle(self, max_steps=10000, rng=None):
        for _ in range(max_steps):
            if not self.active:
                self.flush()
                return
            self.step(rng)
        raise AssertionError('requests did not complete')


def submit_tracking_input(h, *args, **kwargs):
    return h.submit(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Deterministic tests


def test_basic_generation_and_history():
    h = Harness()
    hd, code = h.submit(7, [5, 6, 7, 8, 9], out_len=6, end_id=-1)
    assert code == OK
    h.run_until_idle()
    r = h.done[hd]
    assert r.finished in ('stop', 'length')
    info = h.s.session_info(7)
    assert info['tokens'] == r.tokens and info['status'] == 'idle'
    # the last generated token has no K/V yet
    assert info['num_cached'] == len(r.tokens) - 1
    # next turn: only that token plus the new input are prefilled
    hd2, code = h.submit(7, [11, 12], out_len=3, start=False, step=len(r.tokens))
    plan = h.step()
    assert plan.kv_lens.tolist() == [len(r.tokens) + 2]
    assert plan.positions.tolist() == list(range(len(r.tokens) - 1, len(r.tokens) + 2))
    h.run_until_idle()


def test_validation_codes():
    h = Harness(num_blocks=12, block_size=4, session_len=64)
    assert h.submit(1, [3, 4], start=False)[1] == INVALID  # START=0, unknown id
    assert h.submit(1, [])[1] == INVALID  # empty input on a new session
    assert h.submit(1, [3, VOCAB])[1] == INVALID  # outside the vocabulary
    assert h.submit(1, [3, -1])[1] == INVALID
    assert h.submit(1, [3], out_len=-1)[1] == INVALID
    assert h.submit(1, [3] * 63, out_len=1)[1] == TOO_LONG  # no room for one generated token
    assert h.submit(1, [3] * 62, out_len=0)[1] == NO_CAPACITY  # fits session_len, not the pool
    assert h.submit(1, [3] * 30, out_len=100)[1] == NO_CAPACITY  # 12 blocks of 4 = 48 tokens
    code = h.s.submit(1, [3], sequence_start=True, stop=True)
    assert h.s.last_code == INVALID and 'START' in h.s.last_message  # START with STOP
    h.rejected[code] = INVALID
    assert h.cancel(1) == INACTIVE  # stop, END=0, nothing running
    assert h.cancel(1, via_submit=True) == INACTIVE
    # rejections are events of the next update, with messages
    ev = h.s.update().to_list()
    assert [e[4] for e in ev] == [INVALID] * 5 + [TOO_LONG, NO_CAPACITY, NO_CAPACITY, INVALID, INACTIVE]
    assert all(e[2] and e[3] == 'error' and e[5] for e in ev)
    h.rejected.clear()
    # conflict: queued twice; busy: generating
    h1, code = h.submit(2, [3, 4, 5], out_len=4)
    assert code == OK
    assert h.submit(2, [6], start=False)[1] == CONFLICT
    h.step()
    assert h.s.request_state(h1) == 'running'
    assert h.submit(2, [6], start=False)[1] == BUSY
    assert h.submit(2, [6], start=True)[1] == BUSY
    h.run_until_idle()
    # too long counts the history after `step` truncation
    hist = len(h.sessions[2])
    assert h.submit(2, [3] * (63 - hist), out_len=4, start=False)[1] == TOO_LONG
    assert h.submit(2, [3] * 5, out_len=4, start=False, step=0)[1] == OK
    h.run_until_idle()
    # the session survived all the rejections intact
    h.check_state()


def test_step_truncation_and_invalid_step_warning():
    h = Harness()
    h.submit(3, [5, 6, 7, 8, 9, 10, 11], out_len=4, stop_words=[])
    h.run_until_idle()
    hist = h.sessions[3]
    h.s.take_warnings()
    # rewind to 4 tokens: cached length drops to 4, blocks past it are freed
    h.submit(3, [20, 21], out_len=2, start=False, step=4)
    plan = h.step()
    assert plan.positions.tolist()[0] == 4 and h.s.session_info(3)['tokens'][:6] == hist[:4] + [20, 21]
    h.run_until_idle()
    # a step larger than the history is ignored with a warning
    n = len(h.sessions[3])
    h.submit(3, [22], out_len=2, start=False, step=n + 5)
    h.step()
    assert any('Skipping invalid step' in w for w in h.s.take_warnings())
    h.run_until_idle()
    assert h.sessions[3][:n + 1] == h.reqs[max(h.reqs)].context


def test_start_replaces_session_with_warning():
    h = Harness()
    h.submit(4, [5, 6, 7], out_len=3)
    h.run_until_idle()
    h.s.take_warnings()
    h.submit(4, [8, 9], out_len=3, start=True)
    h.run_until_idle()
    assert any('conflicting' in w for w in h.s.take_warnings())
    assert h.sessions[4][:2] == [8, 9]


def test_end_erases_and_start_id_for_empty_history():
    h = Harness()
    h.submit(5, [5, 6, 7], out_len=3)
    h.run_until_idle()
    # rewind to nothing, no input: start_id is inserted
    h.submit(5, [], out_len=3, start=False, step=0)
    plan = h.step()
    assert plan.input_ids.tolist() == [START_ID]
    h.run_until_idle()
    h.submit(5, [], out_len=2, start=False, end=True, step=len(h.sessions[5]))
    h.run_until_idle()
    assert h.s.session_info(5) is None and h.s.num_free_blocks() == h.num_blocks


def test_stop_token_is_part_of_output_and_history():
    h = Harness()
    # find a prompt whose first sampled token is end_id
    sid = next(s for s in range(1000) if fake_token(s, 3) == END_ID)
    hd, _ = h.submit(sid, [5, 6, 7], out_len=10)
    h.run_until_idle()
    assert h.done[hd].finished == 'stop' and h.done[hd].generated == [END_ID]
    assert h.s.session_info(sid)['tokens'] == [5, 6, 7, END_ID]
    # ignore_eos runs on to the length limit
    hd, _ = h.submit(sid, [5, 6, 7], out_len=5, ignore_eos=True)
    h.run_until_idle()
    assert h.done[hd].finished == 'length' and len(h.done[hd].generated) == 5
    # a stop word stops too
    word = fake_token(sid, 4)
    hd, _ = h.submit(sid, [5, 6, 7], out_len=5, ignore_eos=True, stop_words=[word])
    h.run_until_idle()
    assert h.done[hd].finished == 'stop' and h.done[hd].generated[-1] == word


def test_output_len_clamped_to_session_len():
    h = Harness(session_len=32, num_blocks=64)
    sid = next(s for s in range(1000) if all(fake_token(s, p) != END_ID for p in range(10, 40)))
    hd, _ = h.submit(sid, list(range(3, 13)), out_len=1000)
    h.run_until_idle()
    assert h.done[hd].finished == 'length' and len(h.done[hd].tokens) == 31


def test_prefill_only_then_generate_refeeds_last_token():
    h = Harness()
    hd, _ = h.submit(6, [5, 6, 7, 8, 9, 10], out_len=0)
    h.run_until_idle()
    assert h.done[hd].finished == 'length' and not h.done[hd].generated
    info = h.s.session_info(6)
    assert info['num_cached'] == 6
    h.submit(6, [], out_len=3, start=False, step=6)
    plan = h.step()
    assert plan.positions.tolist() == [5] and plan.num_decode == 1
    h.run_until_idle()


def test_logits_all_decode_style():
    h = Harness(max_prefill_tokens=5)
    hd, _ = submit_tracking_input(h, 8, list(range(3, 20)), out_len=0, end=True, logits_all=True)
    h.run_until_idle()
    r = h.done[hd]
    assert r.logit_positions == list(range(17)) and h.s.session_info(8) is None


def test_chunked_prefill_budget_and_decode_first():
    h = Harness(max_prefill_tokens=6, num_blocks=200, session_len=120)
    sid = next(s for s in range(1000) if all(fake_token(s, p) != END_ID for p in range(3, 30)))
    h.submit(sid, [5, 6, 7], out_len=20)
    h.step()
    h.step()
    long_sid = sid + 1
    h.submit(long_sid, [9] * 40, out_len=2)
    chunks = []
    for _ in range(8):
        plan = h.step()
        q = np.diff(plan.cu_seqlens)
        assert plan.num_decode >= 1 and q[0] == 1  # the decoding session keeps going
        if plan.batch_size > plan.num_decode:
            chunks.append(int(q[plan.num_decode]))
            assert plan.num_prefill_tokens <= 6
    assert sum(chunks[:7]) >= 40 and chunks[:6] == [6] * 6
    h.run_until_idle()


def test_mixed_prefill_budget_applies_beside_decode_rows_only():
    """A prompt arriving while a session decodes is prefilled within the smaller mixed budget;
    alone, a prompt takes the whole max_prefill_tokens."""
    h = Harness(max_prefill_tokens=12, max_mixed_prefill_tokens=5, num_blocks=200, session_len=120)
    assert h.s.max_mixed_prefill_tokens == 5
    sid = next(s for s in range(1000) if all(fake_token(s, p) != END_ID for p in range(30, 60)))
    h.submit(sid, [7] * 30, out_len=20)
    plan = h.step()
    assert plan.num_decode == 0 and plan.num_prefill_tokens == 12  # alone: the full budget
    while h.s.session_info(sid)['num_cached'] < 30:
        h.step()
    h.submit(sid + 1, [9] * 23, out_len=2)
    chunks = []
    for _ in range(6):
        plan = h.step()
        assert plan.num_decode >= 1  # the first session keeps decoding
        if plan.batch_size > plan.num_decode:
            chunks.append(int(np.diff(plan.cu_seqlens)[plan.num_decode]))
    assert chunks[:5] == [5, 5, 5, 5, 3]
    h.run_until_idle()
    with pytest.raises(ValueError, match='max_mixed_prefill_tokens'):
        Scheduler(8, 4, 2, 8, 32, VOCAB, max_mixed_prefill_tokens=-1)


@pytest.mark.parametrize('chunked', [True, False])
def test_chunked_and_whole_prefill_give_same_tokens(chunked):
    outs = {}
    for chunked_prefill in (True, chunked):
        h = Harness(max_prefill_tokens=7, chunked_prefill=chunked_prefill, num_blocks=400, session_len=200)
        hs = [h.submit(sid, [3 + sid % 40] * (5 + 9 * sid % 60), out_len=12)[0] for sid in range(10)]
        h.run_until_idle()
        outs[chunked_prefill] = [h.done[x].generated for x in hs]
    assert outs[True] == outs[chunked]


def test_eviction_lru_and_transparent_reprefill():
    h = Harness(num_blocks=12, block_size=4, session_len=40, max_prefill_tokens=32)
    a, _ = h.submit(1, [5] * 10, out_len=3, ignore_eos=True)
    h.run_until_idle()
    b, _ = h.submit(2, [6] * 10, out_len=3, ignore_eos=True)
    h.run_until_idle()
    assert h.s.session_info(1)['num_cached'] > 0 and h.s.session_info(2)['num_cached'] > 0
    # session 3 needs most of the pool: session 1 (least recently used) goes first
    h.submit(3, [7] * 30, out_len=2, ignore_eos=True)
    h.step()
    assert h.s.session_info(1)['num_cached'] == 0 and h.s.num_evictions() >= 1
    assert h.s.session_info(1)['tokens'] == h.sessions[1]  # tokens stay
    h.run_until_idle()
    # session 1's next turn re-prefills its whole history
    n = len(h.sessions[1])
    h.submit(1, [8, 9], out_len=3, start=False, step=n, ignore_eos=True)
    plan = h.step()
    row = plan.row_handles.tolist().index(max(h.reqs))
    assert plan.positions[plan.cu_seqlens[row]] == 0
    h.run_until_idle()
    assert h.sessions[1][:n] == h.done[a].tokens


def test_cancel_running_waiting_and_end():
    h = Harness(max_batch_size=1)
    sid = next(s for s in range(1000) if all(fake_token(s, p) != END_ID for p in range(3, 40)))
    h1, _ = h.submit(sid, [5, 6, 7], out_len=30)
    h2, _ = h.submit(sid + 1, [5, 6, 7], out_len=30)
    h.step()
    h.step()
    assert h.s.request_state(h1) == 'running' and h.s.request_state(h2) == 'waiting'
    assert h.cancel(sid + 1) == OK  # queued: removed, session untouched (never created)
    assert h.cancel(sid) == OK  # running, not in a plan: finished at once, cache kept
    h.apply_events(h.s.update())
    assert h.done[h1].finished == 'cancel' and h.done[h2].finished == 'cancel'
    assert h.s.session_info(sid)['tokens'] == h.done[h1].tokens and h.s.session_info(sid + 1) is None
    h.check_state()
    # cancel while its step is in flight, with END: erased after the step
    h3, _ = h.submit(sid, [8], out_len=30, start=False, step=len(h.sessions[sid]))
    h.step()
    h.s.schedule()
    assert h.s.cancel(sid, True) == OK
    h.reqs[h3].cancel_end = True
    ev = h.s.update(np.zeros(1, np.int32)).to_list()
    assert ev[0][0] == h3 and ev[0][3] == 'cancel' and not ev[0][1]
    assert h.s.session_info(sid) is None and h.s.num_free_blocks() == h.num_blocks
    h.s.check_invariants()


def test_update_protocol_errors_change_nothing():
    h = Harness()
    h.submit(1, [5, 6, 7], out_len=4)
    plan = h.s.schedule()
    with pytest.raises(RuntimeError):
        h.s.schedule()
    with pytest.raises(ValueError):
        h.s.update(np.zeros(plan.num_samples + 1, np.int32))
    with pytest.raises(ValueError):
        h.s.update(np.full(plan.num_samples, VOCAB, np.int32))
    h.s.discard_plan()
    h.s.check_invariants()
    assert h.s.session_info(1)['num_cached'] == 0
    h.run_until_idle()


def test_preemption_gives_same_tokens_as_big_pool():
    def run(num_blocks):  # greedy admission (no pool check): the small pool must preempt
        h = Harness(num_blocks=num_blocks, block_size=4, max_batch_size=8, max_prefill_tokens=12, session_len=64,
                    admit_horizon=-1)
        hs = []
        for sid in range(16):
            hs.append(h.submit(sid, [3 + sid] * (4 + 3 * sid % 20), out_len=30, ignore_eos=sid % 3 == 0)[0])
        h.run_until_idle()
        return [h.done[x].generated for x in hs], h.s.num_preemptions()

    big, p_big = run(400)
    small, p_small = run(16)  # 64 tokens: barely one long request
    assert p_big == 0 and p_small > 0
    assert small == big


@pytest.mark.parametrize('pipelined', [False, True])
def test_admission_waits_for_blocks_instead_of_thrashing(pipelined):
    """A pool far too small for everyone: with the pool check (the default) requests wait to be
    admitted instead of taking the last blocks, being preempted and prefilled again."""
    prompts = {sid: [3 + sid] * (4 + (3 * sid) % 20) for sid in range(16)}

    def run(admit_horizon):
        h = Harness(num_blocks=16, block_size=4, max_batch_size=8, max_prefill_tokens=12, session_len=64,
                    pipelined=pipelined, admit_horizon=admit_horizon)
        hs = [h.submit(sid, ids, out_len=30, ignore_eos=True)[0] for sid, ids in prompts.items()]
        h.run_until_idle()
        return [h.done[x].generated for x in hs], h.s.num_preemptions(), h.prefill_tokens

    greedy, greedy_preemptions, greedy_prefill = run(-1)
    checked, checked_preemptions, checked_prefill = run(32)
    assert checked == greedy
    assert greedy_preemptions > 0 and greedy_prefill > sum(map(len, prompts.values()))
    # 32 tokens of growth cover these 30-token replies: nobody is ever preempted
    # (a prompt's last chunk of one token runs as a decode row: <=)
    assert checked_preemptions == 0 and checked_prefill <= sum(map(len, prompts.values()))


def test_admission_is_fifo_when_the_head_does_not_fit():
    h = Harness(num_blocks=16, block_size=4, max_batch_size=8, max_prefill_tokens=64, session_len=64)
    big = h.submit(1, [5] * 40, out_len=20, ignore_eos=True)[0]  # 15 of the 16 blocks
    h.step()
    assert h.s.request_state(big) == 'running'
    head = h.submit(2, [6] * 30, out_len=4, ignore_eos=True)[0]  # does not fit beside it
    small = h.submit(3, [7] * 2, out_len=2, ignore_eos=True)[0]  # would fit, must not overtake
    while big not in h.done:
        assert h.s.request_state(head) == 'waiting' and h.s.request_state(small) == 'waiting'
        h.step()
    h.run_until_idle()
    assert h.done[head].finished == 'length' and h.done[small].finished == 'length'
    assert h.s.num_preemptions() == 0


# ---------------------------------------------------------------------------------------------
# Pipelined protocol (schedule(ahead=True) while one plan is outstanding)


def sid_where(pred):
    return next(s for s in range(5000) if pred(s))


def test_pipelined_rows_feed_placeholders_and_commit_oldest_first():
    h = Harness(pipelined=True)
    sid = sid_where(lambda s: all(fake_token(s, p) != END_ID for p in range(3, 12)))
    hd, _ = h.submit(sid, [5, 6, 7], out_len=4)
    a = h.step()  # the prompt; stays outstanding
    assert a.num_samples == 1 and h.s.num_outstanding == 1 and not h.reqs[hd].generated
    b = h.step()  # its pending token is the placeholder for entry 0 of a's samples
    assert b.input_ids.tolist() == [-1] and b.positions.tolist() == [3] and b.kv_lens.tolist() == [4]
    assert h.reqs[hd].generated == [fake_token(sid, 3)]  # a was committed after b was planned
    info = h.s.session_info(sid)
    assert info['num_cached'] == 3 and len(info['blocks']) == 1  # b writes position 3 (block 0)
    h.run_until_idle()
    assert h.done[hd].generated == [fake_token(sid, p) for p in range(3, 7)]
    with pytest.raises(RuntimeError, match='two plans'):
        h.submit(sid, [8], out_len=4, start=False, step=len(h.sessions[sid]))
        h.s.schedule()
        h.s.schedule(ahead=True)
        h.s.schedule(ahead=True)


def test_pipelined_stop_drops_the_newer_row_and_keeps_the_session_right():
    sid = sid_where(lambda s: fake_token(s, 4) == END_ID and fake_token(s, 3) != END_ID)
    h = Harness(pipelined=True, num_blocks=16)
    hd, _ = h.submit(sid, [5, 6, 7], out_len=10)
    h.step()
    h.step()
    c = h.step()  # planned with the EOS still pending; committing b finishes the request
    assert c.input_ids.tolist() == [-1] and c.positions.tolist() == [4]
    assert h.done[hd].finished == 'stop' and h.done[hd].generated == [fake_token(sid, 3), END_ID]
    assert h.s.num_outstanding == 1  # c is still on the device, its row detached
    info = h.s.session_info(sid)
    tokens = [5, 6, 7, fake_token(sid, 3), END_ID]
    # as after a synchronous run: the last token has no K/V; the block c took for position 4 is free
    assert info['tokens'] == tokens and info['num_cached'] == 4 and info['status'] == 'idle'
    assert len(info['blocks']) == 1 and h.s.num_free_blocks() == 15
    h.flush()  # c's token for the finished request is dropped: no event, nothing appended
    assert h.s.session_info(sid) == info
    # the next turn re-feeds the last token, and generates what a synchronous run does
    h2, _ = h.submit(sid, [8], out_len=3, start=False, step=len(tokens))
    assert h.step().positions.tolist() == [4, 5]
    h.run_until_idle()
    sync = Harness()
    sync.submit(sid, [5, 6, 7], out_len=10)
    sync.run_until_idle()
    sync.submit(sid, [8], out_len=3, start=False, step=len(tokens))
    sync.run_until_idle()
    assert h.sessions[sid] == sync.sessions[sid]
    assert h.s.session_info(sid)['num_cached'] == sync.s.session_info(sid)['num_cached']


def test_pipelined_no_row_for_a_pending_token_at_the_length_limit():
    sid = sid_where(lambda s: all(fake_token(s, p) != END_ID for p in range(3, 12)))
    h = Harness(pipelined=True)
    hd, _ = h.submit(sid, [5, 6, 7], out_len=3)
    sizes = [h.step().batch_size for _ in range(4)]
    assert sizes == [1, 1, 1, 0]  # the third token is pending when the fourth step is planned
    assert h.done[hd].finished == 'length' and len(h.done[hd].generated) == 3
    assert h.s.num_outstanding == 0
    # session_len clamps the same way
    h = Harness(pipelined=True, session_len=8)
    hd, _ = h.submit(sid, [5, 6, 7], out_len=100)
    h.run_until_idle()
    assert h.done[hd].finished == 'length' and len(h.done[hd].tokens) == 7


@pytest.mark.parametrize('end', [False, True])
def test_pipelined_cancel_with_rows_in_both_plans(end):
    sid = sid_where(lambda s: all(fake_token(s, p) != END_ID for p in range(3, 12)))
    h = Harness(pipelined=True, num_blocks=16)
    hd, _ = h.submit(sid, [5, 6, 7], out_len=10)
    other, _ = h.submit(sid + 1, [5, 6], out_len=10)
    h.s.schedule()  # a: both prompts
    late, _ = h.submit(sid + 2, [9, 9, 9], out_len=5)
    b = h.s.schedule(ahead=True)  # b: two placeholder rows and the late prompt
    assert b.input_ids.tolist()[:2] == [-1, -2] and b.num_samples == 3
    free = h.s.num_free_blocks()
    assert h.s.cancel(sid, end) == OK and h.s.cancel(sid + 2, False) == OK
    # finished at once, as if cancelled before both steps: nothing of a or b is committed for it
    assert h.s.request_state(hd) == h.s.request_state(late) == 'finished' and h.s.num_running() == 1
    h.s.check_invariants()
    info = h.s.session_info(sid)
    if end:
        assert info is None
    else:
        assert info['tokens'] == [5, 6, 7] and info['num_cached'] == 0 and not info['blocks']
    assert h.s.num_free_blocks() > free
    ev = {e[0]: e for e in h.s.update(np.array([fake_token(sid, 3), fake_token(sid + 1, 2)], np.int32)).to_list()}
    assert ev[hd][1:4] == ([], True, 'cancel') and ev[late][1:4] == ([], True, 'cancel')
    assert ev[other][1] == [fake_token(sid + 1, 2)]
    h.s.check_invariants()
    ev = {e[0]: e for e in h.s.update(np.array([0, fake_token(sid + 1, 3), 0], np.int32)).to_list()}
    assert list(ev) == [other] and ev[other][1] == [fake_token(sid + 1, 3)]
    h.s.check_invariants()
    assert h.s.num_running() == 1
    info = h.s.session_info(sid + 2)  # admitted in b: kept, without K/V
    assert info['tokens'] == [9, 9, 9] and info['num_cached'] == 0 and info['status'] == 'idle'


def test_pipelined_discard_newest_then_oldest():
    sid = sid_where(lambda s: all(fake_token(s, p) != END_ID for p in range(3, 20)))
    h = Harness(num_blocks=16)
    hd, _ = h.submit(sid, [5, 6, 7, 8], out_len=6)
    free = h.s.num_free_blocks()
    h.s.schedule()
    h.s.schedule(ahead=True)  # position 4 needs a second block
    assert h.s.num_free_blocks() == free - 2
    h.s.discard_plan()  # the newest: the prompt's plan stays outstanding
    assert h.s.num_outstanding == 1 and h.s.num_free_blocks() == free - 1
    h.s.check_invariants()
    h.s.schedule(ahead=True)
    h.s.discard_plan()
    h.s.discard_plan()
    assert h.s.num_outstanding == 0 and h.s.num_free_blocks() == free
    assert h.s.session_info(sid)['num_cached'] == 0
    h.s.check_invariants()
    h.run_until_idle()
    assert h.done[hd].generated == [fake_token(sid, p) for p in range(4, 10)]


def test_pipelined_never_preempts_a_request_with_an_outstanding_row():
    # two requests that each need a new block at every block boundary, a pool for barely both
    h = Harness(pipelined=True, num_blocks=5, block_size=4, max_prefill_tokens=16, session_len=40,
                admit_horizon=-1)
    sids = [sid_where(lambda s, k=k: s > 100 * k and all(fake_token(s, p) != END_ID for p in range(2, 40)))
            for k in range(1, 3)]
    hs = [h.submit(sid, [5, 6], out_len=12, ignore_eos=True)[0] for sid in sids]
    h.run_until_idle()  # the harness checks every plan against the simulated pool
    assert all(h.done[x].finished == 'length' for x in hs)
    assert h.s.num_preemptions() > 0


@pytest.mark.parametrize('pipelined', [False, True])
def test_preemption_pressure_same_tokens_pipelined(pipelined):
    def run(num_blocks, pipelined):
        h = Harness(num_blocks=num_blocks, block_size=4, max_batch_size=8, max_prefill_tokens=12, session_len=64,
                    pipelined=pipelined, admit_horizon=-1)
        hs = [h.submit(sid, [3 + sid] * (4 + 3 * sid % 20), out_len=30, ignore_eos=sid % 3 == 0)[0]
              for sid in range(16)]
        h.run_until_idle()
        return [h.done[x].generated for x in hs], h.s.num_preemptions()

    big, _ = run(400, False)
    small, preempted = run(16, pipelined)
    assert preempted > 0 and small == big


def test_pipelined_multi_turn_sessions_equal_synchronous():
    def run(pipelined):
        h = Harness(pipelined=pipelined, num_blocks=24, block_size=4, session_len=64)
        outs, cached = [], []
        for turn in range(4):
            hs = []
            for sid in (11, 12, 13):
                hist = h.sessions.get(sid)
                ids = [3 + (sid + turn) % 40] * (3 + turn)
                hs.append(h.submit(sid, ids, out_len=5 + turn, start=hist is None,
                                   step=len(hist) if hist else -1)[0])
            h.run_until_idle()
            outs.append([(h.done[x].finished, h.done[x].generated) for x in hs])
            cached.append([h.s.session_info(sid)['num_cached'] for sid in (11, 12, 13)])
        return outs, cached, {sid: h.sessions[sid] for sid in (11, 12, 13)}

    assert run(True) == run(False)


# ---------------------------------------------------------------------------------------------
# Randomized streams


def random_stream(seed, num_ops, num_blocks, max_batch_size, budget, chunked=True, session_len=64,
                  pipelined=False, admit_horizon=32, mixed_budget=0):
    rng = random.Random(seed)
    h = Harness(num_blocks=num_blocks, block_size=4, max_batch_size=max_batch_size, max_prefill_tokens=budget,
                session_len=session_len, chunked_prefill=chunked, pipelined=pipelined,
                admit_horizon=admit_horizon, max_mixed_prefill_tokens=mixed_budget)
    ids_pool = list(range(12))
    for _ in range(num_ops):
        op = rng.random()
        sid = rng.choice(ids_pool)
        n_in = rng.choice([0, 1, 2, 5, 9, 17, 30])
        ids = [rng.randrange(3, VOCAB) for _ in range(n_in)]
        out_len = rng.choice([0, 1, 3, 8, 20, 40])
        stop_words = rng.sample(range(3, VOCAB), rng.randint(0, 2))
        if op < 0.25:  # start a session (may replace one; conflicts/busy when active)
            submit_tracking_input(h, sid, ids or [4], out_len=out_len, start=True, end=rng.random() < 0.1,
                                  stop_words=stop_words, ignore_eos=rng.random() < 0.2,
                                  logits_all=rng.random() < 0.1)
        elif op < 0.55:  # continue, with a step from the client (sometimes stale or too large)
            hist = len(h.sessions.get(sid, []))
            step = rng.choice([hist, hist, hist, -1, rng.randint(0, max(hist, 0)), hist + 3])
            submit_tracking_input(h, sid, ids, out_len=out_len, start=False, step=step,
                                  end=rng.random() < 0.15, stop_words=stop_words)
        elif op < 0.6:  # malformed
            bad = rng.choice([[VOCAB], [-3], [5] * session_len])
            submit_tracking_input(h, sid, bad, out_len=out_len, start=rng.random() < 0.5)
        elif op < 0.66:
            h.cancel(sid, end=rng.random() < 0.3, via_submit=rng.random() < 0.5)
        else:
            for _ in range(rng.randint(1, 3)):
                h.step(rng)
    h.run_until_idle(rng=rng)
    h.check_state()
    return h


@pytest.mark.parametrize('seed', range(5))
def test_random_stream_roomy_pool(seed):
    h = random_stream(seed, 2500, num_blocks=256, max_batch_size=6, budget=16)
    assert h.steps > 500


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('admit_horizon', [-1, 4, 32])
def test_random_stream_tiny_pool_forces_eviction_and_preemption(seed, admit_horizon):
    h = random_stream(100 + seed, 2500, num_blocks=16, max_batch_size=6, budget=10,
                      admit_horizon=admit_horizon)
    assert h.s.num_evictions() > 0
    if admit_horizon < 0:  # greedy admission; with the pool check preemption is rarer
        assert h.s.num_preemptions() > 0


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('pipelined', [False, True])
def test_random_stream_mixed_prefill_budget(seed, pipelined):
    h = random_stream(600 + seed, 2000, num_blocks=48, max_batch_size=6, budget=16, mixed_budget=5,
                      pipelined=pipelined)
    assert h.steps > 300


@pytest.mark.parametrize('seed', range(2))
def test_random_stream_whole_prefill(seed):
    random_stream(200 + seed, 1500, num_blocks=40, max_batch_size=4, budget=8, chunked=False)


@pytest.mark.parametrize('seed', range(4))
def test_random_stream_pipelined_roomy_pool(seed):
    h = random_stream(300 + seed, 2500, num_blocks=256, max_batch_size=6, budget=16, pipelined=True)
    assert h.steps > 500


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('admit_horizon', [-1, 32])
def test_random_stream_pipelined_tiny_pool(seed, admit_horizon):
    h = random_stream(400 + seed, 2500, num_blocks=16, max_batch_size=6, budget=10, pipelined=True,
                      admit_horizon=admit_horizon)
    assert h.s.num_evictions() > 0
    if admit_horizon < 0:
        assert h.s.num_preemptions() > 0


@pytest.mark.parametrize('seed', range(2))
def test_random_stream_pipelined_whole_prefill(seed):
    random_stream(500 + seed, 1500, num_blocks=40, max_batch_size=4, budget=8, chunked=False, pipelined=True)
