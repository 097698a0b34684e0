"""The CUDA graphs' padded step layouts (cuda_graph.PackedLayout), checked on CPU: a step staged
into a decode or varlen layout (padding rows, empty rows, placeholder input ids resolved from
the previous step's tokens) gives the same logits for its real rows as the unpadded step.
With the reference kernels in-process, and with the Triton kernels in the interpreter."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmdeploy.turbomind.cuda_graph import PackedLayout, mixed_buckets, varlen_shapes
from lmdeploy.turbomind.step_input import RowPlan, build_step_input

from .test_llama import make_runner, prompt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK = 4


def _steps():
    """A prefill step filling three sequences, then a mixed step: two decode rows, a chunk
    over a cached prefix, a new prompt (blocks chosen out of order)."""
    a, b, c, d = prompt(9, 1), prompt(6, 2), prompt(11, 3), prompt(7, 4)
    blocks = {0: [3, 8, 1, 12], 1: [5, 0], 2: [9, 2, 14, 6], 3: [7, 11]}
    first = build_step_input([RowPlan(a, 0, blocks[0]), RowPlan(b, 0, blocks[1]),
                              RowPlan(c[:6], 0, blocks[2], 'none')], BLOCK)
    mixed = build_step_input([RowPlan([17], 9, blocks[0]), RowPlan([23], 6, blocks[1]),
                              RowPlan(c[6:], 6, blocks[2]), RowPlan(d, 0, blocks[3])], BLOCK)
    return first, mixed


def _padded(layout, step):
    """`step` staged into `layout`'s buffer, as the StepInput a graph would run."""
    buf = layout.initial()
    layout.stage(step, buf)
    return layout.step_input(torch.from_numpy(buf), 64, step.prev_tokens)


def _with_placeholders(step):
    """The step with its decode rows' ids replaced by placeholders into a prev_tokens tensor
    (in reverse order, as a previous step's sample order could be)."""
    ids = step.input_ids.clone()
    nd = step.num_decode
    prev = torch.zeros(nd + 2, dtype=torch.long)
    for r in range(nd):
        j = nd - 1 - r
        prev[j] = ids[r]
        ids[r] = -(j + 1)
    return dataclasses.replace(step, input_ids=ids, prev_tokens=prev)


def check_layouts(runner):
    """Max abs diff of the padded layouts' logits against the unpadded step's, by case."""
    model, kv = runner.model, runner.kv_cache
    first, mixed = _steps()
    model.forward(first, kv)
    cases = [(mixed, PackedLayout(rows, tokens, False, 8, BLOCK))
             for rows, tokens in ((6, 32), (5, mixed.num_tokens + 3), (4, mixed.num_tokens))]
    dec = build_step_input([RowPlan([31], 10, [3, 8, 1, 12]), RowPlan([4], 7, [5, 0])], BLOCK)
    cases.append((dec, PackedLayout(4, 4, True, 8, BLOCK)))  # 2 decode rows in a bucket of 4
    diffs = {}
    for step, layout in cases:
        want = model.forward(step, kv)
        name = f"{'decode' if layout.is_decode else 'varlen'}-{layout.rows}x{layout.tokens}"
        for tag, staged in (('', step), ('-prev', _with_placeholders(step))):
            assert layout.fits(staged)
            got = model.forward(_padded(layout, staged), kv)[:want.shape[0]]
            diffs[name + tag] = (got - want).abs().max().item()
    return diffs


def test_fits_and_shapes():
    _, mixed = _steps()
    assert not PackedLayout(4, 64, False, 16, BLOCK).fits(mixed)  # 4 rows + padding row
    with pytest.raises(AssertionError):  # the padding row (64 tokens) needs 16 blocks
        PackedLayout(8, 64, False, 8, BLOCK)
    assert PackedLayout(4, mixed.num_tokens, False, 8, BLOCK).fits(mixed)  # exact: no pad row
    assert not PackedLayout(8, mixed.num_tokens - 1, False, 8, BLOCK).fits(mixed)
    assert not PackedLayout(8, 8, True, 8, BLOCK).fits(mixed)  # not decode-only
    assert mixed_buckets(300) == [32, 64, 96, 128, 160, 192, 256, 320]
    assert mixed_buckets(8192)[-1] == 1024 and mixed_buckets(100, limit=80) == [32, 64]
    shapes = varlen_shapes([16, 32], [32, 64, 128], 63)
    assert all(r != t for r, t in shapes)  # T == B means decode-only to the kernels
    assert (65, 64) in shapes and (64, 128) in shapes and (2, 16) in shapes


@pytest.mark.parametrize('variant', ['gqa', 'llama'])
def test_padded_layouts_equal_unpadded_reference_kernels(workspace, variant):
    runner = make_runner(workspace(variant), block_size=BLOCK, num_blocks=16)
    diffs = check_layouts(runner)
    assert max(diffs.values()) < 1e-4, diffs


def test_padded_layouts_equal_unpadded_triton_interpreter(workspace):
    """The same with the Triton kernels (TRITON_INTERPRET=1, in a subprocess: the interpreter
    must be on before triton is imported): empty rows and the padding row go through the
    decode/prefill/combine kernels' early exits."""
    ws = workspace('gqa')
    code = ('import sys, json; sys.path.insert(0, %r)\n'
            'from tests.turbomind.test_graph_layout import run_triton\n'
            'print(json.dumps(run_triton(%r)))' % (ROOT, ws))
    env = dict(os.environ, TRITON_INTERPRET='1', LMDEPLOY_KERNELS='triton')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(diffs.values()) < 1e-4, diffs


def run_triton(ws):
    runner = make_runner(ws, block_size=BLOCK, num_blocks=16)  # LMDEPLOY_KERNELS=triton
    assert runner.kernels.impl['paged_attention'] == 'triton'
    return check_layouts(runner)


def test_placeholders_resolve_in_staging_order():
    _, mixed = _steps()
    step = _with_placeholders(mixed)
    assert (step.input_ids[:2] < 0).all()
    assert torch.equal(step.token_ids(), mixed.input_ids)
    assert np.array_equal(step.token_ids()[2:].numpy(), mixed.input_ids[2:].numpy())
