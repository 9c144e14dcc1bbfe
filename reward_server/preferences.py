"""A real preference set from data we have: GSM8K questions, the reference solution as `chosen`, and a solution
sampled by the rollout actors (vLLM) whose final answer is wrong as `rejected`.

    build_gsm8k_preferences(cfg, out="prefs.parquet", num_questions=256, samples_per_question=2)
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)
_CALC = re.compile(r"<<[^>]*>>")


def clean_reference(answer: str) -> str:
    """GSM8K solutions carry calculator annotations '<<48/2=24>>'; drop them, keep the '#### N' line."""
    return _CALC.sub("", answer).strip()


def build_gsm8k_preferences(cfg: Any, out: str | Path, num_questions: int, samples_per_question: int = 2,
                            seed: int = 0) -> dict[str, Any]:
    """cfg: a RunConfig (model, rollout settings, data.path). Ray must be initialised."""
    import ray
    from transformers import AutoTokenizer

    from actors.rollout_worker import RolloutWorker
    from oirl.config import resolve_path
    from oirl.data import PromptDataset
    from oirl.models import resolve_model
    from reward_server.rules import gsm8k_reward

    model_path = str(resolve_model(cfg.model))
    tok = AutoTokenizer.from_pretrained(model_path)
    dataset = PromptDataset(cfg.data, tok)
    raw = [json.loads(line) for line in resolve_path(cfg.data.path).read_text().splitlines() if line.strip()]
    ids = list(range(min(num_questions, len(dataset))))
    rcfg = cfg.rollout.__class__(**{**cfg.rollout.__dict__, "samples_per_prompt": samples_per_question})
    engine = ray.remote(RolloutWorker).options(num_cpus=rcfg.num_cpus, num_gpus=rcfg.num_gpus).remote(
        rcfg, model_path, cfg.model.dtype, seed, 0)
    t0 = time.perf_counter()
    try:
        batch = ray.get(engine.generate.remote(ids, [dataset.token_ids[i] for i in ids], 0), timeout=rcfg.timeout_s)
    finally:
        ray.get(engine.shutdown.remote(), timeout=60)
        ray.kill(engine)
    gen_s = time.perf_counter() - t0
    rows: dict[str, list] = {"prompt_id": [], "prompt": [], "chosen": [], "rejected": []}
    seen = set()
    for pid, resp_ids in zip(batch.column("prompt_id").to_pylist(), batch.column("response_token_ids").to_pylist()):
        text = tok.decode(resp_ids, skip_special_tokens=True).strip()
        if not text or pid in seen or gsm8k_reward(text, dataset.references[pid]) >= 1.0:
            continue  # keep one wrong sample per question
        seen.add(pid)
        rows["prompt_id"].append(pid)
        rows["prompt"].append(raw[pid]["question"])
        rows["chosen"].append(clean_reference(raw[pid]["answer"]))
        rows["rejected"].append(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), out)
    return {"pairs": len(rows["prompt"]), "questions": len(ids), "samples": batch.num_rows,
            "generate_seconds": gen_s, "path": str(out)}
