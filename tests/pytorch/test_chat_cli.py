"""`python -m lmdeploy.pytorch.chat` driven through a terminal (pexpect).

Greedy replies must equal transformers' `generate` on the whole templated conversation (the
engine-style token history: each turn's prompt ids, then the model's own reply ids with the stop
token), across turns (the chat keeps the KV cache), after `config set` and after `end`.
"""
import os
import os.path as osp
import subprocess
import sys

import pytest

from .conftest import MINICHAT, PROMPT, ROOT, Chat, chat_env

pytest.importorskip('pexpect')
pytest.importorskip('transformers')

QUESTIONS = ['What is 12 + 5?', 'Add 7 to that.', 'hello there', 'Count from 3 to 9.']


def _run(argv, env=None, timeout=120):
    return subprocess.run([sys.executable, '-m', 'lmdeploy.pytorch.chat'] + list(argv), cwd=ROOT,
                          env=chat_env(env), capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc
    err = proc.stderr.strip()
    assert 'Traceback' not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith('error: '), err
    for needle in needles:
        assert needle in err, err
    assert PROMPT not in proc.stdout


def test_multi_turn_greedy_equals_generate(chat_ckpt, reference, tmp_path):
    ref = reference(chat_ckpt, 'minichat')
    # --temperture: the README's spelling is an alias of --temperature (here: greedy).
    chat = Chat([chat_ckpt, '--model_name', 'minichat', '--temperture', '0', '--max_new_tokens', '8'],
                tmp_path / 'stderr.txt')
    try:
        assert 'chat template: minichat (--model_name)' in chat.banner
        assert 'tensor parallel 1' in chat.banner
        replies = []
        for question in QUESTIONS[:3]:
            got = chat.send(question)
            assert got == ref.ask(question, 8)
            replies.append(got)
        assert any(replies), 'the fixture model printed nothing at all'

        # Multi-line input is one turn.
        assert chat.send('two\nlines') == ref.ask('two\nlines', 8)

        # config set: literal values, changes printed, next reply uses them.
        assert chat.send('config set max_new_tokens=3') == 'set max_new_tokens = 3 (was 8)'
        assert chat.send(QUESTIONS[3]) == ref.ask(QUESTIONS[3], 3)
        out = chat.send('config set top_p=0.5, repetition_penalty=1')
        assert out == 'set top_p = 0.5 (was 0.95)\nset repetition_penalty = 1.0'
        assert 'max_new_tokens=3' in chat.send('config')

        # Bad config set: one line each, nothing changes, the chat goes on.
        for bad, needle in [('config set max_new_tokens=abc', 'not a literal'),
                            ("config set temperature=__import__('os').getpid()", 'not a literal'),
                            ('config set nosuch=1', "unknown setting 'nosuch'"),
                            ('config set top_p=2', 'top_p must be in (0, 1]'),
                            ('config set max_new_tokens=0', 'at least 1'),
                            ('config set', 'usage')]:
            out = chat.send(bad)
            assert out.startswith('error: config set: ') and needle in out and '\n' not in out, out

        # end: a new conversation renders its first turn with <BOS> again.
        assert chat.send('end') == '(new conversation)'
        ref.reset()
        assert chat.send(QUESTIONS[0]) == ref.ask(QUESTIONS[0], 3)
        assert chat.exit() == 0
        assert 'Traceback' not in chat.stderr()
    finally:
        chat.close()


@pytest.mark.skipif(not osp.isdir(MINICHAT), reason='assets/minichat is not there')
def test_minichat_conversation(tmp_path):
    """The demo model: template detected from the path, arithmetic carried across turns."""
    chat = Chat([MINICHAT, '--temperature', '0'], tmp_path / 'stderr.txt')
    try:
        assert 'chat template: minichat (detected from the model)' in chat.banner
        assert chat.send('What is 12 + 5?') == '12 + 5 = 17.'
        assert chat.send('Add 7 to that.') == '17 + 7 = 24.'
        assert chat.send('end') == '(new conversation)'
        assert chat.send('Reverse the word apple.') == 'apple reversed is elppa.'
        # End of input (Ctrl-D) leaves like exit.
        chat.child.sendeof()
        chat.child.expect(__import__('pexpect').EOF)
        chat.child.close()
        assert chat.child.exitstatus == 0
    finally:
        chat.close()


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def _tp_launcher(kind):
    if kind == 'deepspeed':  # what `deepspeed --module --num_gpus 2 lmdeploy.pytorch.chat` runs
        return [sys.executable, '-m', 'deepspeed.launcher.runner', '--master_port', _free_port(),
                '--module', '--num_gpus', '2', 'lmdeploy.pytorch.chat']
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', _free_port(),
            '-m', 'lmdeploy.pytorch.chat']


@pytest.mark.parametrize('launcher', ['deepspeed', 'torchrun'])
def test_tensor_parallel_2_on_cpu(chat_ckpt, reference, tmp_path, launcher):
    """Two gloo ranks with DeepSpeed AutoTP print the same replies as one process."""
    pytest.importorskip('deepspeed')
    ref = reference(chat_ckpt, 'minichat')
    expected = [ref.ask(q, 6) for q in QUESTIONS[:2]]
    chat = Chat([chat_ckpt, '--model_name', 'minichat', '--temperature', '0', '--max_new_tokens', '6'],
                tmp_path / 'stderr.txt', launcher=_tp_launcher(launcher), timeout=180)
    try:
        assert 'tensor parallel 2' in chat.banner
        assert chat.send(QUESTIONS[0]) == expected[0]
        assert chat.send(QUESTIONS[1]) == expected[1]
        assert chat.send('config set seed=3') == 'set seed = 3 (was 0)'  # printed once, by rank 0
        assert chat.exit() == 0
        assert chat.transcript.count('chat template:') == 1
        assert chat.transcript.count(PROMPT) == 4
        assert 'Traceback' not in chat.stderr()
    finally:
        chat.close()


def test_without_deepspeed_runs_one_process(chat_ckpt, reference, tmp_path):
    """WORLD_SIZE=2 but no DeepSpeed: a notice on stderr and a single-process chat."""
    shim = tmp_path / 'shim' / 'deepspeed'
    shim.mkdir(parents=True)
    (shim / '__init__.py').write_text("raise ImportError('deepspeed hidden by the test')\n")
    ref = reference(chat_ckpt, 'minichat')
    chat = Chat([chat_ckpt, '--model_name', 'minichat', '--temperature', '0', '--max_new_tokens', '4'],
                tmp_path / 'stderr.txt',
                env={'PYTHONPATH': os.pathsep.join([str(shim.parent), ROOT, os.environ.get('PYTHONPATH', '')]),
                     'WORLD_SIZE': '2', 'LOCAL_RANK': '0', 'RANK': '0'})
    try:
        assert 'tensor parallel 1' in chat.banner
        assert chat.send(QUESTIONS[0]) == ref.ask(QUESTIONS[0], 4)
        assert chat.exit() == 0
        assert 'deepspeed is not installed' in chat.stderr()
    finally:
        chat.close()


# ------------------------------------------------------------------------------------------
# Bad inputs: one line on stderr, non-zero exit, no traceback, no prompt.


def test_unknown_flag_is_rejected_before_loading(chat_ckpt):
    proc = _run([chat_ckpt, '--temprature', '0'])
    _assert_one_line_error(proc, 'unknown flag --temprature', '--temperature')
    assert proc.returncode == 2


def test_missing_model_path(tmp_path):
    _assert_one_line_error(_run([str(tmp_path / 'nope')]), 'model path not found')
    _assert_one_line_error(_run(['--temperature', '0']), 'missing MODEL_PATH')


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / 'notes.txt').write_text('hi')
    _assert_one_line_error(_run([str(tmp_path)]), 'not a Hugging Face model folder')


def test_broken_model_folder(tmp_path, chat_ckpt):
    (tmp_path / 'config.json').write_text('{"model_type": "llama"}')
    (tmp_path / 'tokenizer.model').write_bytes(open(osp.join(chat_ckpt, 'tokenizer.model'), 'rb').read())
    proc = _run([str(tmp_path), '--device', 'cpu'])
    _assert_one_line_error(proc, 'cannot load the model')
    assert proc.returncode == 1


def test_bad_option_values(chat_ckpt):
    _assert_one_line_error(_run([chat_ckpt, '--model_name', 'nosuch']), "unknown chat template 'nosuch'")
    _assert_one_line_error(_run([chat_ckpt, '--top_p', '0']), 'top_p must be in (0, 1]')
    _assert_one_line_error(_run([chat_ckpt, '--dtype', 'fp8']), '--dtype must be one of')
    _assert_one_line_error(_run([chat_ckpt, '--device', 'tpu']), '--device must be')


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                 "<|user|>{{ m['content'] }}<|end|><|bot|>{% else %}{{ m['content'] }}<|end|>{% endif %}"
                 "{% endfor %}")


def test_chat_template_from_tokenizer_config(chat_ckpt, tmp_path):
    """No --model_name and a `chat_template` in tokenizer_config.json: the whole conversation is
    rendered by it every turn, and each reply equals `generate` on that rendering."""
    import json
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = tmp_path / 'model'
    shutil.copytree(chat_ckpt, model_dir)
    (model_dir / 'tokenizer_config.json').write_text(json.dumps(dict(
        tokenizer_class='LlamaTokenizer', bos_token='<s>', eos_token='</s>', unk_token='<unk>',
        chat_template=CHAT_TEMPLATE)))
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    end = hf.convert_tokens_to_ids('<|end|>')
    rows = model.config.vocab_size

    def expected(messages):
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = hf.encode(text, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=[2, end],
                                 pad_token_id=2, suppress_tokens=list(range(len(hf), rows)))
        reply = out[0, len(ids):].tolist()
        return hf.decode([t for t in reply if t not in (2, end)], skip_special_tokens=True)

    chat = Chat([str(model_dir), '--temperature', '0', '--max_new_tokens', '6'], tmp_path / 'stderr.txt')
    try:
        assert 'chat template: chat_template (from the tokenizer config)' in chat.banner
        messages = []
        for question in QUESTIONS[:2]:
            messages.append({'role': 'user', 'content': question})
            got = chat.send(question)
            assert got == expected(messages)
            messages.append({'role': 'assistant', 'content': got})
        assert chat.exit() == 0
    finally:
        chat.close()
