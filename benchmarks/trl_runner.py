"""TRL's side of `oirl bench e2e`: TRL's GRPOTrainer on the default job's workload, timed step by step.

Runs with the TRL virtual environment's python (benchmarks/trl_env.sh), one process or under torchrun (DDP over
gloo); it imports nothing of oirl but the pure reward rules (reward_server/rules.py: no Ray, vLLM or DeepSpeed).

    $VENV/bin/python benchmarks/trl_runner.py --spec SPEC.json --out RESULT.json --threads 2
    $VENV/bin/torchrun --standalone --nproc_per_node 2 benchmarks/trl_runner.py --spec ... --threads 1
    $VENV/bin/python benchmarks/trl_runner.py --versions     # versions and whether TRL has a PPO trainer

SPEC.json (written by benchmarks/e2e.py) holds the model folder, the prompts in the order oirl's run used them (the
user message, its reference answer and the token ids oirl's PromptDataset made of it), and the settings: samples per
prompt, prompts per step, max_completion_length, temperature, lr, beta, format bonus, steps, micro-batch, seed.

The workload matches the oirl run: one generation batch of prompts x samples per optimizer step (gradient
accumulation over micro-batches), completions forced to exactly max_completion_length tokens (min_new_tokens; EOS
cannot be sampled before the cap), HF generate (no vLLM), fp32, the same reward function on the same decoded text.
Each step's wall time comes from a TrainerCallback; generation and generate+score (reward, reference forward) from
timers around GRPOTrainer's own methods. Prompt ids as TRL tokenized them are checked against oirl's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def versions() -> dict:
    import importlib.util

    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    has_ppo = hasattr(trl, "PPOTrainer") or importlib.util.find_spec("trl.experimental.ppo") is not None
    heavy = sorted(m for m in ("ray", "vllm", "deepspeed") if importlib.util.find_spec(m) is not None)
    return {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__, "python": sys.version.split()[0],
            "trl_has_ppo_trainer": has_ppo, "heavy_packages_present": heavy}


def run(spec: dict, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REPO))  # for reward_server/rules.py: pure functions, the reward oirl's actor computes
    from reward_server.rules import gsm8k_reward

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    per_step = spec["prompts_per_step"] * spec["samples"]
    if per_step % (world * spec["micro_batch"]):
        raise ValueError(f"{per_step} samples per step do not split into {world} processes x micro-batches of "
                         f"{spec['micro_batch']}")
    accumulation = per_step // (world * spec["micro_batch"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = spec["rows"]
    expected_ids = {r["text"]: r["token_ids"] for r in rows}
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["text"]}], "reference": r["reference"]}
                              for r in rows])
    completion_lengths: list[int] = []
    prompt_lengths: list[int] = []
    mismatched: list[int] = []

    def reward(prompts, completions, completion_ids, reference, **_):
        completion_lengths.extend(len(c) for c in completion_ids)
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)  # as oirl's reward actor decodes
        return [gsm8k_reward(t, ref, spec["format_bonus"]) for t, ref in zip(texts, reference)]

    phase = {"generate": 0.0, "generate_and_score": 0.0}

    class Timed(GRPOTrainer):
        def _tokenize_prompts(self, prompts):
            ids, *rest = super()._tokenize_prompts(prompts)
            for p, got in zip(prompts, ids):
                got = [int(t) for t in got]
                prompt_lengths.append(len(got))
                if got != expected_ids[p[0]["content"]]:
                    mismatched.append(len(got))
            return (ids, *rest)

        def _generate_single_turn(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            phase["generate"] += time.perf_counter() - t0
            return out

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            phase["generate_and_score"] += time.perf_counter() - t0
            return out

    steps: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            phase.update(generate=0.0, generate_and_score=0.0)

        def on_step_end(self, args, state, control, **kw):
            seconds = time.perf_counter() - self.t0
            steps.append({"seconds": seconds, "generate": phase["generate"],
                          "score": phase["generate_and_score"] - phase["generate"],
                          "update": seconds - phase["generate_and_score"]})

    out_dir = Path(spec["work_dir"]) / f"trl-{world}proc"
    config = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=bool(spec.get("bf16", False)), fp16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=spec["seed"], data_seed=spec["seed"], shuffle_dataset=False,
        max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation, num_iterations=1,
        num_generations=spec["samples"], max_completion_length=spec["max_new_tokens"],
        generation_kwargs={"min_new_tokens": spec["max_new_tokens"]},  # EOS is masked until the cap: equal work
        temperature=spec["temperature"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        beta=spec["beta"], use_vllm=False, model_init_kwargs={"dtype": "float32"},
        dataloader_num_workers=0, ddp_backend="gloo" if world > 1 else None,
    )
    trainer = Timed(model=spec["model"], reward_funcs=reward, args=config, train_dataset=data,
                    processing_class=tokenizer, callbacks=[StepClock()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    if mismatched:
        raise RuntimeError(f"TRL tokenized {len(mismatched)} prompts differently from oirl's PromptDataset: the "
                           "workloads are not the same")
    return {"rank": rank, "world_size": world, "threads": threads, "micro_batch": spec["micro_batch"],
            "gradient_accumulation_steps": accumulation, "steps": steps, "train_seconds": total,
            "completion_lengths": completion_lengths, "prompt_lengths": prompt_lengths,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "rewards": [h["reward"] for h in trainer.state.log_history if "reward" in h]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec")
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--versions", action="store_true")
    args = parser.parse_args()
    if args.versions:
        print(json.dumps(versions()))
        return 0
    result = run(json.loads(Path(args.spec).read_text()), args.threads)
    out = Path(args.out)
    out.with_name(f"{out.stem}.rank{result['rank']}{out.suffix}").write_text(json.dumps(result))
    if result["rank"] == 0:
        out.write_text(json.dumps(result))
    close_process_group()
    return 0


def close_process_group() -> None:
    """Destroys the gloo process group accelerate made under torchrun, while the interpreter is whole.

    Left to interpreter shutdown, gloo's worker threads may still hold work objects with tensors in them; freeing
    those during finalization aborts the process ("terminate called without an active exception", SIGABRT) after
    a run that finished, which torchrun reports as a failure. The barrier lets no rank tear down while another is
    still in a collective.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
