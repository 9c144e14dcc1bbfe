"""Evaluate: on held-out queries, accuracy of the selector vs the best single prompt vs the oracle.

- selector: the prompt the reward model rates best for the query (no LLM call to choose); correct if that prompt's
  logged greedy answer was right.
- best single prompt: ONE prompt for every query, the one most accurate on the training queries.
- oracle: any prompt of the set answered correctly (the ceiling a per-query choice can reach).

Every accuracy is a mean over per-query rows that are stored (``heldout_queries.jsonl``), so anyone can recompute
it from them (``accuracies_from_rows``). 95% intervals are Wilson score intervals for a binomial proportion
(Wilson 1927), which stay inside [0, 1] and behave at accuracies near 0 and 1, unlike the normal approximation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from oirl.metrics import wilson_interval
from oirl.prompt_oirl.collect import Query
from oirl.prompt_oirl.selector import PromptSelector, check_records


def read_queries(path: str, dataset: str, max_new_tokens: int, max_rows: int = 0) -> list[Query]:
    """GSM8K-format JSONL (question, answer ending in '#### <number>'); a bad row is an error naming the line and
    field (oirl.data.read_gsm8k). An optional 'kind' field labels the row for per-kind results."""
    from oirl.config import resolve_path
    from oirl.data import read_gsm8k

    rows = read_gsm8k(path, max_rows)
    lines = [json.loads(x) for x in resolve_path(path).read_text().splitlines() if x.strip()][: len(rows)]
    return [Query(f"{dataset}:{i}", dataset, i, q, ref, str(obj.get("kind", dataset)), max_new_tokens)
            for i, ((q, ref), obj) in enumerate(zip(rows, lines))]


def per_query_rows(records: pa.Table, selected: dict[str, int], best_single: int) -> list[dict[str, Any]]:
    """One row per query of ``selected``: which prompt each policy used and whether it was right."""
    outcome: dict[tuple[str, int], bool] = {}
    meta: dict[str, tuple[str, str]] = {}
    for qid, pid, ok, ds, kind in zip(*(records.column(c).to_pylist() for c in
                                        ("query_id", "prompt_id", "correct", "dataset", "kind"))):
        outcome[(qid, pid)] = ok
        meta[qid] = (ds, kind)
    rows = []
    for qid, pid in sorted(selected.items()):
        per_prompt = [outcome.get((qid, p)) for p in range(max(p for _, p in outcome) + 1)]
        if any(v is None for v in per_prompt):
            raise ValueError(f"query {qid}: records lack prompts {[p for p, v in enumerate(per_prompt) if v is None]};"
                             " every query needs a record for every prompt (rerun collect)")
        rows.append({"query_id": qid, "dataset": meta[qid][0], "kind": meta[qid][1], "selected_prompt": pid,
                     "selector_correct": per_prompt[pid], "best_single_prompt": best_single,
                     "best_single_correct": per_prompt[best_single], "oracle_correct": any(per_prompt),
                     "prompt_correct": per_prompt})
    return rows


def _acc(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    k = sum(bool(r[key]) for r in rows)
    lo, hi = wilson_interval(k, len(rows))
    return {"accuracy": k / len(rows) if rows else float("nan"), "ci95": [lo, hi], "correct": k}


def accuracies_from_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Selector, best-single and oracle accuracy with Wilson 95% intervals, from per-query rows alone."""
    sel, best, orc = (_acc(rows, k) for k in ("selector_correct", "best_single_correct", "oracle_correct"))
    diff = [int(r["selector_correct"]) - int(r["best_single_correct"]) for r in rows]
    return {"n_heldout_queries": len(rows),
            "selector_accuracy": sel["accuracy"], "selector_accuracy_ci95": sel["ci95"],
            "best_single_prompt_accuracy": best["accuracy"], "best_single_prompt_accuracy_ci95": best["ci95"],
            "oracle_accuracy": orc["accuracy"], "oracle_accuracy_ci95": orc["ci95"],
            # Paired: on how many queries the selector wins / loses against the best single prompt.
            "selector_wins": sum(d > 0 for d in diff), "selector_losses": sum(d < 0 for d in diff)}


def evaluate(records: pa.Table, selector: PromptSelector, query_ids: list[str]) -> dict[str, Any]:
    """Accuracies on ``query_ids`` (held out from the selector's training) overall and per dataset, plus the
    per-query rows they come from."""
    check_records(records, len(selector.prompts), "records")
    trained_on = set(selector.meta["train_queries"]) & set(query_ids)
    if trained_on:
        raise ValueError(f"{len(trained_on)} evaluation queries (e.g. {sorted(trained_on)[0]}) were used to train "
                         "the selector; evaluate on its held-out queries or on a new query file")
    wanted = set(query_ids)
    known = set(records.column("query_id").to_pylist())
    if wanted - known:
        raise ValueError(f"queries {sorted(wanted - known)[:3]} have no records; collect them first")
    question = {}
    for qid, q in zip(records.column("query_id").to_pylist(), records.column("question").to_pylist()):
        if qid in wanted:
            question.setdefault(qid, q)
    order = sorted(question)
    selected = dict(zip(order, selector.select([question[q] for q in order])))
    rows = per_query_rows(records, selected, int(selector.meta["best_single_prompt"]))
    result = accuracies_from_rows(rows)
    result["by_dataset"] = {ds: accuracies_from_rows([r for r in rows if r["dataset"] == ds])
                            for ds in sorted({r["dataset"] for r in rows})}
    names = [p.name for p in selector.prompts]
    result["prompt_accuracy"] = {names[p]: float(np.mean([r["prompt_correct"][p] for r in rows]))
                                 for p in range(len(names))}
    result["selected_prompt_counts"] = {names[p]: sum(r["selected_prompt"] == p for r in rows)
                                        for p in range(len(names))}
    result["best_single_prompt"] = names[int(selector.meta["best_single_prompt"])]
    result["interval_method"] = "Wilson score, 95%"
    return {"summary": result, "rows": rows}


def write_eval(result: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout_queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result["rows"]))
    (out / "eval.json").write_text(json.dumps(result["summary"], indent=2) + "\n")
    return out / "eval.json"
