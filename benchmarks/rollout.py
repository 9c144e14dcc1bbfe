"""Rollout throughput: the RolloutWorker path vs raw vLLM `LLM.generate` vs transformers `generate`, one run.

    deploy/loopback.sh python -m benchmarks.rollout --out DIR [--quick] [--rounds 3]

Same model (SmolLM2-135M-Instruct fp32; `--quick`: the tiny Llama), the default job's first 8 GSM8K prompts as the
rollout builds them, 4 samples each, 128 new tokens with EOS ignored (every sample is exactly max_new_tokens long,
so the three do equal work), temperature 0.7, the same per-prompt seeds.

- oirl: a RolloutWorker Ray actor with the default job's rollout settings (one CPU, in-process engine); before each
  round after the first the engine loads a new weight version through its real load path (object-store buckets of
  the same weights, fingerprint checked), as in training. Timed from the driver: RPC and Arrow batch included.
- vLLM: `LLM.generate` in a separate process with the same engine settings and environment, no Ray.
- HF: transformers `generate` in a separate process, one thread per core the engine gets, left-padded batch.

Rounds after the first are "warm"; the medians over warm rounds are compared. DIR/rollout.json holds
oirl_tokens_per_s, vllm_tokens_per_s, hf_tokens_per_s, ratio_vs_vllm and every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

WORKLOAD = {"prompts": 8, "samples": 4, "max_new_tokens": 128, "temperature": 0.7, "model": "smollm2-135m"}
QUICK = {"prompts": 2, "samples": 2, "max_new_tokens": 16, "temperature": 0.7, "model": "tiny"}


def demo_config() -> Any:
    """The default job's config, reading only the rows the workload needs."""
    from oirl.config import REPO_ROOT, load_config

    return load_config(str(REPO_ROOT / "configs" / "demo.yaml"), ["data.max_rows=64", "data.max_prompt_tokens=1024"])


def workload_prompts(cfg: Any, model_dir: str, n: int) -> list[list[int]]:
    """The first n prompts of the default job's data section, tokenized as the rollout does."""
    from transformers import AutoTokenizer

    from oirl.data import PromptDataset

    return PromptDataset(cfg.data, AutoTokenizer.from_pretrained(model_dir)).token_ids[:n]


def rollout_config(cfg: Any, w: dict[str, Any]) -> Any:
    from dataclasses import replace

    return replace(cfg.rollout, samples_per_prompt=w["samples"], max_new_tokens=w["max_new_tokens"],
                   temperature=w["temperature"], ignore_eos=True)


def object_store_update(model_dir: str, version: int) -> Any:
    """The model folder's own tensors as a WeightUpdate over the object store (what a learner would publish)."""
    import numpy as np
    import ray

    from benchmarks.sync import folder_tensors
    from oirl.weights import WeightUpdate, fingerprint, pack_bucket, plan_buckets

    named = folder_tensors(model_dir)
    packed = [pack_bucket(g, lambda n: np.empty(n, dtype=np.uint8)) for g in plan_buckets(named, 256 << 20)]
    buckets, buffers = [p[0] for p in packed], [p[1] for p in packed]
    fp = fingerprint(buckets, buffers)
    for b, buf in zip(buckets, buffers):
        b.location = ray.put(buf)
    return WeightUpdate(version, "object_store", buckets, fp, sum(b.nbytes for b in buckets))


def run_oirl(model_dir: str, prompts: list[list[int]], rcfg: Any, rounds: int) -> list[dict[str, float]]:
    import ray

    from actors.rollout_worker import RolloutWorker
    from oirl.config import REPO_ROOT

    ray.init(address="local", include_dashboard=False, num_cpus=4, _temp_dir=f"/tmp/oirl-ray-{os.getpid()}",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}, log_to_driver=False)
    out = []
    try:
        engine = ray.remote(RolloutWorker).options(num_cpus=rcfg.num_cpus).remote(rcfg, model_dir, "float32", 0, 0)
        ray.get(engine.served.remote(), timeout=900)  # started
        for r in range(rounds):
            if r > 0:
                ray.get(engine.load_weights.remote(object_store_update(model_dir, r)), timeout=900)
            t0 = time.perf_counter()
            batch = ray.get(engine.generate.remote(list(range(len(prompts))), prompts, r,
                                                   [1000 + i for i in range(len(prompts))]), timeout=900)
            seconds = time.perf_counter() - t0
            tokens = sum(len(x) for x in batch.column("response_token_ids").to_pylist())
            out.append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
        ray.get(engine.shutdown.remote(), timeout=60)
    finally:
        ray.shutdown()
    return out


def child_vllm(spec: dict[str, Any]) -> list[dict[str, float]]:
    """Raw vLLM with the rollout actor's engine settings (the environment it sets, the same LLM arguments)."""
    w, rcfg = spec["workload"], spec["rollout"]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(rcfg["kv_cache_gib"])))))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", rcfg["cpu_threads_bind"])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if rcfg["in_process_engine"] else "1"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs: dict[str, Any] = dict(model=spec["model"], tokenizer=spec["model"], dtype="float32", seed=0,
                                  enforce_eager=True, enable_prefix_caching=True)
    if rcfg["max_num_seqs"]:  # 0: vLLM's default, as the actor leaves it (actors.rollout_worker.engine_kwargs)
        kwargs["max_num_seqs"] = rcfg["max_num_seqs"]
    if rcfg["in_process_engine"]:
        kwargs["distributed_executor_backend"] = "uni"
    llm = LLM(**kwargs)
    params = [SamplingParams(n=w["samples"], temperature=w["temperature"], max_tokens=w["max_new_tokens"],
                             logprobs=0, seed=1000 + i, ignore_eos=True) for i in range(len(spec["prompts"]))]
    out = []
    try:
        for _ in range(spec["rounds"]):
            t0 = time.perf_counter()
            res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            tokens = sum(len(c.token_ids) for o in res for c in o.outputs)
            out.append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
    finally:
        llm.llm_engine.engine_core.shutdown()
    return out


def child_hf(spec: dict[str, Any]) -> list[dict[str, float]]:
    """transformers generate, left-padded batch of every sample, as many threads as the engine has cores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    w = spec["workload"]
    torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [p for p in spec["prompts"] for _ in range(w["samples"])]
    width = max(len(p) for p in rows)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=w["temperature"],
                             max_new_tokens=w["max_new_tokens"], min_new_tokens=w["max_new_tokens"], pad_token_id=pad)
    seconds = time.perf_counter() - t0
    tokens = int(out.shape[1] - width) * len(rows)
    return [{"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}]


def in_child(kind: str, spec: dict[str, Any], out_dir: Path) -> list[dict[str, float]]:
    spec_file, result_file = out_dir / f"{kind}_spec.json", out_dir / f"{kind}_rounds.json"
    spec_file.write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "benchmarks.rollout", "--child", kind, "--spec", str(spec_file), "--out",
                    str(result_file)], check=True, timeout=3600)
    return json.loads(result_file.read_text())


def warm_median(rounds: list[dict[str, float]]) -> float:
    warm = rounds[1:] or rounds
    return statistics.median(r["tokens_per_s"] for r in warm)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        rounds = child_vllm(spec) if args.child == "vllm" else child_hf(spec)
        Path(args.out).write_text(json.dumps(rounds))
        return 0

    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    w = QUICK if args.quick else WORKLOAD
    rounds = 2 if args.quick else args.rounds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = str(resolve_model(ModelConfig(path=w["model"])))
    cfg = demo_config()
    prompts = workload_prompts(cfg, model_dir, w["prompts"])
    rcfg = rollout_config(cfg, w)
    t0 = time.perf_counter()
    oirl_rounds = run_oirl(model_dir, prompts, rcfg, rounds)
    spec = {"model": model_dir, "prompts": prompts, "workload": w, "rounds": rounds, "rollout": asdict(rcfg),
            "threads": max(1, int(rcfg.num_cpus))}
    vllm_rounds = in_child("vllm", spec, out)
    hf_rounds = in_child("hf", spec, out)
    result = {
        "quick": args.quick, "workload": w, "rounds": rounds, "machine": {"cpus": os.cpu_count()},
        "engine": {k: getattr(rcfg, k) for k in ("num_cpus", "cpu_threads_bind", "in_process_engine", "kv_cache_gib")},
        "oirl_tokens_per_s": warm_median(oirl_rounds), "vllm_tokens_per_s": warm_median(vllm_rounds),
        "hf_tokens_per_s": warm_median(hf_rounds),
        "oirl_rounds": oirl_rounds, "vllm_rounds": vllm_rounds, "hf_rounds": hf_rounds,
        "seconds_total": time.perf_counter() - t0,
        "note": "tokens/s of generated tokens, EOS ignored (equal work); medians over rounds after the first (HF: its "
                "one round); oirl rounds after the first follow a real weight load (object store, fingerprinted)",
    }
    result["ratio_vs_vllm"] = result["oirl_tokens_per_s"] / result["vllm_tokens_per_s"]
    (out / "rollout.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"oirl {result['oirl_tokens_per_s']:.0f} tok/s, vLLM {result['vllm_tokens_per_s']:.0f}, "
          f"HF {result['hf_tokens_per_s']:.0f}; oirl/vLLM {result['ratio_vs_vllm']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
