"""The embedded MiniChat model (assets/minichat) answers its generated tasks correctly.

Questions are drawn from tools/minichat_data.py with a fixed seed and every expected reply is
recomputed with `answer_for`; replies are decoded greedily in fp32 on CPU, with the token history
built the way the engine builds it (tools/eval_minichat.py: GreedyChat).
"""
import json
import os
import sys

import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('sentencepiece')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, 'assets', 'minichat')
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import minichat_data as data  # noqa: E402
from eval_minichat import GreedyChat, end_id, load_model, load_tokenizer, task_of  # noqa: E402

SEED = 4242


def _first_turns(n=18):
    """`n` first-turn questions from seeded dialogues, covering every first-turn task."""
    picked, tasks = [], set()
    pool = [d[0][0] for d in data.dialogues(400, seed=SEED)]
    for q in pool:  # one of each task first ...
        task = task_of(q)
        if task not in tasks:
            tasks.add(task)
            picked.append(q)
    for q in pool:  # ... then in generator order
        if len(picked) >= n:
            break
        if q not in picked:
            picked.append(q)
    return picked


def _follow_up_dialogue():
    """The first seeded dialogue with an "... that." follow-up, up to that turn."""
    for dialogue in data.dialogues(400, seed=SEED + 1):
        for i, (q, _) in enumerate(dialogue):
            if i > 0 and q.endswith('that.'):
                return [q for q, _ in dialogue[:i + 1]]
    raise AssertionError('no follow-up dialogue drawn')


@pytest.fixture(scope='module')
def minichat():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one token at a time: a single thread is fastest for this model
    try:
        yield load_model(MODEL_DIR), load_tokenizer(MODEL_DIR)
    finally:
        torch.set_num_threads(threads)


def test_files_and_config():
    weights = os.path.join(MODEL_DIR, 'model.safetensors')
    assert os.path.getsize(weights) <= 20 * 2**20
    assert os.path.exists(os.path.join(MODEL_DIR, 'tokenizer.model'))
    assert not os.path.exists(os.path.join(MODEL_DIR, 'tokenizer_config.json'))
    with open(os.path.join(MODEL_DIR, 'config.json')) as f:
        cfg = json.load(f)
    assert cfg['model_type'] == 'llama'
    assert cfg['architectures'] == ['LlamaForCausalLM']
    assert cfg['num_key_value_heads'] < cfg['num_attention_heads']  # GQA
    assert cfg['num_attention_heads'] % cfg['num_key_value_heads'] == 0
    assert cfg['bos_token_id'] == 1 and cfg['eos_token_id'] == 2
    with open(os.path.join(MODEL_DIR, 'generation_config.json')) as f:
        gen = json.load(f)
    eos = gen['eos_token_id'] if isinstance(gen['eos_token_id'], list) else [gen['eos_token_id']]
    assert end_id(load_tokenizer(MODEL_DIR)) in eos and 2 in eos


def test_first_turn_answers(minichat):
    model, sp = minichat
    questions = _first_turns()
    assert any(task_of(q) in ('add_zh', 'greeting_zh') for q in questions)  # Chinese is covered
    wrong = []
    for question in questions:
        expected = data.answer_for(question)
        assert expected is not None
        got = GreedyChat(model, sp).ask(question)
        if got != expected:
            wrong.append((question, got, expected))
    assert not wrong, wrong


def test_chinese_addition(minichat):
    model, sp = minichat
    question = next(q for d in data.dialogues(400, seed=SEED + 2) for q, _ in d if task_of(q) == 'add_zh')
    assert GreedyChat(model, sp).ask(question) == data.answer_for(question)


def test_follow_up_uses_history(minichat):
    model, sp = minichat
    chat, previous = GreedyChat(model, sp), None
    for question in _follow_up_dialogue():
        expected = data.answer_for(question, previous)
        assert chat.ask(question) == expected, question
        previous = data.result_of(expected)
