"""The 'tiny' random models (oirl/models.py): one per architecture of model.tiny_architecture, each a folder that
transformers loads with the tensors that make the architecture what it is, and the config check on the choice."""

import pytest
import torch

from oirl.config import REPO_ROOT, TINY_ARCHITECTURES, ConfigError, ModelConfig, load_config
from oirl.models import build_tiny_model, model_folder
from oirl.sync import checkpoint_tensors

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, hidden_size=64, num_layers=2, vocab_size=300, architecture=arch)
            for arch in TINY_ARCHITECTURES}


# What tells each family apart in its checkpoint (HF names, as vLLM's loader and the weight sync read them).
EXPECTED = {
    "llama": dict(model_type="llama", cls="LlamaForCausalLM", tied=True, bias=False, qk_norm=False),
    "qwen2": dict(model_type="qwen2", cls="Qwen2ForCausalLM", tied=True, bias=True, qk_norm=False),
    "qwen3": dict(model_type="qwen3", cls="Qwen3ForCausalLM", tied=False, bias=False, qk_norm=True),
}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_each_architecture_builds_a_folder_transformers_loads(built, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    want = EXPECTED[arch]
    model = AutoModelForCausalLM.from_pretrained(built[arch], dtype=torch.float32)
    assert model.config.model_type == want["model_type"] and type(model).__name__ == want["cls"]
    assert model.config.tie_word_embeddings is want["tied"]
    c = model.config
    assert (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads) == 32  # vLLM's CPU attention
    names = set(checkpoint_tensors(str(built[arch])))  # what every sync must publish (a tied head left out)
    assert ("model.layers.0.self_attn.q_proj.bias" in names) is want["bias"]
    assert ("model.layers.1.self_attn.v_proj.bias" in names) is want["bias"]
    assert ("model.layers.0.self_attn.q_norm.weight" in names) is want["qk_norm"]
    assert ("model.layers.1.self_attn.k_norm.weight" in names) is want["qk_norm"]
    assert ("lm_head.weight" in names) is not want["tied"]
    # Every published tensor is a parameter the learner trains (named_parameters: a tied head once).
    assert names == {n for n, _ in model.named_parameters()}
    tok = AutoTokenizer.from_pretrained(built[arch])
    text = tok.apply_chat_template([{"role": "user", "content": "what is 2 plus 3?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert tok.eos_token_id == model.config.eos_token_id and max(ids) < model.config.vocab_size
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()


def test_architectures_are_different_models_in_different_folders(built):
    from transformers import AutoModelForCausalLM

    sizes = {arch: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(built[arch]).parameters())
             for arch in TINY_ARCHITECTURES}
    assert len(set(sizes.values())) == 3, sizes
    folders = {model_folder(ModelConfig(path="tiny", tiny_architecture=a)) for a in TINY_ARCHITECTURES}
    assert len(folders) == 3
    # llama keeps the folder name it always had: caches built before the option existed are reused.
    assert model_folder(ModelConfig(path="tiny")).name == "tiny-d32-h64-l2-v512"


def test_building_again_reuses_the_folder(built):
    before = (built["qwen3"] / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(built["qwen3"], 64, 2, 300, "qwen3") == built["qwen3"]
    assert (built["qwen3"] / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("overrides, fragment", [
    (["model.tiny_architecture=gpt2"], "model.tiny_architecture='gpt2' must be one of llama, qwen2, qwen3"),
    (["model.tiny_architecture=qwen2", "model.tiny_hidden_size=48"],
     "model.tiny_hidden_size=48 with model.tiny_architecture=qwen2"),
])
def test_a_bad_tiny_architecture_fails_naming_the_field(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(SMOKE, overrides)


def test_the_builder_refuses_an_unknown_architecture_before_writing(tmp_path):
    with pytest.raises(ValueError, match="model.tiny_architecture='gpt2': use one of llama, qwen2, qwen3"):
        build_tiny_model(tmp_path / "out", architecture="gpt2")
    assert not (tmp_path / "out").exists()


def test_qwen2_at_a_multiple_of_32_passes_the_check():
    cfg = load_config(SMOKE, ["model.tiny_architecture=qwen2", "model.tiny_hidden_size=96"])
    assert cfg.model.tiny_architecture == "qwen2"


@pytest.mark.parametrize("arch, own", [("qwen2", "model.layers.1.self_attn.k_proj.bias"),
                                       ("qwen3", "model.layers.0.self_attn.q_norm.weight"),
                                       ("qwen3", "lm_head.weight")])
def test_the_sync_check_refuses_a_publish_without_the_architectures_own_tensors(built, arch, own):
    """What the learner publishes (named_parameters) passes the tensor-count check; the same without a tensor only
    this family has (a bias, a per-head norm, the separate head) fails naming it."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from oirl.sync import SyncError, check_against_checkpoint
    from oirl.weights import WeightUpdate, fingerprint, pack_bucket, plan_buckets

    def publish(named):
        packed = [pack_bucket(g, lambda n: np.empty(n, dtype=np.uint8)) for g in plan_buckets(named, 1 << 16)]
        buckets, buffers = [p[0] for p in packed], [p[1] for p in packed]
        return WeightUpdate(1, "object_store", buckets, fingerprint(buckets, buffers), sum(b.nbytes for b in buckets))

    named = [(n, p.detach()) for n, p in AutoModelForCausalLM.from_pretrained(built[arch]).named_parameters()]
    expected = checkpoint_tensors(str(built[arch]))
    assert check_against_checkpoint(publish(named), expected) == sum(p.numel() * 4 for _, p in named)
    with pytest.raises(SyncError, match=own.replace(".", r"\.")):
        check_against_checkpoint(publish([(n, p) for n, p in named if n != own]), expected)
