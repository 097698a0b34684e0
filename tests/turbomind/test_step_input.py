"""The StepInput contract: what build_step_input emits and what validate() rejects."""
import pytest
import torch

from lmdeploy.turbomind.step_input import RowPlan, StepInput, build_step_input


def test_build_packs_rows():
    rows = [RowPlan([42], 5, [3, 1], 'last'),  # decode: position 5, block 1 offset 1
            RowPlan([7, 8, 9], 0, [0], 'none'),  # first chunk of a prompt, no sampling
            RowPlan([4, 5], 2, [2, 6], 'all')]  # positions 2, 3 -> block 2 offset 2, block 6 0
    s = build_step_input(rows, block_size=3)
    assert s.input_ids.tolist() == [42, 7, 8, 9, 4, 5]
    assert s.positions.tolist() == [5, 0, 1, 2, 2, 3]
    assert s.cu_seqlens.tolist() == [0, 1, 4, 6]
    assert s.kv_lens.tolist() == [6, 3, 4]
    assert s.block_table.tolist() == [[3, 1], [0, -1], [2, 6]]
    assert s.slot_mapping.tolist() == [1 * 3 + 2, 0, 1, 2, 2 * 3 + 2, 6 * 3 + 0]
    assert s.sample_idx.tolist() == [0, 4, 5]
    assert (s.max_q_len, s.max_kv_len, s.num_decode) == (3, 6, 1)
    assert s.cu_seqlens.dtype == torch.int32 and s.block_table.dtype == torch.int32
    assert s.input_ids.dtype == s.slot_mapping.dtype == s.sample_idx.dtype == torch.long
    s.validate(3, num_blocks=7)


def test_validate_rejects_inconsistent_plans():
    s = build_step_input([RowPlan([1, 2], 0, [0]), RowPlan([3], 4, [1, 2])], block_size=4)
    s.validate(4)
    bad = StepInput(**{**vars(s), 'slot_mapping': s.slot_mapping + 1})
    with pytest.raises(ValueError, match='slot_mapping'):
        bad.validate(4)
    bad = StepInput(**{**vars(s), 'positions': s.positions * 0})
    with pytest.raises(ValueError, match='positions'):
        bad.validate(4)
    with pytest.raises(ValueError, match='not a pool block'):
        s.validate(4, num_blocks=2)
    skip = StepInput(**{**vars(s), 'slot_mapping': torch.tensor([-1, 1, 2 * 4])})
    skip.validate(4)  # a negative slot means "do not write"
    with pytest.raises(ValueError, match='blocks'):
        build_step_input([RowPlan([1, 2, 3], 2, [0])], block_size=4)


def test_to_fills_hints_and_casts():
    s = build_step_input([RowPlan([1, 2], 0, [0])], block_size=4)
    raw = StepInput(**{**vars(s), 'max_q_len': 0, 'max_kv_len': 0,
                       'input_ids': s.input_ids.int()})
    t = raw.to('cpu')
    assert (t.max_q_len, t.max_kv_len) == (2, 2) and t.input_ids.dtype == torch.long
