"""Prompt data: malformed rows fail at start-up with the file, line and fix; the real GSM8K file loads."""

import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from oirl.config import REPO_ROOT, DataConfig, ModelConfig
from oirl.data import GSM8K_INSTRUCTION, DatasetError, PromptDataset, read_gsm8k
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


# ---- the formats people have: each is written with pyarrow / datasets and read through the real loader ----------

ROWS = [  # (question, GSM8K-style answer, the reference it gives: the number after '####', by hand)
    ("Tom has 3 apples and buys 4 more. How many?", "3+4=7\n#### 7", "7"),
    ("A box holds 12 eggs. How many in 2 boxes?", "12*2=24\n#### 24", "24"),
    ("Sam had 10 dollars and spent 1,000 cents. How much is left?", "#### 0", "0"),
]
RECORDS = [{"question": q, "answer": a} for q, a, _ in ROWS]
EXPECTED = [(q, ref) for q, _, ref in ROWS]


def _table(records):
    import pyarrow as pa

    return pa.Table.from_pylist(records)


def _write_format(kind: str, tmp_path: Path, records=RECORDS) -> tuple[str, dict]:
    """Write ``records`` as ``kind``; returns data.path and the DataConfig fields that select it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "jsonl":
        return _write(tmp_path, [json.dumps(r) for r in records]), {}
    if kind == "json":
        (tmp_path / "rows.json").write_text(json.dumps(records))
        return str(tmp_path / "rows.json"), {}
    if kind == "parquet":
        pq.write_table(_table(records), tmp_path / "rows.parquet")
        return str(tmp_path / "rows.parquet"), {}
    if kind in ("arrow_file", "arrow_stream"):
        table = _table(records)
        path = tmp_path / "rows.arrow"
        opener = pa.ipc.new_file if kind == "arrow_file" else pa.ipc.new_stream
        with opener(str(path), table.schema) as writer:
            writer.write_table(table)
        return str(path), {}
    import datasets

    if kind == "save_to_disk":
        datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
        return str(tmp_path / "ds"), {}
    if kind == "save_to_disk_dict":  # the rows are the 'test' split; 'train' holds something else
        other = [{"question": "Unrelated?", "answer": "#### 1"}]
        datasets.DatasetDict({"train": datasets.Dataset.from_list(other),
                              "test": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dd"))
        return str(tmp_path / "dd"), {"split": "test"}
    if kind == "folder_of_files":  # as `hf download --repo-type dataset --local-dir` leaves a repository
        (tmp_path / "repo" / "data").mkdir(parents=True)
        pq.write_table(_table(records), tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
        return str(tmp_path / "repo"), {}
    raise AssertionError(kind)


FORMATS = ["jsonl", "json", "parquet", "arrow_file", "arrow_stream", "save_to_disk", "save_to_disk_dict",
           "folder_of_files"]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_gives_the_same_prompts_and_references(tmp_path, kind):
    from dataclasses import replace

    from oirl.data import read_prompts

    path, extra = _write_format(kind, tmp_path)
    cfg = replace(DataConfig(), path=path, **extra)
    assert read_prompts(cfg) == EXPECTED
    assert read_prompts(replace(cfg, max_rows=2)) == EXPECTED[:2]


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk"])
def test_a_table_format_tokenizes_exactly_as_jsonl(tmp_path, tokenizer, kind):
    path, extra = _write_format(kind, tmp_path)
    base = PromptDataset(DataConfig(path=_write(tmp_path, [json.dumps(r) for r in RECORDS])), tokenizer)
    other = PromptDataset(DataConfig(path=path, **extra), tokenizer)
    assert other.token_ids == base.token_ids and other.references == base.references == [r for _, _, r in ROWS]
    # The instruction follows each question, inside the chat template's user turn.
    expected = tokenizer.apply_chat_template([{"role": "user", "content": f"{ROWS[0][0]}\n{GSM8K_INSTRUCTION}"}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
    assert other.token_ids[0] == list(expected)


def _verl_records():
    """veRL's GSM8K parquet layout: the prompt a chat, the answer nested under reward_model."""
    return [{"data_source": "openai/gsm8k",
             "prompt": [{"role": "system", "content": "You are a careful solver."},
                        {"role": "user", "content": f"{q} Let's think step by step and output the final answer "
                                                    "after '####'."}],
             "reward_model": {"ground_truth": ref, "style": "rule"},
             "extra_info": {"index": i}} for i, (q, _, ref) in enumerate(ROWS)]


def test_verl_parquet_chat_prompts_and_nested_ground_truth(tmp_path, tokenizer):
    import pyarrow.parquet as pq

    from oirl.data import read_prompts

    pq.write_table(_table(_verl_records()), tmp_path / "train.parquet")
    cfg = DataConfig(path=str(tmp_path / "train.parquet"), prompt_key="prompt", answer_key="reward_model.ground_truth")
    rows = read_prompts(cfg)
    assert [ref for _, ref in rows] == [r for _, _, r in ROWS]
    assert rows[1][0] == _verl_records()[1]["prompt"]
    ds = PromptDataset(cfg, tokenizer)
    # A chat goes through the chat template as it is: no instruction appended, the system turn kept.
    for ids, rec in zip(ds.token_ids, _verl_records()):
        assert ids == list(tokenizer.apply_chat_template(rec["prompt"], add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))
    assert ds.texts[0] == _verl_records()[0]["prompt"][1]["content"]


def test_chat_column_answer_from_the_last_assistant_turn(tmp_path, tokenizer):
    """OpenRLHF-style `messages`: the prompt is the chat up to its last user turn; with data.answer_key empty the
    reference is the assistant's reply after it."""
    from oirl.data import read_prompts

    chats = [[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"},
              {"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a, _ in ROWS]
    path = _write(tmp_path, [json.dumps({"messages": m}) for m in chats])
    cfg = DataConfig(path=path, prompt_key="messages", answer_key="")
    assert read_prompts(cfg) == [(m[:3], ref) for m, (_, _, ref) in zip(chats, ROWS)]
    text = DataConfig(path=path, prompt_key="messages", answer_key="", answer_format="text")
    assert [ref for _, ref in read_prompts(text)] == [a for _, a, _ in ROWS]  # the whole reply, as it is
    ds = PromptDataset(cfg, tokenizer)
    assert ds.token_ids[2] == list(tokenizer.apply_chat_template(chats[2][:3], add_generation_prompt=True,
                                                                 tokenize=True, return_dict=False))


def test_openrlhf_style_keys_text_answers_and_numeric_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from oirl.data import read_prompts

    pq.write_table(pa.table({"input": ["Name a colour.", "Name a fruit."], "label": ["red", "apple"]}),
                   tmp_path / "t.parquet")
    cfg = DataConfig(path=str(tmp_path / "t.parquet"), prompt_key="input", answer_key="label", answer_format="text")
    assert read_prompts(cfg) == [("Name a colour.", "red"), ("Name a fruit.", "apple")]
    pq.write_table(pa.table({"q": ["1+1?", "Half of 5?"], "gt": [2, 2.5]}), tmp_path / "n.parquet")
    numeric = DataConfig(path=str(tmp_path / "n.parquet"), prompt_key="q", answer_key="gt")
    assert read_prompts(numeric) == [("1+1?", "2"), ("Half of 5?", "2.5")]


def _bad_parquet(tmp_path, records):
    import pyarrow.parquet as pq

    pq.write_table(_table(records), tmp_path / "bad.parquet")
    return str(tmp_path / "bad.parquet")


@pytest.mark.parametrize("case, overrides, fragment", [
    ("columns", {"prompt_key": "prompt"},
     "bad.parquet: no column 'prompt' (data.prompt_key); the columns are question, answer"),
    ("columns", {"answer_key": "reward_model.ground_truth"},
     "no column 'reward_model.ground_truth' (data.answer_key); the columns are question, answer"),
    ("int_prompt", {}, "bad.parquet row 0: field 'question' is int 7"),  # a column has one type: all ints here
    ("list_answer", {}, "bad.parquet row 0: field 'answer' is list"),
    ("null_prompt", {}, "bad.parquet row 1: field 'question' is missing or empty (data.prompt_key); the row has "
                        "fields question, answer"),
    ("bad_chat", {"prompt_key": "prompt", "answer_key": "gt"},
     "bad.parquet row 1: field 'prompt' message 0 is {'role': 'robot'"),
    ("no_user", {"prompt_key": "prompt", "answer_key": "gt"},
     "bad.parquet row 0: field 'prompt' is a chat without a user message"),
    ("nested_null", {"answer_key": "rm.ground_truth"},
     "bad.parquet row 1: field 'rm.ground_truth' is missing or empty (data.answer_key)"),
    ("not_number", {}, "bad.parquet row 0: field 'answer' has no '#### <number>' final line and is not a number"),
])
def test_table_errors_name_the_row_and_the_field(tmp_path, case, overrides, fragment):
    from dataclasses import replace

    from oirl.data import read_prompts

    records = {
        "columns": RECORDS,
        "int_prompt": [{"question": 7, "answer": "#### 1"}, {"question": 5, "answer": "#### 1"}],
        "list_answer": [{"question": "q", "answer": ["#### 1"]}] * 3,
        "null_prompt": [{"question": "q", "answer": "#### 1"}, {"question": None, "answer": "#### 1"}],
        "bad_chat": [{"prompt": [{"role": "user", "content": "q"}], "gt": "1"},
                     {"prompt": [{"role": "robot", "content": "q"}], "gt": "1"}],
        "no_user": [{"prompt": [{"role": "system", "content": "be brief"}], "gt": "1"}],
        "nested_null": [{"question": "q", "answer": "", "rm": {"ground_truth": "1"}},
                        {"question": "q", "answer": "", "rm": {"ground_truth": None}}],
        "not_number": [{"question": "q", "answer": "seven"}],
    }[case]
    cfg = replace(DataConfig(), path=_bad_parquet(tmp_path, records), **overrides)
    with pytest.raises(DatasetError) as err:
        read_prompts(cfg)
    assert fragment in str(err.value)


def test_jsonl_errors_name_the_line_and_the_field(tmp_path):
    from oirl.data import read_prompts

    cases = [
        (json.dumps({"question": 5, "answer": "#### 1"}), "data.jsonl:2: field 'question' is int 5"),
        (json.dumps({"question": "q", "answer": {"n": 1}}), "data.jsonl:2: field 'answer' is dict"),
        (json.dumps({"question": "q"}), "data.jsonl:2: field 'answer' is missing or empty (data.answer_key); the "
                                        "row has fields question"),
        (json.dumps({"question": "q", "extra": {"a": 1}}), "data.jsonl:2: field 'extra.b' is missing"),
    ]
    nested = json.dumps({"question": "q", "extra": {"b": "#### 2"}})
    for bad, fragment in cases:
        key, good = ("extra.b", nested) if "extra" in bad else ("answer", GOOD)
        with pytest.raises(DatasetError) as err:
            read_prompts(DataConfig(path=_write(tmp_path, [good, bad]), answer_key=key))
        assert fragment in str(err.value), (bad, str(err.value))


def test_empty_inputs_say_they_have_no_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from oirl.data import read_prompts

    (tmp_path / "empty.jsonl").write_text("\n\n")
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    for name in ("empty.jsonl", "empty.parquet"):
        with pytest.raises(DatasetError, match=f"{name} has no rows"):
            read_prompts(DataConfig(path=str(tmp_path / name)))


def test_split_and_folder_errors_list_what_is_there(tmp_path):
    from dataclasses import replace

    from oirl.data import read_prompts

    path, _ = _write_format("save_to_disk_dict", tmp_path)
    with pytest.raises(DatasetError, match=r"has no split 'validation' \(data.split\); its splits are train, test"):
        read_prompts(replace(DataConfig(), path=path, split="validation"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="is a folder that `save_to_disk` did not write"):
        read_prompts(DataConfig(path=str(tmp_path / "nothing")))


def test_answer_format_and_reward_kind_are_checked_together():
    from oirl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.answer_format=text keeps answers as text; set data.answer_format=gsm8k"):
        load_config(REPO_ROOT / "configs" / "demo.yaml", ["data.answer_format=text", "reward.kind=gsm8k"])
    with pytest.raises(ConfigError, match="data.answer_format='yaml' must be"):
        load_config(REPO_ROOT / "configs" / "demo.yaml", ["data.answer_format=yaml"])


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """A Hugging Face home holding two datasets, each as one of the two caches a machine with network leaves:
    'oirl-test/prepared' (subset 'main') as `datasets.load_dataset` prepares it (HF_HOME/datasets/
    <owner>___<name>/<subset>/<version>/<revision>/), and 'oirl-test/snapshot' as `hf download --repo-type
    dataset` stores the repository's files (HF_HOME/hub/datasets--<owner>--<name>/snapshots/<revision>/)."""
    import shutil

    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    home = tmp_path_factory.mktemp("hf_home")
    src = home / "src.parquet"
    pq.write_table(_table(RECORDS), src)
    revision = "0123456789abcdef0123456789abcdef01234567"
    builder = Parquet(config_name="main", dataset_name="prepared", hash=revision, data_files={"train": str(src)},
                      cache_dir=str(home / "build"))
    builder.download_and_prepare()
    prepared = home / "datasets" / "oirl-test___prepared" / "main" / "0.0.0" / revision
    prepared.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, prepared)
    assert sorted(p.name for p in prepared.iterdir()) == ["dataset_info.json", "prepared-train.arrow"]
    repo = home / "hub" / "datasets--oirl-test--snapshot"
    (repo / "snapshots" / revision / "data").mkdir(parents=True)
    pq.write_table(_table(RECORDS[::-1]), repo / "snapshots" / revision / "data" / "train-00000-of-00001.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return home


def test_a_dataset_name_is_read_from_the_local_cache_without_network(hf_home):
    """Run as a user would (a fresh process, HF_HOME pointing at the cache, no offline switch set by them): the
    loader switches `datasets` offline itself and finds each name in its cache; an uncached name is an error that
    says how to get it."""
    import subprocess
    import sys

    probe = ("import json, sys\nfrom oirl.config import DataConfig\nfrom oirl.data import DatasetError, read_prompts\n"
             "out = {}\n"
             "for name, subset in [('oirl-test/prepared', 'main'), ('oirl-test/snapshot', ''), ('oirl-test/absent', '')]:\n"
             "    try:\n"
             "        out[name] = read_prompts(DataConfig(path=name, subset=subset))\n"
             "    except DatasetError as e:\n"
             "        out[name] = str(e)\n"
             "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", probe], cwd=hf_home, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [tuple(r) for r in out["oirl-test/prepared"]] == EXPECTED
    assert [tuple(r) for r in out["oirl-test/snapshot"]] == EXPECTED[::-1]
    assert "the local Hugging Face cache" in out["oirl-test/absent"]
    assert "hf download --repo-type dataset oirl-test/absent" in out["oirl-test/absent"]
