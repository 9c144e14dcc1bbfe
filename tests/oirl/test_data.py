"""Prompt data: malformed rows fail at start-up with the file, line and fix; the real GSM8K file loads."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from oirl.config import REPO_ROOT, DataConfig, ModelConfig
from oirl.data import DatasetError, PromptDataset, read_gsm8k
from oirl.models import resolve_model

GSM8K = REPO_ROOT / "data" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(ModelConfig(path="tiny")))


def _write(tmp_path: Path, lines: list[str]) -> str:
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


GOOD = json.dumps({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"})


@pytest.mark.parametrize("bad, fragment", [
    ("{not json", "data.jsonl:2: not valid JSON"),
    (json.dumps({"answer": "#### 1"}), "data.jsonl:2: field 'question' is missing or empty"),
    (json.dumps({"question": "q", "answer": "no final line"}), "data.jsonl:2: field 'answer' has no '#### <number>'"),
    (json.dumps(["a", "list"]), "data.jsonl:2: expected a JSON object"),
])
def test_malformed_rows_name_the_line(tmp_path, bad, fragment):
    path = _write(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DatasetError) as err:
        read_gsm8k(path)
    assert fragment in str(err.value)


def test_missing_file_says_where_gsm8k_lives(tmp_path):
    with pytest.raises(DatasetError, match="data/gsm8k/train.jsonl"):
        read_gsm8k(str(tmp_path / "absent.jsonl"))


def test_overlong_prompt_names_the_row(tmp_path, tokenizer):
    path = _write(tmp_path, [GOOD, json.dumps({"question": "word " * 400, "answer": "#### 1"})])
    cfg = DataConfig(source="gsm8k", path=path, max_prompt_tokens=120)
    with pytest.raises(DatasetError, match="data row 1: prompt is .* over data.max_prompt_tokens=120"):
        PromptDataset(cfg, tokenizer)


def test_sampler_state_resumes_the_same_prompts(tokenizer):
    cfg = DataConfig(source="synthetic", max_rows=10, prompts_per_iteration=4)
    a = PromptDataset(cfg, tokenizer)
    a.next_batch()
    a.next_batch()
    state = a.state()
    expected = [p.prompt_id for p in a.next_batch()]  # crosses the epoch boundary (10 rows)
    b = PromptDataset(cfg, tokenizer)
    b.load_state(state)
    assert [p.prompt_id for p in b.next_batch()] == expected


def test_a_prompt_drawn_twice_in_one_batch_gets_two_seeds(tokenizer):
    """A batch larger than the dataset repeats prompts; each copy samples with its own seed (the same copy the
    same seed on --resume), and a prompt drawn once keeps the seed it always had."""
    import numpy as np

    from oirl.driver import seeds_for

    ds = PromptDataset(DataConfig(source="synthetic", max_rows=3, prompts_per_iteration=5), tokenizer)
    ids = [p.prompt_id for p in ds.next_batch()]
    assert len(set(ids)) < len(ids)
    seeds = seeds_for(0, 7, ids)
    assert len(set(seeds)) == len(ids) and seeds == seeds_for(0, 7, ids)
    first = ids.index(ids[-1])
    assert seeds[first] == int(np.random.default_rng([0, 7, ids[-1]]).integers(2**31 - 1))


def test_real_gsm8k_file_loads(tokenizer):
    rows = read_gsm8k(str(GSM8K))
    assert len(rows) == 7473
    assert rows[0][1] == "72"  # Natalia's clips
    ds = PromptDataset(DataConfig(source="gsm8k", path=str(GSM8K), max_rows=50, max_prompt_tokens=1024), tokenizer)
    assert len(ds) == 50 and all(ds.token_ids)
