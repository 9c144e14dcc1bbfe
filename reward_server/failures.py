"""What a failed reward becomes: retried when the failure is transient, else an error naming the sample, or, with
``reward.on_failure=drop``, a sample that leaves the batch. Never a reward of 0.

Transient, so retried with exponential backoff (and the server's Retry-After) while ``reward.timeout_s`` lasts,
each attempt waiting at most ``reward.attempt_timeout_s``: a refused, reset or aborted connection, a timeout, a
connection cut mid-answer, and HTTP 408, 429, 502, 503, 504 (a server restarting, overloaded or behind a proxy that
lost it). Everything else is raised at once, because running the same code on the same input again gives the same
answer: an HTTP 400/401/404/422/500 (the request, the token or the server's code is wrong), a malformed answer, a
user function's TypeError, a reward model's error. Retrying those would only delay the error by the whole budget.
The rule, the user function and the reward model run in the actor, so only a user function that reaches the
network itself (and raises ConnectionError or TimeoutError) has transient failures among them.

Public: ``call_with_retries(attempt, what, deadline, attempt_timeout)``, ``is_transient(exc)``, ``GaveUp``,
``TransientHTTPError``, ``retry_after_s(header)``, ``Refused``, ``failure_reason(what, exc)``, ``RewardFailure``,
``describe_rows(rows, name)``, and for the driver ``drop_failed(batch, rewards, failed, whole_groups, multiple)``.
"""

from __future__ import annotations

import http.client
import logging
import random
import time
import urllib.error
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_STATUS = frozenset({408, 429, 502, 503, 504})
BACKOFF_FIRST_S = 0.5  # then doubled per attempt, up to BACKOFF_MAX_S, times a random factor in [0.5, 1]
BACKOFF_MAX_S = 30.0
NOT_RETRIED = ("not retried: only refused, reset or timed-out connections and HTTP 408, 429, 502, 503 and 504 "
               "are taken as transient")


class RewardFailure(ValueError):
    """A sample's reward could not be computed; the message names the sample (row, prompt_id)."""


class TransientHTTPError(Exception):
    """An HTTP answer worth retrying (TRANSIENT_STATUS); ``retry_after`` is the server's Retry-After in seconds."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class GaveUp(Exception):
    """Transient failures until the budget ran out; the message says how many attempts over how long."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):  # an answer: the caller decides by status (TransientHTTPError)
        return False
    if isinstance(exc, urllib.error.URLError):  # urllib wraps errors of the connect
        return isinstance(exc.reason, (ConnectionError, TimeoutError))
    return isinstance(exc, (ConnectionError, TimeoutError, TransientHTTPError, http.client.IncompleteRead))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TransientHTTPError):
        return str(exc)
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason  # the connect's own error (refused, timed out)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header given in seconds (an HTTP date is ignored: the backoff applies)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


def call_with_retries(attempt: Callable[[float], T], what: str, deadline: float, attempt_timeout: float) -> T:
    """``attempt(timeout)`` until it returns. A transient failure is retried after a backoff while ``deadline``
    (time.monotonic) allows another attempt, else GaveUp; any other exception is raised as it is, at once. Each
    attempt gets ``attempt_timeout`` seconds, never more than what is left (at least 0.1 s for the first)."""
    start, tries = time.monotonic(), 0
    while True:
        tries += 1
        left = deadline - time.monotonic()
        try:
            return attempt(max(min(attempt_timeout, left), 0.1))
        except Exception as e:
            if not is_transient(e):
                raise
            backoff = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
            delay = max(backoff, getattr(e, "retry_after", None) or 0.0)
            if time.monotonic() + delay >= deadline:
                raise GaveUp(f"{tries} attempt{'s' if tries > 1 else ''} over {time.monotonic() - start:.1f} s "
                             f"failed, the last with {_describe(e)}; the retry budget (reward.timeout_s) is "
                             "spent") from e
            logger.warning("%s: %s (attempt %d); retrying in %.1f s", what, _describe(e), tries, delay)
            time.sleep(delay)


class Refused(Exception):
    """The remote server answered, but not with rewards (``status``: its HTTP status; None: a malformed answer)."""

    def __init__(self, message: str, status: int | None):
        super().__init__(message)
        self.status = status


# Statuses about the request as a whole (token, route, size, media type): sending rows one by one would not help.
REQUEST_LEVEL = frozenset({401, 403, 404, 405, 411, 413, 415})


def failure_reason(what: str, e: Exception, hint: str = "") -> str:
    """The end of a failure's message, after 'reward of <sample> '."""
    if isinstance(e, Refused):
        return f"failed: {e} (not retried: the same request gets the same answer)"
    if isinstance(e, GaveUp):
        return f"failed: {what}: {e}"
    why = hint or " (not retried: only a refused, reset or timed-out connection is taken as transient)"
    return f"failed: {what} raised {type(e).__name__}: {e}{why}"


def describe_rows(rows: list[int], name: Callable[[int], str]) -> str:
    """'row 3 (prompt_id 7, sample 1)', or for several: '12 samples (row 0 (...), row 1 (...), ... and 9 more)'."""
    if len(rows) == 1:
        return name(rows[0])
    shown = ", ".join(name(r) for r in rows[:3])
    return f"{len(rows)} samples ({shown}{f' and {len(rows) - 3} more' if len(rows) > 3 else ''})"


def drop_failed(batch: Any, rewards: np.ndarray, failed: Mapping[int, str], whole_groups: bool,
                multiple: int) -> tuple[Any, np.ndarray]:
    """reward.on_failure=drop: the batch [B rows] and its rewards [B] without the failed rows (``failed``: row ->
    message naming it). With ``whole_groups`` (GRPO, RLOO: their advantage compares the samples of one prompt, and
    a group cut short would shift its baseline, or leave RLOO's leave-one-out mean without a sample) every row of a
    failed row's prompt_id leaves too. Then, while the rows left do not split into ``multiple`` equal parts (every
    learner rank must take the same number of steps: learner.num_ranks * learner.num_minibatches), the last group
    (or row) left goes too. Raises RewardFailure when nothing would be left."""
    if not failed:
        return batch, rewards
    n = batch.num_rows
    keys = batch.column("prompt_id").to_numpy() if whole_groups else np.arange(n)
    keep = ~np.isin(keys, keys[sorted(failed)])
    while keep.any() and keep.sum() % multiple:
        keep &= keys != keys[np.flatnonzero(keep)[-1]]
    if not keep.any():
        first = failed[min(failed)]
        raise RewardFailure(f"reward.on_failure=drop: {len(failed)} of {n} samples failed and no batch of whole "
                            f"{'prompt groups' if whole_groups else 'samples'} that splits over {multiple} learner "
                            f"steps is left to train on; the first: {first}")
    return batch.filter(keep), rewards[keep]
