"""Held-out GSM8K evaluation: greedy accuracy and format rate, each with a 95% Wilson interval.

    python -m benchmarks.gsm8k_eval --model DIR|smollm2-135m|tiny --out FILE.json [--n 200] [--max-new-tokens 256]

The held-out questions are the last ``n`` rows of data/gsm8k/train.jsonl (shipped with the repository). A training run reported against
them sets ``data.max_rows`` to (rows - n) so its sampler can never draw them (``heldout_overrides`` gives the
override; benchmarks/gsm8k_algorithms.py uses it). Prompts are built exactly as the rollout builds them
(oirl.data.PromptDataset: the question, the '#### <number>' instruction, the model's chat template), decoded
greedily by vLLM, and scored with the reward server's GSM8K rule:

- accuracy: the final answer (the number after the last '####', else the last number) equals the reference;
- format rate: the response has a '#### <number>' line.

Per-question records (response, extracted answer, correct, formatted) are stored in the JSON, so every rate can be
recomputed from them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from oirl.metrics import wilson_interval

GSM8K_PATH = "data/gsm8k/train.jsonl"


def count_rows(path: str = GSM8K_PATH) -> int:
    from oirl.config import resolve_path

    resolved = resolve_path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"GSM8K not found at {resolved} (the repository ships it as "
                                "data/gsm8k/train.jsonl); held-out evaluation needs it")
    with open(resolved) as f:
        return sum(1 for line in f if line.strip())


def heldout_overrides(n: int, path: str = GSM8K_PATH) -> list[str]:
    """Overrides that keep a training run off the last ``n`` rows (the evaluation set)."""
    return [f"data.path={path}", f"data.max_rows={count_rows(path) - n}"]


def score_responses(responses: list[str], references: list[str]) -> dict[str, Any]:
    """Rates and intervals from per-question responses; the records it returns hold everything they came from."""
    from reward_server.rules import extract_final_answer, parse_gsm8k_reference

    records = []
    for i, (response, reference) in enumerate(zip(responses, references, strict=True)):
        value, formatted = extract_final_answer(response)
        target = parse_gsm8k_reference(reference)
        records.append({"index": i, "reference": target, "answer": value, "formatted": formatted,
                        "correct": value is not None and abs(value - target) < 1e-6, "response": response})
    n = len(records)
    correct = sum(r["correct"] for r in records)
    formatted = sum(r["formatted"] for r in records)
    return {"n": n, "accuracy": correct / n, "accuracy_ci95": wilson_interval(correct, n),
            "format_rate": formatted / n, "format_rate_ci95": wilson_interval(formatted, n), "records": records}


def heldout_prompts(model_dir: str, n: int, path: str = GSM8K_PATH) -> tuple[list[list[int]], list[str]]:
    """Token ids (as the rollout builds them) and reference answers of the last ``n`` GSM8K rows."""
    from transformers import AutoTokenizer

    from oirl.config import DataConfig
    from oirl.data import PromptDataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = PromptDataset(replace(DataConfig(), source="gsm8k", path=path, max_rows=0, max_prompt_tokens=1024),
                         tokenizer)
    if n > len(data.token_ids):
        raise ValueError(f"--n {n} is more than the {len(data.token_ids)} rows of {path}")
    return data.token_ids[-n:], data.references[-n:]


def evaluate(model_dir: str, n: int = 200, max_new_tokens: int = 256, path: str = GSM8K_PATH) -> dict[str, Any]:
    """Greedy vLLM decoding of the held-out prompts; returns score_responses(...) plus settings and seconds."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, os.cpu_count() or 1) - 1}")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, references = heldout_prompts(model_dir, n, path)
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, tokenizer=model_dir, dtype="float32", seed=0, enforce_eager=True)
    try:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()  # else the engine's /dev/shm segments outlive the process
    seconds = time.perf_counter() - t0
    responses = [o.outputs[0].text for o in outputs]
    result = score_responses(responses, references)
    result.update(model=model_dir, max_new_tokens=max_new_tokens, decoding="greedy", seconds=seconds,
                  heldout=f"last {n} rows of {path}",
                  generated_tokens=sum(len(o.outputs[0].token_ids) for o in outputs))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF folder, or a model name oirl resolves (smollm2-135m, tiny)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    model_dir = args.model if Path(args.model).is_dir() else str(resolve_model(ModelConfig(path=args.model)))
    result = evaluate(model_dir, args.n, args.max_new_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"accuracy {result['accuracy']:.3f} {result['accuracy_ci95']}  format {result['format_rate']:.3f}  "
          f"({result['n']} questions, {result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
