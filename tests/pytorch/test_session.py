"""In-process tests of the PyTorch chat pieces: `config set` parsing, flag checks, template
detection, and ChatSession (KV cache kept between turns, cropped where the history
changes, sampling, context limit) against transformers' `generate`."""
import pytest

from lmdeploy.console import check_fire_args
from lmdeploy.pytorch import chat as cli
from lmdeploy.pytorch.session import (ChatSession, ConfigError, ContextFull, GenerationSettings,
                                      HFTemplateConversation, RegistryConversation, parse_config_set)

torch = pytest.importorskip('torch')


# -- config set ----------------------------------------------------------------------------

def test_parse_config_set_literals():
    assert parse_config_set('max_new_tokens=256') == [('max_new_tokens', 256)]
    assert parse_config_set(' temperature = 0  top_p=0.5, top_k=1 ') == [
        ('temperature', 0.0), ('top_p', 0.5), ('top_k', 1)]
    assert parse_config_set('repetition_penalty=1.1 seed=7') == [('repetition_penalty', 1.1), ('seed', 7)]


@pytest.mark.parametrize('text, needle', [
    ('', 'usage'),
    ('max_new_tokens', 'cannot parse'),
    ('=3', 'cannot parse'),
    ('x max_new_tokens=3', 'cannot parse'),
    ('max_new_tokens=', 'no value'),
    ('max_new_tokens=abc', 'not a literal'),
    ("temperature=__import__('os').system('echo pwned')", 'not a literal'),
    ('temperature=(lambda: 1)()', 'not a literal'),
    ('max_new_tokens=1.5', 'must be an integer'),
    ('max_new_tokens=True', 'must be an integer'),
    ('temperature=-1', 'temperature must be 0'),
    ("temperature='hot'", 'must be a number'),
    ('top_p=0', 'top_p must be in'),
    ('top_k=-2', 'top_k must be 0'),
    ('repetition_penalty=0', 'must be positive'),
    ('do_sample=True', "unknown setting 'do_sample'"),
])
def test_parse_config_set_errors(text, needle):
    with pytest.raises(ConfigError) as info:
        parse_config_set(text)
    message = str(info.value)
    assert needle in message and '\n' not in message


# -- command line --------------------------------------------------------------------------

def check_argv(argv):
    """The chat's command-line check (`cli.cli` runs it before fire)."""
    check_fire_args(cli.main, argv, usage=cli.USAGE)


def test_check_argv_accepts_known_flags():
    check_argv(['m', '--temperture', '0.5', '--top_p=0.9', '--use-fast-tokenizer', 'False',
                '--notrust_remote_code'])
    check_argv(['--model_path', 'm'])
    check_argv(['--help'])


@pytest.mark.parametrize('argv, needle', [
    (['m', '--temprature', '1'], 'unknown flag --temprature'),
    (['m', '--tp=2'], 'unknown flag --tp'),
    ([], 'missing MODEL_PATH'),
    (['--temperature', '0'], 'missing MODEL_PATH'),
])
def test_check_argv_rejects(argv, needle):
    with pytest.raises(cli.CliError) as info:
        check_argv(argv)
    assert needle in str(info.value)


def test_launcher_local_rank_is_dropped(monkeypatch):
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    assert cli._take_launcher_rank(['--local_rank=1', 'm', '--seed', '1']) == ['m', '--seed', '1']
    import os
    assert os.environ['LOCAL_RANK'] == '1'
    assert cli._take_launcher_rank(['m', '--local_rank', '0']) == ['m']


def test_temperture_alias():
    base = dict(max_new_tokens=64, temperature=0.8, top_p=0.95, top_k=0, repetition_penalty=1.0, seed=0)
    assert cli._resolve_settings(dict(base, temperture=0)).temperature == 0
    assert cli._resolve_settings(dict(base, temperture=None)).temperature == 0.8
    with pytest.raises(cli.CliError):
        cli._resolve_settings(dict(base, temperature=0.5, temperture=0.1))


def test_detect_model_name(tmp_path):
    class Cfg:
        model_type = 'llama'
        _name_or_path = ''

    def name(dirname, cfg=Cfg()):
        d = tmp_path / dirname
        d.mkdir(exist_ok=True)
        return cli.detect_model_name(str(d), cfg)

    assert name('minichat') == 'minichat'
    assert name('internlm-chat-7b') == 'internlm-chat-7b'
    assert name('internlm-chat-7b-8k') == 'internlm-chat-7b-8k'
    assert name('Llama-2-7b-chat-hf') == 'llama2'
    assert name('Meta-Llama-3-8B-Instruct') == 'llama3'
    assert name('vicuna-7b-v1.5') == 'vicuna'
    assert name('Llama-2-7b-hf') == 'llama'  # a base model gets no chat template
    assert name('gqa-safetensors-fp32') is None


# -- ChatSession ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny(make_ckpt):
    from transformers import AutoModelForCausalLM

    from lmdeploy.hf_checkpoint import tokenizer_class
    Tokenizer = tokenizer_class()
    path = str(make_ckpt('gqa', 'safetensors', shards=1))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, Tokenizer(path)


def _session(model, tokenizer, conversation=None, stop=None, **settings):
    from lmdeploy.model import get_template
    template = get_template('minichat')
    conversation = conversation or RegistryConversation(template, tokenizer, 'minichat')
    stop = stop if stop is not None else [2] + template.stop_words_for(tokenizer)
    s = GenerationSettings(**{**dict(temperature=0, max_new_tokens=8), **settings})
    return ChatSession(model, tokenizer, conversation, stop, s, max_length=model.config.max_position_embeddings,
                       vocab_limit=tokenizer.vocab_size)


def _generate(model, ids, stop, n, suppress):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=list(stop),
                             pad_token_id=2, suppress_tokens=suppress)
    return out[0, len(ids):].tolist()


def test_kv_cache_reused_across_turns_and_equal_to_generate(tiny, monkeypatch):
    model, tokenizer = tiny
    session = _session(model, tokenizer)
    fed = []
    real = session._forward

    def counting(ids):
        fed.append(len(ids))
        return real(ids)

    monkeypatch.setattr(session, '_forward', counting)
    suppress = list(range(tokenizer.vocab_size, model.config.vocab_size))
    history = []
    for i, question in enumerate(['What is 12 + 5?', 'Add 7 to that.', 'hello']):
        fed.clear()
        turn = tokenizer.encode(session.conversation.template.get_prompt(question, i == 0))
        text = ''.join(session.chat(question))
        reply = _generate(model, history + turn, session.stop_ids, 8, suppress)
        assert session.last_reply_ids == reply
        assert text == tokenizer.decode([t for t in reply if t not in session.stop_ids])
        # Only the new ids are run: the previous reply's last token and this turn's prompt.
        assert fed[0] == (len(turn) if i == 0 else 1 + len(turn))
        assert all(n == 1 for n in fed[1:])
        history += turn + reply
        assert session.cached_ids == history[:-1]
    session.reset()
    assert session.cache is None and session.conversation.ids == []


class EditingTemplate:
    """A Jinja-like renderer whose re-rendering of a reply differs from the generated ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat_template = 'test'

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        parts = ['<s>']
        for m in messages:
            parts.append(f"<|user|>{m['content']}<|end|><|bot|>" if m['role'] == 'user'
                         else f"[{m['content']}]<|end|>")
        return ''.join(parts)

    def encode(self, text, add_special_tokens=False):
        return self.tokenizer.encode(text.replace('<s>', '<BOS>'))


def test_cache_is_cropped_where_the_rendering_changes(tiny, monkeypatch):
    model, tokenizer = tiny
    renderer = EditingTemplate(tokenizer)
    session = _session(model, tokenizer, HFTemplateConversation(renderer), stop=[2])
    suppress = list(range(tokenizer.vocab_size, model.config.vocab_size))
    first = renderer.encode(renderer.apply_chat_template([{'role': 'user', 'content': 'hi'}], True, False))
    reply1 = ''.join(session.chat('hi'))
    fed = []
    real = session._forward
    monkeypatch.setattr(session, '_forward', lambda ids: (fed.append(len(ids)), real(ids))[1])
    reply2 = ''.join(session.chat('again'))
    messages = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': reply1},
                {'role': 'user', 'content': 'again'}]
    ids = renderer.encode(renderer.apply_chat_template(messages, True, False))
    expected = _generate(model, ids, [2], 8, suppress)
    assert session.last_reply_ids == expected
    assert reply2 == tokenizer.decode([t for t in expected if t != 2])
    # The cached first prompt was kept; the re-rendered reply and the new turn were run.
    common = next(i for i, (a, b) in enumerate(zip(first + [None], ids)) if a != b)
    assert fed[0] == len(ids) - common


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    model, tokenizer = tiny

    def reply(**settings):
        return ''.join(_session(model, tokenizer, **settings).chat('hello'))

    sampled = reply(temperature=1.0, top_p=0.9, seed=5)
    assert sampled == reply(temperature=1.0, top_p=0.9, seed=5)
    assert reply(temperature=1.0, top_k=1, seed=3) == reply(temperature=0)
    session = _session(model, tokenizer, temperature=1.0, seed=5)
    assert session.apply([('seed', 5), ('top_k', 4)]) == ['set seed = 5', 'set top_k = 4 (was 0)']


def test_context_limit(tiny):
    model, tokenizer = tiny
    session = _session(model, tokenizer)
    session.max_length = 12
    with pytest.raises(ContextFull):
        list(session.chat('a question that is certainly longer than twelve tokens, by far'))
    session.max_length = 20
    ids = session.conversation.prompt_ids('hi')
    list(session.chat('hi'))
    assert len(session.last_reply_ids) <= 20 - len(ids)
