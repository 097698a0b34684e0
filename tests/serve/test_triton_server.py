"""The Triton service with raw `tritonclient` gRPC and v0.0.2's tensors (reference 9.1).

One real server for the module (started through the workspace's `service_up.sh`) on the
deployed MiniChat; the in-process engine on the same workspace is the oracle.
"""
import os
import queue
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.serve.triton_fixtures import (ROOT, deploy_minichat, free_port, preprocess,
                                         require_serving, start_server)

require_serving()
import tritonclient.grpc as grpcclient  # noqa: E402

END_ID = 5  # MiniChat's <|end|>
EOS = 2


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    return deploy_minichat(tmp_path_factory, 'raw')


@pytest.fixture(scope='module')
def server(ws):
    server = start_server(ws, via_script=True)
    yield server
    code = server.stop()
    assert code == 0, server.output
    assert '[lmdeploy] stopping' in server.output and '[lmdeploy] stopped' in server.output
    assert 'Traceback' not in server.output, server.output


@pytest.fixture(scope='module')
def engine(ws):
    from lmdeploy.turbomind import TurboMind
    tm = TurboMind(ws)
    yield tm
    tm.close()


def solo(engine, ids, session_id=10 ** 6, **kw):
    """Greedy reply of the in-process engine (a fresh session)."""
    kw.setdefault('stop_words', [END_ID])
    inst = engine.create_instance()
    out = None
    for out in inst.stream_infer(session_id, ids, request_output_len=kw.pop('request_output_len', 64),
                                 sequence_start=True, sequence_end=True, top_k=1, **kw):
        pass
    return out[0][0].tolist()


def inputs(ids, corrid, start=1, end=0, stop=0, out_len=64, step=None, stop_words=(END_ID,),
           bad_words=None, top_k=1, **override):
    one = lambda v, dt: np.array([[v]], dtype=dt)  # noqa: E731
    arrays = {
        'input_ids': np.array([ids or [EOS]], dtype=np.uint32),
        'input_lengths': one(len(ids), np.uint32),
        'request_output_len': one(out_len, np.uint32),
        'runtime_top_k': one(top_k, np.uint32),
        'runtime_top_p': one(0.8, np.float32),
        'temperature': one(0.8, np.float32),
        'repetition_penalty': one(1.0, np.float32),
        'START': one(start, np.int32), 'END': one(end, np.int32), 'STOP': one(stop, np.int32),
        'CORRID': one(corrid, np.uint64),
        'session_len': one(1024, np.uint32),
    }
    if step is not None:
        arrays['step'] = one(step, np.int32)
    if stop_words:
        arrays['stop_words_list'] = np.array([[list(stop_words), list(range(1, len(stop_words) + 1))]],
                                             dtype=np.int32)
    if bad_words:
        arrays['bad_words_list'] = np.array([[list(bad_words), list(range(1, len(bad_words) + 1))]],
                                            dtype=np.int32)
    arrays.update(override)
    out = []
    for name, value in arrays.items():
        if value is None:
            continue
        dtype = {np.dtype('uint32'): 'UINT32', np.dtype('int32'): 'INT32', np.dtype('uint64'): 'UINT64',
                 np.dtype('float32'): 'FP32', np.dtype('int64'): 'INT64'}[value.dtype]
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        out.append(t)
    return out


class Stream:
    """One gRPC stream; `responses` are (output_ids, sequence_length, final), `error` a str."""

    def __init__(self, addr):
        self.client = grpcclient.InferenceServerClient(addr)
        self.queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.queue.put((result, error)))

    def send(self, tensors, request_id='r'):
        self.client.async_stream_infer('turbomind', tensors, request_id=request_id,
                                       enable_empty_final_response=True)

    def collect(self, stop_after=None, timeout=60):
        responses, error = [], None
        while True:
            result, err = self.queue.get(timeout=timeout)
            if err is not None:
                return responses, str(err)
            resp = result.get_response()
            final = resp.parameters['triton_final_response'].bool_param
            ids = result.as_numpy('output_ids')
            if ids is not None:
                seq = int(result.as_numpy('sequence_length').reshape(-1)[0])
                responses.append((ids.reshape(-1)[:seq].tolist(), seq, final))
            if final or (stop_after is not None and len(responses) >= stop_after):
                return responses, error

    def close(self, cancel=False):
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def run(addr, tensors):
    s = Stream(addr)
    try:
        s.send(tensors)
        return s.collect()
    finally:
        s.close()


def prompt_ids(addr, question, first=True):
    from lmdeploy.model import get_template
    return preprocess(addr, get_template('minichat').get_prompt(question, first))


# ----------------------------------------------------------------------------- the model

def test_model_config_keeps_v002_interface(server, ws):
    client = grpcclient.InferenceServerClient(server.addr)
    config = client.get_model_config('turbomind').config
    assert config.name == 'turbomind' and config.model_transaction_policy.decoupled
    assert config.parameters['model_name'].string_value == 'minichat'
    names = [i.name for i in config.input]
    for name in ('input_ids', 'input_lengths', 'request_output_len', 'step', 'runtime_top_k',
                 'runtime_top_p', 'temperature', 'repetition_penalty', 'random_seed',
                 'stop_words_list', 'bad_words_list', 'START', 'END', 'STOP', 'CORRID'):
        assert name in names
    assert [o.name for o in config.output][:2] == ['output_ids', 'sequence_length']
    for model in ('turbomind', 'preprocessing', 'postprocessing'):
        assert client.is_model_ready(model)
    assert 'ready in' in server.output and f'127.0.0.1:{server.port}' in server.output
    client.close()


def test_streaming_greedy_tokens_equal_the_in_process_engine(server, engine):
    from tools.minichat_data import answer_for
    q = 'What is 12 + 5?'
    ids = prompt_ids(server.addr, q)
    responses, error = run(server.addr, inputs(ids, corrid=1, end=1))
    assert error is None
    assert len(responses) > 3 and responses[-1][2] and not any(r[2] for r in responses[:-1])
    lengths = [r[1] for r in responses]
    assert lengths == sorted(lengths) and lengths[0] == len(ids) + 1
    final_ids = responses[-1][0]
    assert final_ids[:len(ids)] == ids
    new = final_ids[len(ids):]
    assert new == solo(engine, ids)
    assert new[-1] == END_ID
    from lmdeploy.serve.turbomind.utils import Postprocessor
    assert Postprocessor(server.addr).decode(new[:-1]) == answer_for(q)


def test_multi_turn_keeps_kv_and_equals_a_fresh_run_on_the_concatenation(server, engine):
    ids1 = prompt_ids(server.addr, 'What is 12 + 5?')
    r1, err = run(server.addr, inputs(ids1, corrid=2, start=1))
    assert err is None
    history = r1[-1][0]
    ids2 = prompt_ids(server.addr, 'Add 3 to that.', first=False)
    r2, err = run(server.addr, inputs(ids2, corrid=2, start=0, step=len(history)))
    assert err is None
    turn2 = r2[-1][0][len(history) + len(ids2):]
    assert r2[-1][0][:len(history)] == history
    assert turn2 == solo(engine, history + ids2)
    # the session really continued: the follow-up answer uses turn 1's result
    from lmdeploy.serve.turbomind.utils import Postprocessor
    assert Postprocessor(server.addr).decode(turn2[:-1]) == '17 + 3 = 20.'
    run(server.addr, inputs([], corrid=2, start=0, end=1, out_len=0))


def test_stop_cancels_a_running_request_and_keeps_the_session(server):
    ids = prompt_ids(server.addr, 'What is 12 + 5?')
    long = Stream(server.addr)
    long.send(inputs(ids, corrid=3, out_len=900, stop_words=(), bad_words=[EOS, END_ID]))
    first, err = long.collect(stop_after=3)
    assert err is None and len(first) == 3
    stopped, err = run(server.addr, inputs([], corrid=3, start=0, stop=1, out_len=0))
    assert err is None and stopped and stopped[-1][2]
    rest, err = long.collect()
    long.close()
    assert err is None and rest[-1][2]
    n = rest[-1][1] - len(ids)
    assert 3 <= n < 900
    # the session is kept: a later turn continues it
    more = prompt_ids(server.addr, 'Add 3 to that.', first=False)
    r, err = run(server.addr, inputs(more, corrid=3, start=0, step=rest[-1][1], out_len=8))
    assert err is None and r[-1][1] > rest[-1][1]
    run(server.addr, inputs([], corrid=3, start=0, end=1, out_len=0))


def test_end_frees_the_session(server):
    ids = prompt_ids(server.addr, 'What is 2 + 2?')
    r, err = run(server.addr, inputs(ids, corrid=4))
    assert err is None
    r, err = run(server.addr, inputs([], corrid=4, start=0, end=1, out_len=0))
    assert err is None and r[-1][2]
    more = prompt_ids(server.addr, 'Add 3 to that.', first=False)
    r, err = run(server.addr, inputs(more, corrid=4, start=0, step=len(ids)))
    assert err is not None and 'code 1' in err and 'InvalidRequest' in err, err


def test_a_client_that_disconnects_has_its_request_cancelled(server):
    ids = prompt_ids(server.addr, 'What is 12 + 5?')
    s = Stream(server.addr)
    s.send(inputs(ids, corrid=5, out_len=900, stop_words=(), bad_words=[EOS, END_ID]))
    got, err = s.collect(stop_after=3)
    assert err is None
    s.close(cancel=True)  # the client goes away mid-stream
    t0 = time.monotonic()
    more = prompt_ids(server.addr, 'Add 3 to that.', first=False)
    while True:  # the session stops being busy once the server noticed the disconnect
        r, err = run(server.addr, inputs(more, corrid=5, start=0, out_len=4))
        if err is None:
            break
        assert 'SessionBusy' in err or 'SessionConflict' in err, err
        assert time.monotonic() - t0 < 5, 'the request kept running after the client left'
        time.sleep(0.1)
    # 900 tokens take far longer than this: the request was cancelled, not finished
    assert r[-1][1] < len(ids) + 300
    run(server.addr, inputs([], corrid=5, start=0, end=1, out_len=0))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('case', ['int32 ids', 'no batch dim', 'float seed', 'batch of 2',
                                  'bad words shape'])
def test_wrong_tensor_types_and_shapes_are_refused(server, case):
    ids = prompt_ids(server.addr, 'hi')
    if case == 'int32 ids':
        tensors = inputs(ids, corrid=6, input_ids=np.array([ids], dtype=np.int32))
        words = ('data-type', 'input_ids', 'UINT32')
    elif case == 'no batch dim':
        tensors = inputs(ids, corrid=6, input_ids=np.array(ids, dtype=np.uint32))
        words = ('input_ids',)
    elif case == 'float seed':
        tensors = inputs(ids, corrid=6, random_seed=np.array([[1.5]], dtype=np.float32))
        words = ('random_seed',)
    elif case == 'batch of 2':
        tensors = inputs(ids, corrid=6, input_ids=np.array([ids, ids], dtype=np.uint32))
        words = ('batch',)
    else:
        tensors = inputs(ids, corrid=6, stop_words=None,
                         stop_words_list=np.array([[[5, 6, 7]]], dtype=np.int32))
        words = ('stop_words_list',)
    r, err = run(server.addr, tensors)
    assert err is not None, r
    assert all(w in err for w in words), err


def test_unknown_session_continuation_is_refused(server):
    ids = prompt_ids(server.addr, 'Add 3 to that.', first=False)
    r, err = run(server.addr, inputs(ids, corrid=777, start=0, step=20))
    assert err is not None and 'code 1' in err and '777' in err, err


def test_over_length_session_is_refused(server):
    ids = prompt_ids(server.addr, 'What is 12 + 5? ' * 120)
    assert len(ids) > 1032
    r, err = run(server.addr, inputs(ids, corrid=8))
    assert err is not None and 'SessionTooLong' in err, err


def test_server_survives_bad_requests(server):
    run(server.addr, inputs([1, 2, 99999], corrid=9))  # out of the vocabulary
    ids = prompt_ids(server.addr, 'What is 40 - 8?')
    r, err = run(server.addr, inputs(ids, corrid=9, end=1))
    assert err is None and r[-1][2]


# ----------------------------------------------------------------------------- launcher

def launcher(*args, timeout=60):
    return subprocess.run([sys.executable, '-m', 'lmdeploy.serve.turbomind.triton_server', *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_launcher_refuses_a_missing_workspace(tmp_path):
    p = launcher(str(tmp_path / 'nope'))
    assert p.returncode == 2
    assert p.stderr.strip().count('\n') == 0 and 'does not exist' in p.stderr


def test_launcher_refuses_a_busy_port(server, ws):
    p = launcher(ws, '--grpc_port', str(server.port), '--host', '127.0.0.1')
    assert p.returncode == 2 and 'cannot listen on 127.0.0.1' in p.stderr, p.stderr


def test_launcher_reports_a_failing_engine_in_one_line(ws):
    p = launcher(ws, '--grpc_port', str(free_port()), '--host', '127.0.0.1', '--tp', '3', timeout=120)
    assert p.returncode == 1
    assert 'error: tritonserver exited' in p.stderr and 'tp=3 does not divide' in p.stderr


def test_tensor_parallel_server_gives_the_engine_tokens(ws, engine):
    """--tp 2: the Triton model's engine runs two CPU ranks; tokens equal the tp=1 engine's."""
    from tests.serve.triton_fixtures import start_server as start
    s = start(ws, '--tp', '2')
    try:
        ids = prompt_ids(s.addr, 'What is 12 + 5?')
        responses, error = run(s.addr, inputs(ids, corrid=1, end=1))
        assert error is None
        assert responses[-1][0][len(ids):] == solo(engine, ids)
    finally:
        assert s.stop() == 0, s.output
    assert 'Traceback' not in s.output, s.output


def test_sigint_stops_the_server_cleanly(ws):
    import signal
    from tests.serve.triton_fixtures import start_server as start
    s = start(ws)
    assert s.stop(signal.SIGINT) == 0
    assert s.output.rstrip().endswith('[lmdeploy] stopped'), s.output


def test_profile_serving_benchmark_runs_on_the_synthetic_set(server, ws, tmp_path):
    out = tmp_path / 'serving.json'
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark', 'profile_serving.py'), server.addr,
                        os.path.join(ws, 'triton_models', 'tokenizer'), '--concurrency', '2',
                        '--samples', '4', '--session_len', '512', '--out', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert 'first_token latency(min, max, ave)' in p.stdout and 'throughput:' in p.stdout
    import json
    result = json.loads(out.read_text())
    assert result['requests'] == 4 and result['failed'] == 0
    assert 0 < result['first_token_latency']['ave'] < result['elapsed_time']
