"""Reward-model training for real (`oirl train-rm`, DeepSpeed ranks in Ray actors, tiny Llama backbone), then PPO
against the learned reward model end to end."""

import json
import random
import subprocess
import sys

import pytest
from conftest import requires_loopback

from learner.reward_model import PreferenceDataError, read_preferences, split_pairs
from oirl.config import REPO_ROOT


def synthetic_prefs(path, n=192, seed=0):
    """Chosen: a worked answer ending in '#### N'. Rejected: words without a final answer."""
    rng = random.Random(seed)
    words = "the a of and to is in it you that he was for on are with as his they".split()
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"Question: what is {a} plus {b}?",
                                "chosen": f"{a} plus {b} equals {a + b}. #### {a + b}",
                                "rejected": " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))}) + "\n")


def test_bad_preference_rows_name_the_line(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                 + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(PreferenceDataError, match=r"prefs.jsonl:2: field 'rejected' must be a non-empty string"):
        read_preferences(str(p))
    train, held = split_pairs([{"i": i} for i in range(10)], 0.2, 0)
    assert len(train) == 8 and len(held) == 2 and not {x["i"] for x in train} & {x["i"] for x in held}


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    if "OIRL_IN_LOOPBACK_NS" not in __import__("os").environ:
        pytest.skip("starts Ray: run under deploy/loopback.sh")
    d = tmp_path_factory.mktemp("rm")
    synthetic_prefs(d / "prefs.jsonl")
    out = d / "rm"
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "train-rm", "--data", str(d / "prefs.jsonl"),
                           "--out", str(out), "--backbone", "tiny", "epochs=3", "lr=0.003", "batch_size=16"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
@requires_loopback
def test_reward_model_learns_held_out_preferences(trained_rm):
    from transformers import AutoModelForSequenceClassification

    m = json.loads((trained_rm / "metrics.json").read_text())
    assert m["heldout_pairs"] >= 30
    assert m["heldout_pairwise_accuracy"] >= 0.85, m
    assert m["heldout_pairwise_accuracy"] - m["heldout_pairwise_accuracy_before_training"] >= 0.25, m
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm)
    assert model.config.num_labels == 1


@pytest.mark.slow
@requires_loopback
def test_ppo_against_the_learned_reward_model(trained_rm, tmp_path):
    out = tmp_path / "rm-ppo"
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "train", "--config", "configs/smoke.yaml", "--out",
                           str(out), "--no-progress", "iterations=3", "reward.kind=none",
                           f"reward.model_path={trained_rm}"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(r["reward/std"] > 0 for r in rows)  # a learned, sample-dependent reward
