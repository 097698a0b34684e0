"""The engine's batched sampler: penalties, bad words, temperature, top-k, top-p, per-request seeds.

Each engine step the runner returns fp32 logits ``[S, V]``, one row per sequence that samples;
every row carries its own request's parameters. One `Sampler` call turns them into ``S`` int64
token ids with a handful of vectorised torch ops on whatever device the logits live on (no loop
over rows or over the vocabulary, no host sync).

Semantics (LMDeploy v0.0.2, section 7.7, with the deliberate fixes noted):

1. **Repetition penalty** (multiplicative, v0.0.2 / CTRL): for every token id already in the
   sequence (prompt and generated, each id once), a positive logit is divided by the penalty, a
   negative one multiplied by it. 1.0 is off.
2. **Bad words**: the banned ids get ``-inf`` (also for greedy rows).
3. **Greedy rows** (``top_k == 1`` or ``temperature == 0``) take the argmax of the logits after
   1-2 (the first index on ties); the steps below do not apply to them.
4. **Temperature** divides the logits.
5. **Top-k** (``top_k > 0``) keeps the k largest logits; **top-p** (``top_p < 1``) then keeps
   the smallest prefix of the remaining tokens, in descending probability (probabilities
   renormalised within the top k, after temperature), whose mass reaches ``top_p``; the top
   token is always kept. Both are applied as value thresholds, so tokens *tied* with the last
   kept one are kept too (like transformers' `TopKLogitsWarper`); with distinct logits this is
   exactly "the top k" / "the smallest nucleus".
6. **Sampling** is by inverse CDF, in vocabulary order, over the softmax of the surviving
   logits, with one uniform per row drawn from the row's own counter-based stream. Working in
   vocabulary order (the sort is used only to find the thresholds) makes the result independent
   of how a sort or top-k kernel orders ties, hence of the batch around the row.

v0.0.2 also accepted ``top_k == 0 and top_p == 0`` as greedy; `SamplingParams.validate` rejects
``top_p == 0``; `SamplingParams.from_v002` maps that pair (and ``top_p <= 0`` in general) the
way v0.0.2 did, for the compatibility surface.

Per-request random streams
--------------------------
A row's k-th draw is a pure function of ``(seed, k)``: ``u = uniform(seed, counter)`` with a
SplitMix64-style hash (`random_uniform` on device, `uniform_reference` in plain Python, bit-for-bit
the same; the per-request part, ``stream_key(seed)``, is hashed once on the host). So a seeded
request's k-th token depends only on (seed, k, its logits), never on which other rows share the
batch or where it sits, and it is cheap on CPU and CUDA alike (a dozen int64 element-wise ops
over ``[S]``, no generator objects, no host sync).

`RequestRng` is the small per-request state the engine keeps: ``(seed, counter)``. A request
without ``random_seed`` gets a fresh 64-bit seed drawn once, at admission, from a process-level
source (`fresh_seed`; OS entropy unless `seed_process_rng` made it deterministic), so two
unseeded requests differ and no stale state is ever reused (v0.0.2 bug 13.12). ``state()`` /
``from_state()`` let the engine save the stream in the session so a later turn continues it
(v0.0.2 section 7.3 step 6). An engine that keeps only the seed per session can instead use
the token position as the counter (the stream then also survives eviction and re-prefill).

API
---
- ``SamplingParams(top_k=40, top_p=0.8, temperature=0.8, repetition_penalty=1.0,
  bad_words=(), random_seed=None)`` (defaults: v0.0.2's ``stream_infer``); ``validate()``.
- ``RequestRng(seed=None, counter=0)``.
- ``SamplingBatch`` holds the per-row tensors (the form a persistent batch can keep on device and
  update in place); ``SamplingBatch.build(params, rngs, seen_ids=None, seen_lens=None,
  device=None)`` makes one from per-request objects.  The engine does not rebuild it every step: `sampling_slots.SamplingSlots`
  keeps the running requests' parameters in per-slot arrays and reuses the device batch while
  the rows stay the same.
- ``Sampler()(logits, batch) -> LongTensor[S]``: the vectorised core (no RNG state touched);
  ``Sampler().sample(logits, params, rngs, seen_ids=None, seen_lens=None)`` builds the batch,
  samples and advances every row's `RequestRng` by one.

Tokens already in the sequence (for the repetition penalty) come as a padded id tensor
``seen_ids [S, L]`` (any integer dtype, any device) plus optional ``seen_lens [S]``: entries at
column ``>= seen_lens[row]``, negative ids and ids ``>= V`` are ignored. An engine that keeps
each slot's whole token buffer on device (as v0.0.2's ``output_ids``) passes a view of it and
the lengths; rows whose penalty is 1.0 may pass length 0. When no row has a penalty the ids are
not needed at all (``SamplingBatch.any_penalty`` is False and they are never read).
"""
import math
import numbers
import random
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch

from .kernels.sample import ban_tokens

__all__ = ['SamplingParams', 'RequestRng', 'SamplingBatch', 'Sampler', 'fresh_seed',
           'seed_process_rng', 'stream_key', 'random_uniform', 'uniform_reference']

_U64 = 1 << 64
_M64 = _U64 - 1


def _to_s64(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned value ``x mod 2**64``."""
    x &= _M64
    return x - _U64 if x >= (1 << 63) else x


# SplitMix64 constants (Steele, Lea, Flood 2014), as int64 bit patterns for torch.
_GAMMA = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_GAMMA_S, _C1_S, _C2_S = _to_s64(_GAMMA), _to_s64(_C1), _to_s64(_C2)
_UNIFORM_BITS = 23  # u = (bits + 0.5) / 2**23: exact in fp32, strictly inside (0, 1)


# ----------------------------------------------------------------------------- parameters

def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """One request's sampling parameters (defaults: v0.0.2 ``stream_infer``).

    top_k: int >= 0, 0 = off, 1 = greedy. top_p: float in (0, 1], 1 = off.
    temperature: float >= 0, 0 = greedy. repetition_penalty: float > 0, 1 = off.
    bad_words: token ids that are never sampled. random_seed: None or an int in [0, 2**64).
    """
    top_k: int = 40
    top_p: float = 0.8
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    bad_words: Sequence[int] = field(default_factory=tuple)
    random_seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0

    def validate(self, vocab_size: Optional[int] = None) -> 'SamplingParams':
        """Raise ValueError (one line) on an invalid value; return self.
        With `vocab_size`, bad word ids must also be < vocab_size."""
        k, p, t, r = self.top_k, self.top_p, self.temperature, self.repetition_penalty
        if not _is_int(k):
            raise ValueError(f'top_k must be an integer >= 0, got {k!r}')
        if k < 0:
            raise ValueError(f'top_k must be >= 0 (0 disables it), got {k}')
        if not _is_real(p) or not (0.0 < p <= 1.0):  # also rejects NaN
            raise ValueError(f'top_p must be in (0, 1], got {p!r}')
        if not _is_real(t) or math.isnan(t) or t < 0:
            raise ValueError(f'temperature must be >= 0 (0 = greedy), got {t!r}')
        if math.isinf(t):
            raise ValueError(f'temperature must be finite, got {t!r}')
        if not _is_real(r) or math.isnan(r) or r <= 0:
            raise ValueError(f'repetition_penalty must be > 0 (1 disables it), got {r!r}')
        if math.isinf(r):
            raise ValueError(f'repetition_penalty must be finite, got {r!r}')
        for w in self.bad_words:
            if not _is_int(w) or w < 0 or (vocab_size is not None and w >= vocab_size):
                lim = f' and < vocab_size {vocab_size}' if vocab_size is not None else ''
                raise ValueError(f'bad_words must be token ids >= 0{lim}, got {w!r}')
        s = self.random_seed
        if s is not None and (not _is_int(s) or not (0 <= s < _U64)):
            raise ValueError(f'random_seed must be None or an integer in [0, 2**64), got {s!r}')
        return self

    @classmethod
    def from_v002(cls, top_k: int = 40, top_p: float = 0.8, temperature: float = 0.8,
                  repetition_penalty: float = 1.0, bad_words: Sequence[int] = (),
                  random_seed: Optional[int] = None) -> 'SamplingParams':
        """v0.0.2's reading of the runtime values: ``top_p`` outside (0, 1) is no nucleus
        truncation, and ``top_k == 0 and top_p == 0`` is greedy (treated as top_k = 1)."""
        if _is_real(top_p) and top_p <= 0:
            if top_k == 0:
                top_k = 1
            top_p = 1.0
        return cls(top_k, top_p, temperature, repetition_penalty, tuple(bad_words), random_seed)


# ----------------------------------------------------------------------------- random streams

_proc_lock = threading.Lock()
_proc_rng: random.Random = random.SystemRandom()


def seed_process_rng(seed: Optional[int] = None) -> None:
    """Make the process-level seed source deterministic (`seed`), or OS entropy again (None).
    Only unseeded requests draw from it, once each, at admission."""
    global _proc_rng
    with _proc_lock:
        _proc_rng = random.SystemRandom() if seed is None else random.Random(seed)


def fresh_seed() -> int:
    """A new 64-bit seed from the process-level source."""
    with _proc_lock:
        return _proc_rng.getrandbits(64)


def _mix64_py(z: int) -> int:
    z &= _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def uniform_reference(seed: int, counter: int) -> float:
    """Plain-Python definition of draw number `counter` of stream `seed`, in (0, 1):
    ``h = mix64(mix64(seed) + (counter + 1) * GAMMA)``, ``u = (h >> 41 + 0.5) / 2**23``."""
    h = _mix64_py(_mix64_py(seed) + (counter + 1) * _GAMMA)
    return ((h >> (64 - _UNIFORM_BITS)) + 0.5) / (1 << _UNIFORM_BITS)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64 in torch on CPU and CUDA: the uint64 product's bits.
    z = (z ^ _srl(z, 30)) * _C1_S
    z = (z ^ _srl(z, 27)) * _C2_S
    return z ^ _srl(z, 31)


def stream_key(seed: int) -> int:
    """The key of stream `seed` (uint64) as the int64 bit pattern a tensor carries:
    ``mix64(seed)``, computed once per request on the host so a step hashes only once."""
    return _to_s64(_mix64_py(seed))


def random_uniform(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """fp32 ``[S]`` in (0, 1): draw ``counters[i]`` of the stream with key ``keys[i]``
    (`stream_key` of its seed; int64 tensors). Equals `uniform_reference` exactly; a dozen
    element-wise int64 ops on the keys' device, no sync."""
    keys = keys.to(torch.int64)
    counters = counters.to(device=keys.device, dtype=torch.int64)
    h = _mix64(keys + (counters + 1) * _GAMMA_S)
    bits = _srl(h, 64 - _UNIFORM_BITS)
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << _UNIFORM_BITS))


class RequestRng:
    """A request's random stream: ``seed`` (uint64) and ``counter`` (draws made so far).

    ``RequestRng(None)`` draws a fresh seed (do this once, at admission). Save ``state()`` with the
    session and rebuild with ``RequestRng.from_state(state)`` to continue the stream next turn."""
    __slots__ = ('seed', 'counter', 'key')

    def __init__(self, seed: Optional[int] = None, counter: int = 0):
        if seed is None:
            seed = fresh_seed()
        if not _is_int(seed) or not (0 <= seed < _U64):
            raise ValueError(f'random_seed must be None or an integer in [0, 2**64), got {seed!r}')
        if not _is_int(counter) or counter < 0:
            raise ValueError(f'RNG counter must be an integer >= 0, got {counter!r}')
        self.seed = int(seed)
        self.counter = int(counter)
        self.key = stream_key(self.seed)  # int64 bit pattern of mix64(seed), for the batch

    def state(self) -> Tuple[int, int]:
        return (self.seed, self.counter)

    @classmethod
    def from_state(cls, state: Tuple[int, int]) -> 'RequestRng':
        seed, counter = state
        return cls(seed, counter)

    def advance(self, n: int = 1) -> None:
        self.counter += n

    def next_uniform(self) -> float:
        """Draw on the host (the same value the sampler would use) and advance."""
        u = uniform_reference(self.seed, self.counter)
        self.counter += 1
        return u

    def __repr__(self) -> str:
        return f'RequestRng(seed={self.seed}, counter={self.counter})'


# ----------------------------------------------------------------------------- batch

@dataclass
class SamplingBatch:
    """Per-row sampling inputs for ``S`` rows (tensors on the logits' device, or moved there).

    ``temperature``/``top_p``/``repetition_penalty``: fp32 [S]; ``top_k``: int64 [S] (0 = off);
    ``keys``: int64 [S] (`stream_key` of each row's seed); ``counters``: int64 [S] (which draw of
    the stream);
    ``bad_ids``: optional [S, W] padded with -1; ``seen_ids``: optional [S, L] and
    ``seen_lens``: optional [S] (see the module doc).

    Host-side hints, computed by `build` from the parameters (so the sampler needs no sync to skip
    work); if you build a batch by hand, set them conservatively (True / 0 is always correct):
    ``all_greedy``: every row is greedy; ``any_top_k``: some row has top_k > 1;
    ``any_top_p``: some row has top_p < 1; ``any_penalty``: some row has a penalty != 1;
    ``max_top_k``: the largest top_k if every non-greedy row has 0 < top_k, else 0.

    Optional ``packed_floats`` fp32 [3, S] and ``packed_ints`` int64 [3, S]: tensors whose rows
    the six per-row fields are views of (temperature, top_p, repetition_penalty and top_k, keys,
    counters; `SamplingSlots` builds batches so), letting a consumer copy two tensors instead of
    six (`packed`). The sampler itself never reads them.
    """
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    keys: torch.Tensor
    counters: torch.Tensor
    bad_ids: Optional[torch.Tensor] = None
    seen_ids: Optional[torch.Tensor] = None
    seen_lens: Optional[torch.Tensor] = None
    all_greedy: bool = False
    any_top_k: bool = True
    any_top_p: bool = True
    any_penalty: bool = True
    max_top_k: int = 0
    packed_floats: Optional[torch.Tensor] = None
    packed_ints: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        return int(self.temperature.shape[0])

    def packed(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(packed_floats, packed_ints)`` while the six per-row fields are still their rows
        (a field replaced since would otherwise be missed), else None."""
        floats, ints = self.packed_floats, self.packed_ints
        if floats is None or ints is None:
            return None
        for packed, fields in ((floats, (self.temperature, self.top_p, self.repetition_penalty)),
                               (ints, (self.top_k, self.keys, self.counters))):
            if packed.dim() != 2 or packed.shape[0] != 3:
                return None
            base, row = packed.data_ptr(), packed.stride(0) * packed.element_size()
            for r, t in enumerate(fields):
                if (t.data_ptr() != base + r * row or t.dtype != packed.dtype
                        or t.shape != packed.shape[1:] or t.stride() != packed.stride()[1:]):
                    return None
        return floats, ints

    @classmethod
    def build(cls, params: Sequence[SamplingParams], rngs: Sequence[RequestRng],
              seen_ids: Union[None, torch.Tensor, Sequence[Sequence[int]]] = None,
              seen_lens: Optional[torch.Tensor] = None,
              device: Union[None, str, torch.device] = None) -> 'SamplingBatch':
        """A batch from per-row `params` and `rngs` (each row's current counter is used; the RNGs
        are not advanced). `seen_ids`: a padded tensor (with optional `seen_lens`) or a list of
        id lists; only needed when some row has a repetition penalty. Parameters are assumed
        valid (`SamplingParams.validate` at admission)."""
        S = len(params)
        if len(rngs) != S:
            raise ValueError(f'{S} rows of params but {len(rngs)} RNGs')
        dev = torch.device(device) if device is not None else torch.device('cpu')

        def t(vals, dtype):
            return torch.tensor(vals, dtype=dtype).to(dev, non_blocking=True)

        greedy = [p.greedy for p in params]
        sampled = [p for p, g in zip(params, greedy) if not g]
        any_penalty = any(p.repetition_penalty != 1.0 for p in params)
        all_k = bool(sampled) and all(p.top_k > 0 for p in sampled)
        bad = None
        W = max((len(p.bad_words) for p in params), default=0)
        if W:
            bad = t([list(p.bad_words) + [-1] * (W - len(p.bad_words)) for p in params],
                    torch.int64)
        if seen_ids is not None and not isinstance(seen_ids, torch.Tensor):
            if seen_lens is not None:
                raise ValueError('seen_lens goes with a padded seen_ids tensor, not a list')
            if len(seen_ids) != S:
                raise ValueError(f'{S} rows of params but {len(seen_ids)} rows of seen_ids')
            L = max((len(s) for s in seen_ids), default=0)
            seen_ids = t([list(s) + [-1] * (L - len(s)) for s in seen_ids], torch.int64)
        elif seen_ids is not None:
            if seen_ids.dim() != 2 or seen_ids.shape[0] != S:
                raise ValueError(f'seen_ids must be [S={S}, L], got {tuple(seen_ids.shape)}')
        if any_penalty and seen_ids is None:
            raise ValueError('a row has a repetition penalty but seen_ids was not given')
        return cls(
            temperature=t([float(p.temperature) for p in params], torch.float32),
            top_k=t([int(p.top_k) for p in params], torch.int64),
            top_p=t([float(p.top_p) for p in params], torch.float32),
            repetition_penalty=t([float(p.repetition_penalty) for p in params], torch.float32),
            keys=t([r.key for r in rngs], torch.int64),
            counters=t([r.counter for r in rngs], torch.int64),
            bad_ids=bad, seen_ids=seen_ids if any_penalty else None,
            seen_lens=seen_lens if any_penalty else None,
            all_greedy=all(greedy) and S > 0,
            any_top_k=any(p.top_k > 1 for p in sampled),
            any_top_p=any(p.top_p < 1.0 for p in sampled),
            any_penalty=any_penalty,
            max_top_k=max(p.top_k for p in sampled) if all_k else 0)


# ----------------------------------------------------------------------------- sampler

def _rowwise_update(x: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, fn) -> torch.Tensor:
    """Out of place: ``x[r, ids[r, j]] = fn(x[r, ids[r, j]], r)`` for every valid (r, j), each
    distinct id once. Invalid entries are redirected to the row's first valid id (a duplicate
    write of the same value), or, in a row with none, to column 0 with its own value (a no-op),
    so the scatter is deterministic despite duplicate indices."""
    V = x.shape[1]
    ids = ids.to(device=x.device, dtype=torch.int64)
    valid = valid & (ids >= 0) & (ids < V)
    has_any = valid.any(dim=1, keepdim=True)
    first = torch.gather(ids, 1, valid.to(torch.int8).argmax(dim=1, keepdim=True))
    first = torch.where(has_any, first, torch.zeros_like(first))
    idx = torch.where(valid, ids, first)
    old = torch.gather(x, 1, idx)
    new = torch.where(has_any, fn(old), old)
    return x.scatter(1, idx, new)


class Sampler:
    """Batched sampler; see the module doc for the semantics.

    `topk_fast_path`: when every sampled row has 0 < top_k <= this, the thresholds come from
    ``torch.topk`` over ``max_top_k`` columns instead of a full sort of the vocabulary (same
    result: only the sorted *values* are used).

    The last step (bad words, the argmax or the draw) is the `sample_tokens` kernel of
    `kernels` (the runner passes its own choice; default: `kernels.select` for the logits'
    device: one Triton launch on CUDA, the torch reference elsewhere); the penalty and the
    top-k/top-p thresholds stay torch ops."""

    def __init__(self, topk_fast_path: int = 1024, kernels=None):
        self.topk_fast_path = topk_fast_path
        self._kernels = kernels
        self._by_device = {}

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        return self.forward(logits, batch)

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               rngs: Sequence[RequestRng],
               seen_ids: Union[None, torch.Tensor, Sequence[Sequence[int]]] = None,
               seen_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Build the batch on the logits' device, sample, and advance every RNG by one."""
        batch = SamplingBatch.build(params, rngs, seen_ids, seen_lens, device=logits.device)
        out = self.forward(logits, batch)
        for r in rngs:
            r.counter += 1
        return out

    def kernels_for(self, device: torch.device):
        if self._kernels is not None:
            return self._kernels
        key = str(device)
        if key not in self._by_device:
            from .kernels import select
            self._by_device[key] = select(device)
        return self._by_device[key]

    @staticmethod
    def _penalised(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """fp32 ``[S, V]``: `logits` after the repetition penalty (step 1; `logits` itself
        when it is fp32 and no row has a penalty)."""
        x = logits.to(torch.float32)
        if batch.any_penalty and batch.seen_ids is not None and batch.seen_ids.numel():
            dev = logits.device
            ids = batch.seen_ids.to(dev, non_blocking=True)
            valid = torch.ones_like(ids, dtype=torch.bool)
            if batch.seen_lens is not None:
                cols = torch.arange(ids.shape[1], device=dev)
                lens = batch.seen_lens.to(dev, non_blocking=True).to(torch.int64)
                valid = cols[None, :] < lens[:, None]
            rp = batch.repetition_penalty.to(dev, non_blocking=True).to(torch.float32)[:, None]
            x = _rowwise_update(x, ids, valid, lambda v: torch.where(v > 0, v / rp, v * rp))
        return x

    @staticmethod
    def _bad_ids(batch: SamplingBatch, device) -> Optional[torch.Tensor]:
        if batch.bad_ids is None or not batch.bad_ids.numel():
            return None
        return batch.bad_ids.to(device, non_blocking=True)

    def process_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """fp32 ``[S, V]``: `logits` after the repetition penalty and the bad words (steps 1-2;
        what greedy rows take the argmax of). `logits` itself is not modified."""
        x = self._penalised(logits, batch)
        bad = self._bad_ids(batch, logits.device)
        return x if bad is None else ban_tokens(x, bad)

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """int64 token ids ``[S]`` on the logits' device. `logits` ``[S, V]`` is not modified."""
        if logits.dim() != 2:
            raise ValueError(f'logits must be [S, V], got {tuple(logits.shape)}')
        S, V = logits.shape
        if batch.size != S:
            raise ValueError(f'logits have {S} rows but the sampling batch has {batch.size}')
        dev = logits.device
        if S == 0:
            return torch.empty(0, dtype=torch.int64, device=dev)
        sample_tokens = self.kernels_for(dev).sample_tokens
        x = self._penalised(logits, batch)
        bad = self._bad_ids(batch, dev)
        # 2-3. bad words, greedy rows
        if batch.all_greedy:
            return sample_tokens(x, bad)

        def on(t):
            return t.to(dev, non_blocking=True)

        top_k = on(batch.top_k).to(torch.int64)
        temp = on(batch.temperature).to(torch.float32)
        greedy = (top_k == 1) | (temp == 0)
        keys, counters = on(batch.keys), on(batch.counters)
        if not (batch.any_top_k or batch.any_top_p):
            # 2-6 in one kernel: bad words, greedy rows, temperature, the draw
            return sample_tokens(x, bad, temp, greedy, keys, counters)
        if bad is not None:
            x = ban_tokens(x, bad)
        # 4. temperature (greedy rows divide by 1: their draw is discarded)
        temp = torch.where(greedy, torch.ones_like(temp), temp.clamp(min=1e-6))
        x = x / temp[:, None]
        # 5. top-k / top-p as value thresholds (a greedy row keeps its maximum, so its argmax
        # below is the one of its untempered logits)
        k_fast = batch.max_top_k
        if 0 < k_fast <= self.topk_fast_path and k_fast < V:
            vals = torch.topk(x, k_fast, dim=1, largest=True, sorted=True).values
        else:
            vals = torch.sort(x, dim=1, descending=True).values
        C = vals.shape[1]
        k_eff = torch.where(top_k > 0, top_k.clamp(max=C), torch.full_like(top_k, C))
        ranks = torch.arange(C, device=dev)
        vals = vals.masked_fill(ranks[None, :] >= k_eff[:, None], -math.inf)
        n = k_eff
        if batch.any_top_p:
            top_p = on(batch.top_p).to(torch.float32)
            p = torch.softmax(vals, dim=1)
            cum = torch.cumsum(p, dim=1)
            # ranks whose exclusive prefix mass is < top_p: rank 0, plus one per cum < top_p
            n_p = (cum < top_p[:, None]).sum(dim=1) + 1
            n = torch.minimum(n, n_p)
        n = n.clamp(min=1)
        thr = torch.gather(vals, 1, (n - 1)[:, None])
        x = x.masked_fill(x < thr, -math.inf)
        # 6. inverse CDF in vocabulary order with the row's own uniform
        return sample_tokens(x, None, None, greedy, keys, counters)
