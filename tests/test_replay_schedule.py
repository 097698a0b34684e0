"""benchmark/replay_schedule.py: B3's workload through the real scheduler (CPU, no model)."""
import json

from benchmark import replay_schedule


def test_pool_check_stops_the_preemption_thrash(tmp_path):
    out = tmp_path / 'replay.json'
    replay_schedule.main(['--num_prompts', '200', '--concurrency', '64', '--max_batch_size', '64',
                          '--num_blocks', '300', '--admit_horizon=-1,32', '--out', str(out)])
    greedy, checked = json.loads(out.read_text())['rows']
    assert greedy['requests'] == checked['requests'] == 200
    prompts = greedy['prompt_tokens']
    assert checked['prompt_tokens'] == prompts
    # greedy admission into a small pool: preempted over and over, prompts prefilled again
    assert greedy['preemptions'] > 1000 and greedy['recomputed_tokens'] > prompts / 2
    # with the pool check only requests growing past the horizon are ever preempted
    assert checked['preemptions'] < greedy['preemptions'] / 100
    assert checked['recomputed_tokens'] < prompts / 20
    assert checked['model_s'] < greedy['model_s']
    for r in (greedy, checked):
        assert 0 < r['rows_per_step'] <= 64 and 0 < r['model_tail_s'] < r['model_s']


def test_static_rows_replay_as_one_batch(tmp_path):
    """A B2-style row (C requests submitted together) on a pool that holds half of them."""
    out = tmp_path / 'static.json'
    replay_schedule.main(['--static', '16:40:40', '--max_batch_size', '16', '--block_size', '8',
                          '--num_blocks', '80', '--session_len', '96', '--admit_horizon=-1,32',
                          '--out', str(out)])
    greedy, checked = json.loads(out.read_text())['rows']
    assert greedy['requests'] == checked['requests'] == 16
    assert greedy['prompt_tokens'] == checked['prompt_tokens'] == 16 * 40
    assert 0 <= checked['recomputed_tokens'] < greedy['recomputed_tokens']
    assert checked['preemptions'] < greedy['preemptions']


def test_mixed_prefill_budget_spreads_prompts_over_more_steps(tmp_path):
    rows = {}
    for budget in (0, 16):
        out = tmp_path / f'mixed{budget}.json'
        replay_schedule.main(['--num_prompts', '100', '--concurrency', '32', '--max_batch_size',
                              '32', '--admit_horizon', '32', '--max_mixed_prefill_tokens',
                              str(budget), '--out', str(out)])
        (rows[budget],) = json.loads(out.read_text())['rows']
    free, bounded = rows[0], rows[16]
    assert free['requests'] == bounded['requests'] == 100
    assert bounded['steps'] > free['steps']  # prompts beside decoding rows go 16 tokens a step
    # every prompt token is computed once either way; a chunk that leaves one token of a
    # prompt lets it ride as a decode row (counted as decode, not prefill): at most one a prompt
    assert free['recomputed_tokens'] == 0 and -100 <= bounded['recomputed_tokens'] <= 0
