"""The OpenAI-compatible server end to end: a real uvicorn process on loopback serving the
MiniChat demo model, driven with the official `openai` client (and httpx where the client has no
call for it). Greedy replies are checked with `tools/minichat_data.answer_for`."""
import concurrent.futures
import os
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip('openai')
httpx = pytest.importorskip('httpx')
for _module in ('fastapi', 'uvicorn', 'prometheus_client'):  # the [serve] extra
    pytest.importorskip(_module)

from lmdeploy.serve.openai.metrics import metric, parse_metrics  # noqa: E402
from tools import minichat_data as data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, 'assets', 'minichat')
KEY = 'sk-test-key'
MAX_BATCH, MAX_WAITING = 2, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(workspace, *flags, timeout=120):
    """(process, base_url) of `api_server` on a free loopback port, once /health answers
    (`workspace` None: the flags name the model, e.g. --dummy)."""
    port = _free_port()
    cmd = [sys.executable, '-m', 'lmdeploy.serve.openai.api_server',
           *([workspace] if workspace else []),
           '--server_name', '127.0.0.1', '--server_port', str(port), '--log_level', 'warning',
           *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f'http://127.0.0.1:{port}'
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f'server exited with {proc.returncode}: {proc.stdout.read()}')
        try:
            if httpx.get(f'{url}/health', timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f'server did not become healthy: {proc.stdout.read()}')


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    from lmdeploy.serve.turbomind.deploy import deploy
    ws = str(tmp_path_factory.mktemp('openai') / 'workspace')
    deploy('minichat', MODEL_DIR, 'hf', dst_path=ws)
    proc, url = start_server(ws, '--api_keys', KEY, 'other-key', '--max_batch_size',
                             str(MAX_BATCH), '--max_waiting', str(MAX_WAITING))
    yield url
    stop_server(proc)
    out = proc.stdout.read()
    assert 'Traceback' not in out, out


@pytest.fixture(scope='module')
def client(server):
    return openai.OpenAI(base_url=f'{server}/v1', api_key=KEY, max_retries=0, timeout=60)


def http(server, method, path, key=KEY, **kw):
    headers = {'Authorization': f'Bearer {key}'} if key else {}
    return httpx.request(method, server + path, headers=headers, timeout=60, **kw)


def scrape(server):
    return parse_metrics(http(server, 'GET', '/metrics').text)


def wait_idle(server, timeout=20):
    """Metrics once the engine runs nothing and no KV block is in use."""
    deadline = time.time() + timeout
    while True:
        m = scrape(server)
        if (metric(m, 'lmdeploy_kv_blocks_used') == 0
                and metric(m, 'lmdeploy_num_requests_running') == 0
                and metric(m, 'lmdeploy_num_requests_waiting') == 0):
            return m
        if time.time() > deadline:
            raise AssertionError(f'engine not idle: {m}')
        time.sleep(0.1)


EXTENSIONS = ('ignore_eos', 'top_k', 'repetition_penalty', 'session_id', 'interactive_mode')


def chat(client, question, **kw):
    """A one-message chat; greedy unless told; this server's extensions go in extra_body."""
    kw.setdefault('temperature', 0)
    extra = {k: kw.pop(k) for k in EXTENSIONS if k in kw}
    if extra:
        kw['extra_body'] = {**kw.get('extra_body', {}), **extra}
    return client.chat.completions.create(
        model='minichat', messages=[{'role': 'user', 'content': question}], **kw)


QUESTIONS = ['What is 23 + 45?', 'Reverse the word garden.', 'Subtract 8 from 50.',
             'Count from 3 to 9.']


# ------------------------------------------------------------------------------------------
# Models, chat and completions


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ['minichat']


@pytest.mark.parametrize('question', QUESTIONS)
def test_chat_greedy_answers(client, question):
    r = chat(client, question)
    assert r.choices[0].message.content == data.answer_for(question)
    assert r.choices[0].finish_reason == 'stop'
    assert r.choices[0].message.role == 'assistant'
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(client):
    question = QUESTIONS[3]
    stream = chat(client, question, stream=True, stream_options={'include_usage': True})
    parts, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or '')
            reasons.append(c.finish_reason)
    assert ''.join(parts) == data.answer_for(question)
    assert reasons[-1] == 'stop' and all(r is None for r in reasons[:-1])
    assert len([p for p in parts if p]) > 3, 'the reply must come in several chunks'
    full = chat(client, question)
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_sse_ends_with_done(server):
    body = {'model': 'minichat', 'stream': True, 'temperature': 0,
            'messages': [{'role': 'user', 'content': 'hi'}]}
    r = http(server, 'POST', '/v1/chat/completions', json=body)
    assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
    events = [line for line in r.text.split('\n\n') if line]
    assert events[-1] == 'data: [DONE]'
    assert all(e.startswith('data: ') for e in events)


def test_completion(client):
    prompt = '<BOS><|user|>What is 12 + 30?<|end|><|bot|>'
    r = client.completions.create(model='minichat', prompt=prompt, temperature=0, max_tokens=40)
    assert r.choices[0].text.strip() == data.answer_for('What is 12 + 30?')
    assert r.choices[0].finish_reason == 'stop'
    parts = [c.choices[0].text for c in client.completions.create(
        model='minichat', prompt=prompt, temperature=0, max_tokens=40, stream=True)
        if c.choices]
    assert ''.join(parts) == r.choices[0].text


def test_completion_length_and_token_prompt(client):
    prompt = '<BOS><|user|>Count from 1 to 9.<|end|><|bot|>'
    r = client.completions.create(model='minichat', prompt=prompt, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == 'length'
    assert r.usage.completion_tokens == 3
    # the same prompt as token ids
    from lmdeploy.turbomind.tokenizer import Tokenizer
    ids = Tokenizer(os.path.join(MODEL_DIR, 'tokenizer.model')).encode(prompt)
    r2 = client.completions.create(model='minichat', prompt=ids, temperature=0, max_tokens=3)
    assert r2.choices[0].text == r.choices[0].text
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens == len(ids)


def test_n_choices(client):
    r = chat(client, QUESTIONS[0], n=3, temperature=1.0, seed=5, max_tokens=20)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens >= 3
    stream = chat(client, QUESTIONS[0], n=2, stream=True)
    texts = {0: '', 1: ''}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ''
    assert texts[0] == texts[1] == data.answer_for(QUESTIONS[0])


# ------------------------------------------------------------------------------------------
# Stop strings, seeds, sampling parameters


@pytest.mark.parametrize('stream', [False, True])
def test_stop_string_across_tokens(client, stream):
    question = 'Count from 1 to 9.'
    answer = data.answer_for(question)  # '1, 2, 3, 4, 5, 6, 7, 8, 9.'
    stop = '4, 5'
    r = chat(client, question, stop=[stop, 'never'], stream=stream)
    if stream:
        parts = []
        reason = None
        for chunk in r:
            for c in chunk.choices:
                parts.append(c.delta.content or '')
                reason = c.finish_reason or reason
        text = ''.join(parts)
        # no chunk ever carried the start of the stop string
        assert not any('4' in p for p in parts), parts
    else:
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == answer[:answer.index(stop)]
    assert reason == 'stop'


def test_stop_string_never_matching_is_released(client):
    # '9!' shares the prefix '9' with the reply's end; the held-back '9' must come out
    question = 'Count from 5 to 9.'
    r = chat(client, question, stop='9!', stream=True)
    text = ''.join(c.choices[0].delta.content or '' for c in r if c.choices)
    assert text == data.answer_for(question)


def test_seed_reproducible(client):
    kw = dict(temperature=1.0, top_p=1.0, max_tokens=24, ignore_eos=True)
    a = chat(client, 'hi', seed=1234, **kw).choices[0].message.content
    b = chat(client, 'hi', seed=1234, **kw).choices[0].message.content
    assert a == b
    others = {chat(client, 'hi', seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1, 'different seeds should sample differently'
    stream = chat(client, 'hi', seed=1234, stream=True, **kw)
    assert ''.join(c.choices[0].delta.content or '' for c in stream if c.choices) == a


def test_ignore_eos_runs_to_length(client):
    r = chat(client, 'hi', ignore_eos=True, max_tokens=50)
    assert r.choices[0].finish_reason == 'length'
    assert r.usage.completion_tokens == 50


def test_sampling_params_accepted(client):
    r = chat(client, QUESTIONS[0], temperature=0.7, top_p=0.9, extra_body={
        'top_k': 5, 'repetition_penalty': 1.1}, seed=3, max_tokens=30)
    assert r.choices[0].finish_reason in ('stop', 'length')


# ------------------------------------------------------------------------------------------
# Interactive sessions


def test_session_turn2_equals_fresh_run(client, server):
    q1, q2 = 'What is 31 + 12?', 'Add 7 to that.'
    sid = 4242
    t1 = chat(client, q1, extra_body={'session_id': sid, 'interactive_mode': True})
    a1 = t1.choices[0].message.content
    assert a1 == data.answer_for(q1)
    info = http(server, 'GET', f'/v1/sessions/{sid}').json()
    assert info['tokens'] == t1.usage.prompt_tokens + t1.usage.completion_tokens
    # turn 2 sends only its new message
    t2 = chat(client, q2, extra_body={'session_id': sid, 'interactive_mode': True})
    assert t2.usage.prompt_tokens < 12, 'a later turn must send only the new message'
    fresh = client.chat.completions.create(model='minichat', temperature=0, messages=[
        {'role': 'user', 'content': q1}, {'role': 'assistant', 'content': a1},
        {'role': 'user', 'content': q2}])
    assert t2.choices[0].message.content == fresh.choices[0].message.content
    assert t2.choices[0].message.content == data.answer_for(q2, data.result_of(a1))
    # streaming a third turn works as well
    q3 = 'Subtract 3 from that.'
    parts = chat(client, q3, stream=True, extra_body={'session_id': sid, 'interactive_mode': True})
    a3 = ''.join(c.choices[0].delta.content or '' for c in parts if c.choices)
    assert a3 == data.answer_for(q3, data.result_of(t2.choices[0].message.content))
    # end it: the blocks are freed, the session is gone
    assert http(server, 'POST', f'/v1/sessions/{sid}/end').status_code == 200
    assert http(server, 'GET', f'/v1/sessions/{sid}').status_code == 404
    end_again = http(server, 'POST', f'/v1/sessions/{sid}/end')
    assert end_again.status_code == 404
    assert end_again.json()['error']['code'] == 'session_not_found'
    wait_idle(server)


def test_session_ended_by_non_interactive_turn(client, server):
    sid = 77
    chat(client, 'What is 2 + 3?', extra_body={'session_id': sid, 'interactive_mode': True})
    r = chat(client, 'Add 4 to that.', extra_body={'session_id': sid})
    assert r.choices[0].message.content == data.answer_for('Add 4 to that.', 5)
    assert http(server, 'GET', f'/v1/sessions/{sid}').status_code == 404
    wait_idle(server)


def test_completion_session(client, server):
    sid = 91
    r1 = client.completions.create(model='minichat', temperature=0, max_tokens=40,
                                   prompt='<BOS><|user|>What is 10 + 20?<|end|><|bot|>',
                                   extra_body={'session_id': sid, 'interactive_mode': True})
    assert r1.choices[0].text.strip() == '10 + 20 = 30.'
    r2 = client.completions.create(model='minichat', temperature=0, max_tokens=40,
                                   prompt='<|user|>Add 5 to that.<|end|><|bot|>',
                                   extra_body={'session_id': sid})
    assert r2.choices[0].text.strip() == '30 + 5 = 35.'
    wait_idle(server)


# ------------------------------------------------------------------------------------------
# Errors


def _error(exc_info, status, code=None):
    e = exc_info.value
    assert e.status_code == status, e
    body = e.response.json()
    assert set(body['error']) >= {'message', 'type', 'code'}
    if code:
        assert body['error']['code'] == code, body
    return body['error']


@pytest.mark.parametrize('params', [
    {'temperature': 2.5}, {'temperature': -0.1}, {'top_p': 0}, {'top_p': 1.5}, {'max_tokens': 0},
    {'n': 0}, {'n': 100}, {'seed': -1}, {'stop': ''}, {'stop': ['a'] * 17},
    {'presence_penalty': 1.0}, {'frequency_penalty': 3.0},
    {'extra_body': {'top_k': -1}}, {'extra_body': {'repetition_penalty': 0}},
    {'extra_body': {'session_id': -5}}, {'extra_body': {'interactive_mode': True}},
])
def test_bad_parameters_400(client, params):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, 'hi', **params)
    err = _error(e, 400)
    assert err['message']


def test_bad_requests_400(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model='minichat', prompt='')
    _error(e, 400, 'empty_prompt')
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model='minichat', messages=[])
    _error(e, 400, 'empty_prompt')
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model='minichat', prompt=[1, 2, 5000])
    _error(e, 400)
    too_long = ' '.join(['apple'] * 1200)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, too_long)
    assert 'context' in _error(e, 400, 'context_length_exceeded')['message']
    r = http(server, 'POST', '/v1/chat/completions', content=b'{not json')
    assert r.status_code == 400 and r.json()['error']['code'] == 'invalid_json'
    r = http(server, 'POST', '/v1/chat/completions', json={'model': 'minichat'})
    assert r.status_code == 400 and r.json()['error']['param'] == 'messages'


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model='gpt-4', messages=[{'role': 'user', 'content': 'hi'}])
    _error(e, 404, 'model_not_found')


def test_auth_401(server):
    bad = openai.OpenAI(base_url=f'{server}/v1', api_key='wrong', max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    _error(e, 401, 'invalid_api_key')
    with pytest.raises(openai.AuthenticationError):
        chat(bad, 'hi')
    assert http(server, 'GET', '/metrics', key=None).status_code == 401
    assert http(server, 'POST', '/v1/completions', key=None,
                json={'model': 'minichat', 'prompt': 'x'}).status_code == 401
    # health stays open; the second key works too
    assert httpx.get(f'{server}/health').status_code == 200
    assert http(server, 'GET', '/v1/models', key='other-key').status_code == 200


def test_session_busy_409(server):
    sid = 555
    body = {'model': 'minichat', 'messages': [{'role': 'user', 'content': 'hi'}],
            'ignore_eos': True, 'max_tokens': 400, 'session_id': sid, 'interactive_mode': True}
    with httpx.Client(timeout=60) as c:
        headers = {'Authorization': f'Bearer {KEY}'}
        with c.stream('POST', server + '/v1/chat/completions', json={**body, 'stream': True},
                      headers=headers) as r:
            it = r.iter_lines()
            next(it)
            busy = http(server, 'POST', '/v1/chat/completions', json=body)
            assert busy.status_code == 409, busy.text
            assert busy.json()['error']['code'] == 'session_busy'
    http(server, 'POST', f'/v1/sessions/{sid}/end')
    wait_idle(server)


# ------------------------------------------------------------------------------------------
# Disconnects, overload, metrics


@pytest.mark.parametrize('stream', [True, False])
def test_disconnect_frees_blocks(server, stream):
    wait_idle(server)
    body = {'model': 'minichat', 'messages': [{'role': 'user', 'content': 'hi'}],
            'ignore_eos': True, 'max_tokens': 1000, 'stream': stream}
    headers = {'Authorization': f'Bearer {KEY}'}
    before = scrape(server)
    if stream:
        with httpx.Client(timeout=60) as c:
            with c.stream('POST', server + '/v1/chat/completions', json=body,
                          headers=headers) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for _ in range(6):
                    next(lines)
                busy = scrape(server)
                assert metric(busy, 'lmdeploy_kv_blocks_used') > 0
                assert metric(busy, 'lmdeploy_num_requests_running') == 1
            # leaving the block closes the connection mid-stream
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server + '/v1/chat/completions', json=body, headers=headers, timeout=1.0)
    after = wait_idle(server)
    generated = (metric(after, 'lmdeploy_generation_tokens_total')
                 - metric(before, 'lmdeploy_generation_tokens_total'))
    assert generated < 1000, 'the engine request must have been cancelled'
    assert metric(after, 'lmdeploy_num_sessions') == 0


def test_burst_beyond_max_waiting_gets_503(server):
    wait_idle(server)
    capacity = MAX_BATCH + MAX_WAITING
    body = {'model': 'minichat', 'messages': [{'role': 'user', 'content': 'hi'}],
            'ignore_eos': True, 'max_tokens': 200}

    def post(_):
        return http(server, 'POST', '/v1/chat/completions', json=body)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(12)))
    ok = [r for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 503]
    assert len(ok) + len(busy) == 12, [r.status_code for r in responses]
    assert 1 <= len(ok) <= capacity
    assert len(busy) >= 12 - capacity
    for r in ok:
        assert r.json()['choices'][0]['finish_reason'] == 'length'
        assert r.json()['usage']['completion_tokens'] == 200
    for r in busy:
        assert r.headers['retry-after'] == '1'
        assert r.json()['error']['code'] == 'server_busy'
    m = wait_idle(server)
    assert metric(m, 'lmdeploy_requests_rejected_total') >= len(busy)
    # the server still answers afterwards
    assert http(server, 'POST', '/v1/chat/completions', json={**body, 'max_tokens': 2}
                ).status_code == 200


def test_metrics(server, client):
    chat(client, 'hi')
    m = scrape(server)
    for name in ('lmdeploy_num_requests_running', 'lmdeploy_num_requests_waiting',
                 'lmdeploy_generation_tokens_total', 'lmdeploy_prompt_tokens_total',
                 'lmdeploy_time_to_first_token_seconds_count',
                 'lmdeploy_inter_token_latency_seconds_count',
                 'lmdeploy_e2e_request_latency_seconds_count', 'lmdeploy_kv_blocks_total',
                 'lmdeploy_kv_blocks_used', 'lmdeploy_kv_cache_usage_ratio'):
        assert any(k == name or k.startswith(name + '{') for k in m), name
    assert metric(m, 'lmdeploy_kv_blocks_total') > 0
    assert metric(m, 'lmdeploy_time_to_first_token_seconds_count') > 0
    assert metric(m, 'lmdeploy_generation_tokens_total') > 0
