"""End to end: the default job's samples/s and seconds per phase beside TRL's GRPOTrainer on the same workload, in
one run, against a compute floor measured in the same run.

    deploy/loopback.sh python -m benchmarks.e2e --out DIR [--quick] [--only oirl|trl] [--iterations N]
    (or: deploy/loopback.sh oirl bench e2e [--quick] --out DIR)

Workload: the default job (configs/demo.yaml as it is when this runs: SmolLM2-135M, 8 GSM8K prompts x 4
samples, 128 new tokens, its temperature, lr and KL) in benchmark mode: EOS is ignored, so every sample is exactly
max_new_tokens long on both sides. `--quick`: the tiny model, 2 prompts x 2 samples, 16 tokens, 2 iterations.

- oirl: the real `oirl train` CLI: the default job as it is (PPO; mixed precision), GRPO in fp32 (KL in the loss,
  one step per batch) and, without --quick, PPO in the other precision; seconds per phase come from the run's
  metrics.jsonl (timing_s/*).
- TRL: TRL's GRPOTrainer in its own virtual environment (benchmarks/trl_env.sh builds it once: the same torch CPU
  build and transformers as this environment), run by benchmarks/trl_runner.py on the same prompts (the ones the
  oirl run drew, in its order, chat-formatted by the same template: the runner checks the token ids), the same
  reward function, HF generate, one optimizer step per generation batch. Two layouts: one process with a thread
  per core, and one process per core under torchrun (DDP over gloo), each with its share of the prompts; each in
  fp32 and with bf16=True (TRL's mixed precision; --quick: fp32 only). TRL 1.16 has no PPO trainer; the JSON says so.
- Floor: fp32 matmul GFLOP/s measured here with the model's linear-layer shapes, and the FLOPs one iteration must
  do over its real token counts (no padding): generation forward (each prompt prefilled once per group, then each
  sampled token), a reference forward and a policy forward + backward (3x a forward) over every sample's prompt +
  response. Linear layers (lm_head only where logits are needed) plus causal attention scores; norms, softmax and
  the optimizer are left out, so the floor is a lower bound.

Medians over the iterations after the first. oirl's iteration time leaves out its checkpoint phase (the driver
always saves the last iteration; TRL here saves nothing); that phase is reported on its own.
DIR/e2e.json: oirl_samples_per_s, trl_samples_per_s (TRL's fastest configuration of all measured), ratio_vs_trl,
ratio_vs_trl_fp32, ratio_vs_trl_same_precision, algorithm, precision, sync_share, floor_seconds, iteration_seconds,
<phase>_seconds, and every run's details; DIR/e2e.png: seconds per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from oirl.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"
BENCH_MODE = ["rollout.ignore_eos=true"]  # every sample runs to max_new_tokens: equal work on both sides
QUICK = ["model.path=tiny", "data.prompts_per_iteration=2", "rollout.samples_per_prompt=2",
         "rollout.max_new_tokens=16", "learner.num_minibatches=1", "data.max_rows=64", "data.max_prompt_tokens=1024"]
# The learner's precision: fp32 throughout, or a mixed-precision update (bf16 autocast over fp32 master weights);
# the engine, the reference, the on-policy check and the published weights stay fp32 in both (a bf16 reference
# beside an fp32 policy is refused: its KL measures rounding).
PRECISION = {"fp32": ["learner.update_autocast="],
             "mixed_precision": ["learner.update_autocast=bfloat16"]}
# Besides the default job (configs/demo.yaml as it is): GRPO in fp32 with one optimizer step per batch as TRL's
# GRPOTrainer takes here (so the old logprobs come from the update's own forward: learner.old_logprobs=auto), and
# PPO in the precision the default job does not use (not in --quick).
GRPO = ["learner.algorithm=grpo", "learner.kl_in_loss=true", "learner.num_minibatches=1", *PRECISION["fp32"]]
# bf16 end to end, as a GPU runs: engine, learner weights (DeepSpeed keeps fp32 master weights) and reference in
# bf16, the rollout correction on (learner.rollout_correction=tis, the default). The on-policy check's thresholds
# are this job's measured bf16 noise at its temperature 0.7 (2.6-3.4% of tokens beyond 0.2, KL 2.4-2.8e-3 over 4
# iterations; docs/checks.md) with a margin of 2.3x and 2.1x; the canary scores at temperature 1 (noise 0-0.8%,
# KL 1.1e-3), so configs/gpu.yaml's canary thresholds hold. A stale reload is caught by the served digest.
BF16 = ["model.dtype=bfloat16", "learner.update_autocast=", "sync.on_policy_tolerance=0.2",
        "sync.on_policy_max_frac=0.08", "sync.max_mismatch_kl=0.006", "sync.canary_tolerance=0.2",
        "sync.canary_max_frac=0.02"]
PHASES = ("generate", "reward", "prepare", "update", "sync", "checkpoint")
# What each oirl run reports beside its speed: how far the engine's sampling distribution is from the learner's
# (a fast run whose checks were loosened until they pass is not a result).
MISMATCH = {"mismatch_k3_kl": "rollout/mismatch_k3_kl", "mismatch_ppl_ratio": "rollout/mismatch_ppl_ratio",
            "frac_over_tolerance": "rollout/engine_learner_logprob_frac_over_tol",
            "tolerance": "rollout/engine_learner_logprob_tolerance",
            "max_abs_diff": "rollout/engine_learner_logprob_max_abs_diff",
            "is_weight_mean": "learner/is_weight_mean", "is_truncated_frac": "learner/is_truncated_frac",
            "canary_k3_kl": "sync/canary_k3_kl"}
TRL_LAYOUTS = {"one_process": 1, "ddp_two_processes": 2}
TRL_PRECISIONS = ("fp32", "bf16")  # TrainingArguments(bf16=True): TRL's mixed precision


def precision_of(update_autocast: str, dtype: str = "float32") -> str:
    return "bf16" if dtype == "bfloat16" else "mixed_precision" if update_autocast else "fp32"


def oirl_runs(cfg: Any, quick: bool, only: list[str] | None = None) -> dict[str, list[str]]:
    """The oirl configurations this benchmark runs, the default job (``cfg``) first; ``only``: these names."""
    runs = {"default": [], "grpo": GRPO}
    if not quick or only:
        other = next(p for p in PRECISION if p != precision_of(cfg.learner.update_autocast, cfg.model.dtype))
        runs[f"ppo_{other}"] = PRECISION[other]
        if cfg.model.dtype != "bfloat16":
            runs["ppo_bf16"] = BF16
    if only:
        unknown = sorted(set(only) - set(runs))
        if unknown:
            raise SystemExit(f"--oirl-runs: unknown {unknown}; choose from {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in only}
    return runs


def trl_key(layout: str, precision: str) -> str:
    return layout if precision == "fp32" else f"{layout}_{precision}"


def warm(values: list[float]) -> float:
    """Median over the iterations after the first (all of them when there is one)."""
    return statistics.median(values[1:] or values)


# ---- the workload --------------------------------------------------------------------------------------------

def job_config(quick: bool, iterations: int) -> tuple[Any, list[str]]:
    from oirl.config import load_config

    overrides = [f"iterations={iterations}", *BENCH_MODE, *(QUICK if quick else [])]
    return load_config(str(DEMO), overrides), overrides


def drawn_prompts(cfg: Any, model_dir: str) -> list[list[dict[str, Any]]]:
    """Each iteration's prompts as the driver draws them (same dataset, seed and order)."""
    from transformers import AutoTokenizer

    from oirl.data import PromptDataset

    data = PromptDataset(cfg.data, AutoTokenizer.from_pretrained(model_dir))
    return [[{"text": data.texts[p.prompt_id], "reference": p.reference, "token_ids": p.token_ids}
             for p in data.next_batch()] for _ in range(cfg.iterations)]


# ---- compute floor -------------------------------------------------------------------------------------------

def model_dims(model_dir: str) -> dict[str, int]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d = {"hidden": c.hidden_size, "ffn": c.intermediate_size, "layers": c.num_hidden_layers,
         "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "head_dim": hd, "vocab": c.vocab_size}
    attn = d["heads"] * hd
    d["body_params"] = d["layers"] * (2 * d["hidden"] * attn + 2 * d["hidden"] * d["kv_heads"] * hd
                                      + 3 * d["hidden"] * d["ffn"])  # q, o, k, v, gate/up/down
    d["head_params"] = d["hidden"] * d["vocab"]
    return d


def linear_shapes(d: dict[str, int]) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of one decoder layer, and the lm_head."""
    attn, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    h, f = d["hidden"], d["ffn"]
    return [(h, attn), (h, kv), (h, kv), (attn, h), (h, f), (h, f), (f, h), (h, d["vocab"])]


def matmul_gflops(d: dict[str, int], threads: int, rows: int = 1024, seconds: float = 1.0, rounds: int = 5) -> float:
    """fp32 GFLOP/s of the model's linear shapes on `rows` tokens with `threads` threads: the best of `rounds` (on a
    shared machine others' load only lowers it, and the floor is a lower bound)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        pairs = [(torch.randn(rows, i, generator=g), torch.randn(o, i, generator=g)) for i, o in linear_shapes(d)]
        flops_per_pass = sum(2 * rows * w.shape[0] * w.shape[1] for _, w in pairs)
        for x, w in pairs:  # warm up
            torch.nn.functional.linear(x, w)
        results = []
        for _ in range(rounds):
            n, t0 = 0, time.perf_counter()
            while True:
                for x, w in pairs:
                    torch.nn.functional.linear(x, w)
                n += 1
                if time.perf_counter() - t0 >= seconds:
                    break
            results.append(n * flops_per_pass / (time.perf_counter() - t0) / 1e9)
        return max(results)
    finally:
        torch.set_num_threads(before)


def _attention(d: dict[str, int], first: int, last: int) -> float:
    """Causal attention scores + weighted values for query positions first..last (position t sees t keys)."""
    if last < first:
        return 0.0
    keys = (first + last) * (last - first + 1) / 2
    return 4.0 * d["layers"] * d["heads"] * d["head_dim"] * keys


def forward_flops(d: dict[str, int], prompt: int, response: int) -> float:
    """One forward over prompt + response tokens scoring the response (logits only where a response token is
    predicted)."""
    return 2.0 * d["body_params"] * (prompt + response) + 2.0 * d["head_params"] * response \
        + _attention(d, 1, prompt + response)


def iteration_flops(d: dict[str, int], prompts: list[int], samples: int, response: int) -> dict[str, float]:
    """FLOPs one iteration must do: generation (prefill once per prompt, then every sampled token but the last is
    fed back), a reference forward and a policy forward + backward over every sample."""
    gen = ref = 0.0
    for p in prompts:
        prefill = 2.0 * d["body_params"] * p + _attention(d, 1, p) + 2.0 * d["head_params"]
        decode = (response - 1) * 2.0 * (d["body_params"] + d["head_params"]) + _attention(d, p + 1, p + response - 1)
        gen += prefill + samples * decode
        ref += samples * forward_flops(d, p, response)
    return {"generate": gen, "reference_forward": ref, "policy_forward_backward": 3.0 * ref,
            "total": gen + 4.0 * ref}


# ---- oirl ----------------------------------------------------------------------------------------------------

def run_oirl(name: str, overrides: list[str], out: Path, prompts: list[list[dict[str, Any]]],
             response: int) -> dict[str, Any]:
    run_dir = out / "runs" / f"oirl-{name}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "oirl.cli", "train", "--config", str(DEMO), "--out", str(run_dir), "--no-progress",
           *overrides]
    print(f"e2e: oirl {name}: {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, timeout=4 * 3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"oirl train ({name}) failed with exit code {proc.returncode}; its log is above")
    rows = read_metrics(run_dir / "metrics.jsonl")
    shutil.copy(run_dir / "metrics.jsonl", out / f"oirl_{name}_metrics.jsonl")
    shutil.copy(run_dir / "config.json", out / f"oirl_{name}_config.json")
    run_cfg = json.loads((run_dir / "config.json").read_text())
    learner_cfg = run_cfg["learner"]
    algorithm = learner_cfg["algorithm"]
    shutil.rmtree(run_dir)  # checkpoints: GBs
    for it, (row, drawn) in enumerate(zip(rows, prompts)):
        want = sum(len(p["token_ids"]) for p in drawn) / len(drawn)
        if abs(row["rollout/prompt_tokens_mean"] - want) > 1e-6:
            raise RuntimeError(f"oirl {name} iteration {it}: prompt tokens mean {row['rollout/prompt_tokens_mean']} "
                               f"but the prompts handed to TRL average {want}: not the same workload")
    phases = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("timing_s/")})
    per_it = {p: [r.get(f"timing_s/{p}", 0.0) for r in rows] for p in phases}
    no_ckpt = [r["timing_s/iteration"] - r.get("timing_s/checkpoint", 0.0) for r in rows]
    samples = rows[0]["rollout/samples"]
    iteration = warm(no_ckpt)
    return {
        "algorithm": algorithm, "precision": precision_of(learner_cfg["update_autocast"], run_cfg["model"]["dtype"]),
        "overrides": overrides,
        "wall_seconds": wall, "iterations": len(rows),
        "samples_per_iteration": samples, "samples_per_s": samples / iteration, "iteration_seconds": iteration,
        "iteration_seconds_with_checkpoint": warm(per_it["iteration"]),
        "phase_seconds": {p: warm(v) for p, v in per_it.items() if p != "iteration"},
        "phase_seconds_per_iteration": per_it,
        "response_tokens_mean_per_iteration": [r["rollout/response_tokens_mean"] for r in rows],
        "prompt_tokens_mean_per_iteration": [r["rollout/prompt_tokens_mean"] for r in rows],
        "reward_mean_per_iteration": [r["reward/mean"] for r in rows],
        "gen_tokens_per_s": warm([r["perf/gen_tokens_per_s"] for r in rows]),
        "sync_share": warm(per_it["sync"]) / iteration,
        "completions_at_cap": all(abs(r["rollout/response_tokens_mean"] - response) < 1e-9 for r in rows),
        "checks": {"on_policy_checked": [r.get("rollout/on_policy_checked") for r in rows],
                   **{k: [r.get(m) for r in rows] for k, m in MISMATCH.items()}},
    }


# ---- TRL -----------------------------------------------------------------------------------------------------

def ensure_trl_venv(venv: Path) -> dict[str, Any]:
    """TRL's environment (benchmarks/trl_env.sh: pinned to this environment's torch, transformers and accelerate):
    checked, or built when missing and the network is there; its path, whether it was built now and how long."""
    env = {**os.environ, "OIRL_TRL_PYTHON": sys.executable}
    script = ["bash", str(REPO / "benchmarks" / "trl_env.sh")]
    check = subprocess.run([*script, "--check", str(venv)], env=env, capture_output=True, text=True, timeout=600)
    if check.returncode == 0:
        return {"path": str(venv), "built_now": False, "build_seconds": 0.0}
    if os.environ.get("OIRL_IN_LOOPBACK_NS") == "1":  # no network in here: pip would retry for minutes, then fail
        raise RuntimeError(f"{check.stderr.strip()}\n(building it downloads from PyPI, which this loopback-only "
                           "namespace cannot reach: build it outside deploy/loopback.sh, then rerun)")
    t0 = time.perf_counter()
    proc = subprocess.run([*script, str(venv)], env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"building TRL's environment in {venv} failed (benchmarks/trl_env.sh):\n"
                           f"{proc.stderr[-3000:]}")
    print(f"e2e: {proc.stdout.strip().splitlines()[-1]}", flush=True)
    return {"path": str(venv), "built_now": True, "build_seconds": time.perf_counter() - t0}


def trl_versions(venv: Path) -> dict[str, Any]:
    proc = subprocess.run([str(venv / "bin" / "python"), str(REPO / "benchmarks" / "trl_runner.py"), "--versions"],
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_trl(layout: str, procs: int, venv: Path, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    threads = max(1, cores // procs)
    spec_file, result = out / "trl_spec.json", out / f"trl_{layout}.json"
    spec_file.write_text(json.dumps(spec))
    runner = [str(REPO / "benchmarks" / "trl_runner.py"), "--spec", str(spec_file), "--out", str(result),
              "--threads", str(threads)]
    cmd = ([str(venv / "bin" / "python"), *runner] if procs == 1 else
           [str(venv / "bin" / "torchrun"), "--standalone", f"--nproc_per_node={procs}", *runner])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # nothing of this environment leaks into TRL's
    print(f"e2e: TRL {layout}: {procs} process(es) x {threads} thread(s)", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=out, timeout=4 * 3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"TRL {layout} failed with exit code {proc.returncode}; its log is above")
    r = json.loads(result.read_text())
    ranks = [json.loads(result.with_name(f"{result.stem}.rank{k}.json").read_text()) for k in range(procs)]
    steps = r["steps"]
    iteration = warm([s["seconds"] for s in steps])
    per_step = spec["prompts_per_step"] * spec["samples"]
    completions = [n for k in ranks for n in k["completion_lengths"]]
    return {
        "processes": procs, "threads_per_process": threads, "micro_batch": r["micro_batch"],
        "gradient_accumulation_steps": r["gradient_accumulation_steps"], "wall_seconds": wall,
        "steps": len(steps), "samples_per_step": per_step, "iteration_seconds": iteration,
        "samples_per_s": per_step / iteration,
        "phase_seconds": {p: warm([s[p] for s in steps]) for p in ("generate", "score", "update")},
        "step_seconds": [s["seconds"] for s in steps], "steps_detail": steps,
        "completion_lengths_min_max": [min(completions), max(completions)], "completions": len(completions),
        "completions_at_cap": all(n == spec["max_new_tokens"] for n in completions),
        "prompt_tokens_mean": statistics.fmean(n for k in ranks for n in k["prompt_lengths"]),
        "reward_mean_per_step": r["rewards"], "loss_per_step": r["losses"],
    }


# ---- report --------------------------------------------------------------------------------------------------

def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, dict[str, float], float]] = []
    for name, r in result.get("oirl", {}).items():
        ph = {p: r["phase_seconds"][p] for p in (*PHASES, "generate_wait") if p in r["phase_seconds"]}
        ph.pop("checkpoint", None)  # not in iteration_seconds
        ph["other"] = max(0.0, r["iteration_seconds"] - sum(ph.values()))
        bars.append((f"oirl {name}\n{r['precision'].replace('_', ' ')}", ph, r["iteration_seconds"]))
    for r in result.get("trl", {}).values():
        if "phase_seconds" in r:
            bars.append((f"TRL GRPO {r.get('precision', 'fp32')}\n{r['processes']} proc x {r['threads_per_process']} thr",
                         {"generate": r["phase_seconds"]["generate"], "reward + reference": r["phase_seconds"]["score"],
                          "update": r["phase_seconds"]["update"]}, r["iteration_seconds"]))
    f = result["floor_seconds_per_phase"]
    bars.append(("compute floor", {"generate": f["generate"], "prepare": f["prepare"], "update": f["update"]},
                 result["floor_seconds"]))
    colors = {"generate": "#4c72b0", "reward": "#dd8452", "reward + reference": "#da8bc3", "prepare": "#55a868",
              "update": "#c44e52", "sync": "#8172b3", "generate_wait": "#937860", "other": "#bbbbbb"}
    fig, ax = plt.subplots(figsize=(1.9 * len(bars) + 2, 4.8))
    seen: set[str] = set()
    for i, (_, phases, total) in enumerate(bars):
        bottom = 0.0
        for phase, sec in phases.items():
            ax.bar(i, sec, bottom=bottom, color=colors.get(phase, "#999999"),
                   label=None if phase in seen else phase, edgecolor="white", linewidth=0.5)
            seen.add(phase)
            bottom += sec
        ax.text(i, bottom, f"{total:.3g} s", ha="center", va="bottom", fontsize=8)  # phases are medians each
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("seconds per iteration (median after the first)")
    w = result["workload"]
    ax.set_title(f"{w['model']}: {w['prompts']} prompts x {w['samples']} samples x {w['max_new_tokens']} tokens",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 prompts x 2 samples, 16 tokens")
    parser.add_argument("--iterations", type=int, default=0, help="iterations per run (default 4; --quick 2)")
    parser.add_argument("--only", choices=["oirl", "trl"], help="run one side only (the floor is always measured)")
    parser.add_argument("--trl-venv", default=os.environ.get("OIRL_TRL_VENV", "~/.cache/oirl/trl-venv"),
                        help="TRL's virtual environment (built on first use; env OIRL_TRL_VENV)")
    parser.add_argument("--trl-micro-batch", type=int, default=8, help="TRL's per-process micro-batch (rows)")
    parser.add_argument("--trl-precisions", nargs="+", choices=TRL_PRECISIONS,
                        help="TRL's precisions, each in every layout (default: fp32 and bf16; --quick: fp32)")
    parser.add_argument("--trl-layout", choices=sorted(TRL_LAYOUTS), help="run only this TRL layout")
    parser.add_argument("--oirl-runs", nargs="+", help="run only these oirl configurations (default, grpo, "
                        "ppo_fp32 or ppo_mixed_precision, ppo_bf16)")
    args = parser.parse_args(argv)

    from oirl.models import resolve_model

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    venv = Path(os.path.expanduser(args.trl_venv))
    trl_venv = ensure_trl_venv(venv) if args.only != "oirl" else None  # before the long runs: fail fast
    iterations = args.iterations or (2 if args.quick else 4)
    cfg, overrides = job_config(args.quick, iterations)
    model_dir = str(resolve_model(cfg.model))
    prompts = drawn_prompts(cfg, model_dir)
    n, per_prompt, response = cfg.data.prompts_per_iteration, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens
    dims = model_dims(model_dir)
    t_start = time.perf_counter()

    import torch
    import transformers

    cores = os.cpu_count() or 1
    gflops = matmul_gflops(dims, cores)
    gflops_1 = matmul_gflops(dims, 1) if cores > 1 else gflops
    flops = [iteration_flops(dims, [len(p["token_ids"]) for p in drawn], per_prompt, response) for drawn in prompts]
    fl = {k: warm([f[k] for f in flops]) for k in flops[0]}
    floor = {"generate": fl["generate"] / (gflops * 1e9), "prepare": fl["reference_forward"] / (gflops * 1e9),
             "update": fl["policy_forward_backward"] / (gflops * 1e9)}
    floor_seconds = fl["total"] / (gflops * 1e9)
    result: dict[str, Any] = {
        "quick": args.quick,
        "workload": {"model": cfg.model.path, "dtype": cfg.model.dtype, "prompts": n, "samples": per_prompt,
                     "max_new_tokens": response, "ignore_eos": True, "temperature": cfg.rollout.temperature,
                     "lr": cfg.learner.lr, "kl_coef": cfg.learner.kl_coef, "iterations": iterations,
                     "reward": cfg.reward.kind, "format_bonus": cfg.reward.format_bonus, "config": "configs/demo.yaml",
                     "overrides": overrides},
        "machine": {"cpus": cores, "platform": platform.platform(), "processor": platform.processor()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "matmul_gflops": gflops, "matmul_gflops_1_thread": gflops_1,
        "matmul_note": f"fp32 torch linear over the model's layer shapes, 1024 rows, {cores} threads (best of 5 x 1 s)",
        "tokens": {"response_tokens_per_sample": response,
                   "prompt_tokens_mean_per_iteration": [statistics.fmean(len(p["token_ids"]) for p in d)
                                                        for d in prompts]},
        "model_dims": dims,
        "flops_per_iteration": fl, "flops_per_iteration_each": flops,
        "floor_seconds": floor_seconds, "floor_seconds_per_phase": floor,
        "floor_note": "linear layers (lm_head where logits are needed) + causal attention scores over the real prompt "
                      "and response tokens; generation prefills each prompt once per group; norms, softmax, "
                      "optimizer and communication left out (a lower bound); / matmul_gflops",
    }

    if args.only != "trl":
        result["oirl"] = {}
        for name, extra in oirl_runs(cfg, args.quick, args.oirl_runs).items():
            r = run_oirl(name, overrides + extra, out, prompts, response)
            r["iteration_over_floor"] = r["iteration_seconds"] / floor_seconds
            r["phase_over_floor"] = {p: r["phase_seconds"].get(p, 0.0) / floor[p] for p in floor}
            result["oirl"][r["algorithm"] if name == "default" else name] = r

    if args.only != "oirl":
        result["trl_venv"] = trl_venv
        result["versions"]["trl_venv"] = trl_versions(venv)
        flat = [p for drawn in prompts for p in drawn]
        spec = {"model": model_dir, "rows": flat, "samples": per_prompt, "prompts_per_step": n,
                "max_new_tokens": response, "temperature": cfg.rollout.temperature, "lr": cfg.learner.lr,
                "beta": cfg.learner.kl_coef, "format_bonus": cfg.reward.format_bonus, "steps": iterations,
                "seed": cfg.seed, "work_dir": str(out / "runs"),
                "micro_batch": min(args.trl_micro_batch, n * per_prompt // max(TRL_LAYOUTS.values()))}
        layouts = {k: v for k, v in TRL_LAYOUTS.items() if args.trl_layout in (None, k)}
        precisions = args.trl_precisions or (["fp32"] if args.quick else list(TRL_PRECISIONS))
        result["trl"] = {}
        for precision in precisions:
            for layout, procs in layouts.items():
                key = trl_key(layout, precision)
                r = run_trl(key, procs, venv, {**spec, "bf16": precision == "bf16"}, out)
                r.update(layout=layout, precision=precision, iteration_over_floor=r["iteration_seconds"] / floor_seconds)
                result["trl"][key] = r
        result["trl_ppo"] = {"ran": False, "why": (
            f"TRL {result['versions']['trl_venv']['trl']} ships no PPO trainer (neither trl.PPOTrainer nor "
            "trl.experimental.ppo exists)")} if not result["versions"]["trl_venv"]["trl_has_ppo_trainer"] else {
            "ran": False, "why": "TRL has a PPO trainer, but this benchmark does not drive it yet"}
        # TRL's fastest configuration over every layout and precision measured: the one oirl is compared with
        best = max(result["trl"], key=lambda k: result["trl"][k]["samples_per_s"])
        result["trl_layout"] = best
        result["trl_samples_per_s"] = result["trl"][best]["samples_per_s"]
        result["trl_iteration_seconds"] = result["trl"][best]["iteration_seconds"]
        for precision in precisions:  # and the fastest of each precision
            result[f"trl_{precision}_samples_per_s"] = max(
                t["samples_per_s"] for t in result["trl"].values() if t["precision"] == precision)
        for r in result.get("oirl", {}).values():
            r["ratio_vs_trl"] = r["samples_per_s"] / result["trl_samples_per_s"]
            same = "fp32" if r["precision"] == "fp32" else "bf16"
            if f"trl_{same}_samples_per_s" in result:  # TRL in the same precision as this run
                r["ratio_vs_trl_same_precision"] = r["samples_per_s"] / result[f"trl_{same}_samples_per_s"]

    if "oirl" in result:
        default = next(iter(result["oirl"].values()))
        result.update({
            "algorithm": default["algorithm"], "precision": default["precision"],
            "oirl_samples_per_s": default["samples_per_s"],
            "iteration_seconds": default["iteration_seconds"], "sync_share": default["sync_share"],
            "phase_seconds": default["phase_seconds"], "iteration_over_floor": default["iteration_over_floor"],
            "phase_over_floor": default["phase_over_floor"],
            **{f"{p}_seconds": default["phase_seconds"].get(p, 0.0) for p in PHASES},
        })
        if "grpo" in result["oirl"]:
            result["oirl_grpo_samples_per_s"] = result["oirl"]["grpo"]["samples_per_s"]
        if "trl_samples_per_s" in result:
            result["ratio_vs_trl"] = result["oirl_samples_per_s"] / result["trl_samples_per_s"]
            for key in ("ratio_vs_trl_same_precision",):
                if key in default:
                    result[key] = default[key]
            if "trl_fp32_samples_per_s" in result:
                result["ratio_vs_trl_fp32"] = result["oirl_samples_per_s"] / result["trl_fp32_samples_per_s"]
            if "grpo" in result["oirl"]:
                result["ratio_vs_trl_grpo"] = result["oirl_grpo_samples_per_s"] / result["trl_samples_per_s"]
            if "ppo_bf16" in result["oirl"]:  # the default job in bf16 end to end
                result["ratio_vs_trl_bf16_job"] = result["oirl"]["ppo_bf16"]["ratio_vs_trl"]
    result["seconds_total"] = time.perf_counter() - t_start
    (out / "e2e.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "e2e.png")
    shutil.rmtree(out / "runs", ignore_errors=True)
    summary = {k: result[k] for k in ("oirl_samples_per_s", "oirl_grpo_samples_per_s", "trl_samples_per_s",
                                      "ratio_vs_trl", "ratio_vs_trl_fp32", "ratio_vs_trl_bf16_job",
                                      "iteration_seconds",
                                      "trl_iteration_seconds", "floor_seconds", "matmul_gflops") if k in result}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
