"""A user reward function that is slow on purpose (imported by path inside the reward actor)."""

import time


def slow(prompt: str, response: str, reference: str) -> float:
    time.sleep(0.3)
    return float(len(response))
