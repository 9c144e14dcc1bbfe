"""Rollout correction (learner/algorithms/correction.py) by hand: each mode's weights and statistics on ratios
chosen so that every branch (truncated, masked, kept, padding) is hit."""

import math

import pytest
import torch

from learner.algorithms.correction import correction_weights

# Two samples: ratios pi_old / mu of 1, 2, 0.5, 4 (sample 0) and 3 (sample 1, then padding).
RATIOS = torch.tensor([[1.0, 2.0, 0.5, 4.0], [3.0, 1.0, 1.0, 1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
ENGINE = torch.log(torch.tensor([[0.5, 0.25, 0.5, 0.1], [0.2, 0.3, 0.3, 0.3]]))
OLD = ENGINE + torch.log(RATIOS)
GEO0 = (1 * 2 * 0.5 * 4) ** 0.25  # sample 0's geometric mean ratio: sqrt(2)


def weights(mode, **kw):
    w, stats = correction_weights(OLD, ENGINE, MASK, mode, **kw)
    return w, {k: v.item() for k, v in stats.items()}


def test_none_weighs_every_token_one_and_still_measures_the_mismatch():
    w, st = weights("none")
    torch.testing.assert_close(w, MASK)
    k3 = sum(r - 1 - math.log(r) for r in (1, 2, 0.5, 4, 3))
    assert st["k3_sum"] == pytest.approx(k3, rel=1e-5) and st["num_tokens"] == 5
    assert st["log_ratio_sum"] == pytest.approx(math.log(2 * 0.5 * 4 * 3), rel=1e-5)
    assert st["ratio_max"] == pytest.approx(4.0) and st["num_truncated"] == st["num_masked"] == 0


def test_tis_truncates_each_token_at_the_cap():
    w, st = weights("tis", cap=2.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 0.5, 2.5], [2.5, 0, 0, 0]]))
    assert st["num_truncated"] == 2 and st["weight_sum"] == pytest.approx(8.5) and st["weight_max"] == 2.5


def test_mis_masks_tokens_or_whole_samples_outside_the_bounds():
    w, st = weights("mis", lo=0.6, hi=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0, 0, 0]]))
    assert st["num_masked"] == 3 and st["weight_sum"] == 2
    # Sequence level: sample 0's geometric mean sqrt(2) is inside [0.6, 2], sample 1's 3 is not.
    w, st = weights("mis", lo=0.6, hi=2.0, level="sequence")
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0, 0, 0]]))
    assert st["num_masked"] == 1


def test_seq_gives_every_token_of_a_sample_its_truncated_geometric_mean():
    w, st = weights("seq", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[GEO0] * 4, [2.0, 0, 0, 0]]))
    assert st["num_truncated"] == 1  # sample 1's one token: 3 > 2


def test_equal_policies_give_weight_one_and_no_mismatch():
    for mode in ("tis", "mis", "seq"):
        w, stats = correction_weights(ENGINE, ENGINE, MASK, mode)
        torch.testing.assert_close(w, MASK)
        assert stats["k3_sum"].item() == 0 and stats["num_truncated"].item() == stats["num_masked"].item() == 0


def test_weights_are_detached_and_bad_settings_are_refused():
    old = OLD.clone().requires_grad_(True)
    w, _ = correction_weights(old, ENGINE, MASK, "tis")
    assert not w.requires_grad
    with pytest.raises(ValueError, match="unknown rollout correction 'ppo'"):
        correction_weights(OLD, ENGINE, MASK, "ppo")
    with pytest.raises(ValueError, match="cap must be > 0"):
        correction_weights(OLD, ENGINE, MASK, "seq", cap=0.0)
    with pytest.raises(ValueError, match="0 <= lo < 1 < hi"):
        correction_weights(OLD, ENGINE, MASK, "mis", lo=1.0, hi=2.0)


def test_stays_on_the_inputs_device():
    meta = torch.device("meta")
    t = torch.empty(3, 4, device=meta)
    for mode in ("none", "tis", "mis", "seq"):
        w, stats = correction_weights(t, t, t, mode, level="sequence")
        assert w.device == meta and all(v.device == meta for v in stats.values())
