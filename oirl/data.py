"""Prompt datasets: prompts and reference answers from the formats people have, or a synthetic digit task,
tokenized once at start-up.

``data.path`` is read by its contents, not its name: JSONL (one object a line) or a JSON list of objects, Parquet,
Arrow (IPC file or stream), a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (split
``data.split``) or holding data files, or a dataset name ('openai/gsm8k') that the local Hugging Face cache holds
(never downloaded). Columns are mapped by ``data.prompt_key`` (a string, or a chat: a list of {role, content}) and
``data.answer_key``; dotted keys read nested fields (veRL's ``reward_model.ground_truth``).

Every row is checked before any actor starts; a bad row is an error naming the file, the row, the field and the fix.
The sampler walks a seeded permutation per epoch; its position is part of the checkpoint, so a resumed run sees the
same prompts it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from oirl.config import OFFLINE_ENV, DataConfig, looks_like_dataset_name, resolve_path

GSM8K_INSTRUCTION = DataConfig().instruction
CHAT_ROLES = ("system", "user", "assistant", "tool")
# A prompt is a user message (str) or a chat: a list of {"role", "content"} messages.
PromptText = str | list[dict[str, str]]


class DatasetError(ValueError):
    """A dataset row is malformed; the message names the row and how to fix it."""


@dataclass
class Prompt:
    prompt_id: int
    token_ids: list[int]
    reference: str
    text: str = ""
    """The user message the ids were rendered from (multi-turn environments render their own prompt from it)."""


# ---- reading: every format becomes (where, record) pairs ------------------------------------------------------------

def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from e


def _json_list_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); give a JSON list of objects or "
                           "JSONL, one object a line") from e
    for i, item in enumerate(items):
        yield f"{path} row {i}", item


def _table_columns(table: Any, label: str, keys: list[tuple[str, str]]) -> Any:
    """``table`` cut to the top-level columns ``keys`` read; a key naming no column lists the columns there are."""
    names = list(table.column_names)
    roots = []
    for field, key in keys:
        root = key if key in names else key.split(".")[0]
        if root not in names:
            raise DatasetError(f"{label}: no column {key!r} ({field}); the columns are {', '.join(names)}; set "
                               f"{field} to one of them (a dotted key reads a nested field: 'reward_model.ground_truth')")
        roots.append(root)
    return table.select(list(dict.fromkeys(roots)))


def _table_records(table: Any, label: str, keys: list[tuple[str, str]], max_rows: int) -> Iterator[tuple[str, Any]]:
    table = _table_columns(table, label, keys)
    if max_rows:
        table = table.slice(0, max_rows)
    for i, record in enumerate(table.to_pylist()):
        yield f"{label} row {i}", record


def _read_file_table(path: Path) -> Any:
    """A Parquet or Arrow (IPC file or stream) file as a pyarrow Table, or None for a text (JSON) file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with path.open("rb") as f:
        magic = f.read(6)
    if magic[:4] == b"PAR1":
        return pq.read_table(path)
    if magic == b"ARROW1":
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    if magic[:4] == b"\xff\xff\xff\xff":  # an IPC stream (what Dataset.save_to_disk writes) opens with this marker
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    return None


@contextlib.contextmanager
def _hub_offline() -> Iterator[Any]:
    """`datasets`, switched offline for the call: nothing here waits on the Hub. Both libraries read their offline
    switch when first imported, so a process that imported them online (transformers does) is switched too."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import datasets
        import huggingface_hub.constants as hub_constants
    except ImportError as e:
        raise DatasetError("reading a `datasets` folder or a Hugging Face dataset name needs the `datasets` package: "
                           "pip install -e '.[data]' (deploy/setup.sh installs it), or give data.path a JSONL, "
                           "Parquet or Arrow file") from e
    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield datasets
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def _split_of(datasets: Any, loaded: Any, cfg: DataConfig, label: str) -> Any:
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.split not in loaded:
            raise DatasetError(f"{label} has no split {cfg.split!r} (data.split); its splits are "
                               f"{', '.join(loaded)}; set data.split to one of them")
        return loaded[cfg.split]
    return loaded


def _folder_table(path: Path, cfg: DataConfig) -> tuple[Any, str]:
    with _hub_offline() as datasets:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # save_to_disk
            loaded = _split_of(datasets, datasets.load_from_disk(str(path)), cfg, str(path))
            label = f"{path} (split {cfg.split})" if (path / "dataset_dict.json").is_file() else str(path)
        else:  # data files, as `hf download --repo-type dataset --local-dir` leaves them
            label = f"{path} (split {cfg.split})"
            try:
                loaded = _load_dataset(datasets, str(path), cfg, label)
            except (FileNotFoundError, datasets.exceptions.DatasetsError) as e:
                raise DatasetError(f"data.path={cfg.path!r}: {path} is a folder that `save_to_disk` did not write "
                                   f"(no dataset_dict.json or state.json) and `datasets` reads no split from it "
                                   f"({e}); point data.path at a data file or a saved dataset") from e
        return loaded.with_format("arrow")[:], label


def _load_dataset(datasets: Any, name: str, cfg: DataConfig, label: str) -> Any:
    try:
        return datasets.load_dataset(name, cfg.subset or None, split=cfg.split)
    except ValueError as e:  # an unknown split or subset: datasets' message lists the ones there are
        raise DatasetError(f"{label}: {e} (data.split={cfg.split!r}, data.subset={cfg.subset!r})") from e


def _hub_cache_table(name: str, cfg: DataConfig) -> tuple[Any, str]:
    """A dataset name from the local cache: what `datasets.load_dataset` prepared online once, else the files
    `hf download --repo-type dataset` put in the hub cache."""
    label = f"{name} (local Hugging Face cache, split {cfg.split})"
    with _hub_offline() as datasets:
        try:
            loaded = _load_dataset(datasets, name, cfg, label)
        except (ConnectionError, FileNotFoundError):
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError

            try:
                folder = snapshot_download(name, repo_type="dataset", local_files_only=True)
            except LocalEntryNotFoundError as e:
                raise DatasetError(
                    f"data.path={name!r} is not a file or folder (looked in {resolve_path(name)}), and the local "
                    f"Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}) holds no dataset of that name; "
                    f"nothing is downloaded here: fetch it once where there is network (`hf download --repo-type "
                    f"dataset {name}`, or datasets.load_dataset({name!r})), or point data.path at a file") from e
            loaded = _load_dataset(datasets, folder, cfg, label)
        return loaded.with_format("arrow")[:], label


def _records(cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    """(where, record) for every row of data.path, whatever its format; ``where`` names the file and the row."""
    keys = [("data.prompt_key", cfg.prompt_key)] + ([("data.answer_key", cfg.answer_key)] if cfg.answer_key else [])
    path = resolve_path(cfg.path)
    if path.is_file():
        table = _read_file_table(path)
        if table is not None:
            yield from _table_records(table, str(path), keys, cfg.max_rows)
            return
        with path.open() as f:
            head = f.read(4096).lstrip()
        yield from (_json_list_records(path) if head.startswith("[") else _jsonl_records(path))
    elif path.is_dir():
        table, label = _folder_table(path, cfg)
        yield from _table_records(table, label, keys, cfg.max_rows)
    elif looks_like_dataset_name(cfg.path):
        table, label = _hub_cache_table(cfg.path, cfg)
        yield from _table_records(table, label, keys, cfg.max_rows)
    else:
        raise DatasetError(
            f"data.path={cfg.path!r}: {path} not found. The repository ships GSM8K as data/gsm8k/train.jsonl; "
            "point data.path at a JSONL, Parquet or Arrow file, a `datasets` folder or a cached dataset name, or "
            "use data.source=synthetic"
        )


# ---- rows: each record's prompt and reference, checked ----------------------------------------------------------------

def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _field(record: dict, key: str) -> Any:
    """record[key], or the nested field a dotted key names (None when absent)."""
    if key in record:
        return record[key]
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _missing(where: str, record: dict, key: str, setting: str, needs: str) -> DatasetError:
    return DatasetError(f"{where}: field '{key}' is missing or empty ({setting}); the row has fields "
                        f"{', '.join(map(str, record))}; {needs}")


def _chat(where: str, key: str, messages: list) -> list[dict[str, str]]:
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)):
            raise DatasetError(f"{where}: field '{key}' message {j} is {_short(m)}; a chat is a list of "
                               f"{{'role': {'|'.join(CHAT_ROLES)}, 'content': str}} messages")
    if not any(m["role"] == "user" for m in messages):
        raise DatasetError(f"{where}: field '{key}' is a chat without a user message; the prompt is the chat up to "
                           "its last user turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _reference(where: str, key: str, answer: str, fmt: str) -> str:
    from reward_server.rules import gsm8k_reference_answer, parse_gsm8k_reference

    if fmt == "text":
        return answer
    reference = gsm8k_reference_answer(answer) if "####" in answer else answer.strip()
    try:
        parse_gsm8k_reference(reference)
    except ValueError as e:
        raise DatasetError(f"{where}: field '{key}' has no '#### <number>' final line and is not a number "
                           f"({_short(answer)}); data.answer_format=gsm8k wants a number; set "
                           "data.answer_format=text to keep answers as text") from e
    return reference


def _row(where: str, record: Any, cfg: DataConfig) -> tuple[PromptText, str]:
    """(prompt, reference) of one record: a string or a chat up to its last user turn, and the checked answer."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object with '{cfg.prompt_key}'"
                           + (f" and '{cfg.answer_key}'" if cfg.answer_key else "") + f", got {_short(record)}")
    prompt = _field(record, cfg.prompt_key)
    needs = ("each row needs a prompt: a non-empty string, or a list of {role, content} messages; set "
             "data.prompt_key to the column that holds it")
    if prompt is None or (isinstance(prompt, (str, list)) and not (prompt.strip() if isinstance(prompt, str)
                                                                    else prompt)):
        raise _missing(where, record, cfg.prompt_key, "data.prompt_key", needs)
    if not isinstance(prompt, (str, list)):
        raise DatasetError(f"{where}: field '{cfg.prompt_key}' is {type(prompt).__name__} {_short(prompt)}; "
                           f"{needs.replace('each row needs a prompt: ', 'a prompt is ')}")
    answer: Any = ""
    if isinstance(prompt, list):
        chat = _chat(where, cfg.prompt_key, prompt)
        last_user = max(j for j, m in enumerate(chat) if m["role"] == "user")
        replies = [m["content"] for m in chat[last_user + 1:] if m["role"] == "assistant"]
        prompt, answer = chat[:last_user + 1], (replies[-1] if replies and not cfg.answer_key else "")
    if cfg.answer_key:
        answer = _field(record, cfg.answer_key)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(int(answer)) if float(answer).is_integer() else str(answer)
        if answer is not None and not isinstance(answer, str):
            raise DatasetError(f"{where}: field '{cfg.answer_key}' is {type(answer).__name__} {_short(answer)}; a "
                               "reference answer is a string or a number; set data.answer_key to the column that "
                               "holds it")
        if answer is None or (not answer.strip() and cfg.answer_format == "gsm8k"):
            raise _missing(where, record, cfg.answer_key, "data.answer_key",
                           "each row needs a reference answer ('#### <number>' or a number for "
                           "data.answer_format=gsm8k); set data.answer_key to the column that holds it")
    elif not answer and cfg.answer_format == "gsm8k":
        raise DatasetError(f"{where}: no reference answer: data.answer_key is empty and the prompt has no assistant "
                           "message after its last user turn; set data.answer_key, or data.answer_format=text "
                           "for rewards that need none")
    return prompt, _reference(where, cfg.answer_key or cfg.prompt_key, answer, cfg.answer_format)


def read_prompts(cfg: DataConfig) -> list[tuple[PromptText, str]]:
    """(prompt, reference) per row of data.path (at most data.max_rows), every row validated."""
    rows = []
    for where, record in _records(cfg):
        rows.append(_row(where, record, cfg))
        if cfg.max_rows and len(rows) >= cfg.max_rows:
            break
    if not rows:
        raise DatasetError(f"data.path={cfg.path!r}: {resolve_path(cfg.path)} has no rows")
    return rows


def read_gsm8k(path_str: str, max_rows: int = 0) -> list[tuple[str, str]]:
    """(question, reference final answer) per row of a GSM8K-style file ('question', 'answer'); every row
    validated."""
    rows = read_prompts(replace(DataConfig(), path=path_str, max_rows=max_rows))
    return [(_question(q, f"{path_str} row {i}"), ref) for i, (q, ref) in enumerate(rows)]


def _question(prompt: PromptText, where: str) -> str:
    if not isinstance(prompt, str):
        raise DatasetError(f"{where}: the prompt is a chat, but this reader renders each question into its own "
                           "prompt; give each row a string question")
    return prompt


def synthetic_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """'Say some digits: 4 8 2' -> reward is the fraction of digit tokens in the response."""
    rng = random.Random(seed)
    return [("Say some digits: " + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 6))), "")
            for _ in range(n)]


class PromptDataset:
    def __init__(self, cfg: DataConfig, tokenizer: Any):
        self.cfg = cfg
        prompts: list[PromptText]
        if cfg.source == "gsm8k":
            rows = read_prompts(cfg)
            prompts = [f"{q}\n{cfg.instruction}" if isinstance(q, str) and cfg.instruction else q for q, _ in rows]
            if cfg.prompt_selector:  # Prompt-OIRL: each question in the prompt its reward model rates best
                from oirl.prompt_oirl.selector import PromptSelector

                questions = [_question(q, f"data row {i}") for i, (q, _) in enumerate(rows)]
                prompts = list(PromptSelector.load(resolve_path(cfg.prompt_selector)).render(questions))
        else:
            rows = synthetic_rows(cfg.max_rows or 1024, cfg.seed)
            prompts = [q for q, _ in rows]
        self.references = [r for _, r in rows]
        # The user message of each prompt (benchmarks hand the same prompts to other trainers; a chat's last one).
        self.texts = [p if isinstance(p, str) else [m["content"] for m in p if m["role"] == "user"][-1]
                      for p in prompts]
        self.token_ids = [self._tokenize(tokenizer, p, i) for i, p in enumerate(prompts)]
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _tokenize(self, tokenizer: Any, prompt: PromptText, row: int) -> list[int]:
        """A user message or a chat through the tokenizer's chat template (with the assistant's turn opened); without
        one, the text itself (a chat's contents one per line)."""
        if self.cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
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
