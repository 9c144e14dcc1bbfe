"""Built-in environments (``rollout.env``): GSM8K with a calculator or with Python, and a synthetic lookup task a
model can only solve through its tool.

- ``calculator``: GSM8K rows; one tool, ``calculate(expression)``, exact arithmetic on + - * / // % ** and
  parentheses (parsed, never evaluated as code). The episode's final answer is scored by the reward actor
  (reward.kind=gsm8k).
- ``python``: GSM8K rows; one tool, ``run_python(code)``, run in a sandboxed subprocess (actors/agent/env.py
  ``run_sandboxed``: CPU, memory and wall-time limits); what it prints is the observation.
- ``lookup``: the environment holds a secret 6-digit code for each of a few items, drawn from the row's prompt id
  and the run's seed, so no model can know it; the question asks for one item's code, ``lookup(item)`` returns it,
  and the episode's reward is 1 when the final answer (a turn without a tool call) holds the right code. Arguments:
  ``call_bonus`` (reward for each turn that attempts a call, 0 by default: a shaping term for models too small to
  write the call, as the tiny model of the tests), ``call_open``/``call_close`` (the call markers; the tiny model's
  tests use a one-token marker its random weights can reach).
"""

from __future__ import annotations

import ast
import operator
import random
from typing import Any

from actors.agent.env import CALL_CLOSE, CALL_OPEN, Step, ToolEnv, python_argv, register, tool

_OPS: dict[type, Any] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                         ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
                         ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(expression: str) -> float | int:
    """Arithmetic only: numbers, + - * / // % ** and parentheses (exponents up to 64 in size)."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value,
                                                                                                       bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"only numbers and + - * / // % ** ( ) are allowed, not {ast.dump(node)[:40]}")

    try:
        tree = ast.parse(expression.replace(",", ""), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse {expression!r}: {e.msg}") from None
    return ev(tree)


@tool
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses) exactly."""
    value = evaluate(expression)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


@tool(sandboxed=True)
def run_python(code: str) -> tuple[list[str], str]:
    """Run Python code and return what it prints (5 s of CPU, 512 MiB, no network)."""
    return python_argv(code)


TOOL_SYSTEM = ("Use the tools to compute. To call one, write {open}{{\"name\": \"<tool>\", \"arguments\": "
               "{{...}}}}{close}; its result comes back in the next message. When done, give the final answer.")


@register("calculator")
class CalculatorEnv(ToolEnv):
    """GSM8K with a calculator. ``inline=True``: GSM8K's own annotation format: the policy writes
    ``<<48/2>>``, its turn stops there, the result follows inline (``24``) and the policy writes on."""

    tools = [calculate]
    system = TOOL_SYSTEM.format(open=CALL_OPEN, close=CALL_CLOSE)

    def __init__(self, inline: bool = False) -> None:
        super().__init__()
        if inline:
            self.call_open, self.call_close, self.plain_calls = "<<", ">>", True
            self.stop, self.observation_role = [">>"], ""
            self.system = ("To compute, write the expression between << and >>; the result appears right after "
                           "it. Example: 'Tom has 3 bags of 4 apples. How many apples?' -> 'Tom has 3 * 4 = "
                           "<<3*4>>12 apples.\n#### 12'. End with '#### <number>'.")

    def step(self, text: str) -> Step:
        if self.plain_calls and text.rstrip().endswith(">>") and "<<" in text:  # stopped at a call: result inline
            return super().step(text[text.rindex("<<"):])
        return super().step(text) if not self.plain_calls else Step(None, 0.0, True)


@register("python")
class PythonEnv(ToolEnv):
    tools = [run_python]
    system = TOOL_SYSTEM.format(open=CALL_OPEN, close=CALL_CLOSE)


ITEMS = ("apple", "river", "piano", "comet", "tiger", "maple", "ocean", "violet")


@register("lookup")
class LookupEnv(ToolEnv):
    """Facts held by the environment (see the module docstring)."""

    def __init__(self, call_bonus: float = 0.0, call_open: str = CALL_OPEN, call_close: str = CALL_CLOSE,
                 seed: int = 0) -> None:
        super().__init__()
        self.call_bonus, self.call_open, self.call_close, self.seed = call_bonus, call_open, call_close, seed
        self.codes: dict[str, str] = {}
        self.item = ""

        @tool
        def lookup(item: str) -> str:
            """The secret code of an item."""
            if item not in self.codes:
                raise ValueError(f"unknown item {item!r} (items: {', '.join(self.codes)})")
            return self.codes[item]

        self.tools = [lookup]
        self.system = TOOL_SYSTEM.format(open=call_open, close=call_close)

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        rng = random.Random(f"{self.seed}:{row['prompt_id']}")
        self.codes = {item: f"{rng.randrange(10**6):06d}" for item in rng.sample(ITEMS, 4)}
        self.item = rng.choice(sorted(self.codes))
        row = {**row, "question": f"What is the secret code of the {self.item}? Look it up with the lookup tool "
                                  "and answer with the code."}
        return super().reset(row)

    def step(self, text: str) -> Step:
        step = super().step(text)
        if step.info.get("tool_calls"):
            step.reward += self.call_bonus
        return step

    def final_reward(self, text: str) -> float:
        return 1.0 if self.codes.get(self.item, "-") in text else 0.0
