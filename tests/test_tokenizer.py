"""Tokenizer wrapper (lmdeploy/turbomind/tokenizer.py): both backends, markers, detokenizer."""
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

from lmdeploy.turbomind.tokenizer import IncrementalDetokenizer, Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET_DIR = os.path.join(REPO, 'assets', 'tokenizer')
ASSET_MODEL = os.path.join(ASSET_DIR, 'tokenizer.model')
TOKENIZER_PY = os.path.join(REPO, 'lmdeploy', 'turbomind', 'tokenizer.py')

TEXTS = [
    'Hello world! The quick brown fox jumps over the lazy dog.',
    '你好，世界！今天天气很好，我们去公园散步吧。',
    'emoji 😀 and 👍🏽 and a family 👨‍👩‍👧 and 𝄞.',
    'mixed 中文 English 123 😀 ǅ\n\n  two spaces\ttab  ',
    ' leading space',
    '<|user|>hi<|end|><|bot|>hello<|end|>',
    '稀有字：龘靐齉 ok',
]

HF_CONFIG = {
    'tokenizer_class': 'LlamaTokenizer',
    'bos_token': '<s>',
    'eos_token': '</s>',
    'unk_token': '<unk>',
    'add_bos_token': True,
    'add_eos_token': False,
    'clean_up_tokenization_spaces': False,
    'legacy': False,
}


def _hf_source_dir(path):
    """A HF-style folder as Llama checkpoints ship it: tokenizer.model + tokenizer_config.json."""
    os.makedirs(path, exist_ok=True)
    shutil.copy(ASSET_MODEL, os.path.join(path, 'tokenizer.model'))
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
        json.dump(HF_CONFIG, f)
    return path


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
    """A real HF fast tokenizer converted from the project's sentencepiece model and saved with
    save_pretrained (tokenizer.json + tokenizer_config.json, no tokenizer.model)."""
    from transformers import AutoTokenizer
    src = _hf_source_dir(str(tmp_path_factory.mktemp('hf_src')))
    hf = AutoTokenizer.from_pretrained(src)
    out = str(tmp_path_factory.mktemp('hf_saved'))
    hf.save_pretrained(out)
    assert os.path.exists(os.path.join(out, 'tokenizer_config.json'))
    assert not os.path.exists(os.path.join(out, 'tokenizer.model'))
    return out


@pytest.fixture(scope='module')
def sp_tok():
    return Tokenizer(ASSET_DIR)


@pytest.fixture(scope='module')
def hf_tok(hf_dir):
    return Tokenizer(hf_dir)


@pytest.fixture(scope='module', params=['sentencepiece', 'hf'])
def tok(request, sp_tok, hf_tok):
    return sp_tok if request.param == 'sentencepiece' else hf_tok


# ---------------------------------------------------------------------------------- loading


def test_backend_selection(sp_tok, hf_tok):
    assert sp_tok.backend == 'sentencepiece'
    assert hf_tok.backend == 'hf'
    assert Tokenizer(ASSET_MODEL).backend == 'sentencepiece'  # the `.model` file form


def test_model_file_path_form_loads_that_file(tmp_path, sp_tok):
    model = tmp_path / 'other_name.model'
    shutil.copy(ASSET_MODEL, model)
    tok = Tokenizer(str(model))
    assert tok.backend == 'sentencepiece'
    assert tok.encode('hello world') == sp_tok.encode('hello world')


def test_tokenizer_config_selects_hf_and_caches_tokenizer_json(tmp_path, capsys):
    src = _hf_source_dir(str(tmp_path / 'src'))
    tok = Tokenizer(src)
    assert tok.backend == 'hf'
    assert 'Can not find tokenizer.json' in capsys.readouterr().err
    # The fast tokenizer is saved next to the files, and the next load uses it silently.
    assert os.path.exists(os.path.join(src, 'tokenizer.json'))
    assert not [f for f in os.listdir(src) if f.endswith('.tmp')]
    again = Tokenizer(os.path.join(src, 'tokenizer.model'))  # .model form, config present -> hf
    assert again.backend == 'hf'
    assert 'Can not find tokenizer.json' not in capsys.readouterr().err
    assert again.encode('你好 world 😀') == tok.encode('你好 world 😀')


def test_tokenizer_json_cache_failure_never_breaks_loading(tmp_path, monkeypatch):
    import tempfile
    src = _hf_source_dir(str(tmp_path / 'src'))

    def refuse(*args, **kwargs):
        raise OSError('read-only file system')

    monkeypatch.setattr(tempfile, 'mkstemp', refuse)
    tok = Tokenizer(src)
    assert tok.backend == 'hf'
    assert not os.path.exists(os.path.join(src, 'tokenizer.json'))
    assert tok.decode(tok.encode('hello')) == 'hello'


@pytest.mark.parametrize('path', ['/nonexistent/tokenizer/dir', '/nonexistent/dir/tokenizer.model'])
def test_missing_path_is_a_clear_error(path):
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer(path)
    message = str(info.value)
    assert path in message and '\n' not in message


def test_folder_without_any_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_properties(tok):
    assert tok.vocab_size == 2000
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 2


# ---------------------------------------------------------------------------------- encode


def test_sentencepiece_markers(sp_tok):
    plain = sp_tok.encode('<|user|>hi<|end|><|bot|>')
    assert plain[0] != 1  # no BOS by default
    assert sp_tok.encode('<BOS><|user|>hi<|end|><|bot|>') == [1] + plain
    # `<BOS>` anywhere is removed and turns into one leading BOS.
    assert sp_tok.encode('<|user|>hi<BOS><|end|><|bot|>') == [1] + plain
    assert sp_tok.encode('<EOS>') == [2]
    assert sp_tok.encode('<BOS>') == [1]
    assert sp_tok.encode('') == []
    # `<EOS>` inside other text is plain text, as in v0.0.2.
    assert 2 not in sp_tok.encode('a<EOS>')
    # No other special parsing: '</s>' is text.
    assert 2 not in sp_tok.encode('</s>')
    assert sp_tok.decode(sp_tok.encode('</s>')) == '</s>'


def test_hf_markers(hf_tok):
    ids = hf_tok.encode('<BOS><|user|>hi<|end|><|bot|>')
    assert ids[0] == 1 and ids.count(1) == 1
    assert hf_tok.decode(ids) == '<|user|>hi<|end|><|bot|>'
    assert 1 not in hf_tok.encode('<|user|>hi')  # add_special_tokens=False
    assert hf_tok.encode('<EOS>') == [2]
    assert hf_tok.encode('') == [1]  # v0.0.2: the empty string keeps the special tokens
    # `<BOS>` is replaced in place.
    mid = hf_tok.encode('hi<BOS>there')
    assert 1 in mid and mid[0] != 1
    # The HF backend turns a literal '</s>' into EOS (the vicuna later-turn caveat).
    assert 2 in hf_tok.encode('</s>USER: hi')


def test_user_defined_role_tokens_are_single_ids(tok):
    ids = tok.encode('<|user|>hi<|end|><|bot|>')
    assert 3 in ids and 4 in ids and 5 in ids
    assert tok.token_id('<|end|>') == 5
    assert tok.token_id('<|user|>') == 3
    assert tok.token_id('not-a-token-xyz') is None


@pytest.mark.parametrize('text', TEXTS)
def test_round_trip(tok, text):
    expected = text
    if tok.backend == 'hf' and text.startswith(' '):
        # transformers' Llama tokenizer (legacy=False) adds no dummy prefix to text that
        # already starts with a space, so decode drops that space: HF's own behaviour.
        expected = text[1:]
    assert tok.decode(tok.encode(text)) == expected


def test_byte_fallback_is_used(tok):
    ids = tok.encode('😀')
    pieces = [tok.model.model.id_to_piece(i) for i in ids] if tok.backend == 'sentencepiece' \
        else tok.model.model.convert_ids_to_tokens(ids)
    assert '<0xF0>' in pieces and '<0x80>' in pieces


def test_decode_accepts_lists_arrays_and_tensors(tok):
    ids = tok.encode('hello 你好 😀')
    text = tok.decode(ids)
    assert tok.decode(tuple(ids)) == text
    assert tok.decode(np.array(ids, dtype=np.int64)) == text
    assert tok.decode(np.array(ids, dtype=np.int32)) == text
    torch = pytest.importorskip('torch')
    assert tok.decode(torch.tensor(ids)) == text


def test_hf_decode_skips_special_tokens(hf_tok):
    ids = [1] + hf_tok.encode('hello') + [2]
    assert hf_tok.decode(ids) == 'hello'


def test_call_returns_input_ids(tok):
    single = tok('hello world')
    assert list(single.input_ids) == tok.encode('hello world')
    batch = tok(['hello', '你好'])
    assert [list(x) for x in batch.input_ids] == [tok.encode('hello'), tok.encode('你好')]
    assert 1 not in single.input_ids  # no special tokens


# ---------------------------------------------------------------------------------- detokenizer


def _chunks(ids, size):
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _random_chunks(ids, rng):
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(0, 5)
        out.append(ids[i:i + n])
        i += n
    return out


def _stream(tok, chunks, context=()):
    detok = tok.detokenizer(context)
    deltas = [detok.step(chunk) for chunk in chunks]
    deltas.append(detok.flush())
    return deltas


def _check_stream(tok, ids, chunks):
    final = tok.decode(ids)
    emitted = ''
    deltas = _stream(tok, chunks)
    for i, delta in enumerate(deltas):
        if i < len(deltas) - 1:
            # No partial character: a U+FFFD appears in a step's delta only where the final
            # text has one (it is then part of the prefix check below).
            assert '\ufffd' not in delta or '\ufffd' in final
        emitted += delta
        assert final.startswith(emitted), (ids, emitted, final)
    assert emitted == final, (ids, emitted, final)
    return deltas


@pytest.mark.parametrize('text', TEXTS)
def test_detokenizer_every_cut_and_chunking(tok, text):
    rng = random.Random(zlib.crc32(text.encode()))  # the same chunks every run
    ids = tok.encode(text)
    for cut in range(len(ids) + 1):
        for part in (ids[:cut], ids[cut:]):
            for size in (1, 2, 3):
                _check_stream(tok, part, _chunks(part, size))
            _check_stream(tok, part, _random_chunks(part, rng))


@pytest.mark.parametrize('text', TEXTS)
def test_detokenizer_no_replacement_char_in_clean_text(tok, text):
    ids = tok.encode(text)
    for size in (1, 2, 3):
        deltas = _check_stream(tok, ids, _chunks(ids, size))
        assert all('\ufffd' not in d for d in deltas)


def test_detokenizer_emoji_is_emitted_whole(sp_tok):
    ids = sp_tok.encode('a😀b')
    detok = sp_tok.detokenizer()
    deltas = [detok.step([i]) for i in ids] + [detok.flush()]
    assert '😀' in deltas or any('😀' in d for d in deltas)
    assert all(d in ('', 'a', '😀', 'b', '😀b') for d in deltas), deltas


def test_detokenizer_random_id_sequences(tok):
    """Arbitrary ids, including invalid byte sequences and control tokens."""
    rng = random.Random(1234)
    byte_ids = list(range(6, 262))
    emoji_bytes = tok.encode('😀')
    for _ in range(400):
        ids = []
        for _ in range(rng.randint(0, 16)):
            kind = rng.random()
            if kind < 0.4:
                ids.append(rng.randrange(tok.vocab_size))
            elif kind < 0.75:
                ids.append(rng.choice(byte_ids))
            elif kind < 0.85:
                ids.append(rng.randrange(0, 6))
            else:
                ids.extend(emoji_bytes[:rng.randint(1, len(emoji_bytes))])
        for chunks in (_chunks(ids, 1), _chunks(ids, 2), _random_chunks(ids, rng)):
            _check_stream(tok, ids, chunks)


def test_detokenizer_truncated_character_only_at_flush(tok):
    ids = tok.encode('ok 😀')
    cut = ids[:-1]  # the emoji's last byte never arrives
    detok = tok.detokenizer()
    steps = ''.join(detok.step([i]) for i in cut)
    assert '\ufffd' not in steps
    rest = detok.flush()
    assert steps + rest == tok.decode(cut)
    assert '\ufffd' in rest


def test_detokenizer_leading_space_only_at_sequence_start(tok):
    # '▁world' keeps its space mid-sequence, but not as the first piece of the sequence.
    ids = tok.encode('hello world')
    deltas = _check_stream(tok, ids, _chunks(ids, 1))
    assert ''.join(deltas) == 'hello world'
    space_first = tok.encode(' world')
    assert ''.join(_stream(tok, _chunks(space_first, 1))) == tok.decode(space_first)


def test_detokenizer_context_ids(tok):
    prompt = tok.encode('<BOS><|user|>hi<|end|><|bot|>')
    reply = tok.encode('hello world 😀 你好')
    full = tok.decode(prompt + reply)
    base = tok.decode(prompt)
    for size in (1, 2, 3):
        text = ''.join(_stream(tok, _chunks(reply, size), context=prompt))
        assert text == full[len(base):]
    # With a long context only a short tail of it is decoded.
    long_context = tok.encode('The quick brown fox. ' * 50)
    text = ''.join(_stream(tok, _chunks(reply, 1), context=long_context))
    assert text == tok.decode(long_context + reply)[len(tok.decode(long_context)):]


def test_detokenizer_empty_and_numpy_steps(tok):
    ids = tok.encode('hello 你好')
    detok = tok.detokenizer()
    out = detok.step([]) + detok.step(np.array(ids[:2])) + detok.step([]) + detok.step(ids[2:])
    out += detok.flush() + detok.flush()
    assert out == tok.decode(ids)


def test_detokenizer_cost_is_a_window_not_the_sequence(tok):
    ids = tok.encode('The quick brown fox 你好世界 😀 jumps over 稀有字龘. ' * 100)
    sizes = []
    decode = tok.model.decode

    def counting(window):
        sizes.append(len(window))
        return decode(window)

    detok = IncrementalDetokenizer(counting, **tok.model.detokenizer_options())
    text = ''.join(detok.step([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert len(ids) > 1000
    assert max(sizes) <= 16, max(sizes)
    assert len(sizes) <= 2 * len(ids) + 2


# ---------------------------------------------------------------------------------- workspace copy


def test_imports_only_standalone_modules():
    """The file is copied into workspaces: stdlib + numpy/sentencepiece/transformers only."""
    tree = ast.parse(open(TOKENIZER_PY).read())
    allowed_third_party = {'numpy', 'sentencepiece', 'transformers', 'torch'}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, 'relative import'
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split('.')[0]
            assert top != 'lmdeploy'
            assert top in sys.stdlib_module_names or top in allowed_third_party, name


def test_copied_file_works_without_torch(tmp_path):
    target = tmp_path / 'triton_models' / 'tokenizer'
    target.mkdir(parents=True)
    shutil.copy(TOKENIZER_PY, target / 'tokenizer.py')
    shutil.copy(ASSET_MODEL, target / 'tokenizer.model')
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['lmdeploy'] = None\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "from tokenizer import Tokenizer\n"
        f"t = Tokenizer({str(target)!r})\n"
        "ids = t.encode('<BOS>hello 😀')\n"
        "d = t.detokenizer(); s = ''.join(d.step([i]) for i in ids) + d.flush()\n"
        "assert ids[0] == 1 and s == t.decode(ids) == 'hello 😀', (ids, s)\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=str(tmp_path), env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok'
