"""`python -m lmdeploy.turbomind.decode` on the deployed MiniChat: its printed predictions are
the argmax of the engine's `decode()` logits for the same lines."""
import ast
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('sentencepiece')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LINES = ['<BOS><|user|>What is 12 + 5?<|end|><|bot|>12 + 5 = 17.<|end|>\n',
         'hello world\n',
         '你好']  # the last line has no newline


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    from lmdeploy.serve.turbomind.deploy import deploy
    dst = tmp_path_factory.mktemp('decode') / 'workspace'
    deploy('minichat', os.path.join(ROOT, 'assets', 'minichat'), 'hf', dst_path=str(dst))
    return str(dst)


@pytest.fixture(scope='module')
def engine(ws):
    from lmdeploy.turbomind import TurboMind
    tm = TurboMind(ws)
    yield tm
    tm.close()


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / 'inputs.txt'
    path.write_text(''.join(LINES), encoding='utf-8')
    return str(path)


def run_cli(*args):
    return subprocess.run([sys.executable, '-m', 'lmdeploy.turbomind.decode', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def parse_tensor(stdout: str):
    text = stdout.strip()
    assert text.startswith('tensor(') and text.endswith(')'), text
    return ast.literal_eval(text[len('tensor('):-1])


def expected(engine, lines):
    ids = [engine.tokenizer.encode(line) for line in lines]
    logits = engine.create_instance().decode(ids)
    pred = torch.argmax(logits, -1)
    return ids, [pred[i, :len(row)].tolist() for i, row in enumerate(ids)]


def test_prints_the_argmax_of_the_engine_decode(ws, engine, inputs):
    out = run_cli(ws, inputs)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ''
    rows = parse_tensor(out.stdout)
    ids, want = expected(engine, LINES)
    width = max(len(r) for r in ids)
    assert len(rows) == len(LINES) and all(len(r) == width for r in rows)
    for row, line_ids, pred in zip(rows, ids, want):
        assert row == pred + [-1] * (width - len(line_ids))
    # The trailing newline is encoded (a byte token of its own) and predicted after.
    assert ids[0][-1] == engine.tokenizer.encode('\n')[-1]
    # After `<|bot|>` it predicts the first token that greedy generation gives for that prompt.
    first = ids[0]
    bot = first.index(engine.tokenizer.token_id('<|bot|>'))
    for outputs in engine.create_instance().stream_infer(
            7, first[:bot + 1], request_output_len=1, sequence_start=True, sequence_end=True,
            step=0, top_k=1):
        pass
    assert rows[0][bot] == outputs[0][0].tolist()[0]


def test_strip_newline_drops_the_line_endings(ws, engine, inputs):
    out = run_cli(ws, inputs, '--strip_newline')
    assert out.returncode == 0, out.stderr
    rows = parse_tensor(out.stdout)
    ids, want = expected(engine, [line.rstrip('\n') for line in LINES])
    width = max(len(r) for r in ids)
    for row, line_ids, pred in zip(rows, ids, want):
        assert row == pred + [-1] * (width - len(line_ids))
    # Predictions before the newline do not depend on it (causal attention).
    full = parse_tensor(run_cli(ws, inputs).stdout)
    assert full[0][:len(ids[0])] == rows[0][:len(ids[0])]


@pytest.mark.parametrize('make_args, message', [
    (lambda ws, tmp: (ws, str(tmp / 'missing.txt')), 'error: input file {tmp}/missing.txt does not exist'),
    (lambda ws, tmp: (ws, str(tmp)), 'error: {tmp} is not a file'),
    (lambda ws, tmp: ('/nonexistent/ws', str(tmp)), 'error: workspace /nonexistent/ws does not exist'),
    (lambda ws, tmp: (ws,), 'error: missing required argument INPUTS'),
    (lambda ws, tmp: (ws, str(tmp), '--bogus'), 'error: unknown flag --bogus'),
])
def test_bad_input_is_a_one_line_error(ws, tmp_path, make_args, message):
    out = run_cli(*make_args(ws, tmp_path))
    assert out.returncode != 0 and out.stdout == ''
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), out.stderr


def test_empty_file_is_an_error(ws, tmp_path):
    path = tmp_path / 'empty.txt'
    path.write_text('')
    out = run_cli(ws, str(path))
    assert out.returncode != 0 and out.stderr.strip() == f'error: {path} is empty: nothing to decode'
