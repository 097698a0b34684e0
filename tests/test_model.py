"""Chat-template registry (lmdeploy/model.py) against the v0.0.2 behaviour reference, §4."""
import os
import subprocess
import sys

import pytest

from lmdeploy.model import MODELS, BaseModel, UnknownModelError, get_template

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET_DIR = os.path.join(REPO, 'assets', 'tokenizer')

V002_NAMES = ['llama', 'vicuna', 'internlm', 'internlm-chat-7b', 'internlm-chat-7b-8k', 'puyu',
              'baichuan-7b', 'llama2']
EXTRA_NAMES = ['llama3', 'chatml', 'qwen', 'minichat']

VICUNA_SYSTEM = ('A chat between a curious user and an artificial intelligence assistant. '
                 "The assistant gives helpful, detailed, and polite answers to the user's questions. ")
P = 'What is 1+1?'

# name -> (first turn, later turn) for the prompt P; `{SYS}` is filled per template below.
V002_FORMS = {
    'llama': (P, P),
    'internlm': (P, P),
    'baichuan-7b': (P, P),
    'vicuna': (f'{VICUNA_SYSTEM} USER: {P} ASSISTANT:', f'</s>USER: {P} ASSISTANT:'),
    'internlm-chat-7b': (f'<BOS><|User|>:{P}<eoh>\n<|Bot|>:', f'\n<|User|>:{P}<eoh>\n<|Bot|>:'),
    'internlm-chat-7b-8k': (f'<BOS><|User|>:{P}<eoh>\n<|Bot|>:', f'\n<|User|>:{P}<eoh>\n<|Bot|>:'),
    'puyu': ('<BOS>{SYS}\n' f'<|Human|>:{P}\u0d46\n<|Assistant|>:', f'\n<|Human|>:{P}\u0d46\n<|Assistant|>:'),
    'llama2': ('<BOS>[INST] <<SYS>>\n {SYS} \n<</SYS>>\n\n' f'{P} [/INST] ', f'[INST] {P} [/INST] '),
}

V002_SESSION_LEN = {'llama': 2048, 'vicuna': 2048, 'internlm': 2048, 'internlm-chat-7b': 2048,
                    'internlm-chat-7b-8k': 8192, 'puyu': 2048, 'baichuan-7b': 2048, 'llama2': 4096}
V002_STOP_WORDS = {'llama': None, 'vicuna': None, 'internlm': None, 'baichuan-7b': None,
                   'llama2': None, 'internlm-chat-7b': [103027, 103028],
                   'internlm-chat-7b-8k': [103027, 103028], 'puyu': [45623]}


def _run_cli(*args):
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    return subprocess.run([sys.executable, '-m', 'lmdeploy.model', *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)


@pytest.fixture(scope='module')
def sp_tokenizer():
    from lmdeploy.turbomind.tokenizer import Tokenizer
    return Tokenizer(ASSET_DIR)


# ---------------------------------------------------------------------------------- registry


def test_registry_holds_every_name():
    for name in V002_NAMES + EXTRA_NAMES:
        assert name in MODELS
        assert isinstance(MODELS.get(name)(), BaseModel)
    assert MODELS.get('test') is None
    assert set(V002_NAMES + EXTRA_NAMES) <= set(MODELS.names())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownModelError) as info:
        get_template('no-such-model')
    message = str(info.value)
    assert 'no-such-model' in message and '\n' not in message
    for name in V002_NAMES:
        assert name in message


# ---------------------------------------------------------------------------------- v0.0.2 forms


def _expected(name, form):
    template = get_template(name)
    return form.replace('{SYS}', template.system)


@pytest.mark.parametrize('name', V002_NAMES)
def test_v002_first_and_later_turns(name):
    template = get_template(name)
    first, later = V002_FORMS[name]
    assert template.get_prompt(P) == _expected(name, first)
    assert template.get_prompt(P, sequence_start=True) == _expected(name, first)
    assert template.get_prompt(P, sequence_start=False) == _expected(name, later)


@pytest.mark.parametrize('name', V002_NAMES)
def test_v002_session_len_and_stop_words(name):
    template = get_template(name)
    assert template.session_len == V002_SESSION_LEN[name]
    assert template.stop_words == V002_STOP_WORDS[name]


@pytest.mark.parametrize('name', V002_NAMES)
def test_v002_sampling_fields(name):
    template = get_template(name)
    assert template.top_p == 0.8
    assert template.top_k is None
    assert template.temperature == 0.8
    assert template.repetition_penalty == (1.1 if name == 'baichuan-7b' else 1.0)


def test_base_template_adds_no_bos():
    assert get_template('llama').get_prompt('hi') == 'hi'
    assert '<BOS>' not in get_template('internlm').get_prompt('hi')


def test_vicuna_first_turn_has_two_spaces_before_user():
    prompt = get_template('vicuna').get_prompt('hi')
    assert prompt.startswith('A chat between a curious user and an artificial intelligence assistant.')
    assert "questions.  USER: hi ASSISTANT:" in prompt


def test_puyu_system_text():
    system = get_template('puyu').system
    lines = system.split('\n')
    assert lines[0] == 'meta instruction' and lines[-1] == 'conversation'
    assert len(lines) == 5
    assert 'InternLM (书生·浦语)' in lines[1]
    assert get_template('puyu').get_prompt('hi').count('\u0d46') == 1


def test_llama2_system_text():
    system = get_template('llama2').system
    assert system.startswith('You are a helpful, respectful and honest assistant.')
    assert system.endswith("please don't share false information.")
    assert len(system.split('\n\n')) == 2
    later = get_template('llama2').get_prompt('hi', sequence_start=False)
    assert '<BOS>' not in later and '</s>' not in later


# ---------------------------------------------------------------------------------- newer forms


def test_llama3_forms():
    t = get_template('llama3')
    turn = ('<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>'
            '<|start_header_id|>assistant<|end_header_id|>\n\n')
    assert t.get_prompt('hi') == '<BOS>' + turn
    assert t.get_prompt('hi', sequence_start=False) == turn
    assert t.session_len == 8192
    assert t.stop_word_texts == ('<|eot_id|>', '<|end_of_text|>')


def test_chatml_and_qwen_forms():
    turn = '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
    chatml = get_template('chatml')
    assert chatml.get_prompt('hi') == turn
    assert chatml.get_prompt('hi', sequence_start=False) == '\n' + turn
    qwen = get_template('qwen')
    assert qwen.get_prompt('hi') == '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' + turn
    assert qwen.get_prompt('hi', sequence_start=False) == '\n' + turn
    for t in (chatml, qwen):
        assert t.session_len == 8192
        assert '<|im_end|>' in t.stop_word_texts


def test_minichat_forms():
    t = get_template('minichat')
    assert t.get_prompt('hi') == '<BOS><|user|>hi<|end|><|bot|>'
    assert t.get_prompt('hi', sequence_start=False) == '<|user|>hi<|end|><|bot|>'
    assert t.session_len == 1024
    assert t.top_k == 1


def test_minichat_stop_word_is_the_end_token(sp_tokenizer):
    t = get_template('minichat')
    end_id = sp_tokenizer.token_id('<|end|>')
    assert end_id == 5
    assert t.stop_words_for(sp_tokenizer) == [end_id]
    # Templates with fixed ids keep them whatever the tokenizer.
    assert get_template('internlm-chat-7b').stop_words_for(sp_tokenizer) == [103027, 103028]
    # Stop texts that are not single tokens of this tokenizer are dropped.
    assert get_template('llama3').stop_words_for(sp_tokenizer) is None
    assert get_template('llama').stop_words_for(sp_tokenizer) is None


def test_minichat_stop_word_with_an_hf_tokenizer(tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer
    shutil.copy(os.path.join(ASSET_DIR, 'tokenizer.model'), tmp_path / 'tokenizer.model')
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
        {'tokenizer_class': 'LlamaTokenizer', 'legacy': False}))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert get_template('minichat').stop_words_for(hf) == [5]


def test_minichat_prompt_encodes_with_role_tokens(sp_tokenizer):
    ids = sp_tokenizer.encode(get_template('minichat').get_prompt('hi'))
    assert ids[0] == sp_tokenizer.bos_token_id
    assert ids.count(3) == 1 and ids.count(5) == 1 and ids[-1] == 4


# ---------------------------------------------------------------------------------- messages2prompt


def test_messages2prompt_minichat():
    messages = [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'},
                {'role': 'user', 'content': 'c'}]
    assert get_template('minichat').messages2prompt(messages) == \
        '<BOS><|user|>a<|end|><|bot|>b<|end|><|user|>c<|end|><|bot|>'


def test_messages2prompt_equals_turn_by_turn_prompts():
    messages = [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'},
                {'role': 'user', 'content': 'c'}]
    for name in ('internlm-chat-7b', 'llama2', 'vicuna', 'chatml', 'llama3'):
        t = get_template(name)
        expected = t.get_prompt('a') + 'b' + t.assistant_end + t.get_prompt('c', sequence_start=False)
        assert t.messages2prompt(messages) == expected, name


def test_messages2prompt_system_message_replaces_system():
    qwen = get_template('qwen')
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hi'}]
    prompt = qwen.messages2prompt(messages)
    assert prompt.startswith('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi')
    assert qwen.system == 'You are a helpful assistant.'  # the template itself is unchanged
    llama2 = get_template('llama2').messages2prompt(messages)
    assert llama2 == '<BOS>[INST] <<SYS>>\n Be brief. \n<</SYS>>\n\nhi [/INST] '


def test_messages2prompt_rejects_unknown_roles():
    with pytest.raises(ValueError, match='tool'):
        get_template('minichat').messages2prompt([{'role': 'tool', 'content': 'x'}])


# ---------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize('name', ['llama2', 'internlm-chat-7b', 'minichat', 'vicuna'])
def test_cli_prints_first_turn_and_session_len(name):
    result = _run_cli(name)
    assert result.returncode == 0, result.stderr
    template = get_template(name)
    assert result.stdout == f"{template.get_prompt('hi')}\nsession_len: {template.session_len}\n"


def test_cli_flag_form():
    result = _run_cli('--model_name', 'llama2')
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith('session_len: 4096\n')


@pytest.mark.parametrize('args', [(), ('no-such-model',)])
def test_cli_unknown_name_fails_with_one_line(args):
    result = _run_cli(*args)
    assert result.returncode != 0
    assert result.stdout == ''
    err = result.stderr.strip()
    assert '\n' not in err and 'Traceback' not in err
    assert (args[0] if args else 'test') in err
    for name in V002_NAMES:
        assert name in err
