"""Prompt-OIRL: collect through the real rollout actor (tiny model), the MiniLM reward model learns which prompt
suits which kind of query, select is the reward model's argmax, eval recomputes from stored per-query rows, bad
input names the row and field, and the rollout-stage hook puts the selected prompt into the PPO prompts."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from oirl.config import REPO_ROOT, ConfigError, DataConfig, load_config
from oirl.data import DatasetError, PromptDataset
from oirl.prompt_oirl.cli import main as poirl_main
from oirl.prompt_oirl.collect import RECORD_SCHEMA, Query, cut_at_stop, encode, score
from oirl.prompt_oirl.evaluate import accuracies_from_rows, read_queries, wilson_interval
from oirl.prompt_oirl.prompts import DEFAULT_PROMPTS, PromptSetError, arithmetic_rows, write_jsonl
from oirl.prompt_oirl.selector import (
    WEIGHTS_FILE,
    PromptSelector,
    build_mlp,
    check_records,
    embed,
    prompt_text,
)
from tests.conftest import oirl_cmd

# In the constructed records, prompt 0 ('direct') is right exactly on bare sums and prompt 5 ('fewshot_cot')
# exactly on stories; every other prompt is always wrong. The best single prompt is then right on about half the
# queries, the oracle on all, and a selector that learned the rule on all.
RIGHT = {"bare": 0, "story": 5}


def _constructed_rows(n: int = 80) -> list[dict]:
    rows = [r for r in arithmetic_rows(4 * n, seed=7) if r["kind"] in RIGHT]
    return rows[:n]


def _records(rows: list[dict], dataset: str = "arithmetic") -> pa.Table:
    recs = []
    for i, r in enumerate(rows):
        for p in DEFAULT_PROMPTS:
            recs.append({"query_id": f"{dataset}:{i}", "dataset": dataset, "row": i, "kind": r["kind"],
                         "question": r["question"], "reference": r["answer"].split("####")[-1].strip(),
                         "prompt_id": p.prompt_id, "prompt_name": p.name, "text": "", "extracted": None,
                         "correct": RIGHT[r["kind"]] == p.prompt_id, "response_tokens": 1, "finish_reason": "stop"})
    return pa.Table.from_pylist(recs, schema=RECORD_SCHEMA)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A selector trained through the CLI's train stage on the constructed records."""
    root = tmp_path_factory.mktemp("poirl")
    rows = _constructed_rows()
    pq.write_table(_records(rows), root / "records.parquet")
    write_jsonl(rows, root / "queries.jsonl")
    assert poirl_main(["train", "--records", str(root / "records.parquet"), "--out", str(root / "sel"),
                       "epochs=150"]) == 0
    return root, PromptSelector.load(root / "sel")


def test_reward_model_learns_which_prompt_suits_which_query(trained):
    _, sel = trained
    held = sel.meta["metrics"]["heldout"]
    assert held["auc"] > 0.95 and held["precision"] > 0.8 and held["recall"] > 0.8, held
    assert not set(sel.meta["train_queries"]) & set(sel.meta["heldout_queries"])  # split by query
    rows = _constructed_rows()
    picks = sel.select([r["question"] for r in rows])
    assert picks == [RIGHT[r["kind"]] for r in rows]


def test_select_is_the_reward_models_argmax(trained, capsys):
    root, sel = trained
    rows = _constructed_rows()[:12]
    # Recompute the logits independently: the saved weights in a fresh MLP on [q, p, q*p] of MiniLM embeddings.
    mlp = build_mlp(sel.meta["embedding_dim"], sel.meta["config"]["hidden"], 0.0)
    mlp.load_state_dict(torch.load(root / "sel" / WEIGHTS_FILE, weights_only=True))
    mlp.eval()
    q = torch.from_numpy(embed([r["question"] for r in rows], "minilm"))
    p = torch.from_numpy(embed([prompt_text(x) for x in DEFAULT_PROMPTS], "minilm"))
    with torch.no_grad():
        logits = torch.stack([mlp(torch.cat([q, p[j].expand_as(q), q * p[j]], -1)).squeeze(-1)
                              for j in range(len(DEFAULT_PROMPTS))], dim=1)
    np.testing.assert_allclose(sel.scores([r["question"] for r in rows]), logits.numpy(), atol=1e-5)
    write_jsonl(rows, root / "some.jsonl")
    assert poirl_main(["select", "--selector", str(root / "sel"), "--queries", str(root / "some.jsonl")]) == 0
    picks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["prompt_id"] for x in picks] == logits.argmax(1).tolist()
    assert [x["prompt_name"] for x in picks] == [DEFAULT_PROMPTS[i].name for i in logits.argmax(1).tolist()]


def test_eval_recomputes_accuracies_from_stored_rows(trained, tmp_path):
    root, sel = trained
    out = tmp_path / "eval"
    # Through the top-level CLI, as a user runs it.
    proc = subprocess.run(oirl_cmd() + ["prompt-oirl", "eval", "--selector", str(root / "sel"), "--records",
                                        str(root / "records.parquet"), "--out", str(out), "--results",
                                        str(tmp_path / "prompt_oirl.json")],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "eval.json").read_text())
    assert json.loads((tmp_path / "prompt_oirl.json").read_text()) == summary
    rows = [json.loads(line) for line in (out / "heldout_queries.jsonl").read_text().splitlines()]
    assert sorted(r["query_id"] for r in rows) == sorted(sel.meta["heldout_queries"])
    assert summary["n_heldout_queries"] == len(rows) >= 10
    # Each stored outcome agrees with the records, and each accuracy is the mean of the stored rows.
    records = pq.read_table(root / "records.parquet").to_pylist()
    outcome = {(r["query_id"], r["prompt_id"]): r["correct"] for r in records}
    for r in rows:
        assert r["selector_correct"] == outcome[(r["query_id"], r["selected_prompt"])]
        assert r["best_single_correct"] == outcome[(r["query_id"], r["best_single_prompt"])]
        assert r["oracle_correct"] == any(outcome[(r["query_id"], p)] for p in range(len(DEFAULT_PROMPTS)))
    for key, col in (("selector_accuracy", "selector_correct"), ("best_single_prompt_accuracy", "best_single_correct"),
                     ("oracle_accuracy", "oracle_correct")):
        k = sum(r[col] for r in rows)
        assert summary[key] == pytest.approx(k / len(rows))
        assert summary[f"{key}_ci95"] == pytest.approx(list(wilson_interval(k, len(rows))))
    assert summary["selector_accuracy"] == 1.0 == summary["oracle_accuracy"]
    assert summary["best_single_prompt_accuracy"] < 0.8
    # The best single prompt is the one most accurate on the TRAINING queries.
    train = set(sel.meta["train_queries"])
    acc = [np.mean([r["correct"] for r in records if r["query_id"] in train and r["prompt_id"] == p.prompt_id])
           for p in DEFAULT_PROMPTS]
    assert rows[0]["best_single_prompt"] == int(np.argmax(acc))
    assert summary["rm_precision"] == sel.meta["metrics"]["heldout"]["precision"]
    flipped = [dict(r, selector_correct=False) if i == 0 else r for i, r in enumerate(rows)]
    assert accuracies_from_rows(flipped)["selector_accuracy"] == pytest.approx(1 - 1 / len(rows))


def test_eval_refuses_queries_the_selector_trained_on(trained, tmp_path, capsys):
    root, sel = trained
    from oirl.prompt_oirl.evaluate import evaluate

    with pytest.raises(ValueError, match="were used to train the selector"):
        evaluate(pq.read_table(root / "records.parquet"), sel, sel.meta["train_queries"][:2])


def test_wilson_interval_hand_computed():
    # p = 0.8, n = 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71679, half 0.22654.
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-4)


def test_bad_query_rows_and_prompt_ids_name_the_row_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "What is 1 + 2?", "answer": "#### 3"}) + "\n"
                   + json.dumps({"question": "What is 2 + 2?"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: field 'answer' is missing"):
        read_queries(str(bad), "x", 8)
    assert poirl_main(["select", "--selector", str(tmp_path), "--queries", str(bad)]) == 2
    assert "not a selector folder" in capsys.readouterr().err
    rows = _constructed_rows(4)
    table = _records(rows)
    check_records(table, len(DEFAULT_PROMPTS), "records")
    pids = table.column("prompt_id").to_pylist()
    pids[9] = 7
    broken = table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", pa.array(pids, pa.int64()))
    with pytest.raises(PromptSetError, match=r"records row 9: field 'prompt_id'=7 is not a prompt of this set"):
        check_records(broken, len(DEFAULT_PROMPTS), "records")
    with pytest.raises(PromptSetError, match="columns \\['correct'\\] missing"):
        check_records(table.drop(["correct"]), len(DEFAULT_PROMPTS), "records")
    assert poirl_main(["train", "--records", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "s")]) == 2
    assert poirl_main(["train", "--records", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "s"),
                       "epoch=3"]) == 2
    assert "unknown train option 'epoch'" in capsys.readouterr().err


def test_scoring_cuts_invented_follow_up_questions():
    text = cut_at_stop("So 14 + 9 = 23.\n#### 23\nQuestion: Tom has 5 ... \nAnswer: #### 7")
    assert text == "So 14 + 9 = 23.\n#### 23"
    assert score(text, "23") == (23.0, True)
    assert score("#### 22", "23") == (22.0, False)
    assert score("no number", "23") == (None, False)


def test_rollout_stage_uses_the_selected_prompt(trained, tmp_path, tiny_model_path):
    root, sel = trained
    from transformers import AutoTokenizer

    rows = _constructed_rows()[:6]
    write_jsonl(rows, tmp_path / "q.jsonl")
    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml",
                      ["data.source=gsm8k", f"data.path={tmp_path / 'q.jsonl'}", f"data.prompt_selector={root / 'sel'}",
                       "data.max_prompt_tokens=1024",
                       "reward.kind=gsm8k"])
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ds = PromptDataset(cfg.data, tok)
    expected = [encode(tok, DEFAULT_PROMPTS[RIGHT[r["kind"]]].render(r["question"])) for r in rows]
    assert ds.token_ids == expected
    assert {RIGHT[r["kind"]] for r in rows} == {0, 5}  # both prompts are in use
    plain = PromptDataset(DataConfig(source="gsm8k", path=str(tmp_path / "q.jsonl"), max_prompt_tokens=1024), tok)
    assert plain.token_ids != expected
    with pytest.raises(ConfigError, match="data.prompt_selector='/nope' is not a selector folder"):
        load_config(REPO_ROOT / "configs" / "smoke.yaml", ["data.source=gsm8k", f"data.path={tmp_path / 'q.jsonl'}",
                                                           "data.prompt_selector=/nope", "reward.kind=gsm8k"])
    with pytest.raises(ConfigError, match="data.prompt_selector picks a prompt for each GSM8K question"):
        load_config(REPO_ROOT / "configs" / "smoke.yaml", [f"data.prompt_selector={root / 'sel'}"])


@pytest.mark.slow
def test_collect_through_the_rollout_actor(ray_cluster, tiny_model_path, tmp_path):
    """Tiny random model (answers are ~never right): the records' shape, ids and join are what is checked."""
    import ray
    from transformers import AutoTokenizer

    from actors.rollout_worker import RolloutConfig
    from oirl.prompt_oirl.collect import collect_records, start_engine

    rows = arithmetic_rows(4, seed=3)
    queries = [Query(f"{ds}:{i}", ds, i, r["question"], r["answer"][5:], r["kind"], budget)
               for ds, budget, part in (("a", 6, rows[:2]), ("b", 10, rows[2:])) for i, r in enumerate(part)]
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    engine = start_engine(tiny_model_path, "float32", RolloutConfig(kv_cache_gib=1, num_cpus=0.5))
    try:
        table, stats = collect_records(engine, queries, DEFAULT_PROMPTS, tok, 600)
        # The same pairs generated alone, in another order: greedy, so the text must match the joined record.
        probe = [(queries[3], DEFAULT_PROMPTS[5]), (queries[0], DEFAULT_PROMPTS[2])]
        alone = [ray.get(engine.generate_greedy.remote([encode(tok, p.render(q.question))], q.max_new_tokens,
                                                       ["\nQuestion:"]), timeout=300) for q, p in probe]
    finally:
        ray.get(engine.shutdown.remote(), timeout=60)
        ray.kill(engine)
    assert table.schema == RECORD_SCHEMA and table.num_rows == 4 * len(DEFAULT_PROMPTS) == stats["pairs"]
    recs = table.to_pylist()
    assert sorted((r["query_id"], r["prompt_id"]) for r in recs) == sorted(
        (q.query_id, p.prompt_id) for q in queries for p in DEFAULT_PROMPTS)
    for r in recs:
        assert r["response_tokens"] <= (6 if r["dataset"] == "a" else 10)
        assert (r["extracted"], r["correct"]) == score(r["text"], r["reference"])
        assert r["prompt_name"] == DEFAULT_PROMPTS[r["prompt_id"]].name
    assert stats["generated_tokens"] == sum(r["response_tokens"] for r in recs) > 0
    by_pair = {(r["query_id"], r["prompt_id"]): r["text"] for r in recs}
    for (q, p), batch in zip(probe, alone):
        text = cut_at_stop(tok.decode(batch.column("response_token_ids")[0].as_py(), skip_special_tokens=True))
        assert by_pair[(q.query_id, p.prompt_id)] == text
    assert len({by_pair[(q.query_id, p.prompt_id)] for q, p in probe}) == 2  # the probe can tell pairs apart


@pytest.mark.slow
def test_eval_on_a_query_file_end_to_end(trained, tmp_path):
    """`oirl prompt-oirl eval --queries FILE` on the tiny model: every prompt is generated for every row, and all
    rows are evaluated."""
    from tests.conftest import in_loopback_namespace

    if not in_loopback_namespace():
        pytest.skip("starts Ray: run the suite as `deploy/loopback.sh python -m pytest`")
    root, _ = trained
    write_jsonl(arithmetic_rows(3, seed=11), tmp_path / "new.jsonl")
    proc = subprocess.run(oirl_cmd() + ["prompt-oirl", "eval", "--selector", str(root / "sel"), "--queries",
                                        str(tmp_path / "new.jsonl"), "--out", str(tmp_path / "ev"), "model=tiny",
                                        "gsm8k_max_new_tokens=8", "kv_cache_gib=1"],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert summary["n_heldout_queries"] == 3
    assert pq.read_table(tmp_path / "ev" / "records.parquet").num_rows == 3 * len(DEFAULT_PROMPTS)
    rows = [json.loads(x) for x in (tmp_path / "ev" / "heldout_queries.jsonl").read_text().splitlines()]
    assert summary["selector_accuracy"] == pytest.approx(np.mean([r["selector_correct"] for r in rows]))
    assert Path(tmp_path / "ev" / "collect.json").is_file()


def test_stored_prompt_sets_are_checked():
    from oirl.prompt_oirl.prompts import prompts_from_json, prompts_to_json

    rows = prompts_to_json(DEFAULT_PROMPTS)
    assert prompts_from_json(rows, "p.json") == DEFAULT_PROMPTS
    with pytest.raises(PromptSetError, match="p.json: prompt 1 has prompt_id=5; ids must be 0..P-1"):
        prompts_from_json([rows[0], dict(rows[1], prompt_id=5)], "p.json")
    with pytest.raises(PromptSetError, match=r"p.json: prompt 0 lacks \['suffix'\]"):
        prompts_from_json([{k: v for k, v in rows[0].items() if k != "suffix"}], "p.json")
    with pytest.raises(PromptSetError, match="a selector needs at least 2"):
        prompts_from_json(rows[:1], "p.json")
