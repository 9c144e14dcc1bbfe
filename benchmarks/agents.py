"""Multi-turn rollout throughput: what waiting for tools costs, and what one slow tool does with and without
per-episode advancement. One engine, in-process (no Ray), one run.

    python -m benchmarks.agents --out DIR [--quick]

SmolLM2-135M-Instruct fp32 (`--quick`: the tiny Llama), 8 prompts x 4 samples, EOS ignored so every turn is exactly
``turn_tokens`` long and every variant generates the same policy tokens:

- single_turn: `LLM.generate`, one response of turns x turn_tokens per sample (no environment);
- multi_turn: episodes of ``turns`` turns, the environment answering each turn at once with a short observation;
- slow_tool: the same, with a slow tool call in every turn, each in another prompt's episodes (at turn t the
  episodes of prompt t - 1 sleep ``slow_s`` seconds), advancing each episode on its own (oirl's rollout) and with a
  barrier per turn (every episode's next turn waits for every environment step of the round:
  `run_episodes(barrier=True)`): the barrier waits for a slow call in every round, oirl for the slowest episode.

Policy tokens per second of wall time (median of ``rounds`` after a warm-up round) for each, in DIR/agents.json.

    deploy/loopback.sh python -m benchmarks.agents --out DIR --learning [--seeds 0 1 2] [--iterations 16]

runs `oirl train --config configs/agent_smoke.yaml` once per seed and writes each iteration's tool calls per
episode, turns and reward to DIR/agents_learning.json and DIR/agents_learning.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from actors.agent.env import Environment, Step, register

WORKLOAD = {"model": "smollm2-135m", "prompts": 8, "samples": 4, "turns": 3, "turn_tokens": 48, "slow_s": 2.0,
            "rounds": 3}
QUICK = {"model": "tiny", "prompts": 2, "samples": 2, "turns": 2, "turn_tokens": 8, "slow_s": 0.5, "rounds": 1}


@register("bench-echo")
class BenchEnv(Environment):
    """Answers every turn with a short observation; at turn t, prompt t - 1's episodes sleep ``slow_s`` first."""

    slow_s = 0.0

    def __init__(self) -> None:
        self.row: dict[str, Any] = {}
        self.turn = 0

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        self.row = row
        return [{"role": "user", "content": row["question"]}]

    def step(self, text: str) -> Step:
        self.turn += 1
        if BenchEnv.slow_s and self.row["prompt_id"] == self.turn - 1 and self.row.get("slow"):
            time.sleep(BenchEnv.slow_s)
        return Step(f"result {self.turn}: 42", 0.0, False, {"tool_calls": 1})


def run(w: dict[str, Any]) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from actors.agent.episodes import agent_metrics, run_episodes
    from actors.rollout_worker import RolloutConfig, engine_kwargs
    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    path = str(resolve_model(ModelConfig(path=w["model"], tiny_hidden_size=64)))
    cfg = RolloutConfig(env="bench-echo", samples_per_prompt=w["samples"], max_new_tokens=w["turn_tokens"],
                        max_turns=w["turns"], max_observation_tokens=32, ignore_eos=True, max_model_len=1024)
    llm = LLM(**engine_kwargs(cfg, path, "float32", 0))  # as the rollout worker builds its engine
    tok = llm.get_tokenizer()
    questions = [f"Question {i}: add up the numbers 3, 5 and {i}, using the tool." for i in range(w["prompts"])]
    policy_tokens = w["prompts"] * w["samples"] * w["turns"] * w["turn_tokens"]

    def single() -> float:
        ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for q in questions]
        params = [SamplingParams(n=w["samples"], max_tokens=w["turns"] * w["turn_tokens"], ignore_eos=True,
                                 temperature=1.0, seed=i) for i in range(len(ids))]
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(x)) for x in ids], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        assert sum(len(c.token_ids) for o in outs for c in o.outputs) == policy_tokens
        return seconds

    def episodes(slow: bool, barrier: bool) -> float:
        BenchEnv.slow_s = w["slow_s"] if slow else 0.0
        rows = [{"prompt_id": i, "question": q, "answer": "", "slow": slow} for i, q in enumerate(questions)]
        t0 = time.perf_counter()
        table = run_episodes(llm, cfg, rows, list(range(len(rows))), 0, 0, barrier=barrier)
        seconds = time.perf_counter() - t0
        m = agent_metrics(table)
        assert round(m["rollout/policy_tokens_mean"] * table.num_rows) == policy_tokens, m
        return seconds

    variants = {"single_turn": single, "multi_turn": lambda: episodes(False, False),
                "slow_tool_per_episode": lambda: episodes(True, False),
                "slow_tool_barrier": lambda: episodes(True, True)}
    out: dict[str, Any] = {"workload": w, "policy_tokens": policy_tokens, "rounds": {}}
    for name, fn in variants.items():
        fn()  # warm-up
        times = [fn() for _ in range(w["rounds"])]
        out["rounds"][name] = times
        out[f"{name}_tokens_per_s"] = policy_tokens / statistics.median(times)
    base = out["single_turn_tokens_per_s"]
    out["multi_turn_vs_single"] = out["multi_turn_tokens_per_s"] / base
    out["slow_tool_per_episode_vs_barrier"] = (out["slow_tool_per_episode_tokens_per_s"]
                                               / out["slow_tool_barrier_tokens_per_s"])
    return out


def learning(out: Path, seeds: list[int], iterations: int) -> dict[str, Any]:
    """configs/agent_smoke.yaml trained once per seed (the real CLI, Ray included): per-iteration curves."""
    import subprocess
    import sys

    from oirl.config import REPO_ROOT

    keys = ("rollout/tool_calls_mean", "rollout/turns_mean", "reward/raw_mean", "kl/mean", "timing_s/iteration")
    runs: dict[str, Any] = {}
    for seed in seeds:
        run_dir = out / f"agent_smoke_seed{seed}"
        proc = subprocess.run([sys.executable, "-m", "oirl.cli", "train", "--config",
                               str(REPO_ROOT / "configs" / "agent_smoke.yaml"), "--out", str(run_dir), "--no-progress",
                               f"seed={seed}", f"iterations={iterations}"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"seed {seed}: oirl train failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs[str(seed)] = {k: [r[k] for r in rows] for k in keys}
    result = {"config": "configs/agent_smoke.yaml", "iterations": iterations, "seeds": seeds, "runs": runs}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for seed, r in runs.items():
        axes[0].plot(r["rollout/tool_calls_mean"], label=f"seed {seed}")
        axes[1].plot(r["reward/raw_mean"], label=f"seed {seed}")
    axes[0].set(title="tool calls per episode (at most 3 turns)", xlabel="iteration")
    axes[1].set(title="reward (call bonus)", xlabel="iteration")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "agents_learning.png", dpi=100)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--learning", action="store_true", help="the tool-call learning curves, one run per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=16)
    args = ap.parse_args()
    if args.learning:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        res = learning(out, args.seeds, args.iterations)
        (out / "agents_learning.json").write_text(json.dumps(res, indent=2) + "\n")
        for seed, r in res["runs"].items():
            calls = r["rollout/tool_calls_mean"]
            print(f"seed {seed}: tool calls per episode {calls[0]:.2f} -> {calls[-1]:.2f}")
        return 0
    result = run(dict(QUICK if args.quick else WORKLOAD))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agents.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("_per_s", "_vs_single", "_vs_barrier"))},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

