"""benchmark/profile_generation.py on a tiny dummy shape (CPU)."""
import json

from benchmark.profile_generation import main, parse_rows


def test_tiny_run_with_compare(tmp_path):
    out = tmp_path / 'r.json'
    res = main(['--dummy', 'tiny', '--device', 'cpu', '--rows', '1:1:12,3:20:8,64:8:4',
                '--test_round', '2', '--compare', 'hf', '--hf_output_seqlen', '6',
                '--out', str(out)])
    data = json.loads(out.read_text())
    assert [(r['concurrency'], r['input_seqlen'], r['output_seqlen']) for r in data['rows']] \
        == [(1, 1, 12), (3, 20, 8), (64, 8, 4)]
    for r in res['rows']:
        assert r['out_tok_s'] > 0 and r['ttft_ms_p50'] > 0 and r['tok_ms_p50'] >= 0
        assert r['tok_ms_p99'] >= r['tok_ms_p50']
    bs1, bs64 = res['compare']  # bs1 and bs64 rows are compared; bs3 is not
    assert (bs1['concurrency'], bs1['input_seqlen'], bs1['output_seqlen']) == (1, 1, 6)
    assert (bs64['concurrency'], bs64['input_seqlen'], bs64['output_seqlen']) == (64, 8, 4)
    assert bs1['greedy_common_prefix'] == 6 and bs1['ratio'] > 0  # same weights, same tokens
    assert bs64['greedy_common_prefix'] == 4 and bs64['ratio'] > 0


def test_v002_arguments_and_grids():
    class A:
        rows = None
        grid = None
        grid_concurrency = None
        concurrency, input_seqlen, output_seqlen = 8, 0, 2048
    assert parse_rows(A) == [(8, 0, 2048)]
    A.grid = 'B1'
    assert parse_rows(A) == [(1, 1, 128), (1, 128, 2048), (1, 2048, 128)]
    A.grid = 'B2'
    rows = parse_rows(A)
    assert len(rows) == 25 and (128, 2048, 2048) in rows
    A.grid_concurrency = '64'
    assert parse_rows(A)[1] == (64, 128, 128)
    res = main(['--dummy', 'tiny', '--device', 'cpu', '--concurrency', '2', '--input_seqlen',
                '0', '--output_seqlen', '5', '--test_round', '1', '--no_warmup'])
    assert res['rows'][0]['concurrency'] == 2
