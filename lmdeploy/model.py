"""Chat-template registry: how a user's turn becomes the text the model sees.

A template knows the first-turn form (system text, `<BOS>` marker) and the later-turn form
(only the new turn's text is sent; the engine keeps the KV of everything before it), its stop
words and the `session_len` deploy writes (+8) into config.ini.

`python -m lmdeploy.model NAME` prints the templated first turn for "hi" and `session_len`.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Sequence, Type


class Registry:
    """Name -> template class. `MODELS.get(name)()` gives a template instance."""

    def __init__(self):
        self.module_dict: Dict[str, Type['BaseModel']] = {}

    def register_module(self, name: str) -> Callable[[type], type]:
        def wrap(cls):
            if name in self.module_dict:
                raise KeyError(f'chat template {name!r} is already registered')
            self.module_dict[name] = cls
            return cls

        return wrap

    def get(self, name: str) -> Optional[Type['BaseModel']]:
        return self.module_dict.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.module_dict

    def names(self) -> List[str]:
        return sorted(self.module_dict)


MODELS = Registry()


class UnknownModelError(KeyError):
    """A model name that is not in the registry."""

    def __str__(self):
        return self.args[0]


def get_template(name: str) -> 'BaseModel':
    """Instantiate the template registered as `name`, or raise naming the known ones."""
    cls = MODELS.get(name)
    if cls is None:
        raise UnknownModelError(f'unknown model name {name!r}; known names: {", ".join(MODELS.names())}')
    return cls()


def _single_token_id(tokenizer, text: str) -> Optional[int]:
    """The id of the one vocabulary token spelled `text`, else None.

    Asks the tokenizer by name (lmdeploy's `Tokenizer.token_id`, or HF's
    `convert_tokens_to_ids`) rather than encoding: sentencepiece's dummy prefix makes
    `encode('<|end|>')` two ids ('▁', '<|end|>') and HF's `encode` adds BOS by default.
    """
    token_id = getattr(tokenizer, 'token_id', None)
    if callable(token_id):
        return token_id(text)
    convert = getattr(tokenizer, 'convert_tokens_to_ids', None)
    if callable(convert):
        idx = convert(text)
        unk = getattr(tokenizer, 'unk_token_id', None)
        if idx is None or (idx == unk and text != getattr(tokenizer, 'unk_token', None)):
            return None
        return idx
    encoded = list(tokenizer.encode(text))
    return encoded[0] if len(encoded) == 1 else None


@MODELS.register_module(name='llama')
class BaseModel:
    """Plain completion: the prompt is passed through unchanged (no BOS, no stop words)."""

    session_len = 2048
    top_p = 0.8
    top_k = None
    temperature = 0.8
    repetition_penalty = 1.0
    system = ''
    # Stop words as token ids (v0.0.2's templates hard-code them for their tokenizer) ...
    stop_word_ids: Optional[List[int]] = None
    # ... or as texts, resolved to ids with the model's tokenizer (`stop_words_for`).
    stop_word_texts: Sequence[str] = ()
    # Text the model emits at the end of a reply; used when a whole history is re-rendered.
    assistant_end = ''

    def get_prompt(self, prompt: str, sequence_start: bool = True) -> str:
        return prompt

    @property
    def stop_words(self) -> Optional[List[int]]:
        return self.stop_word_ids

    def stop_words_for(self, tokenizer) -> Optional[List[int]]:
        """Stop-word ids for `tokenizer`: the fixed ids, else each stop text that is one token."""
        if self.stop_word_ids is not None:
            return list(self.stop_word_ids)
        ids = []
        for text in self.stop_word_texts:
            idx = _single_token_id(tokenizer, text)
            if idx is not None:
                ids.append(idx)
        return ids or None

    def messages2prompt(self, messages: Sequence[dict]) -> str:
        """Render a whole OpenAI-style conversation ({'role', 'content'} dicts) as one prompt.

        A leading system message replaces the template's system text; each user turn uses the
        first- or later-turn form; each assistant turn is its text plus `assistant_end`.
        """
        template = self
        if messages and messages[0].get('role') == 'system':
            template = type(self)()
            template.system = messages[0]['content']
            messages = messages[1:]
        parts, first = [], True
        for message in messages:
            role = message.get('role')
            if role == 'user':
                parts.append(template.get_prompt(message['content'], first))
                first = False
            elif role == 'assistant':
                parts.append(message['content'] + template.assistant_end)
            else:
                raise ValueError(f'unsupported message role {role!r}; use system, user or assistant')
        return ''.join(parts)


@MODELS.register_module(name='internlm')
class InternLM(BaseModel):
    """InternLM base model: plain completion."""


@MODELS.register_module(name='baichuan-7b')
class Baichuan7B(BaseModel):
    repetition_penalty = 1.1


@MODELS.register_module(name='vicuna')
class Vicuna(BaseModel):
    """FastChat v1.1 conversation format."""

    system = ('A chat between a curious user and an artificial intelligence assistant. '
              "The assistant gives helpful, detailed, and polite answers to the user's questions. ")
    user = 'USER'
    assistant = 'ASSISTANT'

    def get_prompt(self, prompt, sequence_start=True):
        if sequence_start:
            return f'{self.system} {self.user}: {prompt} {self.assistant}:'
        return f'</s>{self.user}: {prompt} {self.assistant}:'


@MODELS.register_module(name='internlm-chat-7b')
class InternLMChat7B(BaseModel):
    user = '<|User|>'
    eoh = '<eoh>'
    assistant = '<|Bot|>'
    eoa = '<eoa>'
    stop_word_ids = [103027, 103028]
    assistant_end = '<eoa>'

    def get_prompt(self, prompt, sequence_start=True):
        turn = f'{self.user}:{prompt}{self.eoh}\n{self.assistant}:'
        return f'<BOS>{turn}' if sequence_start else f'\n{turn}'


@MODELS.register_module(name='internlm-chat-7b-8k')
class InternLMChat7B8K(InternLMChat7B):
    session_len = 8192


@MODELS.register_module(name='puyu')
class Puyu(BaseModel):
    """InternLM's internal chat format."""

    system = ('meta instruction\n'
              'You are an AI assistant whose name is InternLM (书生·浦语).\n'
              '- 书生·浦语 is a conversational language model that is developed by Shanghai AI '
              'Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n'
              '- 书生·浦语 can understand and communicate fluently in the language chosen by the '
              'user such as English and 中文.\n'
              'conversation')
    user = '<|Human|>'
    eoh = '\u0d46'
    assistant = '<|Assistant|>'
    stop_word_ids = [45623]

    def get_prompt(self, prompt, sequence_start=True):
        turn = f'{self.user}:{prompt}{self.eoh}\n{self.assistant}:'
        return f'<BOS>{self.system}\n{turn}' if sequence_start else f'\n{turn}'


@MODELS.register_module(name='llama2')
class Llama2(BaseModel):
    """Llama-2 chat: [INST] turns, the system prompt inside the first one."""

    session_len = 4096
    system = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as "
              'possible, while being safe. Your answers should not include any harmful, unethical, '
              'racist, sexist, toxic, dangerous, or illegal content. Please ensure that your '
              'responses are socially unbiased and positive in nature.\n\n'
              "If a question does not make any sense, or is not factually coherent, explain why "
              "instead of answering something not correct. If you don't know the answer to a "
              "question, please don't share false information.")
    assistant_end = '</s>'

    def get_prompt(self, prompt, sequence_start=True):
        if sequence_start:
            return f'<BOS>[INST] <<SYS>>\n {self.system} \n<</SYS>>\n\n{prompt} [/INST] '
        return f'[INST] {prompt} [/INST] '


@MODELS.register_module(name='llama3')
class Llama3(BaseModel):
    """Llama-3 / 3.1 instruct header format."""

    session_len = 8192
    system = ''
    stop_word_texts = ('<|eot_id|>', '<|end_of_text|>')
    assistant_end = '<|eot_id|>'

    @staticmethod
    def _header(role):
        return f'<|start_header_id|>{role}<|end_header_id|>\n\n'

    def get_prompt(self, prompt, sequence_start=True):
        turn = f'{self._header("user")}{prompt}<|eot_id|>{self._header("assistant")}'
        if not sequence_start:
            return turn
        system = f'{self._header("system")}{self.system}<|eot_id|>' if self.system else ''
        return f'<BOS>{system}{turn}'


@MODELS.register_module(name='chatml')
class ChatML(BaseModel):
    """ChatML (<|im_start|>role ... <|im_end|>), as used by Qwen and many fine-tunes."""

    session_len = 8192
    system = ''
    stop_word_texts = ('<|im_end|>', '<|endoftext|>')
    assistant_end = '<|im_end|>'

    def get_prompt(self, prompt, sequence_start=True):
        turn = f'<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n'
        if not sequence_start:
            return f'\n{turn}'
        system = f'<|im_start|>system\n{self.system}<|im_end|>\n' if self.system else ''
        return f'{system}{turn}'


@MODELS.register_module(name='qwen')
class Qwen(ChatML):
    system = 'You are a helpful assistant.'


@MODELS.register_module(name='minichat')
class MiniChat(BaseModel):
    """The embedded demo model's format (assets/minichat): one special token per role marker."""

    session_len = 1024
    top_k = 1
    stop_word_texts = ('<|end|>',)
    assistant_end = '<|end|>'

    def get_prompt(self, prompt, sequence_start=True):
        turn = f'<|user|>{prompt}<|end|><|bot|>'
        return f'<BOS>{turn}' if sequence_start else turn


def main(model_name: str = 'test'):
    """Print the templated first turn for "hi" and the template's session_len.

    Args:
        model_name: a registered chat-template name (see the list printed for an unknown one).
    """
    try:
        template = get_template(model_name)
    except UnknownModelError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(template.get_prompt('hi'))
    print(f'session_len: {template.session_len}')


if __name__ == '__main__':
    import fire

    fire.Fire(main)
