"""Behaviour cloning (`oirl sft`), for real: the CLI trains a tiny Llama on GSM8K rows with DeepSpeed ranks in Ray
actors.

- labels: only response tokens carry loss (hand-built example; logits at prompt positions do not move the loss);
- the prompts are exactly the rollouts' prompts (PromptDataset's chat-template ids), responses end with eos;
- SFT lowers the held-out loss; the saved folder reproduces that loss with transformers' own loss, loads as a
  policy for `oirl train` and as a reward-model backbone; two ranks end like one;
- a row without 'answer' and a bad option fail before any actor starts, naming the row / field.
"""

import json
import subprocess

import numpy as np
import pytest
from conftest import oirl_cmd, requires_loopback

from learner.sft import IGNORE, SFTConfig, collate, read_demonstrations, response_nll_sum, split_rows
from oirl.config import REPO_ROOT, DataConfig, ModelConfig, resolve_path

GSM8K = "data/gsm8k/train.jsonl"
TRAIN_ARGS = ["max_rows=48", "heldout_fraction=0.25", "epochs=2", "lr=0.003", "batch_size=8", "micro_batch_size=4",
              "max_tokens=768", "max_prompt_tokens=512"]


def test_labels_mask_prompt_and_padding():
    batch = collate([([5, 6, 7], [8, 9, 2]), ([5, 6], [4, 2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [5, 6, 4, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 8, 9, 2], [IGNORE, IGNORE, 4, 2, IGNORE, IGNORE]]
    # A pad id equal to a response token (SmolLM2 pads with its eos) is still masked by position, not by id.
    same = collate([([5], [8, 2]), ([5], [2])], pad_id=2)
    assert same["labels"].tolist() == [[IGNORE, 8, 2], [IGNORE, 2, IGNORE]]


def test_only_response_tokens_carry_loss():
    import torch

    batch = collate([([5, 6, 7], [8, 9, 2]), ([5, 6], [4, 2])], pad_id=0)
    labels = torch.as_tensor(batch["labels"])
    logits = torch.randn(2, 6, 10, dtype=torch.float64)
    nll = response_nll_sum(logits, labels)
    # By hand: position t predicts token t+1; row 0 predicts 8, 9, 2 from positions 2..4, row 1 predicts 4, 2
    # from positions 1..2.
    lp = torch.log_softmax(logits.float(), -1)
    expected = -(lp[0, 2, 8] + lp[0, 3, 9] + lp[0, 4, 2] + lp[1, 1, 4] + lp[1, 2, 2])
    assert abs(nll.item() - expected.item()) < 1e-5
    moved = logits.clone()
    moved[0, :2] += 50 * torch.randn(2, 10, dtype=torch.float64)  # prompt positions predicting prompt tokens
    moved[1, 3:] += 50 * torch.randn(3, 10, dtype=torch.float64)  # the last response token and padding
    assert abs(response_nll_sum(moved, labels).item() - nll.item()) < 1e-5
    moved[0, 2, 8] += 3.0  # a response target's logit: the loss must move
    assert response_nll_sum(moved, labels).item() < nll.item() - 0.1


def test_prompts_are_the_rollout_prompts(tmp_path, tiny_model_path):
    from transformers import AutoTokenizer

    from oirl.data import PromptDataset

    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
            {"question": "What is 2 times 5?", "answer": "2*5=<<2*5=10>>10 " + "very long " * 300 + "\n#### 10"}]
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    cfg = SFTConfig(data=str(path), model=tiny_model_path, max_tokens=256, max_prompt_tokens=128)
    examples, truncated = read_demonstrations(cfg, tok)
    rollout = PromptDataset(DataConfig(source="gsm8k", path=str(path), max_prompt_tokens=128), tok)
    assert [p for p, _ in examples] == rollout.token_ids
    assert "<|im_start|>assistant" in tok.decode(examples[0][0])  # the chat template, as the engines see it
    assert examples[0][1][-1] == tok.eos_token_id
    assert tok.decode(examples[0][1][:-1]) == "3+4=7\n#### 7"  # calculator annotations dropped
    assert truncated == 1 and len(examples[1][0]) + len(examples[1][1]) == 256


def test_row_without_answer_names_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "1\n#### 1"}) + "\n\n" + json.dumps({"question": "q"}) + "\n")
    proc = subprocess.run([*oirl_cmd(), "sft", "--data", str(path), "--out", str(tmp_path / "o"), "--model", "tiny"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "bad.jsonl:3: field 'answer' is missing or empty" in proc.stderr
    proc = subprocess.run([*oirl_cmd(), "sft", "--data", str(path), "--out", str(tmp_path / "o"), "batch_size=7"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "batch_size=7 must split evenly" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "o").exists()


def run_sft(out, *extra):
    proc = subprocess.run([*oirl_cmd(), "sft", "--data", GSM8K, "--out", str(out), "--model", "tiny", *TRAIN_ARGS,
                           *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One `oirl sft` with 2 ZeRO-2 ranks and the same run with 1 rank (each starts its own Ray)."""
    if not resolve_path(GSM8K).is_file():
        pytest.skip(f"GSM8K train set not found at {resolve_path(GSM8K)}")
    d = tmp_path_factory.mktemp("sft")
    return {ranks: (d / f"r{ranks}", run_sft(d / f"r{ranks}", f"num_ranks={ranks}")) for ranks in (2, 1)}


@pytest.mark.slow
@requires_loopback
def test_sft_lowers_heldout_loss(runs):
    _, m = runs[2]
    assert m["train_rows"] == 36 and m["heldout_rows"] == 12 and m["heldout_tokens"] > 500
    assert m["heldout_loss"] < m["heldout_loss_before"] - 0.5, m
    held = [e["heldout_loss"] for e in m["epochs"]]
    assert len(held) == 2 and held[1] < held[0] < m["heldout_loss_before"]


@pytest.mark.slow
@requires_loopback
def test_saved_folder_reproduces_heldout_loss_with_transformers(runs, tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, m = runs[2]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    base_params = dict(base.named_parameters())
    assert all(not torch.equal(p, base_params[n]) for n, p in model.named_parameters())
    cfg = SFTConfig(**{**m["config"], "model": tiny_model_path})
    examples, _ = read_demonstrations(cfg, AutoTokenizer.from_pretrained(out))
    _, held = split_rows(len(examples), cfg.heldout_fraction, cfg.seed)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for i in held:  # transformers' own shifted, ignore-masked mean loss, one row at a time
            b = collate([examples[i]], pad_id=0)
            n = int((b["labels"][0, 1:] != IGNORE).sum())
            nll += model(input_ids=torch.as_tensor(b["input_ids"]), labels=torch.as_tensor(b["labels"])).loss.item() * n
            tokens += n
    assert tokens == m["heldout_tokens"]
    assert abs(nll / tokens - m["heldout_loss"]) < 1e-4, (nll / tokens, m["heldout_loss"])


@pytest.mark.slow
@requires_loopback
def test_saved_folder_starts_ppo_and_reward_model(runs, tiny_model_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from learner.reward_model import resolve_backbone
    from oirl.config import load_config
    from oirl.data import PromptDataset
    from oirl.models import resolve_model
    from oirl.sync import checkpoint_tensors

    out, _ = runs[2]
    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", [f"model.path={out}"])
    assert resolve_model(cfg.model) == out
    assert checkpoint_tensors(str(out))  # what every weight sync is checked against
    data = DataConfig(source="gsm8k", path=GSM8K, max_rows=8, max_prompt_tokens=512)
    assert PromptDataset(data, AutoTokenizer.from_pretrained(out)).token_ids == \
        PromptDataset(data, AutoTokenizer.from_pretrained(tiny_model_path)).token_ids
    assert resolve_backbone(str(out)) == str(out)
    assert AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).config.num_labels == 1
    assert resolve_model(ModelConfig(path=str(out))) == out


@pytest.mark.slow
@requires_loopback
def test_two_ranks_end_like_one(runs):
    from safetensors.numpy import load_file

    (out2, m2), (out1, m1) = runs[2], runs[1]
    for e2, e1 in zip(m2["epochs"], m1["epochs"], strict=True):
        assert abs(e2["train_loss"] - e1["train_loss"]) < 1e-4 and abs(e2["heldout_loss"] - e1["heldout_loss"]) < 1e-4
    w2, w1 = load_file(out2 / "model.safetensors"), load_file(out1 / "model.safetensors")
    assert w2.keys() == w1.keys()
    assert max(float(np.max(np.abs(w2[k] - w1[k]))) for k in w2) < 1e-4
