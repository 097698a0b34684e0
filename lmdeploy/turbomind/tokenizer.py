"""Tokenizer wrapper used by the engine, the CLIs and the Triton pre/post-processing models.

`Tokenizer(path)` picks one of two backends:

* **sentencepiece**: `path` is a `*.model` file, or a folder holding `tokenizer.model` and no
  `tokenizer_config.json`;
* **HuggingFace** (`AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`): the folder
  holds `tokenizer_config.json`, or has no `tokenizer.model`.

Both understand the chat templates' markers: `<BOS>` anywhere in the text gives a BOS token and
the text `<EOS>` on its own gives `[eos]`. Nothing else adds special tokens (the HF backend keeps
v0.0.2's one exception: the empty string is encoded with the tokenizer's special tokens).

`Tokenizer.detokenizer()` returns an `IncrementalDetokenizer` for streaming:

    detok = tokenizer.detokenizer()
    for new_ids in stream:           # any number of ids per call
        print(detok.step(new_ids), end='')
    print(detok.flush())

The concatenation of every `step` result and `flush()` equals `tokenizer.decode(all_ids)`.

This file is copied verbatim into workspaces (`triton_models/tokenizer/tokenizer.py`) and imported
by the Triton python models there: it may import only the standard library, numpy,
sentencepiece and transformers (lazily), never `lmdeploy`.
"""
from __future__ import annotations

import os
import os.path as osp
import sys
import tempfile
from typing import Iterable, List, Optional, Sequence, Union

BOS_MARK = '<BOS>'
EOS_MARK = '<EOS>'
_REPLACEMENT = '\ufffd'

__all__ = ['Tokenizer', 'SentencePieceTokenizer', 'HuggingFaceTokenizer', 'IncrementalDetokenizer',
           'TokenizerOutput']


def _as_id_list(ids) -> List[int]:
    """A flat list of python ints from a list/tuple, numpy array or torch tensor."""
    if hasattr(ids, 'tolist'):  # numpy arrays and torch tensors, without importing torch
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _is_byte_token(token: str) -> bool:
    """True for byte-fallback tokens spelled like `<0x0A>`."""
    return (len(token) == 6 and token.startswith('<0x') and token.endswith('>')
            and all(c in '0123456789abcdefABCDEF' for c in token[3:5]))


class TokenizerOutput(dict):
    """What `Tokenizer.__call__` returns: a dict with attribute access (`out.input_ids`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class SentencePieceTokenizer:
    """sentencepiece backend: v0.0.2's marker handling, no special tokens otherwise."""

    def __init__(self, model_file: str):
        from sentencepiece import SentencePieceProcessor
        self.model_file = model_file
        self.model = SentencePieceProcessor(model_file=model_file)
        self._byte_ids = None

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size()

    @property
    def bos_token_id(self) -> int:
        return self.model.bos_id()

    @property
    def eos_token_id(self) -> int:
        return self.model.eos_id()

    def encode(self, s: str) -> List[int]:
        add_bos = BOS_MARK in s
        if add_bos:
            s = s.replace(BOS_MARK, '')
        add_eos = s == EOS_MARK
        if add_eos:
            s = ''
        return self.model.Encode(s, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids) -> str:
        return self.model.Decode(_as_id_list(ids))

    def token_id(self, token: str) -> Optional[int]:
        """The id of the vocabulary piece spelled exactly `token`, else None."""
        idx = self.model.piece_to_id(token)
        if self.model.is_unknown(idx) and self.model.id_to_piece(idx) != token:
            return None
        return idx

    def detokenizer_options(self) -> dict:
        # sentencepiece decodes byte pieces character by character: a complete character never
        # changes when more bytes follow, so byte runs need no holding back.
        if self._byte_ids is None:
            self._byte_ids = frozenset(i for i in range(self.model.vocab_size()) if self.model.is_byte(i))
        return dict(byte_ids=self._byte_ids, skipped_ids=frozenset(), hold_byte_runs=False)

    def __call__(self, s: Union[str, Sequence[str]]) -> TokenizerOutput:
        if isinstance(s, str):
            return TokenizerOutput(input_ids=self.model.Encode(s))
        return TokenizerOutput(input_ids=[self.model.Encode(x) for x in s])


class HuggingFaceTokenizer:
    """transformers backend (AutoTokenizer, trust_remote_code=True)."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer
        json_file = osp.join(model_dir, 'tokenizer.json')
        had_json = osp.exists(json_file)
        if not had_json and osp.exists(osp.join(model_dir, 'tokenizer.model')):
            print('WARNING: Can not find tokenizer.json. It may take long time to initialize the '
                  'tokenizer.', file=sys.stderr)
        self.model_dir = model_dir
        self._detok_options = None
        self.model = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        if not had_json:
            self._save_tokenizer_json(json_file)

    def _save_tokenizer_json(self, json_file: str) -> None:
        """Cache the fast tokenizer next to its files so that the next load is quick.

        Best effort: skipped for slow tokenizers and read-only folders, never raises. Written
        through a temporary file and a rename, so a concurrent reader never sees half a file.
        """
        backend = getattr(self.model, 'backend_tokenizer', None)
        folder = osp.dirname(json_file)
        if backend is None or not os.access(folder, os.W_OK):
            return
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix='.tokenizer.', suffix='.json.tmp', dir=folder)
            os.close(fd)
            backend.save(tmp)
            if not osp.exists(json_file):
                os.replace(tmp, json_file)
                tmp = None
        except Exception:  # noqa: BLE001 - a cache write must never break loading
            pass
        finally:
            if tmp is not None and osp.exists(tmp):
                try:
                    os.remove(tmp)
                except OSError:
                    pass

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.model.bos_token_id

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.model.eos_token_id

    def encode(self, s: str) -> List[int]:
        if s == EOS_MARK and self.model.eos_token_id is not None:
            return [self.model.eos_token_id]
        if BOS_MARK in s:
            s = s.replace(BOS_MARK, self.model.bos_token or '')
        add_special_tokens = s == ''
        return list(self.model.encode(s, add_special_tokens=add_special_tokens))

    def decode(self, ids) -> str:
        return self.model.decode(_as_id_list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> Optional[int]:
        """The id of the vocabulary entry spelled exactly `token` (added tokens too), else None."""
        added = self.model.get_added_vocab()
        if token in added:
            return added[token]
        idx = self.model.convert_tokens_to_ids(token)
        if idx is None or (idx == self.model.unk_token_id and token != self.model.unk_token):
            return None
        return idx

    def detokenizer_options(self) -> dict:
        # HF's ByteFallback decoder turns a whole run of byte tokens into U+FFFDs when any part of
        # it is invalid, so text decoded from a run is final only once the run has ended.
        if self._detok_options is None:
            byte_ids = frozenset(i for tok, i in self.model.get_vocab().items() if _is_byte_token(tok))
            skipped = frozenset(getattr(self.model, 'all_special_ids', ()) or ())
            self._detok_options = dict(byte_ids=byte_ids, skipped_ids=skipped, hold_byte_runs=bool(byte_ids))
        return self._detok_options

    def __call__(self, s: Union[str, Sequence[str]]):
        return self.model(s, add_special_tokens=False)


class IncrementalDetokenizer:
    """Streams the text of a growing id sequence, one delta per `step`.

    Made by `Tokenizer.detokenizer()`. Call `step(new_ids)` for each batch of new ids (any
    number, also none) and `flush()` once at the end.

    Guarantees (for decoders that concatenate token texts, which sentencepiece does and HF
    tokenizers do with `clean_up_tokenization_spaces=False`):

    * `''.join(deltas) + flush()` equals `decode(all_ids)`; with `context_ids` it equals the
      text that `decode(context_ids + all_ids)` adds after `decode(context_ids)`;
    * every delta extends the text emitted so far to a prefix of the final text: a delta never
      ends inside a UTF-8 character. While the decoded text ends in U+FFFD (an incomplete
      byte-fallback sequence) it is held back until later ids complete it or show that the
      replacement character is final, or until `flush()`;
    * a step decodes a small window (the ids of the previous delta plus the pending ones), never
      the whole sequence. The window grows only while text is held back (an unfinished character;
      with HF byte-fallback tokenizers, an unfinished run of byte tokens) or while new ids decode
      to nothing (special tokens).

    Why the window is exact: decoders drop the leading space (sentencepiece's dummy prefix '▁') of
    the first piece they decode. The window therefore starts either at the true start of the
    sequence or with already-emitted ids whose own text is non-empty, so the window text and the
    text of its emitted part lose the same space and their difference is the new text. The window
    also starts only where a decode ended on a complete character, never inside a byte run.
    """

    # Pending ids after which held-back text is searched for an earlier complete boundary.
    _MAX_PENDING = 8

    def __init__(self, decode, context_ids: Iterable[int] = (), byte_ids=frozenset(),
                 skipped_ids=frozenset(), hold_byte_runs: bool = False, context_window: int = 16):
        """
        Args:
            decode: ids -> text, the tokenizer's decode.
            context_ids: ids before the streamed ones; their text is not emitted.
            byte_ids: ids of byte-fallback tokens (`<0xNN>`).
            skipped_ids: ids the decoder drops (special tokens); they do not end a byte run.
            hold_byte_runs: hold text while the ids end in a byte run (needed when the decoder
                can change earlier characters of a run, as HF's ByteFallback does).
            context_window: how many trailing context ids to keep (widened when needed).
        """
        self._decode = decode
        self._byte_ids = byte_ids
        self._skipped_ids = skipped_ids
        self._hold_byte_runs = hold_byte_runs
        self._ids: List[int] = []  # the window: emitted ids [0, _read) + pending ids [_read, ...)
        self._read = 0
        self._prefix_text = ''  # decode(self._ids[:self._read])
        context = _as_id_list(context_ids)
        if context:
            self._seed(context, context_window)

    def _in_byte_run(self, ids: List[int], end: int) -> bool:
        """Whether `ids[:end]` ends in a byte token (ignoring skipped ids after it)."""
        for i in range(end - 1, -1, -1):
            if ids[i] in self._skipped_ids:
                continue
            return ids[i] in self._byte_ids
        return False

    def _seed(self, context: List[int], window: int) -> None:
        start = max(0, len(context) - window)
        # Widen the context until its text is non-empty and it does not start inside a byte run.
        while start > 0:
            if not self._in_byte_run(context, start) and self._decode(context[start:]):
                break
            start = max(0, start - window)
        self._ids = list(context[start:])
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def _final_at(self, text: str, end: int) -> bool:
        """Whether `text` (the decode of the window up to `end`) cannot change any more."""
        if text.endswith(_REPLACEMENT):
            return False
        return not (self._hold_byte_runs and self._in_byte_run(self._ids, end))

    def step(self, new_ids) -> str:
        """Append `new_ids` (list, numpy array or tensor; may be empty) and return the new text."""
        self._ids.extend(_as_id_list(new_ids))
        end = len(self._ids)
        if end == self._read:
            return ''
        text = self._decode(self._ids)
        if not self._final_at(text, end):
            text, end = self._earlier_boundary(text)
            if end is None:
                return ''
        return self._emit(text, end)

    def flush(self) -> str:
        """Return the text still held back (e.g. an unfinished character, as U+FFFD)."""
        if len(self._ids) == self._read:
            return ''
        return self._emit(self._decode(self._ids), len(self._ids))

    def _earlier_boundary(self, text: str):
        """Held-back text: once many ids are pending, the latest earlier end whose text is final
        and a prefix of the current text (so the stream does not stall on a long run)."""
        n = len(self._ids)
        if n - self._read <= self._MAX_PENDING:
            return text, None
        for end in range(n - 1, max(self._read, n - 1 - self._MAX_PENDING), -1):
            if self._hold_byte_runs and self._in_byte_run(self._ids, end):
                continue  # cheap test first: no decode for ends inside a byte run
            part = self._decode(self._ids[:end])
            if part and self._final_at(part, end) and text.startswith(part):
                return part, end
        return text, None

    def _emit(self, text: str, end: int) -> str:
        delta = text[len(self._prefix_text):]
        # The ids just read become the next window's context when their own text is non-empty;
        # otherwise the current context stays too.
        chunk_text = self._decode(self._ids[self._read:end])
        if chunk_text:
            del self._ids[:self._read]
            self._read = end - self._read
            self._prefix_text = chunk_text
        else:
            self._read = end
            self._prefix_text = text
        return delta


class Tokenizer:
    """Tokenize/detokenize with sentencepiece or transformers (see the module docstring).

    Args:
        model_file: a `*.model` sentencepiece file (its folder is searched for HF files), or a
            folder holding `tokenizer.model` and/or HF tokenizer files.
    """

    def __init__(self, model_file: str):
        model_file = given = os.fspath(model_file)
        if model_file.endswith('.model'):
            model_folder = osp.dirname(model_file) or '.'
        else:
            model_folder = model_file
            model_file = osp.join(model_folder, 'tokenizer.model')
        if not osp.isdir(model_folder):
            raise FileNotFoundError(f'tokenizer path not found: {given}')
        config_exists = osp.exists(osp.join(model_folder, 'tokenizer_config.json'))
        model_file_exists = osp.exists(model_file)
        if config_exists or not model_file_exists:
            hf_files = ('tokenizer_config.json', 'tokenizer.json', 'config.json', 'vocab.json')
            if not any(osp.exists(osp.join(model_folder, f)) for f in hf_files):
                raise FileNotFoundError(f'no tokenizer found: {model_file} does not exist and '
                                        f'{model_folder} has no tokenizer_config.json / tokenizer.json')
            self.model = HuggingFaceTokenizer(model_folder)
        else:
            self.model = SentencePieceTokenizer(model_file)

    @property
    def backend(self) -> str:
        """'sentencepiece' or 'hf'."""
        return 'sentencepiece' if isinstance(self.model, SentencePieceTokenizer) else 'hf'

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.model.bos_token_id

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.model.eos_token_id

    def encode(self, s: str) -> List[int]:
        """Token ids of `s`: `<BOS>` gives a BOS token, `'<EOS>'` alone gives `[eos]`."""
        return self.model.encode(s)

    def decode(self, ids) -> str:
        """Text of `ids` (list, numpy array or torch tensor); HF skips special tokens."""
        return self.model.decode(ids)

    def token_id(self, token: str) -> Optional[int]:
        """The id of the single vocabulary token spelled `token` (e.g. '<|end|>'), else None."""
        return self.model.token_id(token)

    def detokenizer(self, context_ids: Iterable[int] = ()) -> IncrementalDetokenizer:
        """A streaming detokenizer (see `IncrementalDetokenizer`).

        Args:
            context_ids: ids that come before the streamed ones (e.g. the prompt). Their text is
                not emitted; they only give the first streamed token its context, so a reply that
                starts with '▁word' streams as ' word' rather than 'word'. By default the stream
                is decoded as a sequence of its own, like `decode(ids)`.
        """
        return IncrementalDetokenizer(self.model.decode, context_ids, **self.model.detokenizer_options())

    def __call__(self, s: Union[str, Sequence[str]]):
        """Encode a text or a list of texts without special tokens; the result has `.input_ids`."""
        return self.model(s)
