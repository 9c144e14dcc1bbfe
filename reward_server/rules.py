"""Rule-based (verifiable) rewards: pure functions of the decoded response and the reference."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)")


def _to_number(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def gsm8k_reference_answer(answer: str) -> str:
    """GSM8K reference solutions end with '#### <number>'."""
    if "####" not in answer:
        raise ValueError("GSM8K answer has no '#### <number>' line")
    return answer.split("####")[-1].strip()


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
    """1 for a final answer equal to the reference number, plus format_bonus for a '#### <number>' ending, or half
    of it for a response whose last line holds a number (a step a small model can find and climb from)."""
    target = _to_number(reference)
    value, formatted = extract_final_answer(response)
    correct = value is not None and target is not None and abs(value - target) < 1e-6
    shaped = format_bonus if formatted else (0.5 * format_bonus if ends_with_number(response) else 0.0)
    return float(correct) + shaped


def digit_fraction(token_texts: list[str]) -> float:
    """Synthetic task: fraction of response tokens that are digits (optionally space-led). Empty -> 0."""
    if not token_texts:
        return 0.0
    hits = sum(1 for t in token_texts if t.strip().isdigit())
    return hits / len(token_texts)
