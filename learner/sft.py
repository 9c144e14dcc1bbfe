"""Supervised fine-tuning (behaviour cloning) on demonstrations with the DeepSpeed learner ranks (`oirl sft`).

In the view of RLHF as online inverse RL (arXiv 2310.06147), SFT is behaviour cloning: maximise the likelihood of
the demonstrator's actions (response tokens) in the states it visited (prompt + tokens so far). Demonstrations are
GSM8K rows: the prompt is the question exactly as the rollouts format it (oirl.data.PromptDataset: instruction +
the tokenizer's chat template), the response is the row's `answer` followed by the end-of-turn token. The loss is
the token-mean NLL over response tokens only (labels are -100 on prompt and padding positions). The HF folder it
saves (save_pretrained + tokenizer) is what `oirl train` (model.path) and `oirl train-rm` (--backbone) start from.

    train_sft(SFTConfig(data="data/gsm8k/train.jsonl", model="smollm2-135m"), out_dir) -> metrics dict

Public methods of SFTWorker (one ZeRO rank, a Ray actor): master_address, setup, train_epoch, evaluate, save.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oirl.config import ConfigError
from oirl.data import DatasetError

logger = logging.getLogger(__name__)

IGNORE = -100  # label of positions that carry no loss (torch cross_entropy's ignore_index)


@dataclass(frozen=True)
class SFTConfig:
    data: str = "data/gsm8k/train.jsonl"
    """GSM8K-style rows, 'question' (the prompt) and 'answer' (the demonstrated response), in any format data.path
    reads (JSONL, Parquet, Arrow, a `datasets` folder, a cached dataset name; oirl.data)."""
    model: str = "smollm2-135m"
    """Starting policy: an HF folder, 'smollm2-135m' or 'tiny' (as model.path in `oirl train`)."""
    dtype: str = "float32"
    """Parameter dtype: float32 (CPU) or bfloat16 (GPU)."""
    max_rows: int = 512
    """Read at most this many rows from the start of the file (0 = all)."""
    heldout_fraction: float = 0.1
    """Share of rows held out for the held-out loss (never trained on)."""
    epochs: int = 1
    """Passes over the training rows."""
    lr: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    batch_size: int = 8
    """Rows per optimizer step over all ranks."""
    micro_batch_size: int = 2
    """Rows per forward/backward on one rank (gradient accumulation makes up the rest of batch_size)."""
    max_tokens: int = 512
    """Longest prompt + response; longer responses are cut (counted as truncated_rows)."""
    max_prompt_tokens: int = 256
    """Prompts longer than this are an error naming the row (as data.max_prompt_tokens in `oirl train`)."""
    use_chat_template: bool = True
    """Format prompts with the tokenizer's chat template, as the rollouts do (data.use_chat_template)."""
    strip_calculator: bool = True
    """Drop GSM8K's calculator annotations '<<48/2=24>>' from the answer (the policy should not learn to emit them)."""
    num_ranks: int = 2
    """DeepSpeed ranks (Ray actors)."""
    zero_stage: int = 2
    """ZeRO stage 0-3."""
    num_cpus: float = 1.0
    """Ray CPUs per rank."""
    num_gpus: float = 0.0
    """Ray GPUs per rank."""
    seed: int = 0
    """Split, shuffle and init seed."""
    timeout_s: float = 3600.0
    """Longest wait for one call on the ranks (collectives use it too)."""


def validate_sft(cfg: SFTConfig, prefix: str = "") -> None:
    """Fail before any actor starts; ``prefix`` ('sft.' in the pipeline) makes the message name the config field."""
    def check(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(prefix + msg)

    check(cfg.epochs >= 1, f"epochs={cfg.epochs} must be >= 1")
    check(cfg.lr > 0, f"lr={cfg.lr} must be > 0")
    check(cfg.weight_decay >= 0 and cfg.max_grad_norm > 0, "weight_decay must be >= 0 and max_grad_norm > 0")
    check(0 < cfg.heldout_fraction < 1, f"heldout_fraction={cfg.heldout_fraction} must be in (0, 1)")
    check(cfg.num_ranks >= 1 and cfg.micro_batch_size >= 1, "num_ranks and micro_batch_size must be >= 1")
    check(cfg.batch_size % (cfg.num_ranks * cfg.micro_batch_size) == 0,
          f"batch_size={cfg.batch_size} must split evenly into num_ranks * micro_batch_size = "
          f"{cfg.num_ranks} * {cfg.micro_batch_size}; change batch_size or micro_batch_size")
    check(cfg.zero_stage in (0, 1, 2, 3), f"zero_stage={cfg.zero_stage} must be 0, 1, 2 or 3")
    check(cfg.dtype in ("float32", "bfloat16"), f"dtype={cfg.dtype!r} must be float32 or bfloat16 (float32 on CPU)")
    check(cfg.max_prompt_tokens >= 1 and cfg.max_tokens > cfg.max_prompt_tokens,
          f"max_tokens={cfg.max_tokens} must exceed max_prompt_tokens={cfg.max_prompt_tokens} (room for a response)")
    check(cfg.timeout_s > 0, f"timeout_s={cfg.timeout_s} must be > 0: every remote wait needs a timeout")


def read_demonstrations(cfg: SFTConfig, tokenizer: Any) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(prompt ids, response ids) per row and the number of truncated responses. Prompt ids come from the rollouts'
    own PromptDataset, so SFT trains on exactly the states PPO starts from; every row is validated there first."""
    from oirl.config import DataConfig
    from oirl.data import PromptDataset, read_prompts
    from reward_server.preferences import clean_reference

    prompts = PromptDataset(DataConfig(source="gsm8k", path=cfg.data, max_rows=cfg.max_rows,
                                       max_prompt_tokens=cfg.max_prompt_tokens,
                                       use_chat_template=cfg.use_chat_template), tokenizer)
    # The same rows, in order, with each answer's whole text (the demonstration) instead of its final number.
    answers = [a for _, a in read_prompts(DataConfig(path=cfg.data, max_rows=cfg.max_rows, answer_format="text"))]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"model {cfg.model!r}: the tokenizer has no eos_token; the response needs an end-of-turn "
                         "token so the policy learns to stop")
    examples, truncated = [], 0
    for prompt_ids, answer in zip(prompts.token_ids, answers):
        text = clean_reference(answer) if cfg.strip_calculator else answer.strip()
        response = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]] + [int(eos)]
        room = cfg.max_tokens - len(prompt_ids)
        truncated += len(response) > room
        examples.append((prompt_ids, response[:room]))
    if len(examples) < 2:
        raise DatasetError(f"{cfg.data}: {len(examples)} rows; need at least 2 (train + held out)")
    return examples, truncated


def build_example(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], list[int]]:
    """input_ids = prompt + response; labels = IGNORE on the prompt, the token itself on the response (the shift
    to next-token targets happens in the loss)."""
    return list(prompt_ids) + list(response_ids), [IGNORE] * len(prompt_ids) + list(response_ids)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest row: input_ids, attention_mask, labels, each int64 [B, T]. Padding is masked and
    labelled IGNORE by position, never by token id (SmolLM2 pads with its eos token, which responses end with)."""
    rows = [build_example(p, r) for p, r in examples]
    t = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), t), pad_id, dtype=np.int64)
    labels = np.full((len(rows), t), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)], labels[i, : len(lab)], mask[i, : len(ids)] = ids, lab, 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def response_nll_sum(logits: Any, labels: Any) -> Any:
    """Sum of -log p(token) over labelled positions. logits [B, T, V] at position t predict token t+1; labels
    [B, T] with IGNORE where there is no loss. Returns a float32 scalar on the logits' device."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")


class SFTWorker:
    def __init__(self, cfg: SFTConfig, rank: int, model_path: str):
        self.cfg, self.rank, self.world, self.model_path = cfg, rank, cfg.num_ranks, model_path

    def master_address(self) -> tuple[str, int]:
        from learner.learner_worker import free_master_address

        return free_master_address()

    def setup(self, ip: str, port: int) -> None:
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from learner.learner_worker import init_distributed
        from learner.ranks import deepspeed_config

        c = self.cfg
        self.device = init_distributed(self.rank, self.world, ip, port, c.num_gpus, c.timeout_s)
        torch.manual_seed(c.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, c.dtype))
        model.config.use_cache = False
        gas = c.batch_size // (self.world * c.micro_batch_size)
        ds_config = deepspeed_config(c.micro_batch_size, self.world, c.zero_stage, c.lr, c.weight_decay,
                                     c.max_grad_norm, bf16=c.dtype == "bfloat16", grad_accum=gas)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    def _allreduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _nll(self, chunk: list[tuple[list[int], list[int]]]) -> Any:
        import torch

        batch = {k: torch.as_tensor(v, device=self.device) for k, v in collate(chunk, self.pad_id).items()}
        logits = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return response_nll_sum(logits, batch["labels"])

    def train_epoch(self, examples: list[tuple[list[int], list[int]]], epoch: int) -> dict:
        """One pass; every step's loss is this rank's NLL sum over the global token count of the step (times the
        world size, which DeepSpeed's gradient averaging divides out), so M ranks take one rank's exact step."""
        c = self.cfg
        order = np.random.default_rng([c.seed, epoch]).permutation(len(examples))  # same order on every rank
        nll_total, tokens_total = 0.0, 0
        self.engine.module.train()
        t0 = time.perf_counter()
        for s in range(0, len(order) - c.batch_size + 1, c.batch_size):
            mine = [examples[i] for i in order[s: s + c.batch_size][self.rank:: self.world]]
            (step_tokens,) = self._allreduce([sum(len(r) for _, r in mine)])
            for m in range(0, len(mine), c.micro_batch_size):
                nll = self._nll(mine[m: m + c.micro_batch_size])
                self.engine.backward(nll * self.world / step_tokens, scale_wrt_gas=False)
                self.engine.step()
                nll_total += nll.item()
            tokens_total += sum(len(r) for _, r in mine)
        nll_sum, tokens = self._allreduce([nll_total, tokens_total])
        seconds = time.perf_counter() - t0
        return {"train_loss": nll_sum / max(tokens, 1), "train_tokens": int(tokens), "seconds": seconds,
                "train_tokens_per_s": tokens / max(seconds, 1e-9)}

    def evaluate(self, examples: list[tuple[list[int], list[int]]]) -> dict:
        """Token-mean NLL of the response tokens of ``examples`` (rows split over ranks, summed over all)."""
        import torch

        mine = examples[self.rank:: self.world]
        nll_total = 0.0
        self.engine.module.eval()
        with torch.no_grad():
            for m in range(0, len(mine), self.cfg.micro_batch_size):
                nll_total += self._nll(mine[m: m + self.cfg.micro_batch_size]).item()
        nll_sum, tokens = self._allreduce([nll_total, sum(len(r) for _, r in mine)])
        return {"loss": nll_sum / max(tokens, 1), "tokens": int(tokens)}

    def save(self, out_dir: str) -> None:
        """The policy as a plain HF folder plus the tokenizer (its chat template included): what model.path and
        reward-model backbones load. Every rank joins the ZeRO-3 gather; rank 0 writes."""
        import contextlib

        import deepspeed

        module = self.engine.module
        ctx = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) \
            if self.cfg.zero_stage == 3 else contextlib.nullcontext()
        with ctx:
            if self.rank == 0:
                module.config.use_cache = True
                module.save_pretrained(out_dir, safe_serialization=True)
                self.tokenizer.save_pretrained(out_dir)


def split_rows(n: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train indices, held-out indices); at least one row held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, int(round(n * heldout_fraction)))
    return order[n_held:], order[:n_held]


def train_sft(cfg: SFTConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train on the DeepSpeed ranks (Ray must be initialised); save the HF folder, then metrics.json (last)."""
    import ray
    from transformers import AutoTokenizer

    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    validate_sft(cfg)
    model_path = str(resolve_model(ModelConfig(path=cfg.model)))
    examples, truncated = read_demonstrations(cfg, AutoTokenizer.from_pretrained(model_path))
    train_idx, held_idx = split_rows(len(examples), cfg.heldout_fraction, cfg.seed)
    train, heldout = [examples[i] for i in train_idx], [examples[i] for i in held_idx]
    if len(train) < cfg.batch_size:
        raise DatasetError(f"{len(train)} training rows but batch_size={cfg.batch_size}; lower batch_size or "
                           "raise max_rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cls = ray.remote(SFTWorker)
    workers = [cls.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus).remote(cfg, r, model_path)
               for r in range(cfg.num_ranks)]

    def wait(refs: list) -> list:
        return ray.get(refs, timeout=cfg.timeout_s)

    t0 = time.perf_counter()
    try:
        ip, port = wait([workers[0].master_address.remote()])[0]
        wait([w.setup.remote(ip, port) for w in workers])
        before = wait([w.evaluate.remote(heldout) for w in workers])[0]
        logger.info("held-out loss before training %.4f (%d tokens)", before["loss"], before["tokens"])
        history = []
        for epoch in range(cfg.epochs):
            stats = wait([w.train_epoch.remote(train, epoch) for w in workers])[0]
            stats["heldout_loss"] = wait([w.evaluate.remote(heldout) for w in workers])[0]["loss"]
            history.append({"epoch": epoch, **stats})
            logger.info("epoch %d: train loss %.4f, held-out loss %.4f, %.0f tokens/s", epoch, stats["train_loss"],
                        stats["heldout_loss"], stats["train_tokens_per_s"])
        wait([w.save.remote(str(out)) for w in workers])
    finally:
        for w in workers:
            ray.kill(w)
    metrics = {
        "heldout_loss_before": before["loss"], "heldout_loss": history[-1]["heldout_loss"],
        "train_loss": history[-1]["train_loss"], "train_rows": len(train), "heldout_rows": len(heldout),
        "heldout_tokens": before["tokens"], "truncated_rows": truncated, "epochs": history,
        "seconds": time.perf_counter() - t0, "base_model": model_path, "config": asdict(cfg),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
