"""`oirl prompt-oirl collect|train|select|eval` (each stage reads what the one before wrote).

    oirl prompt-oirl collect --out runs/poirl [gsm8k_queries=60 arithmetic_queries=240 ...]   # starts Ray + vLLM
    oirl prompt-oirl train   --records runs/poirl/records.parquet --out runs/poirl/selector [epochs=200 ...]
    oirl prompt-oirl select  --selector runs/poirl/selector --queries FILE.jsonl [--out picks.jsonl]  # no LLM call
    oirl prompt-oirl eval    --selector runs/poirl/selector --records runs/poirl/records.parquet --out DIR
    oirl prompt-oirl eval    --selector runs/poirl/selector --queries FILE.jsonl --out DIR [collect options]

`eval --queries` runs every prompt on the file's queries (starts Ray + vLLM, as collect) and evaluates on all of
them; without it, eval uses the selector's held-out queries of the training records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _options(cls: type, overrides: list[str], what: str) -> Any:
    from oirl.config import parse_overrides

    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in parse_overrides(overrides).items():
        if key not in fields:
            raise ValueError(f"unknown {what} option '{key}'; known: {', '.join(fields)}")
        kwargs[key] = type(fields[key].default)(value)
    return cls(**kwargs)


def _collect(cfg: Any, queries: list[Any], prompts: tuple, out: Path) -> dict[str, Any]:
    """Generate every (query, prompt) pair on one engine; write out/records.parquet and out/collect.json."""
    import pyarrow.parquet as pq
    import ray
    from transformers import AutoTokenizer

    from oirl.config import ModelConfig
    from oirl.driver import start_ray
    from oirl.models import resolve_model
    from oirl.prompt_oirl.collect import collect_records, start_engine
    from oirl.prompt_oirl.prompts import prompts_to_json

    model_path = str(resolve_model(ModelConfig(path=cfg.model)))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    started = start_ray("", 2)
    try:
        engine = start_engine(model_path, cfg.dtype, cfg.rollout())
        try:
            table, stats = collect_records(engine, queries, prompts, tokenizer, cfg.timeout_s)
        finally:
            try:
                ray.get(engine.shutdown.remote(), timeout=60)
            finally:
                ray.kill(engine)
    finally:
        if started:
            ray.shutdown()
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "records.parquet")
    (out / "prompts.json").write_text(json.dumps(prompts_to_json(prompts), indent=2) + "\n")
    stats.update({"config": dataclasses.asdict(cfg), "model_path": model_path, "records": str(out / "records.parquet"),
                  "accuracy_by_prompt": _accuracy_by_prompt(table)})
    (out / "collect.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _accuracy_by_prompt(table: Any) -> dict[str, dict[str, float]]:
    """Mean correctness per (dataset, prompt name): what collect found, before any selection."""
    acc: dict[str, dict[str, list[bool]]] = {}
    for ds, name, ok in zip(*(table.column(c).to_pylist() for c in ("dataset", "prompt_name", "correct"))):
        acc.setdefault(ds, {}).setdefault(name, []).append(ok)
    return {ds: {n: sum(v) / len(v) for n, v in d.items()} for ds, d in acc.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="oirl prompt-oirl", description="Prompt-OIRL: offline per-query prompt "
                                                                           "selection (arXiv 2309.06553)")
    sub = parser.add_subparsers(dest="stage", required=True)
    p_col = sub.add_parser("collect", help="run every prompt on every query (greedy) and log (query, prompt, correct)")
    p_col.add_argument("--out", required=True, help="folder for records.parquet, prompts.json, collect.json")
    p_tr = sub.add_parser("train", help="train the reward model on the training queries' records")
    p_tr.add_argument("--records", required=True)
    p_tr.add_argument("--out", required=True, help="selector folder")
    p_sel = sub.add_parser("select", help="the best prompt per query by the reward model (no LLM call)")
    p_sel.add_argument("--selector", required=True)
    p_sel.add_argument("--queries", required=True, help="GSM8K-format JSONL (question, answer)")
    p_sel.add_argument("--out", help="JSONL of picks (default: stdout)")
    p_ev = sub.add_parser("eval", help="selector vs best single prompt vs oracle on held-out queries")
    p_ev.add_argument("--selector", required=True)
    p_ev.add_argument("--records", help="records of collect (evaluates the selector's held-out queries)")
    p_ev.add_argument("--queries", help="GSM8K-format JSONL: run every prompt on it and evaluate on all its rows")
    p_ev.add_argument("--out", required=True, help="folder for eval.json and heldout_queries.jsonl")
    p_ev.add_argument("--results", help="also write the summary here (e.g. benchmarks/results/prompt_oirl.json)")
    args, rest = parser.parse_known_args(argv)
    try:
        return _run(args, rest)
    except (ValueError, FileNotFoundError) as e:  # DatasetError, PromptSetError, bad options: name the fix
        print(f"oirl prompt-oirl {args.stage}: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    import pyarrow.parquet as pq

    from oirl.prompt_oirl.collect import CollectConfig
    from oirl.prompt_oirl.evaluate import evaluate, read_queries, write_eval
    from oirl.prompt_oirl.prompts import DEFAULT_PROMPTS, arithmetic_rows, write_jsonl
    from oirl.prompt_oirl.selector import PromptSelector, SelectorConfig, train_selector

    if args.stage == "collect":
        cfg = _options(CollectConfig, rest, "collect")
        out = Path(args.out)
        queries = []
        if cfg.gsm8k_queries:
            queries += read_queries(cfg.gsm8k_path, "gsm8k", cfg.gsm8k_max_new_tokens, cfg.gsm8k_queries)
        if cfg.arithmetic_queries:
            path = write_jsonl(arithmetic_rows(cfg.arithmetic_queries, cfg.arithmetic_seed), out / "arithmetic.jsonl")
            queries += read_queries(str(path), "arithmetic", cfg.arithmetic_max_new_tokens)
        if not queries:
            raise ValueError("gsm8k_queries=0 and arithmetic_queries=0: nothing to collect")
        stats = _collect(cfg, queries, DEFAULT_PROMPTS, out)
        print(json.dumps({k: stats[k] for k in ("pairs", "generate_seconds", "gen_tokens_per_s",
                                                  "accuracy_by_prompt")}, indent=2))
        return 0
    if args.stage == "train":
        from oirl.prompt_oirl.prompts import prompts_from_json

        cfg = _options(SelectorConfig, rest, "train")
        records_path = Path(args.records)
        if not records_path.is_file():
            raise FileNotFoundError(f"--records {records_path} not found; run `oirl prompt-oirl collect` first")
        prompts_file = records_path.parent / "prompts.json"
        prompts = (prompts_from_json(json.loads(prompts_file.read_text()), str(prompts_file))
                   if prompts_file.is_file() else DEFAULT_PROMPTS)
        meta = train_selector(pq.read_table(records_path), prompts, cfg, args.out)
        print(json.dumps({"heldout": meta["metrics"]["heldout"], "train_queries": len(meta["train_queries"]),
                          "heldout_queries": len(meta["heldout_queries"]),
                          "best_single_prompt": prompts[meta["best_single_prompt"]].name}, indent=2))
        return 0
    if rest and not (args.stage == "eval" and args.queries):
        raise ValueError(f"unknown arguments {rest}; only collect, train and `eval --queries` take key=value options")
    selector = PromptSelector.load(args.selector)
    if args.stage == "select":
        queries = read_queries(args.queries, Path(args.queries).stem, 0)
        scores = selector.scores([q.question for q in queries])
        lines = [json.dumps({"query_id": q.query_id, "question": q.question, "prompt_id": int(s.argmax()),
                             "prompt_name": selector.prompts[int(s.argmax())].name,
                             "scores": [round(float(x), 4) for x in s]}) for q, s in zip(queries, scores)]
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        else:
            print("\n".join(lines))
        return 0
    out = Path(args.out)
    if args.queries:  # a new query file: every prompt is run on it, every row is held out
        cfg = _options(CollectConfig, rest, "eval --queries")
        queries = read_queries(args.queries, "queries", cfg.gsm8k_max_new_tokens)
        _collect(cfg, queries, selector.prompts, out)
        records = pq.read_table(out / "records.parquet")
        ids = [q.query_id for q in queries]
    elif args.records:
        records = pq.read_table(args.records)
        ids = list(selector.meta["heldout_queries"])
    else:
        raise ValueError("eval needs --records (the selector's held-out queries) or --queries FILE.jsonl")
    result = evaluate(records, selector, ids)
    result["summary"]["rm_heldout"] = selector.meta["metrics"]["heldout"]
    result["summary"]["rm_precision"] = selector.meta["metrics"]["heldout"]["precision"]
    result["summary"]["rm_recall"] = selector.meta["metrics"]["heldout"]["recall"]
    result["summary"]["rm_auc"] = selector.meta["metrics"]["heldout"]["auc"]
    collected = (out if args.queries else Path(args.records).parent) / "collect.json"
    if collected.is_file():  # how the records were made: model, budgets, generation speed
        stats = json.loads(collected.read_text())
        result["summary"]["collection"] = {k: stats[k] for k in ("pairs", "queries", "prompts", "generate_seconds",
                                                                 "generated_tokens", "prompt_tokens",
                                                                 "gen_tokens_per_s", "config", "accuracy_by_prompt")}
    path = write_eval(result, out)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(path.read_text())
    s = result["summary"]
    print(json.dumps({k: s[k] for k in ("n_heldout_queries", "selector_accuracy", "best_single_prompt_accuracy",
                                        "oracle_accuracy", "rm_precision", "rm_recall", "rm_auc")}, indent=2))
    return 0
