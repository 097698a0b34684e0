"""The MiniChat demo through the engine: deploy assets/minichat, chat greedily with
stream_infer, and check every reply against `tools/minichat_data.answer_for`."""
import os
import threading

import pytest

from lmdeploy.serve.turbomind.deploy import deploy
from lmdeploy.turbomind import TurboMind
from tools import minichat_data as data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, 'assets', 'minichat')
SEED = 2024


@pytest.fixture(scope='module')
def minichat(tmp_path_factory):
    ws = str(tmp_path_factory.mktemp('minichat') / 'workspace')
    deploy('minichat', MODEL_DIR, 'hf', dst_path=ws)
    tm = TurboMind(ws, device='cpu', dtype='fp32')
    yield tm
    tm.close()


def _dialogues():
    """Five seeded questions: two first turns of different tasks, a Chinese one, and a
    two-turn dialogue whose second turn refers to the first answer."""
    pool = data.dialogues(400, seed=SEED)
    firsts = [d[0][0] for d in pool]
    reverse = next(q for q in firsts if data._REV.match(q))
    sub = next(q for q in firsts if data._SUB.match(q) or data._SUB_FROM.match(q))
    chinese = next(q for d in pool for q, _ in d if data._ZH_ADD.match(q))
    follow = next([d[0][0], d[1][0]] for d in pool
                  if len(d) > 1 and data._FOLLOW_ADD.match(d[1][0]) and data._ADD.match(d[0][0]))
    return [[reverse], [sub], [chinese], follow]


class Session:

    def __init__(self, tm, session_id):
        self.tm, self.sid, self.step = tm, session_id, 0
        self.instance = tm.create_instance()

    def ask(self, question):
        tm = self.tm
        first = self.step == 0
        ids = tm.tokenizer.encode(tm.template.get_prompt(question, sequence_start=first))
        last = None
        for outputs in self.instance.stream_infer(self.sid, ids, request_output_len=64,
                                                  sequence_start=first, step=self.step,
                                                  top_k=1, stream_output=True):
            last = outputs[0][0].tolist()
        self.step += len(ids) + len(last)
        assert last and last[-1] in tm.stop_words, 'the reply must end with <|end|>'
        return tm.tokenizer.decode(last[:-1])


def _play(tm, session_id, questions):
    session, previous, replies = Session(tm, session_id), None, []
    for question in questions:
        expected = data.answer_for(question, previous)
        assert expected is not None, question
        replies.append((question, session.ask(question), expected))
        previous = data.result_of(expected)
    return replies


def test_minichat_answers(minichat):
    dialogues = _dialogues()
    assert sum(len(d) for d in dialogues) == 5
    results = [_play(minichat, 1 + i, d) for i, d in enumerate(dialogues)]
    wrong = [r for res in results for r in res if r[1] != r[2]]
    assert not wrong, wrong


def test_minichat_dialogues_concurrently(minichat):
    """The same dialogues at once on one engine (one instance per thread) give the same
    answers."""
    dialogues = _dialogues()
    results = [None] * len(dialogues)

    def play(i):
        results[i] = _play(minichat, 100 + i, dialogues[i])

    threads = [threading.Thread(target=play, args=(i,)) for i in range(len(dialogues))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    wrong = [r for res in results for r in res if r[1] != r[2]]
    assert not wrong, wrong
