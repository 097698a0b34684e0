"""Tensor-parallel TurboMind on CPU: ranks are real processes joined by a gloo group.

Oracle: the same engine at tp=1 on the same workspace. tp=2 must give identical greedy tokens
(and logits equal up to the all-reduce's summation order), whether the workspace was deployed
with tp=2 (each rank reads its `.{rank}.` files) or with tp=1 (sliced at load, v0.0.3's runtime
split). A rank that dies must end the engine within seconds, and every bad start must be one
clear error with no process left behind.
"""
import os
import shutil
import signal
import time

import pytest
import torch

from lmdeploy.turbomind import TurboMind
from lmdeploy.turbomind.config import ConfigError, EngineConfig
from lmdeploy.turbomind.errors import EngineError, EngineFailure
from lmdeploy.turbomind.weights import load_weights

VARIANTS = ['llama', 'gqa', 'internlm', 'baichuan', 'head128', 'rope']
VOCAB = 2048
BASE = dict(device='cpu', dtype='fp32', block_size=8, num_blocks=256)


def prompts(n_rows: int, seed: int, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (int(n),), generator=g).tolist()
            for n in torch.randint(4, 40, (n_rows,), generator=g)]


def child_pids():
    """Live (not zombie) processes whose parent is this one."""
    me, out = str(os.getpid()), []
    for attempt in range(5):
        try:
            entries = os.listdir('/proc')
            break
        except OSError:  # once in CI: EBADF listing /proc while processes came and went
            if attempt == 4:
                raise
            time.sleep(0.2)
    for pid in entries:
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != 'Z':
            out.append(int(pid))
    return out


def conversation(tm, rows, seed=0):
    """Greedy: a batch of first turns, a second turn on every session, and decode() logits."""
    inst = tm.create_instance()
    sids = list(range(seed * 100 + 1, seed * 100 + 1 + len(rows)))
    first = None
    for first in inst.stream_infer(sids, rows, request_output_len=12, top_k=1,
                                   ignore_eos=True, stream_output=True):
        pass
    turn1 = [ids[:n].tolist() for ids, n in first]
    turn2 = []
    for sid, row, out in zip(sids, rows, turn1):
        last = None
        for last in inst.stream_infer(sid, [5, 6, 7], request_output_len=8, top_k=1,
                                      ignore_eos=True, sequence_start=False,
                                      step=len(row) + len(out)):
            pass
        turn2.append(last[0][0].tolist())
        inst.end(sid)
    logits = inst.decode(rows[:2])
    return turn1, turn2, logits


@pytest.fixture(scope='module')
def tp1_results(workspace):
    cache = {}

    def get(variant):
        if variant not in cache:
            with TurboMind(workspace(variant), **BASE) as tm:
                cache[variant] = conversation(tm, prompts(3, seed=len(variant)))
        return cache[variant]

    return get


@pytest.mark.parametrize('variant', VARIANTS)
def test_tp2_runtime_split_equals_tp1(workspace, tp1_results, variant):
    want = tp1_results(variant)
    with TurboMind(workspace(variant), tp=2, **BASE) as tm:
        assert tm.runner.tp == 2 and len(tm.runner.workers) == 1
        got = conversation(tm, prompts(3, seed=len(variant)))
    assert got[0] == want[0]
    assert got[1] == want[1]
    torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=1e-4)
    assert not child_pids()


@pytest.mark.parametrize('variant', ['gqa', 'internlm'])
def test_tp2_deploy_split_equals_runtime_split(workspace, tp1_results, variant):
    """A tp=2 workspace's per-rank files equal the runtime slices of the tp=1 files, and the
    engine on it (at tp=2, and merged back at tp=1) gives the tp=1 output."""
    split = EngineConfig.from_workspace(workspace(variant, tp=2), device='cpu', dtype='fp32')
    whole = EngineConfig.from_workspace(workspace(variant), device='cpu', dtype='fp32')
    assert split.tensor_para_size == 2 and whole.tensor_para_size == 1
    for rank in range(2):
        a, b = load_weights(split, rank, 2), load_weights(whole, rank, 2)
        for name in ('tok_embeddings', 'norm', 'output'):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        for la, lb in zip(a.layers, b.layers):
            for name, t in vars(la).items():
                other = getattr(lb, name)
                assert (t is None and other is None) or torch.equal(t, other), name
    want = tp1_results(variant)
    for tp in (2, 1):
        with TurboMind(workspace(variant, tp=2), tp=tp, **BASE) as tm:
            got = conversation(tm, prompts(3, seed=len(variant)))
        assert got[:2] == want[:2], f'tp={tp}'
        torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=1e-4)


def test_lm_head_is_split_by_vocabulary(workspace):
    cfg = EngineConfig.from_workspace(workspace('gqa'), device='cpu', dtype='fp32')
    whole = load_weights(cfg, 0, 1).output
    parts = [load_weights(cfg, r, 2).output for r in range(2)]
    assert [p.shape[0] for p in parts] == [VOCAB // 2] * 2
    assert torch.equal(torch.cat(parts), whole)


def test_dummy_weights_at_tp2_equal_tp1():
    with TurboMind(dummy='tiny', tp=1, device='cpu', num_blocks=64) as tm:
        want = conversation(tm, prompts(2, seed=3, vocab=256))
    with TurboMind(dummy='tiny', tp=2, device='cpu', num_blocks=64) as tm:
        got = conversation(tm, prompts(2, seed=3, vocab=256))
    assert got[:2] == want[:2]
    torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('tp,message', [
    (3, 'tp=3 does not divide head_num 4'),
    (0, 'tp must be a positive integer, got 0'),
    ('2', "tp must be a positive integer, got '2'"),
])
def test_bad_tp_is_a_clear_error_before_any_process_starts(workspace, tp, message):
    with pytest.raises(ConfigError, match=message):
        TurboMind(workspace('gqa'), tp=tp, **BASE)
    assert not child_pids()


@pytest.mark.parametrize('rank', [0, 1])
def test_a_rank_that_cannot_load_fails_the_start_with_its_reason(workspace, tmp_path, rank):
    ws = tmp_path / 'ws'
    shutil.copytree(workspace('gqa', tp=2), ws)
    victim = ws / 'triton_models' / 'weights' / f'layers.1.feed_forward.w2.{rank}.weight'
    victim.unlink()
    start = time.monotonic()
    with pytest.raises(Exception, match=rf'{victim.name} is missing') as info:
        TurboMind(str(ws), tp=2, **BASE)
    assert time.monotonic() - start < 30
    if rank == 1:
        assert 'rank 1 failed' in str(info.value)
    assert not child_pids()


def _wait_for_tokens(it, n):
    for outputs in it:
        if outputs[0][1] >= n:
            return


def test_a_killed_rank_ends_the_engine_within_seconds():
    tm = TurboMind(dummy='tiny', tp=2, device='cpu', num_blocks=64, session_len=4096)
    try:
        worker = tm.runner.workers[0].proc
        inst = tm.create_instance()
        stream = inst.stream_infer(1, [1, 2, 3], request_output_len=4000, top_k=1,
                                   ignore_eos=True, stream_output=True)
        _wait_for_tokens(stream, 3)
        os.kill(worker.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineFailure, match=r'rank 1 died \(signal 9\)'):
            for _ in stream:
                pass
        assert time.monotonic() - start < 5
        with pytest.raises(EngineFailure, match='rank 1 died'):
            next(inst.stream_infer(2, [1, 2, 3], request_output_len=4))
        assert worker.poll() is not None
    finally:
        start = time.monotonic()
        tm.close()
        assert time.monotonic() - start < 5
    assert not child_pids()


def test_a_rank_killed_while_idle_stops_the_engine():
    tm = TurboMind(dummy='tiny', tp=2, device='cpu', num_blocks=64)
    try:
        inst = tm.create_instance()
        for _ in inst.stream_infer(1, [1, 2, 3], request_output_len=4, top_k=1):
            pass
        os.kill(tm.runner.workers[0].proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                for _ in inst.stream_infer(2, [1, 2, 3], request_output_len=2, top_k=1):
                    pass
            except EngineError as e:
                assert isinstance(e, EngineFailure) and 'rank 1 died' in str(e)
                break
            time.sleep(0.1)
        else:
            pytest.fail('the engine kept serving with a dead rank')
    finally:
        tm.close()
    assert not child_pids()


def test_more_ranks_than_gpus_is_a_clear_error(workspace, monkeypatch):
    from lmdeploy.turbomind.tensor_parallel import check_tp
    cfg = EngineConfig.from_workspace(workspace('gqa'), device='cuda:1', dtype='fp16')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(ConfigError, match=r'tp=2 needs 2 GPUs from cuda:1 on; 2 visible'):
        check_tp(cfg, 2)
    assert check_tp(cfg, 1) == 1
