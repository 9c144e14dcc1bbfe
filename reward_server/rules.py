"""Rule-based (verifiable) rewards: pure functions of the decoded response and the reference.

A GSM8K reference is accepted as the bare final answer ('72', '1,000', '$5', '-3.5') or as the dataset writes the
whole solution ('... <<6*12=72>>72\n#### 72'); anything else is a ValueError that names it, never a silent 0.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)")


def _to_number(text: str) -> float | None:
    """'1,234', '$7', '-3.5', '7.' -> float; anything else (including 'nan', '1e5', '7 apples') -> None."""
    text = text.strip().rstrip(".")
    if not _NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", "").replace("$", ""))


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def gsm8k_reference_answer(answer: str) -> str:
    """GSM8K reference solutions end with '#### <number>'; returns the text after the last '####'."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer {_shorten(answer)!r} has no '#### <number>' line")
    return answer.split("####")[-1].strip()


def parse_gsm8k_reference(reference: str) -> float:
    """The reference answer as a number: a bare number or GSM8K answer text ending in '#### <number>'."""
    final = reference.split("####")[-1] if "####" in reference else reference
    value = _to_number(final)
    if value is None:
        raise ValueError(f"GSM8K reference {_shorten(reference)!r} is not a number: give the final answer ('72') "
                         "or the dataset's answer text ending in '#### 72'")
    return value


def extract_final_answer(response: str) -> tuple[float | None, bool]:
    """(number, formatted): the number after the last '####', else the last number in the text."""
    finals = _FINAL.findall(response)
    if finals:
        return _to_number(finals[-1]), True
    numbers = _NUMBER.findall(response)
    return (_to_number(numbers[-1]) if numbers else None), False


def ends_with_number(response: str) -> bool:
    lines = [line for line in response.strip().splitlines() if line.strip()]
    return bool(lines) and bool(_NUMBER.search(lines[-1]))


def gsm8k_reward(response: str, reference: str, format_bonus: float = 0.0) -> float:
    """1 for a final answer equal to the reference (bare number or '... #### <number>'; anything else is a
    ValueError), plus format_bonus for a '#### <number>' ending, or half of it for a response whose last line holds
    a number (a step a small model can find and climb from)."""
    target = parse_gsm8k_reference(reference)
    value, formatted = extract_final_answer(response)
    correct = value is not None and abs(value - target) < 1e-6
    shaped = format_bonus if formatted else (0.5 * format_bonus if ends_with_number(response) else 0.0)
    return float(correct) + shaped


def digit_fraction(token_texts: list[str]) -> float:
    """Synthetic task: fraction of response tokens that are digits (optionally space-led). Empty -> 0."""
    if not token_texts:
        return 0.0
    hits = sum(1 for t in token_texts if t.strip().isdigit())
    return hits / len(token_texts)
