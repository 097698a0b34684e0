"""One chat conversation on a transformers causal LM: template, KV cache, sampling, streaming.

The token history of a conversation is what the TurboMind engine keeps (and what MiniChat was
trained on): encode(first-turn prompt) + the model's own reply ids, stop token included +
encode(next-turn prompt) + ...  With a Jinja `chat_template` from the tokenizer config the
history is instead the tokenized rendering of all messages so far.

The KV cache (`past_key_values`, called `cache` by newer transformers) survives between turns:
a turn feeds only the ids after the longest prefix the cache already holds, so its reply equals
`model.generate` on the whole history. Settings change with `config set key=value`.
"""
from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass, fields
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple


class ConfigError(ValueError):
    """A `config set` command that cannot be applied (the message is one line)."""


class ContextFull(RuntimeError):
    """The conversation does not fit the model's context any more."""


@dataclass
class GenerationSettings:
    """Sampling settings of a chat; greedy when temperature is 0 or top_k is 1."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    def describe(self) -> str:
        return ', '.join(f'{name}={getattr(self, name)!r}' for name in self.names())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_setting(name: str, value):
    """The validated value of setting `name` (ints for counts, floats for the rest)."""
    if name not in GenerationSettings.names():
        raise ConfigError(f'unknown setting {name!r}; settings: {", ".join(GenerationSettings.names())}')
    if name in ('max_new_tokens', 'top_k', 'seed'):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f'{name} must be an integer, got {value!r}')
        if name == 'max_new_tokens' and value < 1:
            raise ConfigError(f'max_new_tokens must be at least 1, got {value!r}')
        if name == 'top_k' and value < 0:
            raise ConfigError(f'top_k must be 0 (off) or more, got {value!r}')
        if name == 'seed' and value < 0:
            raise ConfigError(f'seed must not be negative, got {value!r}')
        return value
    if not _number(value):
        raise ConfigError(f'{name} must be a number, got {value!r}')
    value = float(value)
    if name == 'temperature' and not value >= 0:
        raise ConfigError(f'temperature must be 0 (greedy) or more, got {value!r}')
    if name == 'top_p' and not 0 < value <= 1:
        raise ConfigError(f'top_p must be in (0, 1], got {value!r}')
    if name == 'repetition_penalty' and not value > 0:
        raise ConfigError(f'repetition_penalty must be positive, got {value!r}')
    return value


_ASSIGNMENT = re.compile(r'([A-Za-z_]\w*)\s*=')


def parse_config_set(text: str) -> List[Tuple[str, object]]:
    """Parse the `key=value [key=value ...]` part of a `config set` command.

    Values are Python literals (`ast.literal_eval`, never `eval`); each is checked by
    `check_setting`. Raises ConfigError with a one-line message.
    """
    text = text.strip()
    if not text:
        raise ConfigError('usage: config set key=value [key=value ...]')
    matches = list(_ASSIGNMENT.finditer(text))
    # Assignments must tile the text: 'a=1 b=2' but not 'x a=1' or '=1'.
    if not matches or matches[0].start() != 0:
        raise ConfigError(f'cannot parse {text!r}; usage: config set key=value [key=value ...]')
    pairs = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        raw = text[match.end():end].strip().rstrip(',').strip()
        name = match.group(1)
        if not raw:
            raise ConfigError(f'no value for {name!r}; usage: config set {name}=VALUE')
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ConfigError(f'{raw!r} is not a literal value for {name}') from None
        pairs.append((name, check_setting(name, value)))
    return pairs


# ------------------------------------------------------------------------------------------
# Conversations: how the history becomes token ids.


class RegistryConversation:
    """History rendered with a template of `lmdeploy.model` (turn by turn, engine style)."""

    def __init__(self, template, tokenizer, name: str):
        self.template = template
        self.tokenizer = tokenizer
        self.name = name
        self.ids: List[int] = []

    def describe(self) -> str:
        return self.name

    def reset(self) -> None:
        self.ids = []

    def prompt_ids(self, prompt: str) -> List[int]:
        """The ids the model sees for the whole conversation up to this new user turn."""
        turn = self.template.get_prompt(prompt, sequence_start=not self.ids)
        return self.ids + list(self.tokenizer.encode(turn))

    def add_turn(self, prompt: str, prompt_ids: List[int], reply_ids: List[int], reply: str) -> None:
        self.ids = list(prompt_ids) + list(reply_ids)

    def stop_ids(self) -> List[int]:
        return list(self.template.stop_words_for(self.tokenizer) or [])


class HFTemplateConversation:
    """History rendered with the Jinja `chat_template` of a Hugging Face tokenizer config."""

    def __init__(self, hf_tokenizer):
        self.hf_tokenizer = hf_tokenizer
        self.messages: List[Dict[str, str]] = []
        self.ids: List[int] = []

    def describe(self) -> str:
        return 'chat_template'

    def reset(self) -> None:
        self.messages = []
        self.ids = []

    def prompt_ids(self, prompt: str) -> List[int]:
        messages = self.messages + [{'role': 'user', 'content': prompt}]
        text = self.hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.hf_tokenizer.encode(text, add_special_tokens=False))

    def add_turn(self, prompt: str, prompt_ids: List[int], reply_ids: List[int], reply: str) -> None:
        self.messages += [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': reply}]
        self.ids = list(prompt_ids) + list(reply_ids)

    def stop_ids(self) -> List[int]:
        return []


# ------------------------------------------------------------------------------------------


def _cache_arg(model) -> str:
    """transformers renamed forward's `past_key_values` to `cache`; use what this model takes."""
    params = inspect.signature(type(model).forward).parameters
    return 'cache' if 'cache' in params and 'past_key_values' not in params else 'past_key_values'


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    """A conversation with one model; `chat(prompt)` streams the reply's text.

    Args:
        model: a transformers causal LM (for tensor parallelism, the module DeepSpeed sharded).
        tokenizer: `lmdeploy.turbomind.tokenizer.Tokenizer`.
        conversation: RegistryConversation or HFTemplateConversation.
        stop_ids: ids that end a reply (EOS and the template's stop words).
        settings: GenerationSettings (changed in place by `apply`).
        max_length: the model's context length; a turn never goes beyond it.
        sync_token: with several ranks, makes every rank continue with rank 0's token.
        vocab_limit: how many ids the tokenizer can decode; when the model's embedding is padded
            beyond it, the extra ids are never sampled.
    """

    def __init__(self, model, tokenizer, conversation, stop_ids: Sequence[int],
                 settings: Optional[GenerationSettings] = None, max_length: Optional[int] = None,
                 sync_token: Optional[Callable[[int], int]] = None, vocab_limit: Optional[int] = None):
        import torch
        self.torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self.conversation = conversation
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.settings = settings or GenerationSettings()
        self.max_length = max_length
        self.sync_token = sync_token
        self.vocab_limit = vocab_limit
        self.device = next(model.parameters()).device
        self._cache_arg = _cache_arg(model)
        self._logits_to_keep = 'logits_to_keep' in inspect.signature(type(model).forward).parameters
        self.cache = None
        self.cached_ids: List[int] = []  # the ids whose keys/values are in self.cache
        self.last_reply_ids: List[int] = []
        self._seed_generator()

    # -- settings ---------------------------------------------------------------------------

    def _seed_generator(self) -> None:
        self.generator = self.torch.Generator(device=self.device)
        self.generator.manual_seed(self.settings.seed)

    def apply(self, pairs: Sequence[Tuple[str, object]]) -> List[str]:
        """Apply validated (name, value) pairs; returns one line per setting that was given."""
        lines = []
        for name, value in pairs:
            old = getattr(self.settings, name)
            setattr(self.settings, name, value)
            if name == 'seed':
                self._seed_generator()
            lines.append(f'set {name} = {value!r}' + ('' if old == value else f' (was {old!r})'))
        return lines

    # -- conversation -----------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new conversation (drops the history and the KV cache)."""
        self.conversation.reset()
        self.cache = None
        self.cached_ids = []

    def _forward(self, ids: List[int]):
        torch = self.torch
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        kwargs = {self._cache_arg: self.cache, 'use_cache': True}
        if self._logits_to_keep:
            kwargs['logits_to_keep'] = 1
        out = self.model(input_ids=input_ids, **kwargs)
        cache = getattr(out, 'cache', None)
        self.cache = cache if cache is not None else out.past_key_values
        self.cached_ids.extend(ids)
        return out.logits[0, -1].float()

    def _feed(self, ids: List[int]):
        """Logits after `ids`, reusing the cached prefix (cropping the cache where they differ)."""
        keep = min(_common_prefix(self.cached_ids, ids), len(ids) - 1)
        if keep < len(self.cached_ids):
            if not (keep > 0 and self._crop(len(self.cached_ids) - keep)):
                self.cache, self.cached_ids, keep = None, [], 0
            else:
                del self.cached_ids[keep:]
        return self._forward(ids[keep:])

    def _crop(self, drop: int) -> bool:
        """Drop the last `drop` positions of the cache; False where the cache cannot."""
        crop = getattr(self.cache, 'crop', None)
        if crop is None:
            return False
        try:
            crop(-drop)  # a negative count removes tokens in every transformers version with crop
        except (ValueError, NotImplementedError, TypeError):
            return False
        seq_len = getattr(self.cache, 'get_seq_length', None)
        return seq_len is None or seq_len() == len(self.cached_ids) - drop

    def _next_token(self, logits, ids: List[int]) -> int:
        torch = self.torch
        s = self.settings
        if self.vocab_limit is not None and logits.numel() > self.vocab_limit:
            logits = logits[:self.vocab_limit]
        if s.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)), dtype=torch.long, device=logits.device)
            scores = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)
        if s.greedy:
            token = int(logits.argmax())
        else:
            logits = logits / s.temperature
            if s.top_k > 0 and s.top_k < logits.numel():
                kth = torch.topk(logits, s.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float('-inf'))
            if s.top_p < 1.0:
                # Keep the smallest set of most likely tokens whose probability reaches top_p.
                sorted_logits, order = torch.sort(logits, descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum - sorted_logits.softmax(-1) >= s.top_p
                drop[0] = False
                logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float('-inf'))
            probs = logits.softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.sync_token is not None:
            token = self.sync_token(token)
        return token

    def chat(self, prompt: str) -> Iterator[str]:
        """Send one user turn; yields the reply's text as it is generated.

        Afterwards `last_reply_ids` holds the generated ids (with the stop token, if one came).
        Raises ContextFull (before generating anything) when no room is left.
        """
        torch = self.torch
        ids = self.conversation.prompt_ids(prompt)
        room = self.settings.max_new_tokens
        if self.max_length is not None:
            room = min(room, self.max_length - len(ids))
            if room < 1:
                raise ContextFull(f'the conversation is too long ({len(ids)} tokens with this turn, the model '
                                  f'takes {self.max_length}); type `end` to start a new one')
        detok = self.tokenizer.detokenizer()
        reply: List[int] = []
        self.last_reply_ids = reply
        text = []
        with torch.inference_mode():
            logits = self._feed(ids)
            while True:
                token = self._next_token(logits, ids + reply)
                reply.append(token)
                if token in self.stop_ids:
                    break
                delta = detok.step([token])
                if delta:
                    text.append(delta)
                    yield delta
                if len(reply) >= room:
                    break
                logits = self._forward([token])
        tail = detok.flush()
        if tail:
            text.append(tail)
            yield tail
        self.conversation.add_turn(prompt, ids, reply, ''.join(text))
