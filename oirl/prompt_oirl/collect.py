"""Collect: run every candidate prompt on every query through the rollout actors and log (query, prompt, correct).

Decoding is greedy (temperature 0, one sample), so correctness is a property of the (query, prompt) pair and the
records can be reused offline as often as needed: that is the premise of Prompt-OIRL. A response is cut at the
prompt set's stop strings (few-shot formats otherwise go on to invent the next "Question:") and scored with the
project's GSM8K final-answer rule (reward_server/rules.py: the number after the last '####', else the last number).

    engine = start_engine(cfg)                                      # a GreedyRolloutWorker Ray actor
    table = collect_records(engine, queries, DEFAULT_PROMPTS, tokenizer, cfg.timeout_s)

Record columns (one row per query x prompt): query_id, dataset, row, kind, question, reference, prompt_id,
prompt_name, text, extracted (null when no number), correct, response_tokens, finish_reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from actors.rollout_worker import RolloutConfig, RolloutWorker
from oirl.prompt_oirl.prompts import PromptSpec

logger = logging.getLogger(__name__)

STOP = ("\nQuestion:",)
"""Stop strings: a few-shot format's answer ends where the model starts the next example."""

RECORD_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("dataset", pa.string()), ("row", pa.int64()), ("kind", pa.string()),
    ("question", pa.string()), ("reference", pa.string()), ("prompt_id", pa.int64()), ("prompt_name", pa.string()),
    ("text", pa.string()), ("extracted", pa.float64()), ("correct", pa.bool_()), ("response_tokens", pa.int64()),
    ("finish_reason", pa.string()),
])


@dataclass(frozen=True)
class Query:
    query_id: str
    """'<dataset>:<row>', unique over all datasets of one collection."""
    dataset: str
    """Which query file it came from (e.g. 'gsm8k', 'arithmetic')."""
    row: int
    """0-based row in that file."""
    question: str
    reference: str
    """The final answer (the text after '####')."""
    kind: str
    """A finer label for reading results (the arithmetic form, or the dataset name)."""
    max_new_tokens: int
    """Generation budget of this query's dataset."""


class GreedyRolloutWorker(RolloutWorker):
    """The project's rollout actor (same engine, same start-up) with one more RPC: greedy generation with stop
    strings and a per-call token budget, which Prompt-OIRL needs and PPO must not have (it samples)."""

    def generate_greedy(self, prompt_token_ids: list[list[int]], max_tokens: int,
                        stop: list[str]) -> pa.Table:
        """One greedy response per prompt; RolloutBatch rows with prompt_id = position in the call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from oirl.batch import make_rollout_batch

        params = SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, stop=list(stop), logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids], params,
                                 use_tqdm=False)
        resp = [list(o.outputs[0].token_ids) for o in outs]
        lps = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, r)] for o, r in zip(outs, resp)]
        return make_rollout_batch(list(range(len(outs))), [0] * len(outs), prompt_token_ids, resp, lps,
                                  [o.outputs[0].finish_reason or "length" for o in outs], self.version)


def encode(tokenizer: Any, text: str) -> list[int]:
    """The question as the engine sees it: one user turn of the chat template (as oirl/data.py builds prompts)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    return [int(t) for t in ids]


def cut_at_stop(text: str, stop: tuple[str, ...] = STOP) -> str:
    """The engine stops on a stop string but the decoded token ids may still hold part of it."""
    for s in stop:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


def score(text: str, reference: str) -> tuple[float | None, bool]:
    from reward_server.rules import extract_final_answer, parse_gsm8k_reference

    value, _ = extract_final_answer(text)
    return value, value is not None and abs(value - parse_gsm8k_reference(reference)) < 1e-6


def start_engine(model_path: str, dtype: str, rollout: RolloutConfig, seed: int = 0) -> Any:
    """One GreedyRolloutWorker actor (Ray must be initialised)."""
    import ray

    return (ray.remote(GreedyRolloutWorker).options(num_cpus=rollout.num_cpus, num_gpus=rollout.num_gpus)
            .remote(rollout, model_path, dtype, seed, 0))


def collect_records(engine: Any, queries: list[Query], prompts: tuple[PromptSpec, ...], tokenizer: Any,
                    timeout_s: float) -> tuple[pa.Table, dict[str, float]]:
    """Every (query, prompt) pair once, greedy. Returns the records (RECORD_SCHEMA) and generation stats."""
    from oirl.remote import get_all

    pairs = [(q, p) for q in queries for p in prompts]
    ids = [encode(tokenizer, p.render(q.question)) for q, p in pairs]
    budgets = sorted({q.max_new_tokens for q in queries})
    # One call per token budget, all submitted before any wait (the engine batches each call's prompts).
    groups = [[i for i, (q, _) in enumerate(pairs) if q.max_new_tokens == b] for b in budgets]
    t0 = time.perf_counter()
    refs = [engine.generate_greedy.remote([ids[i] for i in g], b, list(STOP)) for g, b in zip(groups, budgets)]
    batches = get_all(refs, timeout_s, "prompt-oirl collect", [f"budget {b}" for b in budgets],
                      hint="raise timeout_s or collect fewer queries")
    seconds = time.perf_counter() - t0
    cols: dict[str, list] = {f.name: [None] * len(pairs) for f in RECORD_SCHEMA}
    gen_tokens = 0
    for g, batch in zip(groups, batches):
        positions = batch.column("prompt_id").to_pylist()
        for pos, resp, finish in zip(positions, batch.column("response_token_ids").to_pylist(),
                                     batch.column("finish_reason").to_pylist()):
            i = g[pos]
            q, p = pairs[i]
            text = cut_at_stop(tokenizer.decode(resp, skip_special_tokens=True))
            value, correct = score(text, q.reference)
            gen_tokens += len(resp)
            for key, v in (("query_id", q.query_id), ("dataset", q.dataset), ("row", q.row), ("kind", q.kind),
                           ("question", q.question), ("reference", q.reference), ("prompt_id", p.prompt_id),
                           ("prompt_name", p.name), ("text", text), ("extracted", value), ("correct", correct),
                           ("response_tokens", len(resp)), ("finish_reason", finish)):
                cols[key][i] = v
    missing = [i for i, v in enumerate(cols["query_id"]) if v is None]
    assert not missing, f"the engine returned no response for pairs {missing[:5]}"
    stats = {"pairs": len(pairs), "queries": len(queries), "prompts": len(prompts), "generate_seconds": seconds,
             "generated_tokens": gen_tokens, "prompt_tokens": sum(len(x) for x in ids),
             "gen_tokens_per_s": gen_tokens / max(seconds, 1e-9)}
    logger.info("collected %d records in %.1fs (%.1f generated tokens/s)", len(pairs), seconds,
                stats["gen_tokens_per_s"])
    return pa.table(cols, schema=RECORD_SCHEMA), stats


@dataclass(frozen=True)
class CollectConfig:
    model: str = "smollm2-135m"
    """model.path of the LLM whose prompts are chosen: 'smollm2-135m', 'tiny' or an HF folder."""
    dtype: str = "float32"
    """Engine dtype (float32 on CPU)."""
    gsm8k_path: str = "data/gsm8k/train.jsonl"
    """GSM8K-format JSONL; a relative path is taken from the repository root."""
    gsm8k_queries: int = 100
    """First N rows of gsm8k_path (0 = none)."""
    gsm8k_max_new_tokens: int = 192
    """Token budget of a GSM8K answer."""
    arithmetic_queries: int = 320
    """Seeded synthetic arithmetic problems (0 = none)."""
    arithmetic_seed: int = 0
    """Seed of the arithmetic set."""
    arithmetic_max_new_tokens: int = 48
    """Token budget of an arithmetic answer."""
    kv_cache_gib: float = 2.0
    """KV cache of the engine (VLLM_CPU_KVCACHE_SPACE)."""
    cpu_threads_bind: str = "0-1"
    """VLLM_CPU_OMP_THREADS_BIND: one engine computing on both cores of the 2-core box."""
    max_num_seqs: int = 128
    """vLLM scheduler batch limit."""
    num_cpus: float = 1.0
    """Ray CPUs reserved for the engine actor."""
    timeout_s: float = 3600.0
    """Longest wait for one generate call."""

    def rollout(self) -> RolloutConfig:
        return RolloutConfig(samples_per_prompt=1, temperature=0.0, kv_cache_gib=self.kv_cache_gib,
                             cpu_threads_bind=self.cpu_threads_bind, max_num_seqs=self.max_num_seqs,
                             num_cpus=self.num_cpus, timeout_s=self.timeout_s)
