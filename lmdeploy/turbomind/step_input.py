"""The flat per-step plan: the contract between the C++ scheduler and the Python data plane.

Each engine step the scheduler emits one `StepInput`: B rows (sequences), each contributing
``q_len[b] >= 1`` new tokens, packed row after row into T = sum(q_len) tokens. A row is a
decode row (q_len 1, the last sampled token), a whole prompt, or one chunk of a prompt whose
earlier chunks (or earlier turns) already have their K/V in the pool. The forward writes the
new tokens' K/V into the pool, attends each new token causally over its row's whole KV, and
returns logits only for the tokens named in `sample_idx`.

Fields (all 1-D/2-D tensors on any device; the runner moves them to its device):

``input_ids``    [T] int64 (int32 accepted)
    Token ids of the new tokens, rows concatenated in row order. A negative entry ``-(j+1)``
    stands for a token the host does not know yet: entry j of ``prev_tokens``, the previous
    step's sampled tokens, still on the device (the engine plans step n+1 while step n runs).
``positions``    [T] int64
    Absolute position of each new token in its sequence (0 = the first token of the session):
    for row b, ``kv_lens[b] - q_len[b] + i`` for its i-th new token. Drives the rotary
    embedding only; attention masking uses cu_seqlens/kv_lens.
``cu_seqlens``   [B+1] int32
    Query offsets: row b's new tokens are ``input_ids[cu_seqlens[b]:cu_seqlens[b+1]]``;
    ``cu_seqlens[0] == 0``, ``cu_seqlens[B] == T``, strictly increasing (q_len >= 1).
``kv_lens``      [B] int32
    KV length of each row AFTER this step's tokens are written, i.e. cached prefix + q_len.
    New token i of row b attends to KV positions ``0 .. kv_lens[b] - q_len[b] + i`` inclusive.
``block_table``  [B, max_blocks] int32
    Row b's KV position p lives in block ``block_table[b, p // block_size]`` at offset
    ``p % block_size``. Entries at column >= ceil(kv_lens[b] / block_size) are padding and
    never read (fill them with -1). max_blocks >= ceil(max(kv_lens) / block_size).
``slot_mapping`` [T] int64
    Where each new token's K/V is written in the flattened pool ``[num_blocks * block_size]``:
    ``block_table[b, p // block_size] * block_size + p % block_size`` with p its position.
    A negative slot means "do not write" (padding tokens, e.g. CUDA-graph batch padding).
``sample_idx``   [S] int64
    Indices into the T tokens whose logits are returned, in the order of the returned rows:
    the last new token of every row that samples this step (a prefill chunk that is not the
    prompt's last samples nothing), or every position for `decode()` (v0.0.2 section 6.4).

Optional:
``prev_tokens``  [S'] int tensor on the runner's device, or None
    The previous step's sampled tokens, which negative ``input_ids`` entries refer to.

Plain ints (known to the scheduler; they save a device sync in the kernels):
``max_q_len`` = max(q_len), ``max_kv_len`` = max(kv_lens), ``num_decode`` = how many leading
rows are decode rows with q_len 1 (the scheduler puts decode rows first; 0 if unknown).

The runner returns fp32 logits ``[S, vocab_size]``, row j for token ``sample_idx[j]``.

`build_step_input` is the executable reference of this contract (the C++ Scheduler must produce
the same arrays); tests and the pure-Python driver use it.
"""
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

import torch


@dataclass
class StepInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    kv_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    sample_idx: torch.Tensor
    max_q_len: int = 0
    max_kv_len: int = 0
    num_decode: int = 0
    prev_tokens: Optional[torch.Tensor] = None

    def token_ids(self) -> torch.Tensor:
        """input_ids with every placeholder replaced by its entry of prev_tokens."""
        return resolve_input_ids(self.input_ids, self.prev_tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.kv_lens.shape[0])

    @property
    def q_lens(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device, non_blocking: bool = False) -> 'StepInput':
        """Same plan with every tensor on `device`, with the dtypes the kernels expect."""
        want = {'input_ids': torch.long, 'positions': torch.long, 'cu_seqlens': torch.int32,
                'kv_lens': torch.int32, 'block_table': torch.int32, 'slot_mapping': torch.long,
                'sample_idx': torch.long, 'prev_tokens': torch.long}
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=want[f.name], non_blocking=non_blocking)
            kwargs[f.name] = value
        out = StepInput(**kwargs)
        if not out.max_q_len or not out.max_kv_len:
            q_lens = out.q_lens
            out.max_q_len = int(q_lens.max()) if q_lens.numel() else 0
            out.max_kv_len = int(out.kv_lens.max()) if out.kv_lens.numel() else 0
        return out

    def validate(self, block_size: int, num_blocks: Optional[int] = None):
        """Check every invariant of the contract (slow; for tests and debugging)."""
        T, B = self.num_tokens, self.batch_size
        cu = self.cu_seqlens.cpu().long()
        kv = self.kv_lens.cpu().long()
        pos = self.positions.cpu().long()
        slots = self.slot_mapping.cpu().long()
        table = self.block_table.cpu().long()

        def need(cond, msg):
            if not cond:
                raise ValueError(f'invalid StepInput: {msg}')

        need(self.prev_tokens is not None or not bool((self.input_ids < 0).any()),
             'negative input_ids (placeholders) need prev_tokens')
        need(tuple(cu.shape) == (B + 1,), f'cu_seqlens shape {tuple(cu.shape)} != ({B + 1},)')
        need(int(cu[0]) == 0 and int(cu[-1]) == T, 'cu_seqlens must start at 0 and end at T')
        q_lens = cu[1:] - cu[:-1]
        need(bool((q_lens >= 1).all()), 'every row needs at least one new token')
        need(bool((kv >= q_lens).all()), 'kv_lens must be >= q_len')
        need(tuple(pos.shape) == (T,) and tuple(slots.shape) == (T,), 'positions/slots length')
        need(table.dim() == 2 and table.shape[0] == B, 'block_table must be [B, max_blocks]')
        need(table.shape[1] * block_size >= int(kv.max()) if B else True,
             'block_table too narrow for kv_lens')
        for b in range(B):
            start = int(kv[b] - q_lens[b])
            for i in range(int(q_lens[b])):
                t, p = int(cu[b]) + i, start + i
                need(int(pos[t]) == p, f'positions[{t}] = {int(pos[t])}, expected {p}')
                blk = int(table[b, p // block_size])
                need(blk >= 0 and (num_blocks is None or blk < num_blocks),
                     f'row {b} block {p // block_size} = {blk} is not a pool block')
                if int(slots[t]) >= 0:
                    need(int(slots[t]) == blk * block_size + p % block_size,
                         f'slot_mapping[{t}] = {int(slots[t])} does not match the block table')
        s = self.sample_idx.cpu().long()
        need(bool(((s >= 0) & (s < T)).all()), 'sample_idx out of range')
        d = self.num_decode
        need(0 <= d <= B and bool((q_lens[:d] == 1).all()), 'num_decode rows must have q_len 1')


def resolve_input_ids(input_ids: torch.Tensor, prev_tokens: Optional[torch.Tensor]):
    """Token ids with each placeholder ``-(j+1)`` replaced by ``prev_tokens[j]``, on the
    device and without a sync (so it can also run inside a CUDA graph)."""
    if prev_tokens is None:
        return input_ids
    src = (-1 - input_ids).clamp_(min=0)
    prev = prev_tokens.to(input_ids.dtype).index_select(0, src.clamp_(max=max(
        prev_tokens.shape[0] - 1, 0))) if prev_tokens.shape[0] else torch.zeros_like(input_ids)
    return torch.where(input_ids < 0, prev, input_ids)


@dataclass
class RowPlan:
    """One row of a step, as a scheduler sees it.

    ``tokens``: the new token ids; ``num_cached``: how many tokens of the sequence already have
    K/V in the pool (positions start there); ``block_ids``: the sequence's blocks, enough for
    num_cached + len(tokens) tokens; ``sample``: 'last' (sample the last new token), 'none'
    (an intermediate prefill chunk) or 'all' (return logits for every new token).
    """
    tokens: Sequence[int]
    num_cached: int
    block_ids: Sequence[int]
    sample: str = 'last'


def build_step_input(rows: List[RowPlan], block_size: int, device='cpu') -> StepInput:
    """Pack rows into a StepInput (the reference for what the C++ Scheduler emits)."""
    input_ids, positions, slots, sample_idx, cu, kv_lens = [], [], [], [], [0], []
    width = max([len(r.block_ids) for r in rows] + [1])
    table = torch.full((len(rows), width), -1, dtype=torch.int32)
    num_decode, leading = 0, True
    for b, row in enumerate(rows):
        n = len(row.tokens)
        if n < 1:
            raise ValueError(f'row {b} has no new tokens')
        kv_len = row.num_cached + n
        if len(row.block_ids) * block_size < kv_len:
            raise ValueError(f'row {b} has {len(row.block_ids)} blocks of {block_size} for '
                             f'{kv_len} tokens')
        if row.sample not in ('last', 'none', 'all'):
            raise ValueError(f'row {b}: sample must be last|none|all, got {row.sample!r}')
        table[b, :len(row.block_ids)] = torch.tensor(list(row.block_ids), dtype=torch.int32)
        t0 = cu[-1]
        for i, tok in enumerate(row.tokens):
            p = row.num_cached + i
            input_ids.append(int(tok))
            positions.append(p)
            slots.append(int(row.block_ids[p // block_size]) * block_size + p % block_size)
        if row.sample == 'last':
            sample_idx.append(t0 + n - 1)
        elif row.sample == 'all':
            sample_idx.extend(range(t0, t0 + n))
        cu.append(t0 + n)
        kv_lens.append(kv_len)
        if leading and n == 1:
            num_decode += 1
        else:
            leading = False
    step = StepInput(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32),
        block_table=table,
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        sample_idx=torch.tensor(sample_idx, dtype=torch.long),
        max_q_len=max(cu[i + 1] - cu[i] for i in range(len(rows))),
        max_kv_len=max(kv_lens),
        num_decode=num_decode,
    )
    return step.to(device)
