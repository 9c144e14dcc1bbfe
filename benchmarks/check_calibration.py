"""Calibration of the on-policy check and the canary: how far the engine's and the learner's logprobs of the sampled
tokens lie apart when nothing is wrong (kernel noise, fp32 or bf16 on both sides), and when something is: the
engine one update stale, one corrupted layer, or a different sampler (temperature 0.9 against the learner's 1.0).

For each case it reports, over every sampled token: the fraction with |engine - learner| above each tolerance of a
grid, the mean and max |diff|, and the k3 estimate of KL(engine || learner) on the sampled tokens (the same
statistic as rollout/mismatch_k3_kl). Thresholds belong between the noise row and the fault rows.

    deploy/loopback.sh python3 -m benchmarks.check_calibration --model tiny --lr 3e-3
    deploy/loopback.sh python3 -m benchmarks.check_calibration --model smollm2-135m --lr 5e-6 --max-new-tokens 64

Writes benchmarks/results/check_calibration.json (one entry per model x dtype, merged into the file).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

TOLERANCES = (1e-3, 1e-2, 0.05, 0.1, 0.2, 0.5)
OUT = Path(__file__).resolve().parent / "results" / "check_calibration.json"


def compare(engine_lp: list[np.ndarray], learner_lp: list[np.ndarray]) -> dict:
    """Statistics of |engine - learner| over every token; k3 of KL(mu || pi) = E_mu[r - 1 - log r], r = pi / mu."""
    e = np.concatenate([np.asarray(x, dtype=np.float64) for x in engine_lp])
    lrn = np.concatenate([np.asarray(x, dtype=np.float64) for x in learner_lp])
    log_r = lrn - e
    diff = np.abs(log_r)
    out = {"tokens": int(diff.size), "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
           "mismatch_k3_kl": float(np.mean(np.exp(log_r) - 1 - log_r))}
    out.update({f"frac_over_{t:g}": float((diff > t).mean()) for t in TOLERANCES})
    return out


def main() -> None:
    import dataclasses

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from actors.rollout_worker import RolloutConfig, RolloutWorker
    from learner.group import LearnerGroup
    from learner.learner_worker import LearnerConfig
    from oirl.batch import add_column
    from oirl.config import ModelConfig
    from oirl.data import PromptDataset
    from oirl.models import resolve_model
    from oirl.weights import WeightUpdate, fingerprint, pack_bucket, plan_buckets

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--lr", type=float, default=3e-3, help="the learning rate of the one update (the recipe's)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--corrupt-scale", type=float, default=0.9, help="the corrupted layer's weights x this")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    path = str(resolve_model(ModelConfig(path=args.model)))
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=f"/tmp/oirl-calib-{time.time_ns()}")
    from transformers import AutoTokenizer

    from oirl.config import DataConfig

    source = "synthetic" if args.model == "tiny" else "gsm8k"
    data = DataConfig(source=source, prompts_per_iteration=args.prompts, max_rows=256)
    prompts = PromptDataset(data, AutoTokenizer.from_pretrained(path)).next_batch()
    ids, toks = [p.prompt_id for p in prompts], [p.token_ids for p in prompts]
    results = {}
    for dtype in args.dtypes.split(","):
        t0 = time.perf_counter()
        rcfg = RolloutConfig(samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens, num_cpus=1,
                             temperature=1.0)
        engine = ray.remote(RolloutWorker).options(num_cpus=1).remote(rcfg, path, dtype, 0, 0)
        hot = ray.remote(RolloutWorker).options(num_cpus=1).remote(dataclasses.replace(rcfg, temperature=0.9), path,
                                                                   dtype, 0, 1)
        lcfg = LearnerConfig(num_ranks=1, algorithm="grpo", kl_coef=0.0, lr=args.lr, num_cpus=1, timeout_s=1800,
                             forward_batch_size=8)
        learner = LearnerGroup(lcfg, path, dtype, 0, 1.0, f"calib-{dtype}", micro_batch=len(ids) * args.samples)

        def gen(eng, version, seed=0):
            return ray.get(eng.generate.remote(ids, toks, version, [seed + i for i in range(len(ids))]), timeout=1800)

        def learner_view(batch, learner=learner):
            seqs = [p + r for p, r in zip(batch.column("prompt_token_ids").to_pylist(),
                                          batch.column("response_token_ids").to_pylist())]
            plens = [len(p) for p in batch.column("prompt_token_ids").to_pylist()]
            return learner.call_rank0("logprobs", seqs, plens)

        def engine_view(batch):
            return batch.column("response_logprobs").to_pylist()

        def publish(model, version, engine=engine):
            named = [(n, p.detach()) for n, p in model.named_parameters()]
            packed = [pack_bucket(g, lambda n: np.empty(n, dtype=np.uint8)) for g in plan_buckets(named, 64 << 20)]
            buckets, buffers = [p[0] for p in packed], [p[1] for p in packed]
            for b, buf in zip(buckets, buffers):
                b.location = ray.put(buf)
            upd = WeightUpdate(version, "object_store", buckets, fingerprint(buckets, buffers),
                               sum(b.nbytes for b in buckets))
            ray.get(engine.load_weights.remote(upd), timeout=600)

        row = {}
        b0 = gen(engine, 0)
        row["noise"] = compare(engine_view(b0), learner_view(b0))
        b_hot = gen(hot, 0)
        row["sampler_temperature_0.9"] = compare(engine_view(b_hot), learner_view(b_hot))
        ray.get(hot.shutdown.remote(), timeout=120)

        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        layers = model.model.layers
        target = layers[len(layers) // 2].mlp.down_proj.weight
        clean = target.detach().clone()
        with torch.no_grad():
            target.mul_(args.corrupt_scale)
        publish(model, 0)
        b_bad = gen(engine, 0)
        row[f"corrupted_layer_x{args.corrupt_scale:g}"] = compare(engine_view(b_bad), learner_view(b_bad))
        with torch.no_grad():
            target.copy_(clean)
        publish(model, 0)  # the engine serves version 0 again

        rng = np.random.default_rng(0)
        rewards = rng.normal(size=b0.num_rows).astype(np.float32)
        learner.call_rank0("prepare", add_column(b0, "reward", rewards), 0)
        upd = learner.call_rank0("update")
        b_stale = gen(engine, 0, seed=100)  # the engine still serves version 0; the learner holds version 1
        row["stale_one_update"] = compare(engine_view(b_stale), learner_view(b_stale))
        changed = learner.call_rank0("full_state")
        with torch.no_grad():
            before = dict(model.named_parameters())
            moved = sum(int((torch.from_numpy(v).to(before[k[3:]].dtype) != before[k[3:]]).sum())
                        for k, v in changed.items() if k.startswith("lm.") and k[3:] in before)
            total = sum(p.numel() for p in model.parameters())
        row["stale_one_update"]["weights_changed_frac"] = moved / total
        row["update_grad_norm"] = upd.get("learner/grad_norm")
        row["seconds"] = time.perf_counter() - t0
        row["settings"] = {"lr": args.lr, "prompts": args.prompts, "samples": args.samples,
                           "max_new_tokens": args.max_new_tokens, "tolerances": list(TOLERANCES)}
        results[f"{args.model}/{dtype}"] = row
        print(json.dumps({f"{args.model}/{dtype}": row}, indent=1), flush=True)
        ray.get(engine.shutdown.remote(), timeout=120)
        learner.shutdown()
    ray.shutdown()
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.is_file() else {}
    merged.update(results)
    out.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
