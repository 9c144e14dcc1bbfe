"""Prompt datasets: GSM8K JSONL or a synthetic digit task, tokenized once at start-up.

Every row is checked before any actor starts; a bad row is an error naming the file, the line and the fix. The
sampler walks a seeded permutation per epoch; its position is part of the checkpoint, so a resumed run sees the
same prompts it would have seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from oirl.config import DataConfig, resolve_path

GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final answer on its own line as '#### <number>'."


class DatasetError(ValueError):
    """A dataset row is malformed; the message names the row and how to fix it."""


@dataclass
class Prompt:
    prompt_id: int
    token_ids: list[int]
    reference: str
    text: str = ""
    """The user message the ids were rendered from (multi-turn environments render their own prompt from it)."""


def read_gsm8k(path_str: str, max_rows: int = 0) -> list[tuple[str, str]]:
    """(question, reference final answer) per row; every row validated."""
    from reward_server.rules import gsm8k_reference_answer

    path = resolve_path(path_str)
    if not path.is_file():
        raise DatasetError(
            f"data.path={path_str!r}: {path} not found. the repository ships GSM8K as data/gsm8k/train.jsonl; "
            "point data.path at a JSONL file or use data.source=synthetic"
        )
    rows = []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: expected a JSON object with 'question' and 'answer'")
            for key in ("question", "answer"):
                if not isinstance(obj.get(key), str) or not obj[key].strip():
                    raise DatasetError(f"{where}: field '{key}' is missing or empty; each row needs a non-empty "
                                       "string 'question' and an 'answer' ending in '#### <number>'")
            try:
                ref = gsm8k_reference_answer(obj["answer"])
            except ValueError as e:
                raise DatasetError(f"{where}: field 'answer' has no '#### <number>' final line") from e
            rows.append((obj["question"], ref))
            if max_rows and len(rows) >= max_rows:
                break
    if not rows:
        raise DatasetError(f"data.path={path_str!r}: {path} has no rows")
    return rows


def synthetic_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """'Say some digits: 4 8 2' -> reward is the fraction of digit tokens in the response."""
    rng = random.Random(seed)
    return [("Say some digits: " + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 6))), "")
            for _ in range(n)]


class PromptDataset:
    def __init__(self, cfg: DataConfig, tokenizer: Any):
        self.cfg = cfg
        if cfg.source == "gsm8k":
            rows = read_gsm8k(cfg.path, cfg.max_rows)
            texts = [f"{q}\n{GSM8K_INSTRUCTION}" for q, _ in rows]
            if cfg.prompt_selector:  # Prompt-OIRL: each question in the prompt its reward model rates best
                from oirl.prompt_oirl.selector import PromptSelector

                texts = PromptSelector.load(resolve_path(cfg.prompt_selector)).render([q for q, _ in rows])
        else:
            rows = synthetic_rows(cfg.max_rows or 1024, cfg.seed)
            texts = [q for q, _ in rows]
        self.references = [r for _, r in rows]
        self.texts = texts  # the user message of each prompt (benchmarks hand the same prompts to other trainers)
        self.token_ids = [self._tokenize(tokenizer, t, i) for i, t in enumerate(texts)]
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _tokenize(self, tokenizer: Any, text: str, row: int) -> list[int]:
        if self.cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        ids = [int(t) for t in ids]
        if len(ids) > self.cfg.max_prompt_tokens:
            raise DatasetError(f"data row {row}: prompt is {len(ids)} tokens, over data.max_prompt_tokens="
                               f"{self.cfg.max_prompt_tokens}; raise the limit or drop the row")
        return ids

    def __len__(self) -> int:
        return len(self.token_ids)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.token_ids))

    def next_batch(self) -> list[Prompt]:
        out = []
        for _ in range(self.cfg.prompts_per_iteration):
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            i = int(self._order[self.cursor])
            self.cursor += 1
            out.append(Prompt(i, self.token_ids[i], self.references[i], self.texts[i]))
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
