"""RewardWorker: a Ray actor, separate from the learner, that scores RolloutBatches (the "inverse" half of online
inverse RL: a reward learned offline, queried online).

Public methods (its RPC surface; the HTTP front in reward_server/http.py calls the same class in-process):
    score(batch: pa.Table) -> np.ndarray[float32]                     # one scalar reward per row
    score_batch(batch, norm_state: dict | None) -> (rewards, dict, dict[int, str], raw rewards)
    score_texts(prompts, responses, references, update_stats=True) -> np.ndarray[float32]
    stats() -> dict
    peak_rss_mib() -> float                                           # this actor's peak memory

Reads the RolloutBatch columns prompt_token_ids, response_token_ids and reference; the driver adds the result as
the ``reward`` column. Backends, combined as a weighted sum: a rule (GSM8K final-answer match, synthetic digits), a
user function given by import path, a learned reward model (transformers sequence classification with one scalar
output), and a remote reward server over HTTP (`oirl serve-reward`'s /score, or any server that speaks OpenRLHF's
remote reward protocol: reward.protocol=openrlhf). Then optional running normalisation and clipping.

A failed reward is never a 0 (reward_server/failures.py): a transient failure of a backend (a refused or reset
connection, a timeout, HTTP 429/502/503/504) is retried with backoff within ``reward.timeout_s``; past that, or on
any other failure (a user function's TypeError, a 4xx, a NaN or inf reward), the call raises an error naming the
sample (row, prompt_id). With ``reward.on_failure=drop``, ``score_batch`` instead returns the failed rows (row ->
message; their rewards NaN) and the driver removes them from the batch. A failure the reward model or the remote
server has on a batch is narrowed down by scoring its rows one by one, so only the samples that fail are named.

Running normalisation: ``score`` keeps the moments (count, mean, m2) in the actor, so they are lost when the actor
restarts. ``score_batch`` takes them from the caller and returns the updated moments as plain JSON-able data, so the
driver can keep them in its checkpoint; a restarted actor or a resumed run then continues exactly. The HTTP front
never updates them (``update_stats=False``): remote clients cannot shift a training run's statistics.

The bearer token of a remote reward server is never a config value (configs are written to out/config.json and
shown by `oirl show-config`): it is read when the worker starts, from ``reward.url_token_file`` or else from the
environment variable named by ``reward.url_token_env``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oirl.bounds import any_value, bounds
from reward_server.failures import (
    REQUEST_LEVEL,
    TRANSIENT_STATUS,
    GaveUp,
    Refused,
    RewardFailure,
    TransientHTTPError,
    call_with_retries,
    describe_rows,
    failure_reason,
    retry_after_s,
)

logger = logging.getLogger(__name__)

WEIGHT = "a backend's weight: negative makes it a penalty, 0 turns it off"


@dataclass(frozen=True)
class RewardConfig:
    kind: str = "gsm8k"
    """Rule backend: 'gsm8k' (final-answer match against the row's reference), 'synthetic_digits', or 'none'."""
    rule_weight: float = field(default=1.0, metadata=any_value(WEIGHT))
    """Weight of the rule backend."""
    format_bonus: float = field(default=0.0, metadata=any_value("negative: a penalty for the missing format"))
    """gsm8k: extra reward for ending with '#### <number>' (half for a bare number on the last line)."""
    function: str = ""
    """User reward 'package.module:function', called as f(prompt, response, reference) -> float."""
    function_weight: float = field(default=1.0, metadata=any_value(WEIGHT))
    """Weight of the user function."""
    model_path: str = ""
    """Folder of a learned reward model (sequence classification, 1 label), e.g. from `oirl train-rm`."""
    model_weight: float = field(default=1.0, metadata=any_value(WEIGHT))
    """Weight of the learned reward model."""
    model_batch_size: int = field(default=32, metadata=bounds(ge=1))
    """Rows per reward-model forward."""
    model_max_tokens: int = field(default=512, metadata=bounds(ge=1))
    """Truncation length of prompt + response for the reward model."""
    url: str = ""
    """Remote reward server (`oirl serve-reward`), e.g. http://127.0.0.1:8000; its /score is called per batch."""
    protocol: str = "oirl"
    """How reward.url is called: 'oirl' (POST /score) or 'openrlhf' (OpenRLHF's remote reward model: POST
    {query, prompts, labels} to the url as given, /get_reward when it names no path)."""
    url_weight: float = field(default=1.0, metadata=any_value(WEIGHT))
    """Weight of the remote reward."""
    url_token_env: str = "OIRL_REWARD_TOKEN"
    """Name of the environment variable that holds the remote server's bearer token (read where the actor runs)."""
    url_token_file: str = ""
    """File holding the remote server's bearer token (e.g. a mounted Kubernetes Secret); wins over url_token_env."""
    normalize: bool = False
    """Normalise the combined reward with a running mean/std (over every batch scored so far)."""
    clip: float = field(default=0.0, metadata=bounds(ge=0, why="0 disables clipping"))
    """Clip the final reward to [-clip, clip] (0 = off)."""
    num_gpus: float = field(default=0.0, metadata=bounds(ge=0))
    """Ray GPUs for the reward actor; with one, the learned reward model runs on it."""
    model_dtype: str = "float32"
    """dtype of the learned reward model: float32, or bfloat16 (on a GPU: half the memory, faster)."""
    num_cpus: float = field(default=0.0, metadata=bounds(ge=0))
    """Ray CPUs reserved for the reward actor."""
    max_restarts: int = field(default=1, metadata=bounds(ge=0, why="0: a crash ends the run"))
    """Ray restarts the actor after a crash this many times; a lost call is retried on the restarted actor."""
    timeout_s: float = field(default=300.0, metadata=bounds(gt=0, why="every remote wait needs a timeout"))
    """Budget of one score call: transient backend failures are retried within it (the driver waits 60 s longer)."""
    attempt_timeout_s: float = field(default=60.0, metadata=bounds(gt=0, why="every remote wait needs a timeout"))
    """Longest wait for one HTTP request to the remote server; a request that times out is retried (timeout_s)."""
    on_failure: str = "error"
    """A reward still failing after retries: 'error' stops the run naming the sample; 'drop' leaves it out."""


def load_function(path: str) -> Callable[[str, str, str], float]:
    if ":" not in path:
        raise ValueError(f"reward.function={path!r} must look like 'package.module:function'")
    module, name = path.split(":", 1)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.function={path!r} cannot be imported: {e}") from e


def read_token_file(path: str, field: str) -> str:
    """The token in a file (surrounding whitespace stripped); errors name ``field`` but never show the token."""
    try:
        token = open(os.path.expanduser(path)).read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{field}={path!r} cannot be read ({e}); point it at a file that holds the token") from e
    if not token:
        raise ValueError(f"{field}={path!r} is empty; write the token into it")
    return token


def url_token(cfg: RewardConfig) -> str:
    """Bearer token for cfg.url: from cfg.url_token_file, else from $cfg.url_token_env, else '' (no token)."""
    if cfg.url_token_file:
        return read_token_file(cfg.url_token_file, "reward.url_token_file")
    return os.environ.get(cfg.url_token_env, "").strip() if cfg.url_token_env else ""


class RunningMoments:
    """Running mean/variance over every reward seen (Chan et al. parallel update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def state(self) -> dict:
        """Plain, JSON-serialisable copy: {'count': int, 'mean': float, 'm2': float}."""
        return {"count": int(self.count), "mean": float(self.mean), "m2": float(self.m2)}

    @classmethod
    def from_state(cls, state: dict | None) -> RunningMoments:
        """Moments from ``state()`` output; None means no reward seen yet. A malformed state is a ValueError."""
        moments = cls()
        if state is None:
            return moments
        if not isinstance(state, dict) or set(state) != {"count", "mean", "m2"}:
            raise ValueError(f"norm_state must be None or a dict with keys count, mean, m2 (as returned by "
                             f"score_batch), got {state!r:.200}")
        count, mean, m2 = state["count"], state["mean"], state["m2"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"norm_state['count']={count!r} must be an integer >= 0")
        for key, value in (("mean", mean), ("m2", m2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"norm_state[{key!r}]={value!r} must be a finite number")
        if m2 < 0:
            raise ValueError(f"norm_state['m2']={m2!r} must be >= 0 (it is a sum of squared deviations)")
        moments.count, moments.mean, moments.m2 = count, float(mean), float(m2)
        return moments

    def update(self, x: np.ndarray) -> None:
        n = len(x)
        if n == 0:
            return
        mean, var = float(x.mean()), float(x.var())
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += var * n + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.count)) if self.count > 1 else 1.0


class RewardWorker:
    def __init__(self, cfg: RewardConfig, tokenizer_path: str, log_file: str = ""):
        """log_file: this actor's stdout/stderr go there (oirl/logs.py); "" leaves them to Ray."""
        from transformers import AutoTokenizer

        from oirl.logs import redirect_actor_output

        redirect_actor_output(log_file)  # first: a restarted actor appends to the same file

        self.cfg = cfg
        # Local folders only: a missing path must fail here, not wait on a model hub.
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)  # the policy's
        self.function = load_function(cfg.function) if cfg.function else None
        self._url_token = url_token(cfg) if cfg.url else ""  # kept out of cfg, stats() and every message
        self.model = self.rm_tokenizer = None
        if cfg.model_path:
            from oirl.config import BUILD_REWARD_MODEL, resolve_path

            model_dir = str(resolve_path(cfg.model_path))  # as validate() checks it: cwd, else the repository
            if not os.path.isfile(os.path.join(model_dir, "config.json")):
                raise ValueError(f"reward.model_path={cfg.model_path!r} is not a model folder (no config.json) on "
                                 f"this node; {BUILD_REWARD_MODEL}")
            import torch
            from transformers import AutoModelForSequenceClassification

            # Ray caps a num_cpus=0 actor at one thread; scoring is its own phase of the loop, so use the cores.
            torch.set_num_threads(max(1, int(cfg.num_cpus)) if cfg.num_cpus >= 1 else (os.cpu_count() or 1))

            self.rm_tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.device = torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, dtype=getattr(torch, cfg.model_dtype), local_files_only=True).to(self.device)
            self.model.eval()
            if self.model.config.num_labels != 1:
                raise ValueError(f"reward.model_path={cfg.model_path!r} has {self.model.config.num_labels} labels; "
                                 "a reward model needs exactly 1 (train one with `oirl train-rm`)")
        self.moments = RunningMoments()
        self.scored = 0

    # ---- backends: [B] float64 each, NaN where a row failed (reported through ``fail``) -------------------------

    def _rows(self, rows: Any, value: Callable[[int], float], what: str, fail: Callable, deadline: float,
              out: np.ndarray, hint: str = "") -> None:
        """out[i] = value(i) for each row i, transient failures retried; a row that still fails goes to ``fail``."""
        for i in rows:
            try:
                out[i] = call_with_retries(lambda _timeout, i=i: float(value(i)), what, deadline,
                                           self.cfg.attempt_timeout_s)
            except Exception as e:
                fail([i], failure_reason(what, e, hint))

    def _rule(self, responses: list[str], references: list[str], response_ids: list[list[int]] | None,
              fail: Callable, deadline: float) -> np.ndarray:
        from reward_server import rules

        out = np.full(len(responses), np.nan)
        if self.cfg.kind == "gsm8k":
            bonus = self.cfg.format_bonus
            self._rows(range(len(responses)), lambda i: rules.gsm8k_reward(responses[i], references[i], bonus),
                       "reward.kind=gsm8k", fail, deadline, out, " (reward.kind=gsm8k needs a reference answer per row)")
        elif self.cfg.kind == "synthetic_digits":
            ids = response_ids if response_ids is not None else [
                self.tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
            self._rows(range(len(responses)),
                       lambda i: rules.digit_fraction([self.tokenizer.decode([t]) for t in ids[i]]),
                       "reward.kind=synthetic_digits", fail, deadline, out)
        else:
            out[:] = 0.0
        return out

    def _function(self, prompts: list[str], responses: list[str], references: list[str], fail: Callable,
                  deadline: float) -> np.ndarray:
        assert self.function is not None, "called without reward.function"
        f, out = self.function, np.full(len(responses), np.nan)
        self._rows(range(len(responses)), lambda i: f(prompts[i], responses[i], references[i]),
                   f"reward.function {self.cfg.function}", fail, deadline, out)
        return out

    def _forward(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """The reward model's scalar [len(prompts)] for these pairs, in one forward."""
        import torch

        enc = self.rm_tokenizer(prompts, responses, truncation=True, max_length=self.cfg.model_max_tokens,
                                padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = self.model(**enc.to(self.device)).logits
        return logits[:, 0].double().cpu().numpy()

    def _model(self, prompts: list[str], responses: list[str], fail: Callable, deadline: float) -> np.ndarray:
        out = np.full(len(prompts), np.nan)
        what = f"reward model {self.cfg.model_path}"
        for s in range(0, len(prompts), self.cfg.model_batch_size):
            rows = list(range(s, min(len(prompts), s + self.cfg.model_batch_size)))
            try:
                out[rows] = call_with_retries(lambda _timeout, rows=rows: self._forward(
                    [prompts[i] for i in rows], [responses[i] for i in rows]), what, deadline, self.cfg.attempt_timeout_s)
            except Exception as e:
                if len(rows) == 1 or isinstance(e, GaveUp):
                    fail(rows, failure_reason(what, e))
                else:  # find the rows it fails on: each alone
                    self._rows(rows, lambda i: self._forward([prompts[i]], [responses[i]])[0], what, fail,
                               deadline, out)
        return out

    def _endpoint(self) -> str:
        """The URL requests go to: {url}/score, or for protocol=openrlhf the url itself (OpenRLHF's users give the
        full .../get_reward) or {url}/get_reward when it has no path."""
        url = self.cfg.url
        if self.cfg.protocol == "openrlhf":
            return url if urllib.parse.urlsplit(url).path.strip("/") else url.rstrip("/") + "/get_reward"
        return url.rstrip("/") + "/score"

    def _request(self, prompts: list[str], responses: list[str], references: list[str], timeout: float,
                 queries: list[str] | None = None) -> np.ndarray:
        """One POST to the server; a transient answer raises TransientHTTPError, any other bad one Refused.
        protocol=openrlhf sends ``queries`` (prompt + response, default: the two texts joined) with the prompts."""
        url = self.cfg.url
        if self.cfg.protocol == "openrlhf":
            queries = queries if queries is not None else [p + r for p, r in zip(prompts, responses)]
            payload: dict[str, Any] = {"query": queries, "prompts": prompts, "labels": references}
        else:
            payload = {"prompts": prompts, "responses": responses, "references": references}
        req = urllib.request.Request(self._endpoint(), data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        if self._url_token:
            req.add_header("Authorization", f"Bearer {self._url_token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            if e.code in TRANSIENT_STATUS:
                raise TransientHTTPError(f"reward server {url} answered {e.code}: {detail}",
                                         retry_after_s(e.headers.get("Retry-After"))) from e
            fix = (f"; put the server's token in ${self.cfg.url_token_env} or in the file reward.url_token_file "
                   "where the reward actor runs") if e.code == 401 else ""
            raise Refused(f"reward server {url} answered {e.code}: {detail}{fix}", e.code) from e
        try:
            rewards = json.loads(raw)["rewards"]
        except (ValueError, KeyError, TypeError) as e:
            raise Refused(f"reward server {url} answered without a JSON object holding 'rewards': {raw[:200]!r}",
                          None) from e
        if isinstance(rewards, (int, float)) and not isinstance(rewards, bool) and len(prompts) == 1:
            rewards = [rewards]  # an OpenRLHF reward function may answer one query with a bare number
        if not isinstance(rewards, list) or len(rewards) != len(prompts):
            raise Refused(f"reward server {url} returned {len(rewards) if isinstance(rewards, list) else rewards!r:.80} "
                          f"rewards for {len(prompts)} rows", None)
        try:
            return np.asarray([np.nan if r is None else r for r in rewards], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise Refused(f"reward server {url} returned rewards that are not numbers: {rewards!r:.200}", None) from e

    def _remote(self, prompts: list[str], responses: list[str], references: list[str], fail: Callable,
                deadline: float, openrlhf_texts: tuple[list[str], list[str]] | None = None) -> np.ndarray:
        """``openrlhf_texts``: (prompts, queries) as OpenRLHF sends them, with special tokens (protocol=openrlhf);
        None: the decoded prompts, and each prompt + response."""
        out = np.full(len(prompts), np.nan)
        what = f"reward server {self.cfg.url}"
        sent_prompts, queries = openrlhf_texts or (prompts, None)

        def request(rows: list[int]) -> np.ndarray:
            return call_with_retries(lambda timeout: self._request(
                [sent_prompts[i] for i in rows], [responses[i] for i in rows], [references[i] for i in rows], timeout,
                None if queries is None else [queries[i] for i in rows]), what, deadline, self.cfg.attempt_timeout_s)

        rows = list(range(len(prompts)))
        try:
            out[:] = request(rows)
        except Refused as e:
            if len(rows) > 1 and e.status is not None and e.status not in REQUEST_LEVEL:
                # The server failed on something in the batch (400, 422, 500): one request per row finds what.
                self._rows(rows, lambda i: request([i])[0], what, fail, deadline, out)
            else:
                fail(rows, failure_reason(what, e))
        except Exception as e:  # GaveUp: the server stayed unreachable or overloaded for the whole budget
            fail(rows, failure_reason(what, e))
        return out

    # ---- public --------------------------------------------------------------------------------------------

    def _combined(self, prompts: list[str], responses: list[str], references: list[str] | None,
                  response_ids: list[list[int]] | None, name: Callable[[int], str] = lambda i: f"sample {i}",
                  keep_going: bool = False, hint: str = "",
                  openrlhf_texts: tuple[list[str], list[str]] | None = None) -> tuple[np.ndarray, dict[int, str]]:
        """Weighted sum of the backends [B] (float64), before normalisation, and the failed rows {row: message}
        (NaN in the sum). keep_going=False raises RewardFailure at the first failure, its message naming the
        sample(s) by ``name`` and ending in ``hint``; a NaN or inf reward is a failure too. ``openrlhf_texts``:
        what reward.protocol=openrlhf sends (see _remote)."""
        references = references if references is not None else [""] * len(responses)
        if not len(prompts) == len(responses) == len(references):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(references)} references: "
                             "give one of each per sample")
        c = self.cfg
        deadline = time.monotonic() + c.timeout_s
        failed: dict[int, str] = {}

        def fail(rows: list[int], reason: str) -> None:
            if not keep_going:
                raise RewardFailure(f"reward of {describe_rows(rows, name)} {reason}{hint}")
            for r in rows:
                failed.setdefault(r, f"reward of {name(r)} {reason}")

        total = np.zeros(len(responses))
        if c.kind != "none":
            total += c.rule_weight * self._rule(responses, references, response_ids, fail, deadline)
        if self.function is not None:
            total += c.function_weight * self._function(prompts, responses, references, fail, deadline)
        if self.model is not None:
            total += c.model_weight * self._model(prompts, responses, fail, deadline)
        if c.url and len(responses):
            total += c.url_weight * self._remote(prompts, responses, references, fail, deadline, openrlhf_texts)
        for i in np.flatnonzero(~np.isfinite(total)):
            if int(i) not in failed:
                fail([int(i)], f"is {total[i]} (not finite); check the reward backends for response "
                               f"{responses[i][:80]!r}")
        return total, failed

    def _finish(self, total: np.ndarray, moments: RunningMoments, update_stats: bool) -> np.ndarray:
        """Normalise with (and, when asked, first update) ``moments``, then clip. [B] float64 -> [B] float32."""
        if self.cfg.normalize:
            if update_stats:
                moments.update(total)
            total = (total - moments.mean) / max(moments.std, 1e-6)
        if self.cfg.clip > 0:
            total = np.clip(total, -self.cfg.clip, self.cfg.clip)
        self.scored += len(total)
        return total.astype(np.float32)

    def score_texts(self, prompts: list[str], responses: list[str], references: list[str] | None = None,
                    response_ids: list[list[int]] | None = None, update_stats: bool = True) -> np.ndarray:
        """Rewards [B] of decoded texts; update_stats=False normalises with the actor's moments but leaves them.
        Any failure raises (RewardFailure, naming 'sample i'): the HTTP front answers it with a 422."""
        total, _ = self._combined(prompts, responses, references, response_ids)
        return self._finish(total, self.moments, update_stats)

    def _texts(self, batch: Any) -> dict[str, Any]:
        """_combined's text arguments for a RolloutBatch. protocol=openrlhf also gets OpenRLHF's texts: the prompt
        and prompt + response decoded with their special tokens (chat markers, EOS), as OpenRLHF sends them."""
        response_ids = batch.column("response_token_ids").to_pylist()
        prompt_ids = batch.column("prompt_token_ids").to_pylist()
        responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        prompts = self.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True) if (
            self.model is not None or self.function is not None or self.cfg.url) else [""] * len(responses)
        references = (batch.column("reference").to_pylist() if "reference" in batch.column_names
                      else [""] * len(responses))
        openrlhf = None
        if self.cfg.url and self.cfg.protocol == "openrlhf":
            openrlhf = (self.tokenizer.batch_decode(prompt_ids, skip_special_tokens=False),
                        self.tokenizer.batch_decode([p + r for p, r in zip(prompt_ids, response_ids)],
                                                    skip_special_tokens=False))
        return {"prompts": prompts, "responses": responses, "references": references, "response_ids": response_ids,
                "openrlhf_texts": openrlhf}

    @staticmethod
    def _namer(batch: Any) -> Callable[[int], str]:
        """'row 3 (prompt_id 17, sample 1)': how an error names a row of a RolloutBatch."""
        prompt_ids = batch.column("prompt_id").to_pylist()
        samples = batch.column("sample_index").to_pylist()
        return lambda i: f"row {i} (prompt_id {prompt_ids[i]}, sample {samples[i]})"

    def score(self, batch: Any) -> np.ndarray:
        """RolloutBatch -> rewards [B]. Token ids are decoded only for scoring; training keeps the engine's ids.
        Normalises with (and updates) the moments kept in this actor. Any failure raises, naming the row."""
        total, _ = self._combined(**self._texts(batch), name=self._namer(batch))
        return self._finish(total, self.moments, update_stats=True)

    def score_batch(self, batch: Any, norm_state: dict | None
                    ) -> tuple[np.ndarray, dict, dict[int, str], np.ndarray]:
        """Like ``score``, but the running moments belong to the caller: normalise with ``norm_state`` (None = no
        reward seen yet) and return (rewards [B] float32, updated moments {'count', 'mean', 'm2'}, failed rows
        {row: message naming it}, raw rewards [B] float32: before normalisation and clipping, what curves and
        summaries show). The actor keeps nothing, so a restarted actor given the returned state continues
        exactly. reward.on_failure=error raises at the first failure (nothing is failed then); with 'drop', failed
        rows are NaN, left out of the moments, and the caller removes them (reward_server.failures.drop_failed)."""
        moments = RunningMoments.from_state(norm_state)
        drop = self.cfg.on_failure == "drop"
        total, failed = self._combined(**self._texts(batch), name=self._namer(batch), keep_going=drop,
                                       hint="" if drop else "; with reward.on_failure=drop such samples would "
                                                            "leave the batch instead")
        ok = np.ones(len(total), dtype=bool)
        ok[list(failed)] = False
        rewards = np.full(len(total), np.nan, dtype=np.float32)
        rewards[ok] = self._finish(total[ok], moments, update_stats=True)
        if failed:
            logger.warning("reward.on_failure=drop: %d of %d samples failed; the first: %s", len(failed), len(total),
                           failed[min(failed)])
        return rewards, moments.state(), failed, total.astype(np.float32)

    def stats(self) -> dict:
        return {"scored": self.scored, "running_mean": self.moments.mean, "running_std": self.moments.std}

    def peak_rss_mib(self) -> float:
        """This actor's peak resident memory so far (the driver logs it as memory/reward_peak_rss_mib)."""
        from learner.ranks import tree_peak_rss_mib

        return tree_peak_rss_mib()

    def pid(self) -> int:
        import os

        return os.getpid()


def spawn_reward_actor(cfg: RewardConfig, tokenizer_path: str, name: str | None = None,
                       resources: dict[str, float] | None = None, log_file: str = "") -> Any:
    """The reward actor as the driver runs it: a crash restarts it (cfg.max_restarts times) and the lost call is
    retried on the restarted actor; past that, ray.get raises an error naming the actor instead of hanging.
    log_file: where its output goes (oirl/logs.py)."""
    import ray

    return ray.remote(RewardWorker).options(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=resources or {}, name=name, max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_restarts,
    ).remote(cfg, tokenizer_path, log_file)
