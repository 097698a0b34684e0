"""The Triton model-repository templates and service_docker_up.sh (reference §3.1, §9.1, §9.2).

Checks the config.pbtxt files field by field against the §9.1 tables, runs the pre/post-
processing models' tokenizing code (and their TritonPythonModel classes, against a stand-in
for ``triton_python_backend_utils``) in a workspace-shaped temp tree, and runs the docker
script with a fake ``docker`` on PATH.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = os.path.join(ROOT, 'lmdeploy', 'serve', 'turbomind')
TEMPLATES = os.path.join(SERVE, 'triton_models')
SCRIPT = os.path.join(SERVE, 'service_docker_up.sh')
TOKENIZER_MODEL = os.path.join(ROOT, 'assets', 'tokenizer', 'tokenizer.model')
TOKENIZER_PY = os.path.join(ROOT, 'lmdeploy', 'turbomind', 'tokenizer.py')

# ---------------------------------------------------------------------------------------------
# A small reader for protobuf text format (enough for Triton's config.pbtxt): every field maps
# to the list of its occurrences; "[a, b]" values are Python lists; messages are dicts.

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"#]+')


def _tokens(text):
    pos = 0
    out = []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f'cannot tokenize pbtxt at {text[pos:pos + 30]!r}'
        tok = m.group(0)
        pos = m.end()
        if not tok.isspace() and not tok.startswith('#'):
            out.append(tok)
    return out


def _scalar(tok):
    if tok.startswith('"'):
        return tok[1:-1]
    if tok in ('true', 'True'):
        return True
    if tok in ('false', 'False'):
        return False
    try:
        return int(tok)
    except ValueError:
        try:
            return float(tok)
        except ValueError:
            return tok  # enum such as TYPE_UINT32 / KIND_CPU


def _parse_value(toks, i):
    if toks[i] == '{':
        return _parse_message(toks, i + 1, '}')
    if toks[i] == '[':
        items, i = [], i + 1
        while toks[i] != ']':
            value, i = _parse_value(toks, i)
            items.append(value)
            if toks[i] == ',':
                i += 1
        return items, i + 1
    return _scalar(toks[i]), i + 1


def _parse_message(toks, i, end):
    msg = {}
    while i < len(toks) and toks[i] != end:
        name = toks[i]
        i += 1
        if toks[i] == ':':
            i += 1
        value, i = _parse_value(toks, i)
        msg.setdefault(name, []).append(value)
        if i < len(toks) and toks[i] in (',', ';'):
            i += 1
    return msg, i + 1


def parse_pbtxt(text):
    msg, _ = _parse_message(_tokens(text), 0, None)
    return msg


def one(msg, key):
    values = msg.get(key, [])
    assert len(values) == 1, f'{key}: expected one value, got {values!r}'
    return values[0]


def many(msg, key):
    """All items of a repeated field, whether written as `key [..]` or repeated `key {..}`."""
    out = []
    for v in msg.get(key, []):
        out.extend(v if isinstance(v, list) else [v])
    return out


def read_config(name):
    with open(os.path.join(TEMPLATES, name, 'config.pbtxt')) as f:
        return parse_pbtxt(f.read())


def tensors(msg, key):
    """name -> (data_type, dims, reshape shape or None, optional)."""
    out = {}
    for t in many(msg, key):
        name = one(t, 'name')
        assert name not in out, f'duplicate {key} {name}'
        reshape = one(one(t, 'reshape'), 'shape') if 'reshape' in t else None
        optional = one(t, 'optional') if 'optional' in t else False
        out[name] = (one(t, 'data_type'), one(t, 'dims'), reshape, optional)
    return out


def parameters(msg):
    return {one(p, 'key'): one(one(p, 'value'), 'string_value') for p in many(msg, 'parameters')}


def test_pbtxt_reader_itself():
    msg = parse_pbtxt('a: 1\nb [ { c: "x" d: [ 2, -1 ] }, { c: "y" } ]  # note\ne { f: true }\n'
                      'g: KIND_CPU\ne { f: false }\n')
    assert one(msg, 'a') == 1
    assert [one(x, 'c') for x in many(msg, 'b')] == ['x', 'y']
    assert one(many(msg, 'b')[0], 'd') == [2, -1]
    assert [one(x, 'f') for x in many(msg, 'e')] == [True, False]
    assert one(msg, 'g') == 'KIND_CPU'


# ---------------------------------------------------------------------------------------------
# §9.1 tables

S = []  # "[1]->[]": dims [1] reshaped to a scalar
TURBOMIND_INPUTS = {
    # name: (type, dims, reshape, optional)
    'input_ids': ('UINT32', [-1], None, False),
    'input_lengths': ('UINT32', [1], S, False),
    'request_output_len': ('UINT32', [-1], None, False),
    'step': ('INT32', [1], S, True),
    'session_len': ('UINT32', [1], S, True),
    'runtime_top_k': ('UINT32', [1], S, True),
    'runtime_top_p': ('FP32', [1], S, True),
    'beam_search_diversity_rate': ('FP32', [1], S, True),
    'temperature': ('FP32', [1], S, True),
    'len_penalty': ('FP32', [1], S, True),
    'repetition_penalty': ('FP32', [1], S, True),
    'random_seed': ('UINT64', [1], S, True),
    'is_return_log_probs': ('BOOL', [1], S, True),
    'beam_width': ('UINT32', [1], S, True),
    'start_id': ('UINT32', [1], S, True),
    'end_id': ('UINT32', [1], S, True),
    'bad_words_list': ('INT32', [2, -1], None, True),
    'stop_words_list': ('INT32', [2, -1], None, True),
    'prompt_learning_task_name_ids': ('UINT32', [1], S, True),
    'top_p_decay': ('FP32', [1], S, True),
    'top_p_min': ('FP32', [1], S, True),
    'top_p_reset_ids': ('UINT32', [1], S, True),
    'START': ('INT32', [1], S, True),
    'END': ('INT32', [1], S, True),
    'STOP': ('INT32', [1], S, True),
    'CORRID': ('UINT64', [1], S, True),
}
TURBOMIND_OUTPUTS = {
    'output_ids': ('UINT32', [-1, -1]),
    'sequence_length': ('UINT32', [-1]),
    'cum_log_probs': ('FP32', [-1]),
    'output_log_probs': ('FP32', [-1, -1]),
}


def test_turbomind_config_header():
    cfg = read_config('interactive')
    assert one(cfg, 'name') == 'turbomind'
    assert one(cfg, 'backend') == 'turbomind'
    assert one(cfg, 'default_model_filename') == 'weights'
    assert one(cfg, 'max_batch_size') == 1
    assert one(one(cfg, 'model_transaction_policy'), 'decoupled') is True
    groups = many(cfg, 'instance_group')
    assert len(groups) == 1
    assert one(groups[0], 'count') == 48 and one(groups[0], 'kind') == 'KIND_CPU'
    assert parameters(cfg) == {'pipeline_para_size': '1', 'data_type': 'fp16',
                               'model_type': 'Llama', 'enable_custom_all_reduce': '0'}
    assert 'sequence_batching' not in cfg and 'dynamic_batching' not in cfg


def test_turbomind_inputs_and_outputs():
    cfg = read_config('interactive')
    got_in = tensors(cfg, 'input')
    assert set(got_in) == set(TURBOMIND_INPUTS)
    for name, (dtype, dims, reshape, optional) in TURBOMIND_INPUTS.items():
        assert got_in[name] == ('TYPE_' + dtype, dims, reshape, optional), name
    got_out = tensors(cfg, 'output')
    assert set(got_out) == set(TURBOMIND_OUTPUTS)
    for name, (dtype, dims) in TURBOMIND_OUTPUTS.items():
        assert got_out[name] == ('TYPE_' + dtype, dims, None, False), name


def test_turbomind_config_takes_deploy_parameters():
    """deploy appends tensor_para_size and model_name blocks at the end of the file."""
    with open(os.path.join(TEMPLATES, 'interactive', 'config.pbtxt')) as f:
        text = f.read()
    assert text.endswith('\n')
    for key, value in (('tensor_para_size', '2'), ('model_name', 'llama2')):
        text += (f'parameters {{\n  key: "{key}"\n  value: {{\n    string_value: "{value}"\n'
                 '  }\n}\n')
    params = parameters(parse_pbtxt(text))
    assert params['tensor_para_size'] == '2' and params['model_name'] == 'llama2'


def test_preprocessing_config():
    cfg = read_config('preprocessing')
    assert one(cfg, 'name') == 'preprocessing'
    assert one(cfg, 'backend') == 'python'
    assert one(cfg, 'max_batch_size') == 1
    assert tensors(cfg, 'input') == {
        'QUERY': ('TYPE_STRING', [-1], None, False),
        'BAD_WORDS_DICT': ('TYPE_STRING', [-1], None, True),
        'STOP_WORDS_DICT': ('TYPE_STRING', [-1], None, True),
        'REQUEST_OUTPUT_LEN': ('TYPE_UINT32', [-1], None, False),
    }
    assert tensors(cfg, 'output') == {
        'INPUT_ID': ('TYPE_UINT32', [-1], None, False),
        'REQUEST_INPUT_LEN': ('TYPE_UINT32', [1], None, False),
        'BAD_WORDS_IDS': ('TYPE_INT32', [2, -1], None, False),
        'STOP_WORDS_IDS': ('TYPE_INT32', [2, -1], None, False),
        'REQUEST_OUTPUT_LEN': ('TYPE_UINT32', [-1], None, False),
        'PROMPT_LEARNING_TASK_NAME_IDS': ('TYPE_UINT32', [1], None, False),
    }
    groups = many(cfg, 'instance_group')
    assert len(groups) == 1
    assert one(groups[0], 'count') == 4 and one(groups[0], 'kind') == 'KIND_CPU'
    assert parameters(cfg) == {'tokenizer_path': 'tokenizer/tokenizer.model'}


def test_postprocessing_config():
    cfg = read_config('postprocessing')
    assert one(cfg, 'name') == 'postprocessing'
    assert one(cfg, 'backend') == 'python'
    assert one(cfg, 'max_batch_size') == 1
    assert tensors(cfg, 'input') == {
        'TOKENS_BATCH': ('TYPE_UINT32', [-1, -1], None, False),
        'sequence_length': ('TYPE_UINT32', [-1], None, False),
    }
    assert tensors(cfg, 'output') == {'OUTPUT': ('TYPE_STRING', [-1, -1], None, False)}
    groups = many(cfg, 'instance_group')
    assert len(groups) == 1
    assert one(groups[0], 'count') == 1 and one(groups[0], 'kind') == 'KIND_CPU'
    assert parameters(cfg)['tokenizer_path'] == 'tokenizer/tokenizer.model'


def test_template_tree_files_and_no_symlinks():
    expected = {
        'interactive/config.pbtxt', 'interactive/1/placeholder',
        'preprocessing/config.pbtxt', 'preprocessing/1/model.py',
        'postprocessing/config.pbtxt', 'postprocessing/1/model.py',
        'tokenizer/placeholder', 'weights/config.ini',
    }
    found = set()
    for dirpath, dirnames, filenames in os.walk(TEMPLATES):
        dirnames[:] = [d for d in dirnames if d != '__pycache__']
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            # deploy makes 1/weights, 1/tokenizer and model_repository/* itself
            assert not os.path.islink(path), f'template tree must not hold symlinks: {path}'
        for name in filenames:
            if not name.endswith('.pyc'):
                found.add(os.path.relpath(os.path.join(dirpath, name), TEMPLATES))
    assert found == expected
    assert os.path.getsize(os.path.join(TEMPLATES, 'weights', 'config.ini')) == 0


def test_python_models_do_not_import_triton_at_module_level():
    for name in ('preprocessing', 'postprocessing'):
        with open(os.path.join(TEMPLATES, name, '1', 'model.py')) as f:
            for line in f:
                if 'triton_python_backend_utils' in line and line.lstrip().startswith(
                        ('import', 'from')):
                    assert line.startswith((' ', '\t')), f'{name}: {line!r}'


# ---------------------------------------------------------------------------------------------
# pre/post-processing models in a workspace-shaped tree


@pytest.fixture
def workspace(tmp_path):
    """triton_models/{preprocessing,postprocessing}/1/tokenizer -> ../../tokenizer, as deploy
    builds it, with the project tokenizer model and tokenizer.py in tokenizer/."""
    tm = tmp_path / 'triton_models'
    shutil.copytree(TEMPLATES, tm, symlinks=True,
                    ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(TOKENIZER_MODEL, tm / 'tokenizer' / 'tokenizer.model')
    shutil.copy(TOKENIZER_PY, tm / 'tokenizer' / 'tokenizer.py')
    for name in ('preprocessing', 'postprocessing'):
        os.symlink('../../tokenizer', tm / name / '1' / 'tokenizer')
    return tm


def load_model_module(workspace, name):
    path = workspace / name / '1' / 'model.py'
    spec = importlib.util.spec_from_file_location(f'_test_{name}_model_{id(workspace)}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def reference_tokenizer():
    from lmdeploy.turbomind.tokenizer import Tokenizer
    return Tokenizer(TOKENIZER_MODEL)


TEXTS = ['hello world', 'The quick brown fox jumps over the lazy dog.', 'a']


def test_preprocess_encodes_and_pads_with_eos(workspace, reference_tokenizer):
    pre = load_model_module(workspace, 'preprocessing')
    tok = pre.load_tokenizer()  # default parameter, resolved through 1/tokenizer symlink
    queries = np.array([[t.encode()] for t in TEXTS], dtype=object)
    out = pre.preprocess(tok, queries, np.array([[7], [8], [9]], dtype=np.uint32))
    expected = [reference_tokenizer.encode(t) for t in TEXTS]
    width = max(len(x) for x in expected)
    eos = reference_tokenizer.eos_token_id
    assert out['INPUT_ID'].dtype == np.uint32 and out['INPUT_ID'].shape == (3, width)
    assert out['REQUEST_INPUT_LEN'].dtype == np.uint32
    assert out['REQUEST_INPUT_LEN'].tolist() == [[len(x)] for x in expected]
    for row, ids in zip(out['INPUT_ID'].tolist(), expected):
        assert row == list(ids) + [eos] * (width - len(ids))
    assert out['REQUEST_OUTPUT_LEN'].tolist() == [[7], [8], [9]]
    assert out['REQUEST_OUTPUT_LEN'].dtype == np.uint32


def test_preprocess_markers_and_strings(workspace, reference_tokenizer):
    pre = load_model_module(workspace, 'preprocessing')
    tok = pre.load_tokenizer()
    ids, lens = pre.encode_queries(tok, ['<EOS>'])  # str items, 1-D batch
    assert ids.tolist() == [[reference_tokenizer.eos_token_id]] and lens.tolist() == [[1]]
    ids, _ = pre.encode_queries(tok, np.array([['<BOS>hi'.encode()]], dtype=object))
    assert ids[0, 0] == reference_tokenizer.bos_token_id
    with pytest.raises(ValueError):
        pre.encode_queries(tok, np.array([[b'a', b'b']], dtype=object))


def test_round_trip_through_pre_and_post(workspace):
    pre = load_model_module(workspace, 'preprocessing')
    post = load_model_module(workspace, 'postprocessing')
    tok_pre, tok_post = pre.load_tokenizer(), post.load_tokenizer()
    queries = np.array([[t.encode()] for t in TEXTS], dtype=object)
    ids, lens = pre.encode_queries(tok_pre, queries)
    # [batch, beams=1, len] and [batch, beams=1], as the turbomind model returns them
    text = post.decode_tokens(tok_post, ids[:, None, :], lens)
    assert text.dtype == object and text.shape == (3,)
    assert [t.decode('utf-8') for t in text] == TEXTS
    # lengths cut the padding; a zero length gives empty text
    text = post.decode_tokens(tok_post, ids[:1, None, :], np.array([[0]], dtype=np.uint32))
    assert text.tolist() == [b'']


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class FakeRequest:
    def __init__(self, **inputs):
        self.inputs = {k: FakeTensor(k, v) for k, v in inputs.items()}


class FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


@pytest.fixture
def fake_pb_utils(monkeypatch):
    pb = types.ModuleType('triton_python_backend_utils')
    pb.Tensor = FakeTensor
    pb.InferenceResponse = FakeResponse
    pb.TritonError = lambda msg: msg
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    monkeypatch.setitem(sys.modules, 'triton_python_backend_utils', pb)
    return pb


def _args(workspace, name):
    import json
    cfg = read_config(name)
    model_config = {'name': name, 'parameters': {
        k: {'string_value': v} for k, v in parameters(cfg).items()}}
    return {'model_config': json.dumps(model_config), 'model_repository': str(workspace / name),
            'model_version': '1'}


def test_triton_models_execute(workspace, fake_pb_utils):
    pre_mod = load_model_module(workspace, 'preprocessing')
    post_mod = load_model_module(workspace, 'postprocessing')
    pre, post = pre_mod.TritonPythonModel(), post_mod.TritonPythonModel()
    pre.initialize(_args(workspace, 'preprocessing'))
    post.initialize(_args(workspace, 'postprocessing'))

    good = FakeRequest(QUERY=np.array([[b'hello world']], dtype=object),
                       REQUEST_OUTPUT_LEN=np.array([[16]], dtype=np.uint32))
    bad = FakeRequest(QUERY=np.array([[b'\xff\xfe']], dtype=object),  # not UTF-8
                      REQUEST_OUTPUT_LEN=np.array([[16]], dtype=np.uint32))
    r_good, r_bad = pre.execute([good, bad])
    assert r_good.error is None
    assert set(r_good.outputs) == {'INPUT_ID', 'REQUEST_INPUT_LEN', 'REQUEST_OUTPUT_LEN'}
    assert r_bad.error and 'preprocessing' in r_bad.error and not r_bad.outputs

    ids, lens = r_good.outputs['INPUT_ID'], r_good.outputs['REQUEST_INPUT_LEN']
    (r_text,) = post.execute([FakeRequest(TOKENS_BATCH=ids[:, None, :], sequence_length=lens)])
    assert r_text.error is None
    assert r_text.outputs['OUTPUT'][0].decode() == 'hello world'
    pre.finalize()
    post.finalize()


# ---------------------------------------------------------------------------------------------
# service_docker_up.sh


def test_script_syntax_and_shebang():
    subprocess.run(['bash', '-n', SCRIPT], check=True)
    with open(SCRIPT) as f:
        text = f.read()
    assert text.startswith('#!/bin/bash\n')
    # deploy rewrites the one "TP=1" line
    assert re.findall(r'TP=1\b', text) == ['TP=1']
    assert re.search(r'^TP=1$', text, re.M)


@pytest.fixture
def fake_docker(tmp_path):
    """A workspace dir holding the script (TP rewritten to 2 as deploy does) and a PATH with
    a fake docker that prints its argv one per line and leaves a marker file."""
    ws = tmp_path / 'ws'
    ws.mkdir()
    with open(SCRIPT) as f:
        text = f.read()
    (ws / 'service_docker_up.sh').write_text(text.replace('TP=1', 'TP=2'))
    bindir = tmp_path / 'bin'
    bindir.mkdir()
    marker = tmp_path / 'docker_ran'
    docker = bindir / 'docker'
    docker.write_text(f'#!/bin/sh\ntouch "{marker}"\nprintf "%s\\n" "$@"\n')
    docker.chmod(0o755)
    env = dict(os.environ, PATH=f'{bindir}{os.pathsep}{os.environ.get("PATH", "")}')
    return types.SimpleNamespace(ws=ws, env=env, marker=marker, tmp=tmp_path)


def run_script(fd, *args, cwd=None):
    return subprocess.run(['bash', str(fd.ws / 'service_docker_up.sh'), *args], env=fd.env,
                          cwd=cwd or fd.tmp, capture_output=True, text=True, timeout=60)


def expected_argv(ws, devices, lib_dir=None):
    argv = ['run', '--gpus', f'device={devices}', '--rm', '-v', f'{ws}:/workspace/models']
    if lib_dir:
        argv += ['-v', f'{lib_dir}:/opt/tritonserver/backends/turbomind']
    argv += ['--shm-size', '16g', '-p', '33336:22', '-p', '33337-33400:33337-33400',
             '--cap-add=SYS_PTRACE', '--cap-add=SYS_ADMIN', '--security-opt',
             'seccomp=unconfined', '--name', 'lmdeploy', '-it', '--env',
             'NCCL_LAUNCH_MODE=GROUP', 'openmmlab/lmdeploy:latest', 'tritonserver',
             '--model-repository=/workspace/models/model_repository', '--allow-http=0',
             '--allow-grpc=1', '--grpc-port=33337', '--log-verbose=0', '--allow-metrics=1']
    return argv


def test_script_help(fake_docker):
    for flag in ('-h', '--help'):
        r = run_script(fake_docker, flag)
        assert r.returncode == 0, r.stderr
        assert 'Usage' in r.stdout and '--lib-dir' in r.stdout
    assert not fake_docker.marker.exists()


def test_script_unknown_argument(fake_docker):
    r = run_script(fake_docker, '--bogus')
    assert r.returncode == 2
    assert 'unknown argument: --bogus' in r.stderr and 'Usage' in r.stderr
    assert not fake_docker.marker.exists()
    r = run_script(fake_docker, '--lib-dir')  # missing value
    assert r.returncode == 2 and not fake_docker.marker.exists()
    r = run_script(fake_docker, '--lib-dir', str(fake_docker.tmp / 'missing'))
    assert r.returncode == 2 and not fake_docker.marker.exists()


def test_script_docker_command(fake_docker):
    ws = os.path.realpath(fake_docker.ws)
    # run from another directory: the workspace is found from the script's own location
    r = run_script(fake_docker)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == expected_argv(ws, '0,1')

    lib = fake_docker.tmp / 'lib'
    lib.mkdir()
    for args in (['--lib-dir', 'lib'], [f'--lib-dir={lib}']):
        r = run_script(fake_docker, *args)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == expected_argv(ws, '0,1', os.path.realpath(lib))


def test_script_devices_follow_tp(fake_docker):
    with open(SCRIPT) as f:
        text = f.read()
    for tp, devices in ((1, '0'), (4, '0,1,2,3'), (8, '0,1,2,3,4,5,6,7')):
        (fake_docker.ws / 'service_docker_up.sh').write_text(text.replace('TP=1', f'TP={tp}'))
        r = run_script(fake_docker)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[:3] == ['run', '--gpus', f'device={devices}']


# ---------------------------------------------------------------------------------------------
# the templates inside a workspace made by deploy


def test_deployed_workspace(make_ckpt, tmp_path, fake_docker):
    from lmdeploy.serve.turbomind.deploy import deploy
    ws = tmp_path / 'workspace'
    deploy('llama2', str(make_ckpt('gqa')), dst_path=str(ws), tp=2)

    # model_repository/* -> triton_models/*, with the deploy parameters appended
    repo = ws / 'model_repository'
    cfg = parse_pbtxt((repo / 'turbomind' / 'config.pbtxt').read_text())
    assert one(cfg, 'name') == 'turbomind'
    params = parameters(cfg)
    assert params['tensor_para_size'] == '2' and params['model_name'] == 'llama2'
    assert set(tensors(cfg, 'input')) == set(TURBOMIND_INPUTS)
    assert (repo / 'turbomind' / '1' / 'weights' / 'config.ini').stat().st_size > 0

    # the python models run from the repository, through the 1/tokenizer symlinks
    pre = load_model_module(repo, 'preprocessing')
    post = load_model_module(repo, 'postprocessing')
    ids, lens = pre.encode_queries(pre.load_tokenizer(), [b'hello world'])
    text = post.decode_tokens(post.load_tokenizer(), ids[:, None, :], lens)
    assert text.tolist() == [b'hello world']

    # the script's TP line was rewritten; the workspace mounts itself
    script = (ws / 'service_docker_up.sh').read_text()
    assert re.findall(r'^TP=\d+$', script, re.M) == ['TP=2']
    r = subprocess.run(['bash', str(ws / 'service_docker_up.sh')], env=fake_docker.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == expected_argv(os.path.realpath(ws), '0,1')
