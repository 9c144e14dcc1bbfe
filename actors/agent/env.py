"""Environments for multi-turn rollouts: what an episode is made of, beside the policy.

    env = make_env("calculator")            # rollout.env: a built-in name or 'package.module:factory'
    messages = env.reset(row)               # the first messages (system, user) from a data row
    step = env.step(policy_text)            # Step(observation, reward, done, info)

An episode alternates a policy turn (the engine generates up to rollout.max_new_tokens) and an environment step on
its text; it ends when the environment says done, at rollout.max_turns policy turns, or when the episode's token
budget is spent. A non-None observation becomes a message (role ``Step.role``, 'tool' by default) rendered by the
model's chat template, and the tokens it adds are the environment's: masked out of the loss (actors/agent/episodes.py
carries every id exactly as the engine generated it and as the environment appended it).

``ToolEnv`` is the environment most tasks need: tools are plain Python functions with JSON-schema arguments
(``tool`` builds the schema from the signature), offered through the chat template's tool format (or, for a
template without one, a system message listing them); the policy calls one as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes/Qwen format). A failing, slow or malformed
call is an observation for the model ("error: ..."), never a crashed run: each call has a timeout, and tools that
run code (``sandboxed=True``) run in a subprocess with CPU, memory and time limits (``run_sandboxed``).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Step:
    """What the environment returns for one policy turn."""

    observation: str | None = None
    """Text the environment appends as its own message (None: nothing; the episode must then be done)."""
    reward: float = 0.0
    """This turn's reward, added to the episode's (beside the reward actor's score of the whole episode)."""
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    """Counts the rollout reports: ``tool_calls`` and ``tool_errors`` (ints)."""
    role: str = "tool"
    """The observation's chat role ('tool', or 'user' for an environment that speaks as the user); '' appends the
    text itself right after the policy's tokens, inside the same message (an inline tool result, as GSM8K's
    calculator annotations: ``<<48/2>>24``), and the policy goes on writing that message."""


class Environment:
    """One episode's environment. A fresh instance per episode (``make_env``), so state lives on ``self``."""

    tools: list[Tool] = []

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The episode's first messages from a data row ({'prompt_id', 'question', 'answer'}): usually one user
        message. The rollout renders them through the chat template (with ``tools``) and generates from there."""
        return [{"role": "user", "content": row["question"]}]

    def step(self, text: str) -> Step:
        """The policy's turn as text (decoded for reading only: its ids are kept as generated)."""
        raise NotImplementedError


# ---- tools ------------------------------------------------------------------------------------------------------

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments: {'type': 'object', 'properties': {...}, 'required': [...]}."""
    fn: Callable[..., Any]
    sandboxed: bool = False
    """Runs model- or user-written code: ``fn`` returns (argv, stdin) run by ``run_sandboxed``, not the result."""

    def schema(self) -> dict[str, Any]:
        """The tool as chat templates take it (OpenAI's function format)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def check_arguments(self, args: Any) -> dict[str, Any]:
        """The arguments against the schema (names, required, basic JSON types); ValueError naming the field."""
        if not isinstance(args, dict):
            raise ValueError(f"arguments of {self.name} must be a JSON object, got {type(args).__name__}")
        props = self.parameters.get("properties", {})
        for name in self.parameters.get("required", []):
            if name not in args:
                raise ValueError(f"{self.name}: missing argument '{name}'")
        for name, value in args.items():
            if name not in props:
                raise ValueError(f"{self.name}: unknown argument '{name}' (takes {', '.join(props) or 'none'})")
            want = props[name].get("type")
            ok = {"integer": isinstance(value, int) and not isinstance(value, bool),
                  "number": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "string": isinstance(value, str), "boolean": isinstance(value, bool),
                  "array": isinstance(value, list), "object": isinstance(value, dict)}.get(want, True)
            if not ok:
                raise ValueError(f"{self.name}: argument '{name}' must be {want}, got {json.dumps(value)[:40]}")
        return args


def tool(fn: Callable[..., Any] | None = None, *, sandboxed: bool = False) -> Any:
    """Make a Tool of a function: its name, its docstring's first paragraph as the description, its annotated
    parameters (int, float, str, bool, list, dict) as the JSON schema; parameters without a default are required.
    ``@tool`` or ``@tool(sandboxed=True)``."""

    def build(f: Callable[..., Any]) -> Tool:
        props, required = {}, []
        hints = inspect.get_annotations(f, eval_str=True)
        for name, p in inspect.signature(f).parameters.items():
            kind = hints.get(name, str)
            if kind not in _JSON_TYPES:
                raise TypeError(f"tool {f.__name__}: parameter '{name}' is {kind}; use int, float, str, bool, "
                                "list or dict")
            props[name] = {"type": _JSON_TYPES[kind]}
            if p.default is inspect.Parameter.empty:
                required.append(name)
        doc = inspect.getdoc(f) or f.__name__
        return Tool(f.__name__, doc.split("\n\n")[0].replace("\n", " "),
                    {"type": "object", "properties": props, "required": required}, f, sandboxed)

    return build(fn) if fn is not None else build


@dataclass
class SandboxLimits:
    cpu_s: int = 5
    memory_mib: int = 512
    wall_s: float = 10.0
    output_chars: int = 2000


def run_sandboxed(argv: list[str], stdin: str = "", limits: SandboxLimits | None = None) -> str:
    """Run argv in a subprocess with CPU seconds, address space and wall time limited, an empty environment and a
    temporary working folder; return its stdout (and stderr), cut to limits.output_chars. A non-zero exit, a limit
    hit or a timeout raises RuntimeError with what the program printed (the caller makes it an observation)."""
    import resource
    import tempfile

    lim = limits or SandboxLimits()

    def confine() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s))
        mem = lim.memory_mib << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        os.setsid()

    with tempfile.TemporaryDirectory(prefix="oirl-tool-") as cwd:
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=lim.wall_s, cwd=cwd,
                                  env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
                                  preexec_fn=confine)  # noqa: PLW1509 (no threads start between fork and exec)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"timed out after {lim.wall_s:g}s") from e
    out = (proc.stdout + proc.stderr)[-lim.output_chars:]
    if proc.returncode != 0:
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise RuntimeError(f"{why}: {out.strip()[-500:]}")
    return out


def python_argv(code: str) -> tuple[list[str], str]:
    """A sandboxed tool's command: this interpreter, isolated (-I: no user site, no environment), reading the code
    from stdin."""
    return [sys.executable, "-I", "-"], code


# ---- the tool-calling environment ---------------------------------------------------------------------------------

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="oirl-tool")


class ToolEnv(Environment):
    """Tool calls in the policy's turn are run and their results are the observation; a turn without a call ends
    the episode (its text is the final answer). Subclasses set ``tools`` and ``system`` and may override ``reset``
    and ``final_reward``."""

    system: str = ""
    call_open: str = CALL_OPEN
    call_close: str = CALL_CLOSE
    """The markers around a call's JSON (an unclosed last call runs to the turn's end)."""
    plain_calls: bool = False
    """The call's text is the argument of the environment's only tool, which takes one (no JSON)."""
    stop: list[str] = []
    """Strings that end the policy's turn when generated (kept in its text and ids), e.g. the call's close marker
    so the result comes right after the call."""
    observation_role: str = "tool"
    """Step.role of the results (see Step.role; '' inline)."""
    tool_timeout_s: float = 10.0
    max_calls_per_turn: int = 4
    sandbox: SandboxLimits = SandboxLimits()

    def __init__(self) -> None:
        self.row: dict[str, Any] = {}
        self.calls = 0

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        self.row = row
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": row["question"]}]

    def final_reward(self, text: str) -> float:
        """Reward of the turn that ends the episode (no tool call), 0 by default: the reward actor scores it."""
        return 0.0

    def parse(self, text: str) -> list[str]:
        """The calls in a turn, each the text between the markers."""
        return parse_tool_calls(text, self.call_open, self.call_close)

    def step(self, text: str) -> Step:
        calls = self.parse(text)
        if not calls:
            return Step(None, self.final_reward(text), True)
        results, errors = [], 0
        for raw in calls[: self.max_calls_per_turn]:
            self.calls += 1
            try:
                results.append(self.call(raw))
            except Exception as e:  # a failing tool is the model's problem to read, not the run's
                errors += 1
                results.append(f"error: {e}")
        if len(calls) > self.max_calls_per_turn:
            errors += 1
            results.append(f"error: at most {self.max_calls_per_turn} tool calls per turn")
        return Step("\n".join(results), 0.0, False, {"tool_calls": len(calls), "tool_errors": errors},
                    self.observation_role)

    def call(self, raw: str) -> str:
        """One call's text (between the markers) -> the tool's result as text; errors raise. With
        ``plain_calls``, the environment's only tool takes the text itself as its one argument (GSM8K's own
        calculator annotations: ``<<48/2>>``)."""
        if self.plain_calls:
            (t,) = self.tools
            (name,) = t.parameters["properties"]
            obj = {"name": t.name, "arguments": {name: raw}}
        else:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"tool call is not JSON ({e.msg}); write {self.call_open}{{\"name\": ..., "
                                 f"\"arguments\": {{...}}}}{self.call_close}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ValueError("tool call needs a 'name'")
        by_name = {t.name: t for t in self.tools}
        if obj["name"] not in by_name:
            raise ValueError(f"no tool named {obj['name']!r} (tools: {', '.join(by_name)})")
        t = by_name[obj["name"]]
        args = t.check_arguments(obj.get("arguments", {}))
        if t.sandboxed:
            argv, stdin = t.fn(**args)
            return run_sandboxed(argv, stdin, self.sandbox).strip()
        future = _EXECUTOR.submit(t.fn, **args)
        try:
            return str(future.result(timeout=self.tool_timeout_s))
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"{t.name} timed out after {self.tool_timeout_s:g}s") from None


def parse_tool_calls(text: str, call_open: str = CALL_OPEN, call_close: str = CALL_CLOSE) -> list[str]:
    """The text of each call in a turn, between ``call_open`` and ``call_close`` (an unclosed last call runs to
    the turn's end)."""
    pattern = re.escape(call_open) + r"(.*?)(?:" + re.escape(call_close) + r"|$)"
    return [m.group(1).strip() for m in re.finditer(pattern, text, re.S)]


# ---- registry -----------------------------------------------------------------------------------------------------

ENVIRONMENTS: dict[str, Callable[[], Environment]] = {}
AGENT_PREFIX = "agent:"
"""rollout.env=agent:package.module:function: a black-box agent on the OpenAI API (actors/agent/blackbox.py)."""


def register(name: str) -> Callable[[Any], Any]:
    """Class decorator: ``@register("calculator")`` makes ``rollout.env=calculator`` build it."""

    def add(factory: Any) -> Any:
        ENVIRONMENTS[name] = factory
        return factory

    return add


def env_factory(spec: str) -> Callable[[], Environment]:
    """rollout.env -> a factory of fresh environments: a registered name, 'package.module:factory' (a class or
    function returning an Environment), or 'agent:package.module:function' (a black-box agent). ValueError naming
    the field and the choices."""
    import actors.agent.tasks  # noqa: F401  (registers the built-in environments)

    if spec in ENVIRONMENTS:
        return ENVIRONMENTS[spec]
    if spec.startswith(AGENT_PREFIX):
        from actors.agent.blackbox import agent_factory

        return agent_factory(spec)
    if ":" not in spec:
        raise ValueError(f"rollout.env={spec!r} is not a registered environment ({', '.join(sorted(ENVIRONMENTS))}) "
                         "nor 'package.module:factory'")
    return import_callable(spec, spec)


def import_callable(target: str, spec: str) -> Callable[..., Any]:
    """'package.module:name' -> that callable; ValueError naming rollout.env=spec."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"rollout.env={spec!r}: write package.module:name")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rollout.env={spec!r} cannot be imported: {e}") from e
    if not callable(factory):
        raise ValueError(f"rollout.env={spec!r} is not callable")
    return factory


def make_env(spec: str, args: dict[str, Any] | None = None) -> Environment:
    """A fresh environment: rollout.env's factory called with rollout.env_args (a JSON object) as keywords."""
    try:
        env = env_factory(spec)(**(args or {}))
    except TypeError as e:
        raise ValueError(f"rollout.env={spec!r} does not take rollout.env_args={json.dumps(args)}: {e}") from e
    if not isinstance(env, Environment):
        raise ValueError(f"rollout.env={spec!r} built a {type(env).__name__}, not an actors.agent.Environment")
    return env
