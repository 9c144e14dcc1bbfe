"""benchmarks/precision_curve.py's statistics and its --add-to guard, on constructed runs (the study itself runs the
135M default job 10 iterations x settings x seeds: tens of minutes, not a test)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import precision_curve as pc


def fake_run(setting: str, seed: int, rewards: list[float]) -> dict:
    n = len(rewards)
    return {"setting": setting, "seed": seed, "reward_mean_per_iteration": rewards,
            "kl_mean_per_iteration": [0.1] * n, "iteration_seconds_per_iteration": [50.0 + seed] * n}


def test_paired_difference_over_seeds():
    # Iterations 2..3 average: fp32 0.30 / 0.20 / 0.25, mixed 0.31 / 0.23 / 0.25 -> differences 0.01, 0.03, 0.0
    runs = [fake_run("fp32", 0, [0.1, 0.3, 0.3]), fake_run("mixed", 0, [0.1, 0.32, 0.30]),
            fake_run("fp32", 1, [0.2, 0.1, 0.3]), fake_run("mixed", 1, [0.2, 0.16, 0.30]),
            fake_run("fp32", 2, [0.3, 0.25, 0.25]), fake_run("mixed", 2, [0.3, 0.25, 0.25])]
    out = pc.compare(runs, ["fp32", "mixed"], [0, 1, 2])
    diffs = [0.01, 0.03, 0.0]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert [out["setting_difference_same_seed"][s] for s in "012"] == pytest.approx(diffs)
    assert out["setting_difference_mean"] == pytest.approx(mean)
    assert out["setting_difference_stderr"] == pytest.approx(sd / math.sqrt(3))
    assert out["paired_t"] == pytest.approx(mean / (sd / math.sqrt(3)))
    assert out["paired_t_dof"] == 2 and "4.30" in out["paired_t_note"]
    assert out["sign_of_differences"] == {"negative": 0, "positive": 2}
    assert out["first_iteration_rewards_equal"] == {"0": True, "1": True, "2": True}
    assert out["seed_spread_same_setting"]["fp32"] == pytest.approx(0.05)  # 0.30, 0.20, 0.25


def test_first_iterations_that_differ_are_reported():
    runs = [fake_run("fp32", 0, [0.1, 0.3]), fake_run("mixed", 0, [0.2, 0.3])]
    assert pc.compare(runs, ["fp32", "mixed"], [0])["first_iteration_rewards_equal"] == {"0": False}


@pytest.mark.parametrize("change, message", [
    ({"iterations": 5}, "it ran 5 iterations"),
    ({"seeds": [0, 2]}, r"seeds \[2\] are already in it"),
    ({"extra_overrides": ["rollout.max_new_tokens=64"]}, "extra overrides"),
])
def test_add_to_refuses_a_study_it_cannot_extend(tmp_path, change, message):
    earlier = {"iterations": 10, "seeds": [0, 1], "settings": {n: pc.SETTINGS[n] for n in pc.DEFAULT_SETTINGS}, "extra_overrides": [], "runs": [],
               "seconds_total": 1.0, **change}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    with pytest.raises(SystemExit, match=message):  # before any run starts
        pc.main(["--seeds", "2", "--add-to", str(path), "--out", str(tmp_path / "runs"),
                 "--results", str(tmp_path / "results")])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
