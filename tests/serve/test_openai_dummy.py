"""`api_server --dummy`: random weights, no tokenizer (byte-level stand-in), token-id prompts;
what B4 runs against. Greedy output equals the in-process engine on the same seeded weights."""
import json
import socket
import subprocess
import sys

import pytest

httpx = pytest.importorskip('httpx')
for _module in ('fastapi', 'uvicorn', 'prometheus_client'):  # the [serve] extra
    pytest.importorskip(_module)

from lmdeploy.serve.openai.dummy_tokenizer import ByteTokenizer  # noqa: E402
from tests.serve.test_openai_server import ROOT, start_server, stop_server  # noqa: E402

SHAPE = 'tiny-mha'
PROMPT = [1, 300, 41, 77, 500, 9]


@pytest.fixture(scope='module')
def server():
    proc, url = start_server(None, '--dummy', SHAPE, '--device', 'cpu', '--max_batch_size', '4',
                             '--engine_timing')
    yield url
    stop_server(proc)
    out = proc.stdout.read()
    assert 'Traceback' not in out, out
    assert '(512 beside decoding)' in out  # the server's default reached the scheduler
    # --engine_timing: the step phases and where each first token spent its time, per stage
    timing = json.loads(next(line for line in out.splitlines()
                             if line.startswith('engine_timing: '))[len('engine_timing: '):])
    assert timing['steps'] > 0
    for stage in ('ttft_server_in', 'ttft_queue', 'ttft_step', 'ttft_server_out'):
        assert timing[f'{stage}_n'] >= 2 and timing[f'{stage}_ms_p50'] >= 0, (stage, timing)


@pytest.fixture(scope='module')
def reference():
    from lmdeploy.turbomind import TurboMind
    with TurboMind(dummy=SHAPE, device='cpu', max_batch_size=1) as tm:
        out = list(tm.create_instance().stream_infer(1, PROMPT, request_output_len=8, top_k=1,
                                                     ignore_eos=True, sequence_end=True))
    return out[-1][0][0].tolist(), tm.config.vocab_size


def test_token_prompt_streams_one_chunk_per_token(server, reference):
    ids, vocab = reference
    body = {'model': 'llama2', 'prompt': PROMPT, 'max_tokens': 8, 'temperature': 0,
            'ignore_eos': True, 'stream': True, 'stream_options': {'include_usage': True}}
    texts, reasons, usage = [], [], None
    with httpx.stream('POST', server + '/v1/completions', json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith('data: ') or line == 'data: [DONE]':
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get('usage') or usage
            for c in chunk['choices']:
                texts.append(c['text'])
                reasons.append(c['finish_reason'])
    expected = ByteTokenizer(vocab).decode(ids)
    assert ''.join(texts) == expected
    if all(t >= 259 for t in ids):  # random weights: ids beyond the bytes, one piece each
        assert [t for t in texts if t] == [f'<{t}>' for t in ids]
    assert reasons[-1] == 'length' and usage['completion_tokens'] == 8


def test_chat_through_the_byte_tokenizer(server):
    r = httpx.post(server + '/v1/chat/completions', timeout=60, json={
        'model': 'llama2', 'messages': [{'role': 'user', 'content': 'héllo'}],
        'max_tokens': 4, 'temperature': 0})
    assert r.status_code == 200, r.text
    choice = r.json()['choices'][0]
    assert choice['finish_reason'] in ('stop', 'length') and r.json()['usage']['prompt_tokens'] > 6


def test_cli_help_and_one_line_errors():
    run = [sys.executable, '-m', 'lmdeploy.serve.openai.api_server']
    help_text = subprocess.run(run + ['--help'], cwd=ROOT, capture_output=True, text=True).stdout
    for flag in ('--dummy', '--server_name', '--server_port', '--tp', '--api_keys',
                 '--max_waiting', '--model_name', '--instance_num', '--max_batch_size',
                 '--session_len', '--cache_max_entry_count', '--num_blocks', '--block_size',
                 '--max_prefill_tokens', '--max_mixed_prefill_tokens', '--quant_policy',
                 '--dtype', '--device', '--log_level'):
        assert flag in help_text, flag
    both = subprocess.run(run + ['./ws', '--dummy', 'tiny'], cwd=ROOT, capture_output=True,
                          text=True)
    assert both.returncode == 2 and 'one of them' in both.stderr
    small = subprocess.run(run + ['--dummy', 'tiny', '--device', 'cpu'], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert small.returncode == 1
    assert small.stderr.strip().splitlines() == [
        'error: a byte-level tokenizer needs a vocabulary of at least 259 ids, got 256']


@pytest.mark.parametrize('client', ['aiohttp', 'httpx'])
def test_profile_restful_api_against_the_dummy_server(server, tmp_path, capsys, client):
    pytest.importorskip(client)
    from benchmark import profile_restful_api
    from benchmark.profile_throughput import sample_synthetic
    out = tmp_path / 'b4.json'
    assert profile_restful_api.main(['synthetic', '--base_url', server, '--request_rate', '20',
                                     '--num_prompts', '4', '--vocab_size', '512',
                                     '--max_seq_len', '120', '--no_progress', '--client', client,
                                     '--out', str(out)]) == 0
    assert f'client {client}' in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data['client'] == client
    (r,) = data['results']
    assert r['completed'] == 4 and r['errors'] == 0
    assert 0 < r['ttft_ms_p50'] <= r['ttft_ms_p99'] and 0 < r['itl_ms_p50'] <= r['itl_ms_p99']
    assert r['ttft_ms_p50'] < r['e2e_s_p50'] * 1000 and 0 < r['tpot_ms_p50']
    # ignore_eos: every request streams its max_tokens, counted from the reported usage
    wanted = sum(n for _, n in sample_synthetic(4, 512, 0, 120))
    assert round(r['throughput_out_tok_s'] * r['elapsed_s']) == wanted


def test_both_benchmark_clients_read_the_same_stream(server):
    """aiohttp and httpx carry the bytes; tokens, chunk gaps and errors come out the same."""
    pytest.importorskip('aiohttp')
    import asyncio
    import time
    from benchmark import profile_restful_api as b4
    greedy = {'model': 'llama2', 'prompt': PROMPT, 'max_tokens': 8, 'temperature': 0,
              'ignore_eos': True, 'stream': True, 'stream_options': {'include_usage': True}}
    invalid = dict(greedy, max_tokens=0)
    unknown = dict(greedy, model='nope')

    async def run(client, body, url=server):
        transport = b4.CLIENTS[client]
        async with transport.session() as session:
            return await b4.one_request(transport, session, url + '/v1/completions', {}, body,
                                        time.perf_counter())

    def results(body, url=server):
        return {c: asyncio.run(run(c, body, url)) for c in ('aiohttp', 'httpx')}

    for client, (ttft, gaps, e2e, n, error) in results(greedy).items():
        assert error is None and n == 8 and gaps, client
        assert 0 < ttft <= e2e and all(g >= 0 for g in gaps), client
    for body, status in ((invalid, 400), (unknown, 404)):
        got = results(body)
        assert got['aiohttp'] == got['httpx']
        assert got['httpx'][:4] == (None, [], None, 0)
        assert got['httpx'][4].startswith(f'{status}: {{"error"')
    with socket.socket() as s:  # a port nobody listens on: the transport's exception, named
        s.bind(('127.0.0.1', 0))
        closed = f'http://127.0.0.1:{s.getsockname()[1]}'
    for client, (*_, error) in results(greedy, closed).items():
        assert error and 'Error' in error.split(':')[0], (client, error)


def test_benchmark_client_flag(capsys, monkeypatch):
    from benchmark import profile_restful_api as b4
    with pytest.raises(SystemExit):
        b4.parse_args(['--help'])
    assert '--client {aiohttp,httpx}' in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, 'aiohttp', None)  # not installed: httpx
    assert b4.default_client() == 'httpx'
    with pytest.raises(SystemExit):
        b4.parse_args(['synthetic', '--client', 'aiohttp'])
    assert 'aiohttp is not installed' in capsys.readouterr().err


def test_tensor_parallel_server_gives_the_same_tokens(reference):
    """--tp 2: the server's engine runs two CPU ranks; greedy text equals the tp=1 engine's."""
    ids, vocab = reference
    proc, url = start_server(None, '--dummy', SHAPE, '--device', 'cpu', '--max_batch_size', '4',
                             '--tp', '2')
    try:
        r = httpx.post(url + '/v1/completions', timeout=60, json={
            'model': 'llama2', 'prompt': PROMPT, 'max_tokens': 8, 'temperature': 0,
            'ignore_eos': True})
        assert r.status_code == 200, r.text
        assert r.json()['choices'][0]['text'] == ByteTokenizer(vocab).decode(ids)
    finally:
        stop_server(proc)
    out = proc.stdout.read()
    assert 'Traceback' not in out, out
    assert '(512 beside decoding)' in out  # the server's default reached the scheduler
