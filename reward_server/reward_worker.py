"""RewardWorker: a Ray actor, separate from the learner, that scores RolloutBatches (the "inverse" half of online
inverse RL: a reward learned offline, queried online).

Public methods (its RPC surface; the HTTP front in reward_server/http.py calls the same class in-process):
    score(batch: pa.Table) -> np.ndarray[float32]                     # one scalar reward per row
    score_batch(batch, norm_state: dict | None) -> (np.ndarray[float32], dict)
    score_texts(prompts, responses, references, update_stats=True) -> np.ndarray[float32]
    stats() -> dict
    peak_rss_mib() -> float                                           # this actor's peak memory

Reads the RolloutBatch columns prompt_token_ids, response_token_ids and reference; the driver adds the result as
the ``reward`` column. Backends, combined as a weighted sum: a rule (GSM8K final-answer match, synthetic digits), a
user function given by import path, a learned reward model (transformers sequence classification with one scalar
output), and a remote reward server over HTTP. Then optional running normalisation and clipping. A NaN or inf is
an error naming the sample.

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
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oirl.bounds import any_value, bounds

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
    """Longest wait for one score call (and for one HTTP request to a remote server)."""


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
    def __init__(self, cfg: RewardConfig, tokenizer_path: str):
        from transformers import AutoTokenizer

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

    # ---- backends ------------------------------------------------------------------------------------------

    def _rule(self, responses: list[str], references: list[str], response_ids: list[list[int]] | None) -> np.ndarray:
        from reward_server import rules

        if self.cfg.kind == "gsm8k":
            out = np.zeros(len(responses))
            for i, (r, ref) in enumerate(zip(responses, references)):
                try:
                    out[i] = rules.gsm8k_reward(r, ref, self.cfg.format_bonus)
                except ValueError as e:
                    raise ValueError(f"sample {i}: {e} (reward.kind=gsm8k needs a reference answer per row)") from e
            return out
        if self.cfg.kind == "synthetic_digits":
            if response_ids is None:
                response_ids = [self.tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
            return np.array([rules.digit_fraction([self.tokenizer.decode([t]) for t in ids])
                             for ids in response_ids], dtype=np.float64)
        return np.zeros(len(responses))

    def _model(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        import torch

        out = []
        for s in range(0, len(prompts), self.cfg.model_batch_size):
            enc = self.rm_tokenizer(prompts[s: s + self.cfg.model_batch_size],
                                    responses[s: s + self.cfg.model_batch_size], truncation=True,
                                    max_length=self.cfg.model_max_tokens, padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(**enc.to(self.device)).logits
            out.append(logits[:, 0].double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def _remote(self, prompts: list[str], responses: list[str], references: list[str]) -> np.ndarray:
        body = json.dumps({"prompts": prompts, "responses": responses, "references": references}).encode()
        req = urllib.request.Request(self.cfg.url.rstrip("/") + "/score", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        if self._url_token:
            req.add_header("Authorization", f"Bearer {self._url_token}")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                rewards = json.loads(resp.read())["rewards"]
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            fix = (f"; put the server's token in ${self.cfg.url_token_env} or in the file reward.url_token_file "
                   "where the reward actor runs") if e.code == 401 else ""
            raise ValueError(f"reward server {self.cfg.url} answered {e.code}: {detail}{fix}") from e
        if not isinstance(rewards, list) or len(rewards) != len(prompts):
            raise ValueError(f"reward server {self.cfg.url} returned {len(rewards) if isinstance(rewards, list) else rewards!r:.80} "
                             f"rewards for {len(prompts)} rows")
        return np.asarray(rewards, dtype=np.float64)

    # ---- public --------------------------------------------------------------------------------------------

    def _combined(self, prompts: list[str], responses: list[str], references: list[str] | None,
                  response_ids: list[list[int]] | None) -> np.ndarray:
        """Weighted sum of the backends [B] (float64), before normalisation; a non-finite reward is an error."""
        references = references if references is not None else [""] * len(responses)
        if not len(prompts) == len(responses) == len(references):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(references)} references: "
                             "give one of each per sample")
        c = self.cfg
        total = np.zeros(len(responses))
        if c.kind != "none":
            total += c.rule_weight * self._rule(responses, references, response_ids)
        if self.function is not None:
            total += c.function_weight * np.array([float(self.function(p, r, ref)) for p, r, ref
                                                   in zip(prompts, responses, references)])
        if self.model is not None:
            total += c.model_weight * self._model(prompts, responses)
        if c.url:
            total += c.url_weight * self._remote(prompts, responses, references)
        bad = np.flatnonzero(~np.isfinite(total))
        if len(bad):
            raise ValueError(f"reward of sample {int(bad[0])} is {total[bad[0]]} (not finite); check the reward "
                             f"backends for response {responses[bad[0]][:80]!r}")
        return total

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
        """Rewards [B] of decoded texts; update_stats=False normalises with the actor's moments but leaves them."""
        return self._finish(self._combined(prompts, responses, references, response_ids), self.moments, update_stats)

    def _texts(self, batch: Any) -> tuple[list[str], list[str], list[str], list[list[int]]]:
        response_ids = batch.column("response_token_ids").to_pylist()
        prompt_ids = batch.column("prompt_token_ids").to_pylist()
        responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        prompts = self.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True) if (
            self.model is not None or self.function is not None or self.cfg.url) else [""] * len(responses)
        references = (batch.column("reference").to_pylist() if "reference" in batch.column_names
                      else [""] * len(responses))
        return prompts, responses, references, response_ids

    def score(self, batch: Any) -> np.ndarray:
        """RolloutBatch -> rewards [B]. Token ids are decoded only for scoring; training keeps the engine's ids.
        Normalises with (and updates) the moments kept in this actor."""
        return self.score_texts(*self._texts(batch))

    def score_batch(self, batch: Any, norm_state: dict | None) -> tuple[np.ndarray, dict]:
        """Like ``score``, but the running moments belong to the caller: normalise with ``norm_state`` (None = no
        reward seen yet) and return (rewards [B] float32, updated moments {'count', 'mean', 'm2'}). The actor keeps
        nothing, so a restarted actor given the returned state continues exactly."""
        moments = RunningMoments.from_state(norm_state)
        rewards = self._finish(self._combined(*self._texts(batch)), moments, update_stats=True)
        return rewards, moments.state()

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
                       resources: dict[str, float] | None = None) -> Any:
    """The reward actor as the driver runs it: a crash restarts it (cfg.max_restarts times) and the lost call is
    retried on the restarted actor; past that, ray.get raises an error naming the actor instead of hanging."""
    import ray

    return ray.remote(RewardWorker).options(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=resources or {}, name=name, max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_restarts,
    ).remote(cfg, tokenizer_path)
