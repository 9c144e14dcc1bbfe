"""benchmarks/gsm8k_eval.py: the held-out set is disjoint from training, the rates are what the records say, and the
intervals are Wilson's (hand-computed closed forms)."""

import math
import sys

import pytest

from oirl.config import REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import gsm8k_eval  # noqa: E402


def test_wilson_interval_matches_its_closed_forms():
    z = 1.959964
    lo, hi = gsm8k_eval.wilson_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx(z * z / (5 + z * z))  # 0 successes: upper = z^2 / (n + z^2)
    lo, hi = gsm8k_eval.wilson_interval(50, 100)
    half = z * math.sqrt(0.25 / 100 + z * z / 40000) / (1 + z * z / 100)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half)) and hi - lo == pytest.approx(0.1923, abs=1e-3)
    assert all(math.isnan(x) for x in gsm8k_eval.wilson_interval(0, 0))


def test_rates_are_recomputed_from_the_records():
    responses = ["so 3+4=7\n#### 7", "The answer is 12", "#### 13", "no number here"]
    result = gsm8k_eval.score_responses(responses, ["#### 7", "12", "Natalia sold 48 #### 12", "5"])
    assert [r["correct"] for r in result["records"]] == [True, True, False, False]
    assert [r["formatted"] for r in result["records"]] == [True, False, True, False]
    assert result["accuracy"] == 0.5 and result["format_rate"] == 0.5
    assert result["accuracy_ci95"] == pytest.approx(gsm8k_eval.wilson_interval(2, 4))


def test_training_with_the_heldout_overrides_never_sees_the_heldout_questions(tiny_model_path):
    from transformers import AutoTokenizer

    from oirl.config import load_config
    from oirl.data import PromptDataset

    overrides = gsm8k_eval.heldout_overrides(200) + ["data.max_prompt_tokens=1024"]  # the tiny tokenizer is wordier
    cfg = load_config(str(REPO_ROOT / "configs" / "demo.yaml"), overrides)
    train = PromptDataset(cfg.data, AutoTokenizer.from_pretrained(tiny_model_path))
    heldout, references = gsm8k_eval.heldout_prompts(tiny_model_path, 200)
    assert len(heldout) == len(references) == 200
    assert len(train.token_ids) + 200 == gsm8k_eval.count_rows()
    seen = {tuple(ids) for ids in train.token_ids}
    assert not any(tuple(ids) in seen for ids in heldout)


@pytest.mark.slow
def test_evaluate_runs_vllm_greedily_and_its_rates_match_its_records(tiny_model_path):
    result = gsm8k_eval.evaluate(tiny_model_path, n=4, max_new_tokens=8)
    assert result["n"] == 4 == len(result["records"]) and result["decoding"] == "greedy"
    assert 0 < result["generated_tokens"] <= 4 * 8
    assert result["accuracy"] == sum(r["correct"] for r in result["records"]) / 4
    assert result["format_rate"] == sum(r["formatted"] for r in result["records"]) / 4
