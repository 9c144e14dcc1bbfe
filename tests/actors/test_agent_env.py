"""Environments and tools (actors/agent/env.py, tasks.py) without an engine: the schema a tool offers, calls that
fail in every way a model can make them fail (each an observation, never an exception), the sandbox's limits, the
registry's and the config's errors, and the learner's view of a multi-turn row (holes in the mask)."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pytest
import torch

from actors.agent.env import SandboxLimits, ToolEnv, make_env, parse_tool_calls, run_sandboxed, tool
from actors.agent.tasks import LookupEnv, evaluate
from oirl.batch import add_agent_columns, make_rollout_batch
from oirl.config import ConfigError, load_config


@tool
def add(a: int, b: int = 2) -> str:
    """Add two integers.

    More text that is not the description."""
    return str(a + b)


@tool
def nap(seconds: float) -> str:
    """Sleep."""
    time.sleep(seconds)
    return "woke"


class TwoTools(ToolEnv):
    tools = [add, nap]
    tool_timeout_s = 0.5


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_a_tool_offers_the_schema_of_its_signature():
    assert add.schema() == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a"]}}}
    assert tool(lambda x: x).parameters["properties"] == {"x": {"type": "string"}}  # unannotated: a string

    def bad(x: set) -> str:
        return ""

    with pytest.raises(TypeError, match="parameter 'x' is <class 'set'>"):
        tool(bad)


def test_tool_calls_are_run_and_every_failure_is_an_observation():
    env = TwoTools()
    env.reset({"prompt_id": 0, "question": "q"})
    ok = env.step("let me add " + call("add", a=40) + " then")
    assert (ok.observation, ok.done, ok.info) == ("42", False, {"tool_calls": 1, "tool_errors": 0})
    cases = {
        "<tool_call>{not json</tool_call>": "is not JSON",
        call("mul", a=1): "no tool named 'mul' (tools: add, nap)",
        call("add", b=1): "missing argument 'a'",
        call("add", a="x"): "argument 'a' must be integer",
        call("add", a=1, c=2): "unknown argument 'c'",
        call("nap", seconds=5): "nap timed out after 0.5s",
    }
    for text, message in cases.items():
        t0 = time.perf_counter()
        step = env.step(text)
        assert step.observation.startswith("error: ") and message in step.observation, (text, step.observation)
        assert step.info == {"tool_calls": 1, "tool_errors": 1} and not step.done
        assert time.perf_counter() - t0 < 2.0  # the timeout cut the sleeping tool
    final = env.step("no call: the answer is 42")
    assert final.done and final.observation is None


def test_calls_are_parsed_with_the_environments_markers():
    assert parse_tool_calls('a <tool_call>{"x": 1}</tool_call> b <tool_call>{"y": 2}') == ['{"x": 1}', '{"y": 2}']
    assert parse_tool_calls("a # first\n b # second", "#", "\n") == ["first", "second"]
    assert parse_tool_calls("no call here") == []


def test_the_calculator_is_arithmetic_only():
    assert evaluate("123456789 * 987654321") == 121932631112635269
    assert evaluate("(2 + 3) ** 2 - 7 // 2") == 22
    for bad in ("__import__('os').system('true')", "2 ** 1000", "open('x')", "1 +"):
        with pytest.raises(ValueError):
            evaluate(bad)
    env = make_env("calculator")
    env.reset({"prompt_id": 0, "question": "q"})
    assert env.step(call("calculate", expression="1,000 * 3")).observation == "3000"
    assert env.step(call("calculate", expression="os.system('x')")).observation.startswith("error: ")


def test_the_sandbox_enforces_its_limits():
    assert run_sandboxed(["python3", "-I", "-"], "print(6 * 7)").strip() == "42"
    with pytest.raises(RuntimeError, match="timed out"):
        run_sandboxed(["python3", "-I", "-"], "import time; time.sleep(30)", SandboxLimits(wall_s=1.0))
    with pytest.raises(RuntimeError, match="signal|MemoryError"):  # a 2 GiB list beyond 256 MiB of address space
        run_sandboxed(["python3", "-I", "-"], "x = [0] * (1 << 28)", SandboxLimits(memory_mib=256))
    with pytest.raises(RuntimeError, match="signal"):  # CPU seconds, not wall time
        run_sandboxed(["python3", "-I", "-"], "while True: pass", SandboxLimits(cpu_s=1, wall_s=20.0))
    with pytest.raises(RuntimeError, match="exit code 3"):
        run_sandboxed(["python3", "-I", "-"], "import sys; print('bye'); sys.exit(3)")
    assert "HOME" not in run_sandboxed(["python3", "-I", "-"], "import os; print(sorted(os.environ))")
    env = make_env("python")
    env.reset({"prompt_id": 0, "question": "q"})
    assert env.step(call("run_python", code="print(2 ** 70)")).observation == str(2 ** 70)
    failed = env.step(call("run_python", code="raise SystemExit(5)"))
    assert failed.observation.startswith("error: exit code 5") and failed.info["tool_errors"] == 1


def test_the_lookup_task_can_only_be_solved_through_its_tool():
    env = LookupEnv()
    messages = env.reset({"prompt_id": 7, "question": "ignored"})
    assert env.item in messages[-1]["content"] and len(env.codes) == 4
    code = env.codes[env.item]
    assert code not in json.dumps(messages)  # the prompt never holds the answer
    again = LookupEnv()
    again.reset({"prompt_id": 7, "question": "ignored"})
    other = LookupEnv()
    other.reset({"prompt_id": 8, "question": "ignored"})
    assert again.codes == env.codes and other.codes != env.codes  # drawn from the row, the same every time
    looked = env.step(call("lookup", item=env.item))
    assert looked.observation == code and looked.reward == 0.0
    assert env.step(f"The code is {code}.").reward == 1.0
    assert env.step("The code is 000000.").reward == (1.0 if code == "000000" else 0.0)
    shaped = LookupEnv(call_bonus=0.5, call_open="#", call_close="\n")
    shaped.reset({"prompt_id": 7, "question": "q"})
    step = shaped.step("junk # not json\n")
    assert step.reward == 0.5 and step.info == {"tool_calls": 1, "tool_errors": 1}


def test_a_bad_environment_setting_is_refused_naming_the_field():
    base = ["rollout.env=lookup", "reward.kind=none", "data.source=synthetic"]
    load_config(None, base, check_paths=False)
    as_mapping = load_config(None, base + ['rollout.env_args={"call_bonus": 0.5}'], check_paths=False)
    assert json.loads(as_mapping.rollout.env_args) == {"call_bonus": 0.5}  # a YAML mapping is written as JSON
    for extra, message in ((["rollout.env=nowhere"], "rollout.env='nowhere' is not a registered environment"),
                           (["rollout.env=no.such.module:f"], "cannot be imported"),
                           (["rollout.env_args={oops"], "rollout.env_args='{oops' is not JSON"),
                           (['rollout.env_args={"colour": 1}'], "does not take rollout.env_args"),
                           (["rollout.max_turns=0"], "rollout.max_turns")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, base + extra, check_paths=False)
    with pytest.raises(ConfigError, match="reward.kind=none needs another backend"):
        load_config(None, ["reward.kind=none", "data.source=synthetic"], check_paths=False)


def episode_batch() -> pa.Table:
    """Two rows: a two-turn episode (policy 2 tokens, environment 3, policy 2) and a one-turn one (3 tokens)."""
    t = make_rollout_batch([0, 0], [0, 1], [[5, 6], [5, 6]], [[10, 11, 90, 91, 92, 12, 13], [20, 21, 22]],
                           [[-1.0, -1.0, 0.0, 0.0, 0.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], ["stop", "stop"], 0)
    return add_agent_columns(t, [[1, 1, 0, 0, 0, 1, 1], [1, 1, 1]], [2, 1], [1, 0], [0, 0], [0.0, 0.0],
                             [0.1, 0.0])


def test_the_learner_masks_the_environments_tokens():
    from learner.ppo import pad_batch

    d = pad_batch(episode_batch(), 0)
    assert d["resp_mask"].tolist() == [[1, 1, 0, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0, 0]]
    assert d["input_ids"][0].tolist() == [5, 6, 10, 11, 90, 91, 92, 12, 13]  # every id, the environment's too
    with pytest.raises(AssertionError, match="row 0: loss_mask has 2 entries for 7 response ids"):
        add_agent_columns(episode_batch().select(range(8)), [[1, 1], [1, 1, 1]], [1, 1], [0, 0], [0, 0], [0, 0],
                          [0, 0])


def test_returns_and_advantages_flow_over_the_environments_tokens():
    """GAE and REINFORCE++ skip the environment's tokens: the episode's end reward reaches the first turn as if
    they were not there (hand-computed over the policy's 4 tokens), where treating a hole as the end of the
    sequence gave the first turn nothing."""
    from learner.algorithms.reinforce_pp import reinforce_pp_returns
    from learner.ppo import compute_gae, token_rewards

    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1]], dtype=torch.float32)
    kl = torch.zeros(1, 7)
    rewards = token_rewards(torch.tensor([1.0]), kl, mask, 0.0)
    assert rewards.tolist() == [[0, 0, 0, 0, 0, 0, 1.0]]  # on the last policy token, not at mask.sum() - 1
    values = torch.tensor([[0.5, 0.25, 9.0, 9.0, 9.0, 0.5, 0.25]])  # the holes' values must not matter
    adv, ret = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # policy steps only: v = [0.5, 0.25, 0.5, 0.25], r = [0, 0, 0, 1]
    d = [0 + 0.5 * 0.25 - 0.5, 0 + 0.5 * 0.5 - 0.25, 0 + 0.5 * 0.25 - 0.5, 1 - 0.25]
    a3 = d[3]
    a2 = d[2] + 0.25 * a3
    a1 = d[1] + 0.25 * a2
    a0 = d[0] + 0.25 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, 0, 0, 0, a2, a3])
    assert ret[0, 2:5].tolist() == [0, 0, 0]
    g = reinforce_pp_returns(torch.tensor([1.0]), kl, mask, 0.0, 0.5)
    assert g[0].tolist() == pytest.approx([0.125, 0.25, 0, 0, 0, 0.5, 1.0])


def test_the_docs_example_runs_as_written(capsys):
    from oirl.config import REPO_ROOT

    readme = (REPO_ROOT / "docs" / "writing.md").read_text()
    code = readme.split("Writing an environment and a tool")[1].split("```python")[1].split("```")[0]
    exec(compile(code, "docs/writing.md", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out.splitlines() == ["rain, 12 C", "1.0"]


def test_the_inline_calculator_answers_a_call_right_after_it():
    """GSM8K's annotation format: the turn stops at '>>' (the engine's stop string), the result is the
    observation, inline (role ''), and the policy writes on; a turn that does not end in a call ends the episode."""
    env = make_env("calculator", {"inline": True})
    env.reset({"prompt_id": 0, "question": "q"})
    assert env.stop == [">>"] and env.observation_role == ""
    step = env.step("She sold 48/2 = <<48/2>>")
    assert (step.observation, step.role, step.done, step.info["tool_calls"]) == ("24", "", False, 1)
    assert env.step("so 48 + 24 = <<48 + oops>>").observation.startswith("error: ")
    assert env.step("#### 72").done
    assert make_env("calculator").stop == []  # the default calculator: Hermes calls, results as tool messages
