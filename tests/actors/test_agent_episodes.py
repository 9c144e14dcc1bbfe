"""Multi-turn episodes on a real vLLM engine (the tiny model, in-process, no Ray): the ids the learner trains on are
byte for byte the ids the engine saw at every turn, the environment's tokens are exactly the template's rendering
of its messages, a slow environment holds up only its own episode, and a broken one ends only its own."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from actors.agent.env import Environment, Step, register
from actors.rollout_worker import RolloutConfig


@pytest.fixture(scope="module")
def llm():
    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    path = str(resolve_model(ModelConfig(path="tiny", tiny_hidden_size=64)))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # as the rollout worker sets it (1 GiB)
    from vllm import LLM

    from actors.rollout_worker import engine_kwargs

    engine = LLM(**engine_kwargs(config(), path, "float32", 0))  # as the rollout worker builds its engine
    yield engine
    del engine


@register("test-echo")
class EchoEnv(Environment):
    """Answers every turn with a fixed observation for three turns; sleeps `delay` seconds in episode 0's steps."""

    delay = 0.0

    def __init__(self, fail: bool = False):
        self.fail, self.turn, self.row = fail, 0, {}

    def reset(self, row):
        self.row = row
        return [{"role": "user", "content": f"count for {row['prompt_id']}"}]

    def step(self, text):
        self.turn += 1
        if self.fail and self.row["prompt_id"] == 1:
            raise RuntimeError("the environment broke")
        if self.row["prompt_id"] == 0 and EchoEnv.delay:
            time.sleep(EchoEnv.delay)
        if self.turn >= 3:
            return Step(None, 0.25, True)
        return Step(f"observation {self.turn}", 0.5, False)


def config(**kw) -> RolloutConfig:
    return dataclasses.replace(RolloutConfig(env="test-echo", max_turns=3, max_new_tokens=12, samples_per_prompt=2,
                                             max_observation_tokens=32, max_model_len=1024), **kw)


def recorded(llm):
    """Wrap the engine's add_request to record the ids each request was given."""
    seen: dict[str, list[int]] = {}
    seen_at: dict[str, float] = {}
    engine = llm.llm_engine
    original = engine.add_request

    def add_request(request_id, prompt, params, *a, **k):
        seen[request_id] = list(prompt["prompt_token_ids"])
        seen_at[request_id] = time.perf_counter()
        return original(request_id, prompt, params, *a, **k)

    engine.add_request = add_request
    recorded.at = seen_at
    return seen, lambda: setattr(engine, "add_request", original)


@pytest.mark.slow
def test_the_learner_sees_exactly_the_ids_the_engine_saw(llm):
    from actors.agent.episodes import run_episodes
    from learner.ppo import pad_batch

    seen, restore = recorded(llm)
    try:
        table = run_episodes(llm, config(), [{"prompt_id": i, "question": "", "answer": ""} for i in range(3)],
                             [11, 12, 13], 0, 0)
    finally:
        restore()
    tok = llm.get_tokenizer()
    assert table.num_rows == 6 and table.column("prompt_id").to_pylist() == [0, 0, 1, 1, 2, 2]
    d = pad_batch(table, tok.pad_token_id)
    for i, row in enumerate(table.to_pylist()):
        assert row["num_turns"] == 3 and row["env_reward"] == pytest.approx(1.25)
        ids = row["prompt_token_ids"] + row["response_token_ids"]
        n = len(ids)
        assert d["input_ids"][i, :n].tolist() == ids  # what the learner scores
        requests = [seen[f"{row['prompt_id']}:{row['sample_index']}:{t}"] for t in range(3)]
        assert requests[0] == row["prompt_token_ids"]
        for t in (1, 2):  # every turn's request is a prefix of the trajectory: nothing rewritten or re-tokenised
            assert ids[: len(requests[t])] == requests[t]
        mask, resp = row["loss_mask"], row["response_token_ids"]
        # the environment's tokens are the template's rendering of its message between two turns, and only those
        runs = _runs(mask)
        assert [m for m, _, _ in runs] == [1, 0, 1, 0, 1]
        for k, (_, a, b) in enumerate(runs[1::2], start=1):
            text = tok.decode(resp[a:b])
            assert f"<|im_start|>tool\nobservation {k}<|im_end|>\n<|im_start|>assistant\n" in text
            assert len(requests[k]) == len(row["prompt_token_ids"]) + b  # the next turn was generated after it
        lps = row["response_logprobs"]
        assert all(lp == 0.0 for lp, m in zip(lps, mask) if not m) and all(lp < 0 for lp, m in zip(lps, mask) if m)


def _runs(mask):
    out, start = [], 0
    for j in range(1, len(mask) + 1):
        if j == len(mask) or mask[j] != mask[start]:
            out.append((mask[start], start, j))
            start = j
    return out


@pytest.mark.slow
def test_a_slow_environment_holds_up_only_its_own_episode(llm):
    """Episode 0's environment sleeps 1 s per step; the other episodes run all three turns before its first sleep
    ends (a barrier per turn would hold every episode's second turn until then)."""
    from actors.agent.episodes import run_episodes

    EchoEnv.delay = 1.0
    seen, restore = recorded(llm)
    try:
        t0 = time.perf_counter()
        table = run_episodes(llm, config(samples_per_prompt=1),
                             [{"prompt_id": i, "question": "", "answer": ""} for i in range(4)], [1, 2, 3, 4], 0, 0)
    finally:
        EchoEnv.delay = 0.0
        restore()
    at = recorded.at
    waited = dict(zip(table.column("prompt_id").to_pylist(), table.column("env_seconds").to_pylist()))
    assert waited[0] >= 3.0 and max(waited[i] for i in (1, 2, 3)) < 0.5
    assert max(at[f"{i}:0:2"] for i in (1, 2, 3)) < at["0:0:1"]  # their last turns began before 0's second did
    assert at["0:0:1"] - t0 >= 1.0
    assert table.column("num_turns").to_pylist() == [3, 3, 3, 3]


@pytest.mark.slow
def test_a_broken_or_stuck_environment_ends_only_its_own_episode(llm):
    from actors.agent.episodes import run_episodes
    from oirl.batch import generate_seconds

    table = run_episodes(llm, config(env_args=json.dumps({"fail": True})),
                         [{"prompt_id": i, "question": "", "answer": ""} for i in range(3)], [1, 2, 3], 0, 0)
    rows = {(r["prompt_id"], r["sample_index"]): r for r in table.to_pylist()}
    for j in range(2):
        assert rows[(1, j)]["finish_reason"] == "env_error" and rows[(1, j)]["tool_errors"] == 1
        assert rows[(1, j)]["num_turns"] == 1
        assert rows[(0, j)]["num_turns"] == 3 and rows[(0, j)]["finish_reason"] == "stop"
    EchoEnv.delay = 6.0
    try:
        t0 = time.perf_counter()
        table = run_episodes(llm, config(env_timeout_s=1.0, samples_per_prompt=1),
                             [{"prompt_id": i, "question": "", "answer": ""} for i in range(2)], [1, 2], 0, 0)
        waited = time.perf_counter() - t0 - generate_seconds(table)  # beside the engine's own steps
    finally:
        EchoEnv.delay = 0.0
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    assert rows[0]["finish_reason"] == "env_timeout" and rows[0]["tool_errors"] == 1
    assert 1.0 <= rows[0]["env_seconds"] < 3.0 and rows[1]["num_turns"] == 3
    assert waited < 3.0  # cut at the 1 s timeout, not after the 6 s sleep
