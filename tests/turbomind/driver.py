"""A minimal Python stand-in for the C++ scheduler: a free-list block allocator and a greedy
loop over ModelRunner, used to test the data plane end to end."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from lmdeploy.turbomind.step_input import RowPlan, build_step_input


@dataclass
class Seq:
    prompt: List[int]
    max_new: int
    chunk: Optional[int] = None  # prefill chunk size (None: whole prompt in one step)
    num_cached: int = 0
    blocks: List[int] = field(default_factory=list)
    output: List[int] = field(default_factory=list)
    done: bool = False

    @property
    def tokens(self) -> List[int]:
        return self.prompt + self.output


class Driver:

    def __init__(self, runner, eos: Optional[int] = None):
        self.runner = runner
        self.bs = runner.block_size
        self.free = list(range(runner.num_blocks))
        self.eos = runner.cfg.end_id if eos is None else eos
        # A shuffled free list, so that a sequence's blocks are not contiguous in the pool.
        g = torch.Generator().manual_seed(1)
        self.free = [self.free[i] for i in torch.randperm(len(self.free), generator=g)]

    def _grow(self, seq: Seq, n_tokens: int):
        while len(seq.blocks) * self.bs < n_tokens:
            seq.blocks.append(self.free.pop())

    def release(self, seq: Seq):
        self.free.extend(seq.blocks)
        seq.blocks = []

    def step(self, seqs: List[Seq]) -> Dict[int, torch.Tensor]:
        """One step over the given live sequences: decode rows first, then prefill chunks.
        Returns {index in seqs: logits} for the rows that sampled."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].num_cached < len(seqs[i].prompt))
        rows, sampled = [], []
        for i in order:
            s = seqs[i]
            toks = s.tokens
            todo = toks[s.num_cached:]
            if s.chunk is not None and s.num_cached < len(s.prompt):
                todo = todo[:s.chunk]
            last = s.num_cached + len(todo) == len(toks)
            self._grow(s, s.num_cached + len(todo))
            rows.append(RowPlan(todo, s.num_cached, list(s.blocks), 'last' if last else 'none'))
            if last:
                sampled.append(i)
        step = build_step_input(rows, self.bs)
        step.validate(self.bs, self.runner.num_blocks)
        logits = self.runner.run(step)
        for row, i in zip(rows, order):
            seqs[i].num_cached += len(row.tokens)
        return {i: logits[j] for j, i in enumerate(sampled)}

    def generate(self, prompts: List[List[int]], max_new: int, chunk: Optional[int] = None,
                 start_at: Optional[List[int]] = None) -> List[List[int]]:
        """Greedy generation; sequence k joins at step start_at[k] (default 0)."""
        start_at = start_at or [0] * len(prompts)
        seqs = [Seq(list(p), max_new, chunk) for p in prompts]
        t = 0
        while not all(s.done for s in seqs):
            live = [s for k, s in enumerate(seqs) if start_at[k] <= t and not s.done]
            t += 1
            if not live:
                continue
            out = self.step(live)
            for i, lg in out.items():
                s = live[i]
                tok = int(torch.argmax(lg))
                s.output.append(tok)
                if tok == self.eos or len(s.output) >= s.max_new:
                    s.done = True
                    self.release(s)
        return [s.output for s in seqs]
