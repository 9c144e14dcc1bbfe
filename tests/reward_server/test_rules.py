"""Rule rewards: GSM8K final-answer match and the synthetic digit task."""

import pytest

from reward_server import rules


@pytest.mark.parametrize("response, reward", [
    ("She has 3 + 4 = 7 apples.\n#### 7", 1.5),
    ("The answer is 7.", 1.25),         # last number on the last line: half the format bonus
    ("7 apples.\nThat is all", 1.0),   # correct last number, but the last line has no number
    ("#### 1,234", 0.5),                # formatted but wrong (reference 7)
    ("#### 7.0", 1.5),
    ("#### $7", 1.5),
    ("I think 8 then 7 then 9", 0.25),
    ("no digits here", 0.0),
])
def test_gsm8k_reward(response, reward):
    assert rules.gsm8k_reward(response, "7", format_bonus=0.5) == pytest.approx(reward)


def test_gsm8k_reference_parsing():
    assert rules.gsm8k_reference_answer("3 + 4 = <<3+4=7>>7\n#### 1,000") == "1,000"
    assert rules.gsm8k_reward("#### 1000", "1,000") == 1.0
    with pytest.raises(ValueError):
        rules.gsm8k_reference_answer("no final line")


GSM8K_ANSWER_TEXT = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize("response", ["So she sold 72 clips.\n#### 72", "72", "#### 71", "The answer is 48.",
                                      "no number", "#### 72.0", "#### $72"])
def test_gsm8k_reference_as_the_dataset_writes_it_scores_like_the_bare_number(response):
    bare = rules.gsm8k_reward(response, "72", format_bonus=0.5)
    assert rules.gsm8k_reward(response, GSM8K_ANSWER_TEXT, format_bonus=0.5) == bare
    assert rules.gsm8k_reward(response, "#### 72", format_bonus=0.5) == bare


def test_a_correct_answer_beats_a_wrong_one_for_both_reference_forms():
    for ref in ("72", GSM8K_ANSWER_TEXT):
        assert rules.gsm8k_reward("#### 72", ref) == 1.0
        assert rules.gsm8k_reward("#### 73", ref) == 0.0


@pytest.mark.parametrize("reference", ["", "seventy-two", "72 clips", "#### ", "answer:\n#### x", "nan", "inf",
                                       "1e3", "72\n#### seventy"])
def test_unparsable_reference_is_an_error_naming_it(reference):
    with pytest.raises(ValueError, match="GSM8K reference") as e:
        rules.gsm8k_reward("#### 72", reference)
    assert repr(reference)[1:-1][:20] in str(e.value)


def test_digit_fraction():
    assert rules.digit_fraction(["1", " 23", "a", "<|im_end|>"]) == 0.5
    assert rules.digit_fraction([]) == 0.0
