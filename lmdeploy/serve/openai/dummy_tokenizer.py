"""The tokenizer of a `--dummy` server: random weights come without one.

Byte-level: ids 0..2 are the special tokens (unk, BOS, EOS, as in Llama), ids 3..258 are the
256 UTF-8 bytes, so any text encodes (``<BOS>`` first, as the workspace tokenizers do) and a
reply made of byte ids decodes to text. Every other id decodes to ``<id>``: a random model
mostly samples those, and each of them is one visible piece of text, so a streamed reply has one
chunk per token (what `profile_restful_api.py` times). Prompts given as token ids (the synthetic
B3/B4 set) are passed through untouched.
"""
from __future__ import annotations

from typing import Iterable, List

from lmdeploy.turbomind.tokenizer import IncrementalDetokenizer

SPECIAL = 3  # unk, bos, eos


class ByteTokenizer:

    def __init__(self, vocab_size: int, bos_id: int = 1, eos_id: int = 2):
        if vocab_size < SPECIAL + 256:
            raise ValueError(f'a byte-level tokenizer needs a vocabulary of at least '
                             f'{SPECIAL + 256} ids, got {vocab_size}')
        self.vocab_size = vocab_size
        self.bos_token_id = bos_id
        self.eos_token_id = eos_id
        self._byte_ids = frozenset(range(SPECIAL, SPECIAL + 256))

    def encode(self, s: str) -> List[int]:
        ids = [self.bos_token_id]
        if s.startswith('<BOS>'):  # the chat templates' spelling of BOS
            s = s[len('<BOS>'):]
        return ids + [b + SPECIAL for b in s.encode('utf-8')]

    def decode(self, ids) -> str:
        out, run = [], bytearray()
        for i in (int(t) for t in ids):
            if SPECIAL <= i < SPECIAL + 256:
                run.append(i - SPECIAL)
                continue
            if run:
                out.append(run.decode('utf-8', errors='replace'))
                run = bytearray()
            if i >= SPECIAL + 256:
                out.append(f'<{i}>')
        if run:
            out.append(run.decode('utf-8', errors='replace'))
        return ''.join(out)

    def detokenizer(self, context_ids: Iterable[int] = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.decode, context_ids, byte_ids=self._byte_ids,
                                      skipped_ids=frozenset(range(SPECIAL)))
