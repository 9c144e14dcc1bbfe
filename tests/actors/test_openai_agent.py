"""Black-box agents (actors/agent/blackbox.py, openai_server.py): agents written with the real `openai` client,
served by a real tiny vLLM engine in-process. The learner's ids are exactly the first request's rendered prompt,
each completion as the engine returned it and the template's ids of the messages in between; the mask marks the
completions; the logprobs are the engine's; the reward is the agent's. An agent that rewrites history, hangs,
raises, or asks for too much fails its own episode and the batch goes on; the docs' agent (docs/agents.md) trains end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import threading
import time

import numpy as np
import openai
import pytest

from actors.agent.blackbox import _Episode, extension_error
from actors.agent.openai_server import RequestError, normalize_message, parse_chat_request
from actors.rollout_worker import RolloutConfig
from oirl.config import REPO_ROOT, ConfigError, load_config

HERE = "test_openai_agent"  # this module, as the agent specs import it (pytest puts tests/actors on sys.path)
LOG: dict[tuple[int, int], dict] = {}
RELEASE = threading.Event()


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="oirl", max_retries=0, timeout=60)


def _text(reply) -> str:
    return reply.choices[0].message.content


def chat(base_url: str, row: dict) -> float:
    """Three completions: a question, a fake tool result, a follow-up (the reply passed back as the client's own
    message object). The first request asks for greedy sampling and 1000 tokens, which the rollout overrides."""
    c = _client(base_url)
    log = LOG.setdefault((row["prompt_id"], row["sample_index"]), {"texts": []})
    msgs = [{"role": "user", "content": row["question"]}]
    r = c.chat.completions.create(model="gpt-test", messages=msgs, temperature=0.0, top_p=0.5, max_tokens=1000)
    log["texts"].append(_text(r))
    log["model"] = r.model
    msgs += [{"role": "assistant", "content": _text(r)}, {"role": "tool", "content": f"result {row['prompt_id']}"}]
    r = c.chat.completions.create(model="gpt-test", messages=msgs)
    log["texts"].append(_text(r))
    msgs += [r.choices[0].message, {"role": "user", "content": "final?"}]
    r = c.chat.completions.create(model="gpt-test", messages=msgs, max_tokens=4)
    log["texts"].append(_text(r))
    log["usage"] = (r.usage.prompt_tokens, r.usage.completion_tokens)
    return 0.25 + row["prompt_id"]


def rewrite(base_url: str, row: dict) -> float:
    """Edits the first user message in its second request (history rewritten); then claims a reward."""
    c = _client(base_url)
    msgs = [{"role": "user", "content": row["question"]}]
    r = c.chat.completions.create(model="m", messages=msgs)
    msgs = [{"role": "user", "content": row["question"] + " (edited)"}, {"role": "assistant", "content": _text(r)},
            {"role": "user", "content": "again"}]
    try:
        c.chat.completions.create(model="m", messages=msgs)
    except openai.BadRequestError as e:
        LOG[(row["prompt_id"], row["sample_index"])] = {"error": str(e)}
    return 1.0


def hang(base_url: str, row: dict) -> float:
    """One completion, then stuck until the test releases it; then a late request."""
    c = _client(base_url)
    msgs = [{"role": "user", "content": row["question"]}]
    r = c.chat.completions.create(model="m", messages=msgs)
    RELEASE.wait(120)
    msgs += [{"role": "assistant", "content": _text(r)}, {"role": "user", "content": "late"}]
    try:
        c.chat.completions.create(model="m", messages=msgs)
    except openai.APIStatusError as e:
        LOG[(row["prompt_id"], row["sample_index"])] = {"late": e.status_code, "error": str(e)}
    return 1.0


def loop(base_url: str, row: dict) -> float:
    """Asks again and again until refused (rollout.max_turns)."""
    c = _client(base_url)
    msgs = [{"role": "user", "content": row["question"]}]
    for _ in range(10):
        try:
            r = c.chat.completions.create(model="m", messages=msgs)
        except openai.BadRequestError as e:
            LOG[(row["prompt_id"], row["sample_index"])] = {"error": str(e)}
            break
        msgs += [{"role": "assistant", "content": _text(r)}, {"role": "user", "content": "more"}]
    return 2.0


def mixed(base_url: str, row: dict) -> float:
    """The batch's agents by prompt: 0 and 1 chat, 2 rewrites, 3 hangs, 4 loops."""
    return {0: chat, 1: chat, 2: rewrite, 3: hang, 4: loop}[row["prompt_id"]](base_url, row)


def raises_first(base_url: str, row: dict) -> float:
    """Streams (refused), then raises before any completion."""
    try:
        _client(base_url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    except openai.BadRequestError as e:
        LOG[("stream", row["prompt_id"])] = {"error": str(e)}
    raise RuntimeError("the agent broke")


def long_prompt(base_url: str, row: dict) -> float:
    _client(base_url).chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 2000}])
    return 0.0


# ---- light: the request format and the extension rule -----------------------------------------------------------


def test_refused_and_ignored_fields_are_named():
    msgs = [{"role": "user", "content": "hi"}]
    for body, field in (({"n": 2}, "n=2"), ({"stream": True}, "stream"),
                        ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"max_tokens": 0}, "max_tokens=0"), ({"stop": ["a"] * 5}, "stop")):
        with pytest.raises(RequestError, match=field) as err:
            parse_chat_request({"model": "m", "messages": msgs, **body})
        assert err.value.status == 400
    with pytest.raises(RequestError, match=r"messages\[1\].role='robot'"):
        parse_chat_request({"messages": msgs + [{"role": "robot", "content": "x"}]})
    with pytest.raises(RequestError, match=r"messages\[0\].content\[0\] must be a text part"):
        parse_chat_request({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    req = parse_chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}],
                              "temperature": 0.0, "top_p": 0.5, "max_completion_tokens": 7, "stop": "END"})
    assert req.messages == [{"role": "user", "content": "ab"}]
    assert (req.ignored, req.max_tokens, req.stop) == (["temperature", "top_p"], 7, ["END"])


def test_a_reply_passed_back_as_the_clients_object_is_the_text_it_holds():
    from openai.types.chat import ChatCompletionMessage

    dumped = ChatCompletionMessage(role="assistant", content="forty two").model_dump()
    assert dumped["refusal"] is None  # what the client adds, and normalize drops
    assert normalize_message(dumped, 3) == {"role": "assistant", "content": "forty two"}


def test_a_request_must_extend_the_conversation():
    ep = _Episode(0, 0, None, {}, None)  # type: ignore[arg-type]
    ep.messages, ep.tools, ep.last_text = [{"role": "user", "content": "q"}], None, "a1"

    def check(messages, tools=None):
        req = parse_chat_request({"messages": messages, **({"tools": tools} if tools else {})})
        return extension_error(ep, req)

    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}]
    assert check(ok + [{"role": "tool", "content": "r"}]) == ""
    assert check(ok) == ""  # nothing new: only the template's tokens between the completions
    assert "messages[0] (user) differs" in check([{"role": "user", "content": "Q"}] + ok[1:])
    assert "completion exactly as returned" in check(ok[:1] + [{"role": "assistant", "content": "a1 "}])
    assert "completion exactly as returned" in check(ok[:1] + [{"role": "user", "content": "a1"}])
    assert "must repeat the conversation so far" in check(ok[:1])
    assert "tools differ" in check(ok, [{"type": "function", "function": {"name": "f"}}])


def test_the_template_tokens_after_a_completion(tiny_model_path):
    """What the template writes after the completion, once: its end-of-message text only when the policy did not
    generate it (the tiny template: <|im_end|> closes a message, and is also the model's EOS)."""
    from transformers import AutoTokenizer

    from actors.agent.blackbox import between_ids
    from actors.agent.episodes import Renderer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ep = _Episode(0, 0, None, {}, None)  # type: ignore[arg-type]
    ep.messages, ep.last_text = [{"role": "user", "content": "q"}], "a1"
    new = [{"role": "tool", "content": "r"}, {"role": "user", "content": "go on"}]
    rest = "\n<|im_start|>tool\nr<|im_end|>\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n"
    ep.last_id = tok.eos_token_id
    assert between_ids(Renderer(tok), ep, new) == tok.encode(rest, add_special_tokens=False)
    ep.last_id = tok.encode("a", add_special_tokens=False)[0]
    assert between_ids(Renderer(tok), ep, new) == tok.encode("<|im_end|>" + rest, add_special_tokens=False)


def test_agent_specs_and_their_arguments_are_checked_at_start_up(tmp_path):
    base = [f"rollout.env=agent:{HERE}:mixed", "reward.kind=none", "data.source=synthetic"]
    cfg = load_config(None, base)
    assert cfg.rollout.env == f"agent:{HERE}:mixed"
    with pytest.raises(ConfigError, match="rollout.env_args=.*must be called as run\\(base_url, row"):
        load_config(None, base + ['rollout.env_args={"nope": 1}'])
    with pytest.raises(ConfigError, match="write agent:package.module:function"):
        load_config(None, ["rollout.env=agent:only_a_module", "reward.kind=none", "data.source=synthetic"])
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_config(None, ["rollout.env=agent:no_such_module_x:run", "reward.kind=none", "data.source=synthetic"])
    with pytest.raises(ConfigError, match="rollout.agent_timeout_s=900 must be below rollout.timeout_s=900"):
        load_config(None, base + ["rollout.agent_timeout_s=900"])


# ---- a real engine -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    path = str(resolve_model(ModelConfig(path="tiny", tiny_hidden_size=64)))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    engine = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                 enable_chunked_prefill=False, max_num_batched_tokens=4096)
    yield engine
    del engine


def config(agent: str, **kw) -> RolloutConfig:
    return dataclasses.replace(RolloutConfig(env=f"agent:{HERE}:{agent}", max_turns=3, max_new_tokens=8,
                                             samples_per_prompt=2, max_observation_tokens=48, temperature=0.9,
                                             agent_timeout_s=20.0, max_model_len=1024), **kw)


def recorded(llm):
    """What the engine was given (ids, sampling) and what it returned (finished outputs), by request id."""
    engine = llm.llm_engine
    given, returned = {}, {}
    add, step = engine.add_request, engine.step

    def add_request(request_id, prompt, params, *a, **k):
        given[request_id] = (list(prompt["prompt_token_ids"]), params)
        return add(request_id, prompt, params, *a, **k)

    def step_():
        outs = step()
        for o in outs:
            if o.finished:
                c = o.outputs[0]
                returned[o.request_id] = ([int(x) for x in c.token_ids],
                                          [lp[x].logprob for lp, x in zip(c.logprobs, c.token_ids)], c.text)
        return outs

    engine.add_request, engine.step = add_request, step_

    def restore():
        engine.add_request, engine.step = add, step

    return given, returned, restore


@pytest.mark.slow
def test_black_box_episodes_carry_exact_ids_and_fail_alone(llm, caplog):
    from actors.agent.episodes import agent_metrics, run_episodes

    tok = llm.get_tokenizer()
    LOG.clear()
    RELEASE.clear()
    cfg = config("mixed")
    rows = [{"prompt_id": i, "question": f"question {i}", "answer": ""} for i in range(5)]
    given, returned, restore = recorded(llm)
    t0 = time.perf_counter()
    try:
        with caplog.at_level(logging.WARNING):
            table = run_episodes(llm, cfg, rows, [11, 12, 13, 14, 15], 0, 0)
    finally:
        restore()
    elapsed = time.perf_counter() - t0
    hung_thread_alive = not RELEASE.is_set()
    RELEASE.set()
    got = {(r["prompt_id"], r["sample_index"]): r for r in table.to_pylist()}
    assert len(got) == 10 and hung_thread_alive
    assert elapsed < 60, elapsed  # the hung agents were cut at agent_timeout_s, not waited for

    eos = tok.eos_token_id
    for pid in (0, 1):
        for j in range(2):
            r, log = got[(pid, j)], LOG[(pid, j)]
            comps = [returned[f"agent-{pid}:{j}:{k}"] for k in range(3)]
            first = tok.encode(f"<|im_start|>user\nquestion {pid}<|im_end|>\n<|im_start|>assistant\n",
                               add_special_tokens=False)
            assert r["prompt_token_ids"] == first == given[f"agent-{pid}:{j}:0"][0]
            between = [f"\n<|im_start|>tool\nresult {pid}<|im_end|>\n<|im_start|>assistant\n",
                       "\n<|im_start|>user\nfinal?<|im_end|>\n<|im_start|>assistant\n"]
            ids, mask, lps = [], [], []
            for k, (c_ids, c_lps, _text) in enumerate(comps):
                assert given[f"agent-{pid}:{j}:{k}"][0] == first + ids  # the engine saw the trajectory so far
                ids, mask, lps = ids + c_ids, mask + [1] * len(c_ids), lps + c_lps
                if k < 2:  # the template's end of the assistant message, unless the policy generated it
                    env = tok.encode(("" if c_ids[-1] == eos else "<|im_end|>") + between[k], add_special_tokens=False)
                    ids, mask, lps = ids + env, mask + [0] * len(env), lps + [0.0] * len(env)
            assert r["response_token_ids"] == ids
            assert r["loss_mask"] == mask
            np.testing.assert_array_equal(np.array(r["response_logprobs"], np.float32), np.array(lps, np.float32))
            assert log["texts"] == [c[2] for c in comps]  # the agent got what the engine decoded
            assert log["model"] == "gpt-test"
            assert log["usage"] == (len(given[f"agent-{pid}:{j}:2"][0]), len(comps[2][0]))
            assert (r["num_turns"], r["tool_calls"], r["tool_errors"], r["finish_reason"]) == (3, 1, 0, "stop")
            assert r["env_reward"] == pytest.approx(0.25 + pid)
            params = [given[f"agent-{pid}:{j}:{k}"][1] for k in range(3)]
            assert [p.temperature for p in params] == [0.9] * 3  # the request's temperature 0 was ignored
            assert [p.max_tokens for p in params] == [8, 8, 4]  # 1000 capped by rollout.max_new_tokens
            assert len({p.seed for p in params}) == 3

    for j in range(2):
        r = got[(2, j)]  # rewrote history: its episode failed, its claimed reward is not taken
        assert (r["finish_reason"], r["tool_errors"], r["num_turns"], r["env_reward"]) == ("env_error", 1, 1, 0.0)
        assert r["response_token_ids"] == returned[f"agent-2:{j}:0"][0] and set(r["loss_mask"]) == {1}
        assert "messages[0] (user) differs" in LOG[(2, j)]["error"]
        r = got[(3, j)]  # hung: cut at the timeout with its one completion
        assert (r["finish_reason"], r["tool_errors"], r["num_turns"], r["env_reward"]) == ("agent_timeout", 1, 1, 0.0)
        r = got[(4, j)]  # looped: refused at max_turns, its reward counts
        assert (r["finish_reason"], r["tool_errors"], r["num_turns"], r["env_reward"]) == ("max_turns", 0, 3, 2.0)
        assert "rollout.max_turns=3" in LOG[(4, j)]["error"]
    warnings = " ".join(rec.getMessage() for rec in caplog.records)
    assert "2/0 failed: messages[0] (user) differs" in warnings
    assert "3/1: the agent ran past rollout.agent_timeout_s=20s" in warnings
    assert "temperature is ignored" in warnings
    m = agent_metrics(table)
    assert m["rollout/turns_mean"] == pytest.approx((4 * 3 + 2 + 2 + 2 * 3) / 10)
    assert m["rollout/tool_errors"] == 4.0

    deadline = time.time() + 30  # the released agents' late requests are refused: their episodes are gone
    while time.time() < deadline and not all("late" in LOG.get((3, j), {}) for j in range(2)):
        time.sleep(0.1)
    assert [LOG[(3, j)]["late"] for j in range(2)] == [404, 404]
    assert "no live episode" in LOG[(3, 0)]["error"]


@pytest.mark.slow
def test_an_episode_without_a_completion_fails_the_batch_naming_it(llm, caplog):
    from actors.agent.episodes import run_episodes

    rows = [{"prompt_id": 7, "question": "q", "answer": ""}]
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match=(
            r"2 black-box episodes ended before their first chat completion \(first: episode 7/0, the agent raised "
            r"RuntimeError: the agent broke\)")):
        run_episodes(llm, config("raises_first"), rows, [0], 0, 0)
    assert "stream" in LOG[("stream", 7)]["error"]
    with pytest.raises(ValueError, match="raise data.max_prompt_tokens to at least"):
        run_episodes(llm, config("long_prompt"), rows, [0], 0, 0)


# ---- end to end: the docs' agent trains -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_readme_agent_trains_with_grpo(tmp_path):
    from conftest import in_loopback_namespace, oirl_cmd

    if not in_loopback_namespace():
        pytest.skip("starts Ray: run as `deploy/loopback.sh python -m pytest`")
    readme = (REPO_ROOT / "docs" / "agents.md").read_text()
    code = readme.split("## Black-box agents")[1].split("```python")[1].split("```")[0]
    (tmp_path / "my_agent.py").write_text(code)
    out = tmp_path / "out"
    cmd = [*oirl_cmd(), "train", "--config", str(REPO_ROOT / "configs" / "agent_smoke.yaml"), "--out", str(out),
           "--no-progress", "iterations=2", "rollout.env=agent:my_agent:run", "rollout.env_args=",
           "learner.algorithm=grpo"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert r["rollout/turns_mean"] == 2.0  # the agent's two completions, every episode
        assert r["rollout/env_tokens_mean"] > 0 and r["rollout/policy_tokens_mean"] > 0
        assert r["rollout/tool_errors"] == 0.0
        assert r["rollout/on_policy_checked"] == 1.0  # the learner's logprobs of the assembled ids are the engine's
