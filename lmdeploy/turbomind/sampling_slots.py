"""The running requests' sampling state, kept in flat per-slot host arrays across steps.

Building a `SamplingBatch` from request objects every step walks Python objects per row (about
a millisecond at 256 rows). Here a request gets a slot when it first samples; its parameters,
its random stream (key, counter), its bad words and, when it has a repetition penalty, its token
history live in row `slot` of numpy arrays. A step's batch is a numpy gather by the step's slot
order plus a few host-to-device copies, and while the set and order of sampling rows stays the
same (steady decoding) the device tensors of the previous step are reused: only the counters
move, on the device. Bad ids come padded with -1 to a power-of-two width (what the sampler
graphs' keys use: sampler_graphs.py), so a graph loads them with one copy.

    slots = SamplingSlots()
    s = slots.add(params, rng, history=None)     # history: token ids, only with a penalty
    batch = slots.batch(slot_idx, device)          # SamplingBatch for rows in this order
    tokens = sampler(logits, batch); slots.advance(slot_idx, batch)
    slots.extend_history(s, new_tokens)            # tokens the row got (penalty rows only)
    counter = slots.remove(s)                      # the stream's counter, for the session
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .sampling import RequestRng, SamplingBatch, SamplingParams


class SamplingSlots:

    def __init__(self, capacity: int = 64):
        self._free: List[int] = []
        self._size = 0
        self._alloc(max(1, capacity), 1)
        self._history: Dict[int, np.ndarray] = {}  # slot -> int32 buffer (penalty rows)
        self._history_len: Dict[int, int] = {}
        self._changes = 0  # bumped by add/remove: a cached batch is only valid without any
        self._cached = None  # (slot_idx, changes, device, batch)

    def _alloc(self, capacity: int, width: int):
        old = getattr(self, 'temperature', None)
        arrays = dict(temperature=np.float32, top_p=np.float32, penalty=np.float32,
                      top_k=np.int64, key=np.int64, counter=np.int64, greedy=np.bool_,
                      bad_len=np.int64)
        for name, dtype in arrays.items():
            a = np.zeros(capacity, dtype=dtype)
            if old is not None:
                a[:len(old)] = getattr(self, name)
            setattr(self, name, a)
        bad = np.full((capacity, width), -1, dtype=np.int64)
        if old is not None:
            bad[:self.bad.shape[0], :self.bad.shape[1]] = self.bad
        self.bad = bad

    def __len__(self) -> int:
        return self._size - len(self._free)

    def add(self, params: SamplingParams, rng: RequestRng,
            history: Optional[Sequence[int]] = None) -> int:
        if self._free:
            s = self._free.pop()
        else:
            s = self._size
            self._size += 1
            if s >= len(self.temperature):
                self._alloc(2 * len(self.temperature), self.bad.shape[1])
        words = list(params.bad_words)
        if len(words) > self.bad.shape[1]:  # a power of two, as the batches' widths
            self._alloc(len(self.temperature), 1 << (len(words) - 1).bit_length())
        self.temperature[s] = params.temperature
        self.top_p[s] = params.top_p
        self.penalty[s] = params.repetition_penalty
        self.top_k[s] = params.top_k
        self.key[s] = rng.key
        self.counter[s] = rng.counter
        self.greedy[s] = params.greedy
        self.bad_len[s] = len(words)
        self.bad[s] = -1
        self.bad[s, :len(words)] = words
        if params.repetition_penalty != 1.0:
            tokens = np.asarray(history if history is not None else [], dtype=np.int32)
            buf = np.empty(max(64, 2 * len(tokens)), dtype=np.int32)
            buf[:len(tokens)] = tokens
            self._history[s], self._history_len[s] = buf, len(tokens)
        self._changes += 1
        return s

    def remove(self, s: int) -> int:
        """Free slot `s`; returns its stream's counter (draws made so far)."""
        self._history.pop(s, None)
        self._history_len.pop(s, None)
        self._free.append(s)
        self._changes += 1
        return int(self.counter[s])

    def has_history(self, s: int) -> bool:
        return s in self._history

    def extend_history(self, s: int, tokens: Sequence[int]):
        buf, n = self._history[s], self._history_len[s]
        if n + len(tokens) > len(buf):
            grown = np.empty(2 * (n + len(tokens)), dtype=np.int32)
            grown[:n] = buf[:n]
            self._history[s] = buf = grown
        buf[n:n + len(tokens)] = tokens
        self._history_len[s] = n + len(tokens)

    def batch(self, idx: np.ndarray, device) -> SamplingBatch:
        """The SamplingBatch of the rows in slots `idx` (int64), on `device`."""
        device = torch.device(device)
        cached = self._cached
        if (cached is not None and cached[1] == self._changes and cached[2] == device
                and np.array_equal(cached[0], idx)):
            batch = cached[3]
            if batch.any_penalty:
                batch.seen_ids, batch.seen_lens = self._seen(idx, device)
            return batch
        batch = self._build(idx, device)
        self._cached = (idx.copy(), self._changes, device, batch)
        return batch

    def advance(self, idx: np.ndarray, batch: SamplingBatch):
        """Every row of the batch made one draw."""
        self.counter[idx] += 1
        batch.counters.add_(1)

    def _build(self, idx: np.ndarray, device: torch.device) -> SamplingBatch:
        greedy = self.greedy[idx]
        top_k, top_p = self.top_k[idx], self.top_p[idx]
        penalty = self.penalty[idx]
        sampled = ~greedy
        k_sampled = top_k[sampled]
        all_k = bool(sampled.any()) and bool((k_sampled > 0).all())
        any_penalty = bool((penalty != 1.0).any())
        width = int(self.bad_len[idx].max()) if len(idx) else 0
        width = 1 << (width - 1).bit_length() if width else 0
        floats = torch.from_numpy(np.stack([self.temperature[idx], top_p, penalty]))
        ints = torch.from_numpy(np.stack([top_k, self.key[idx], self.counter[idx]]))
        floats, ints = floats.to(device, non_blocking=True), ints.to(device, non_blocking=True)
        bad = (torch.from_numpy(self.bad[idx, :width]).to(device, non_blocking=True)
               if width else None)
        seen_ids, seen_lens = self._seen(idx, device) if any_penalty else (None, None)
        return SamplingBatch(
            temperature=floats[0], top_p=floats[1], repetition_penalty=floats[2],
            top_k=ints[0], keys=ints[1], counters=ints[2], packed_floats=floats,
            packed_ints=ints, bad_ids=bad,
            seen_ids=seen_ids, seen_lens=seen_lens,
            all_greedy=bool(greedy.all()) and len(idx) > 0,
            any_top_k=bool((k_sampled > 1).any()),
            any_top_p=bool((top_p[sampled] < 1.0).any()),
            any_penalty=any_penalty,
            max_top_k=int(k_sampled.max()) if all_k else 0)

    def _seen(self, idx: np.ndarray, device: torch.device):
        """Padded token histories [S, L] and lengths [S] (0 for rows without a penalty)."""
        lens = np.array([self._history_len.get(s, 0) for s in idx.tolist()], dtype=np.int64)
        ids = np.full((len(idx), max(1, int(lens.max()) if len(idx) else 1)), -1, dtype=np.int32)
        for row, s in enumerate(idx.tolist()):
            n = self._history_len.get(s, 0)
            if n:
                ids[row, :n] = self._history[s][:n]
        return (torch.from_numpy(ids).to(device, non_blocking=True),
                torch.from_numpy(lens).to(device, non_blocking=True))
