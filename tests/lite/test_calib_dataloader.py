"""Calibration samples: the shipped corpus (generated, small, regenerable), local .txt/.jsonl
files, seeded windows, and one-line errors for bad sources."""
import json

import pytest

from lmdeploy.console import CliError, UsageError
from lmdeploy.lite.utils.calib_dataloader import (BUILTIN, CORPUS_PATH, check_calib_dataset,
                                                  get_calib_samples)
from tests.lite.conftest import windows
from tools import gen_calib_corpus


@pytest.fixture(scope='module')
def sp(tokenizer_model):
    from sentencepiece import SentencePieceProcessor
    return SentencePieceProcessor(model_file=tokenizer_model)


def test_shipped_corpus_is_the_generator_output_and_small():
    with open(CORPUS_PATH, 'rb') as f:
        data = f.read()
    assert data.decode('utf-8') == gen_calib_corpus.generate()
    assert len(data) < 1_000_000
    text = data.decode('utf-8')
    assert sum('\u4e00' <= c <= '\u9fff' for c in text) > 10_000  # some Chinese prose too


def test_builtin_windows_are_seeded_slices_of_the_corpus(sp, corpus_ids):
    samples = get_calib_samples(BUILTIN, sp.encode, nsamples=5, seqlen=2048)
    assert samples == windows(corpus_ids, 5, 2048)
    assert all(len(s) == 2048 for s in samples)
    assert get_calib_samples(BUILTIN, sp.encode, 5, 2048, seed=1) != samples
    # Enough text for many full-length samples that do not overlap.
    assert len(corpus_ids) >= 50 * 2048


def test_local_text_and_jsonl_files(tmp_path, sp):
    docs = ['The first document talks about rivers and bridges. ' * 4,
            '第二篇文章讲的是山和湖。' * 4, 'A third one, about bread. ' * 4]
    jsonl = tmp_path / 'calib.jsonl'
    jsonl.write_text(''.join(json.dumps({'text': d, 'id': i}) + '\n' for i, d in enumerate(docs)) + '\n')
    txt = tmp_path / 'calib.txt'
    txt.write_text('\n\n'.join(docs), encoding='utf-8')
    ids = sp.encode('\n\n'.join(docs))
    for path in (jsonl, txt):
        name = check_calib_dataset(str(path))
        assert get_calib_samples(name, sp.encode, 3, 16) == windows(ids, 3, 16)
    with pytest.raises(UsageError, match=f'has {len(ids)} tokens, fewer than --max_seq_len'):
        get_calib_samples(str(txt), sp.encode, 1, len(ids) + 1)


@pytest.mark.parametrize('content, message', [
    ('{"text": "ok"}\nnot json\n', 'line 2 is not JSON'),
    ('{"body": "no text field"}\n', 'line 1 has no "text" string'),
    ('\n\n', 'holds no text'),
])
def test_bad_jsonl_is_a_one_line_error(tmp_path, sp, content, message):
    path = tmp_path / 'bad.jsonl'
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        get_calib_samples(str(path), sp.encode, 1, 4)


def test_dataset_names_and_paths_are_checked(tmp_path):
    assert check_calib_dataset('C4') == 'c4'
    assert check_calib_dataset('builtin') == 'builtin'
    with pytest.raises(UsageError, match='neither a dataset .*builtin, c4, ptb, wikitext2, pileval'):
        check_calib_dataset('openwebtext')
    with pytest.raises(UsageError, match='is not a file'):
        check_calib_dataset(str(tmp_path))


def test_named_dataset_without_datasets_names_the_offline_options(sp, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'datasets', None)  # import datasets -> ImportError
    with pytest.raises(CliError) as e:
        get_calib_samples('c4', sp.encode, 1, 8)
    assert 'pip install datasets' in str(e.value)
    assert '--calib_dataset builtin' in str(e.value) and '--calib_dataset PATH' in str(e.value)


class FakeDataset(list):
    """What the loaders use of a `datasets.Dataset`: rows by index, columns by name."""

    def __getitem__(self, key):
        return [row[key] for row in self] if isinstance(key, str) else list.__getitem__(self, key)


def fake_datasets(rows, calls):
    import types

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeDataset({'text': r, 'sentence': r} for r in rows)

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_named_datasets_follow_v002_sampling(sp, monkeypatch, capsys):
    import random
    import sys
    rows = [f'Document number {i} has a few words. ' * (1 + i % 5) for i in range(40)]
    calls = []
    monkeypatch.setitem(sys.modules, 'datasets', fake_datasets(rows, calls))
    # wikitext2 / ptb: windows of the documents joined with blank lines.
    joined = sp.encode('\n\n'.join(rows))
    assert get_calib_samples('wikitext2', sp.encode, 3, 20) == windows(joined, 3, 20)
    assert get_calib_samples('ptb', sp.encode, 3, 20) == windows(joined, 3, 20)
    # c4: random documents until one is long enough, then a random window of it.
    rng, want = random.Random(0), []
    for _ in range(4):
        while len(doc := sp.encode(rows[rng.randint(0, len(rows) - 1)])) < 30:
            pass
        start = rng.randint(0, len(doc) - 30)
        want.append(doc[start:start + 30])
    assert get_calib_samples('c4', sp.encode, 4, 30) == want
    # pileval: shuffled documents of <= 512 tokens, concatenated, cut into blocks.
    blocks = get_calib_samples('pileval', sp.encode, 10, 25)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    ids = sum((sp.encode(rows[i].strip()) for i in order[:10]), [])
    assert blocks == [ids[i:i + 25] for i in range(0, len(ids) - 24, 25)]
    assert f' * Split into {len(blocks)} blocks' in capsys.readouterr().out
    assert [c[0][0] for c in calls] == ['wikitext', 'ptb_text_only', 'allenai/c4',
                                        'mit-han-lab/pile-val-backup']


def test_named_dataset_unreachable_is_one_line(sp, monkeypatch):
    import sys
    import types

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setitem(sys.modules, 'datasets', types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(CliError) as e:
        get_calib_samples('c4', sp.encode, 1, 8)
    message = str(e.value)
    assert message.startswith('cannot load calibration dataset c4 (ConnectionError: ')
    assert '\n' not in message and '--calib_dataset builtin' in message
