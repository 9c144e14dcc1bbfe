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


def test_digit_fraction():
    assert rules.digit_fraction(["1", " 23", "a", "<|im_end|>"]) == 0.5
    assert rules.digit_fraction([]) == 0.0
