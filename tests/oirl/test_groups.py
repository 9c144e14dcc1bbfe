"""DAPO's dynamic sampling, the batch side (oirl/groups.py), by hand."""

import numpy as np
import pytest

from oirl.batch import make_rollout_batch
from oirl.groups import count_informative, fill_groups, informative_rows


def scored(prompt_ids, rewards, n=2):
    """A batch of n samples per prompt and their rewards."""
    pids = [p for p in prompt_ids for _ in range(n)]
    batch = make_rollout_batch(pids, list(range(n)) * len(prompt_ids), [[1]] * len(pids), [[2, 3]] * len(pids),
                               [[-1.0, -1.0]] * len(pids), ["stop"] * len(pids), 0)
    return batch, np.array(rewards, dtype=np.float32)


def test_groups_whose_rewards_are_all_equal_carry_no_signal():
    batch, rewards = scored([7, 8, 9], [0.1, 0.1, 0.0, 1.0, 1.0, 1.0])
    assert informative_rows(batch, rewards).tolist() == [False, False, True, True, False, False]


def test_fill_takes_informative_groups_first_then_keeps_the_size():
    first = scored([1, 2, 3], [0, 0, 1, 0, 1, 1])  # only prompt 2 has a signal
    second = scored([4, 5, 2], [1, 0, 0, 0, 0, 1])  # 4 and (again) 2: the second draw of 2 is skipped
    assert count_informative([first]) == 1 and count_informative([first, second]) == 2
    batch, rewards, frac = fill_groups([first, second], 3)
    assert batch.column("prompt_id").to_pylist() == [2, 2, 4, 4, 1, 1]
    assert rewards.tolist() == [1, 0, 1, 0, 0, 0]
    assert frac == pytest.approx(2 / 3)
    batch, _, frac = fill_groups([first, second], 2)
    assert batch.column("prompt_id").to_pylist() == [2, 2, 4, 4] and frac == 1.0
    with pytest.raises(ValueError, match="5 groups scored, 6 needed"):
        fill_groups([first, second], 6)
