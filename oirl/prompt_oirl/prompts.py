"""Candidate prompts, query files and the synthetic arithmetic set.

A prompt is an instruction or few-shot format wrapped around the question: ``prefix + question + suffix``, put in
one user turn of the chat template. Few-shot examples sit in the prefix so that every query of one prompt shares it
(vLLM's prefix cache computes it once). The examples below are written for this file, not taken from GSM8K.

Queries are GSM8K-format JSONL rows (``question``, ``answer`` ending in ``#### <number>``); the arithmetic set is
written in that format too, so every stage reads one format.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_FEWSHOT_SHORT = (
    "Question: A shelf has 14 books. Sam puts 9 more books on it. How many books are on the shelf?\n"
    "Answer: #### 23\n\n"
    "Question: Lena had 52 stickers and gave 17 to her brother. How many stickers does she have left?\n"
    "Answer: #### 35\n\n"
    "Question: "
)
_FEWSHOT_COT = (
    "Question: A shelf has 14 books. Sam puts 9 more books on it. How many books are on the shelf?\n"
    "Answer: The shelf had 14 books and 9 more were added, so 14 + 9 = 23.\n#### 23\n\n"
    "Question: A baker made 3 trays of 12 muffins and sold 20. How many muffins are left?\n"
    "Answer: 3 trays of 12 muffins is 3 * 12 = 36 muffins. After selling 20, 36 - 20 = 16 are left.\n#### 16\n\n"
    "Question: "
)


@dataclass(frozen=True)
class PromptSpec:
    prompt_id: int
    """Index of the prompt in its set (the column stored with every record)."""
    name: str
    """Short readable name."""
    prefix: str
    """Text before the question (instruction or few-shot examples)."""
    suffix: str
    """Text after the question."""

    def render(self, question: str) -> str:
        return f"{self.prefix}{question}{self.suffix}"


# Seven formats: bare answer, the project's default instruction, zero-shot chain of thought, one equation,
# few-shot with bare answers, few-shot with worked steps, and a natural-language answer line.
DEFAULT_PROMPTS: tuple[PromptSpec, ...] = (
    PromptSpec(0, "direct", "", "\nReply with only the final number, written as '#### <number>'."),
    PromptSpec(1, "step_by_step", "",
               "\nSolve the problem step by step, then give the final answer on its own line as '#### <number>'."),
    PromptSpec(2, "lets_think", "Question: ", "\nLet's think step by step. At the end, write '#### ' followed by the "
                                              "answer."),
    PromptSpec(3, "equation", "", "\nWrite the calculation as one equation, then write '#### ' and the result."),
    PromptSpec(4, "fewshot_short", _FEWSHOT_SHORT, "\nAnswer:"),
    PromptSpec(5, "fewshot_cot", _FEWSHOT_COT, "\nAnswer:"),
    PromptSpec(6, "answer_is", "", "\nEnd your reply with 'The answer is <number>.'"),
)


class PromptSetError(ValueError):
    """A prompt set or a prompt id is malformed; the message names it and the fix."""


def prompts_to_json(prompts: tuple[PromptSpec, ...] | list[PromptSpec]) -> list[dict[str, Any]]:
    return [asdict(p) for p in prompts]


def prompts_from_json(rows: list[dict[str, Any]], where: str) -> tuple[PromptSpec, ...]:
    """Read a stored prompt set; ids must be 0..P-1 in order (the classifier's and the records' index)."""
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("prompt_id", "name", "prefix", "suffix") if k not in row]
        if missing:
            raise PromptSetError(f"{where}: prompt {i} lacks {missing}; each needs prompt_id, name, prefix, suffix")
        if row["prompt_id"] != i:
            raise PromptSetError(f"{where}: prompt {i} has prompt_id={row['prompt_id']}; ids must be 0..P-1 in order")
        out.append(PromptSpec(int(row["prompt_id"]), str(row["name"]), str(row["prefix"]), str(row["suffix"])))
    if len(out) < 2:
        raise PromptSetError(f"{where}: {len(out)} prompts; a selector needs at least 2 to choose from")
    return tuple(out)


def check_prompt_id(prompt_id: Any, n_prompts: int, where: str) -> int:
    """A record's prompt id must index the prompt set; anything else names the row and the fix."""
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, int) or not 0 <= prompt_id < n_prompts:
        raise PromptSetError(f"{where}: field 'prompt_id'={prompt_id!r} is not a prompt of this set (0..{n_prompts - 1}); "
                             "records and selector must come from the same prompt set (prompts.json)")
    return prompt_id


# -- the synthetic arithmetic set ------------------------------------------------------------------------------

_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam")
_THINGS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "cookies")


def arithmetic_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` seeded two-digit addition/subtraction problems in GSM8K format, in four surface forms (bare
    expression, one-line question, a short story, a two-step story); the form is kept in the row's ``kind`` so
    results can be read per form. Subtractions never go below zero."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kind = rng.choice(("bare", "question", "story", "two_step"))
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        if kind == "bare":
            q = f"What is {a} {op} {b}?"
        elif kind == "question":
            q = f"What is {a} {'plus' if op == '+' else 'minus'} {b}?"
        elif kind == "story":
            q = (f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?" if op == "+"
                 else f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?")
        else:
            c = rng.randint(2, 9)
            q = (f"{name} has {a} {thing}. A friend gives {name} {b} more, then {name} loses {c}. "
                 f"How many {thing} does {name} have now?" if op == "+"
                 else f"{name} has {a} {thing}, gives {b} to a friend and then buys {c} more. "
                      f"How many {thing} does {name} have now?")
            result = result - c if op == "+" else result + c
        rows.append({"question": q, "answer": f"#### {result}", "kind": kind})
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
