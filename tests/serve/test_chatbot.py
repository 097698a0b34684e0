"""`Chatbot` (the gRPC client, reference 9.3) against a real server on the deployed MiniChat."""
import logging
import threading
import time

import pytest

from tests.serve.triton_fixtures import deploy_minichat, free_port, require_serving, start_server

require_serving()

from lmdeploy.serve.turbomind.chatbot import Chatbot, StatusCode  # noqa: E402
from tools.minichat_data import answer_for  # noqa: E402


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    server = start_server(deploy_minichat(tmp_path_factory, 'chatbot'))
    yield server
    assert server.stop() == 0, server.output


def bot(server, **kw):
    return Chatbot(server.addr, log_level=logging.ERROR, **kw)


def ask(chatbot, question, session_id=1, **kw):
    results = list(chatbot.stream_infer(session_id, question, **kw))
    return results


def final(results):
    status, text, n = results[-1]
    assert status == StatusCode.TRITON_STREAM_END, results[-1]
    return text


def test_model_name_bos_eos_and_template_come_from_the_server(server):
    b = bot(server)
    assert b.model_name == 'minichat'
    assert (b.bos_id, b.eos_id) == (1, 2)
    assert b.stop_ids == [5]  # <|end|>, from the server's stop_words parameter
    assert b.cfg.session_len == 1024 and b.cfg.top_k == 1


def test_multi_turn_conversation_streams_and_keeps_the_session(server):
    b = bot(server)
    results = ask(b, 'What is 12 + 5?')
    assert len(results) > 2
    texts = [t for s, t, _ in results]
    assert all(s == StatusCode.TRITON_STREAM_ING for s, _, _ in results[:-1])
    assert all(texts[-1].startswith(t) for t in texts)  # every step extends the text
    assert final(results) == answer_for('What is 12 + 5?') == '12 + 5 = 17.'
    assert final(ask(b, 'Add 3 to that.')) == '17 + 3 = 20.'
    assert final(ask(b, 'Subtract 4 from that.')) == '20 - 4 = 16.'
    assert b.session.histories.endswith('<|user|>Subtract 4 from that.<|end|><|bot|>20 - 4 = 16.')
    assert final(ask(b, '你好')) == answer_for('你好')
    assert b.end(1) == StatusCode.TRITON_STREAM_END
    assert b.session is None


def test_end_then_a_new_conversation(server):
    b = bot(server)
    final(ask(b, 'What is 40 - 8?', session_id=2))
    assert b.end(2) == StatusCode.TRITON_STREAM_END
    assert b.end(2) == StatusCode.TRITON_SESSION_INVALID_ARG  # nothing left to end
    assert final(ask(b, 'What is 3 + 4?', session_id=2)) == '3 + 4 = 7.'
    assert b.session.sequence_length > 0
    b.end(2)


def test_cancel_stops_the_reply_and_keeps_the_session(server):
    b = bot(server, ignore_eos=True)  # runs to the length limit unless cancelled
    results = []

    def consume():
        for r in b.stream_infer(3, 'What is 12 + 5?', request_output_len=900):
            results.append(r)

    t = threading.Thread(target=consume)
    t.start()
    while len(results) < 3:
        time.sleep(0.01)
    assert b.cancel(3) == StatusCode.TRITON_STREAM_END
    t.join(30)
    assert not t.is_alive()
    status, _, n = results[-1]
    assert status == StatusCode.TRITON_STREAM_END and 3 <= n < 900
    held = b.session.sequence_length
    assert list(b.stream_infer(3, 'Add 3 to that.', request_output_len=4))[-1][0] == 0
    assert b.session.sequence_length > held
    b.end(3)


def test_cancel_with_nothing_running_is_an_error_status(server):
    b = bot(server)
    assert b.cancel(4) == StatusCode.TRITON_SESSION_INVALID_ARG
    final(ask(b, 'hi', session_id=4))
    assert b.cancel(4) == StatusCode.TRITON_SERVER_ERR  # inactive
    b.end(4)


def test_out_of_limit_says_to_end_the_session(server):
    b = bot(server, session_len=36)  # 26 held + 10 new leave no room
    final(ask(b, 'What is 12 + 5?', session_id=5))
    status, message, _ = ask(b, 'Add 3 to that.', session_id=5)[-1]
    assert status == StatusCode.TRITON_SESSION_OUT_OF_LIMIT
    assert '`end`' in message and 'session 5' in message
    held = b.session.sequence_length
    assert held == 26  # nothing was sent; the session is unchanged
    assert b.end(5) == StatusCode.TRITON_STREAM_END
    assert final(ask(b, 'What is 1 + 1?', session_id=5)) == '1 + 1 = 2.'
    b.end(5)


def test_resume_rebuilds_the_server_session(server):
    b = bot(server)
    final(ask(b, 'What is 12 + 5?', session_id=6))
    # the server loses the session (ended by someone else)
    other = bot(server)
    other.session = type(b.session)(session_id=6)
    assert other.end(6) == StatusCode.TRITON_STREAM_END
    status, message, _ = ask(b, 'Add 3 to that.', session_id=6)[-1]
    assert status == StatusCode.TRITON_SERVER_ERR and 'code 1' in message
    assert b.resume(6) == StatusCode.TRITON_STREAM_END
    assert final(ask(b, 'Add 3 to that.', session_id=6)) == '17 + 3 = 20.'
    b.end(6)


def test_eight_concurrent_clients_each_get_their_solo_answer(server):
    questions = ['What is 12 + 5?', 'What is 40 - 8?', 'Reverse the word apple.', '你好',
                 'Count from 3 to 7.', 'What is 9 plus 9?', 'Who are you?', '3 加 4 等于几？']
    answers = {}

    def one(i, q):
        b = bot(server)
        answers[i] = final(ask(b, q, session_id=100 + i))
        b.end(100 + i)

    threads = [threading.Thread(target=one, args=(i, q)) for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [answers.get(i) for i in range(8)] == [answer_for(q) for q in questions]


def test_a_server_that_is_down():
    from tritonclient.utils import InferenceServerException
    with pytest.raises(InferenceServerException):
        Chatbot(f'127.0.0.1:{free_port()}', log_level=logging.ERROR)
