"""RunConfig: every shipped recipe loads; bad values fail before anything starts, naming the field and the fix."""

import dataclasses
from pathlib import Path

import pytest

from oirl.bounds import field_range, is_numeric
from oirl.config import REPO_ROOT, ConfigError, RunConfig, load_config, parse_overrides

# pipeline*.yaml add sft/preferences/rm sections to a RunConfig: tests/oirl/test_pipeline.py loads those.
CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if not p.stem.startswith("pipeline"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    # Cluster recipes name paths on the cluster's volumes (/models, /data): check everything but local files.
    cfg = load_config(path, check_paths=path.stem in ("smoke", "demo"))
    assert cfg.batch_size % (cfg.learner.num_ranks * cfg.learner.num_minibatches) == 0


def test_smoke_recipe_is_the_ci_shape():
    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml")
    assert cfg.model.path == "tiny" and cfg.learner.num_ranks == 2 and cfg.rollout.num_engines == 1
    assert cfg.iterations >= 3 and cfg.model.dtype == "float32"


def test_dotted_overrides_in_both_spellings():
    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml",
                      ["learner.lr=1e-4", "--rollout.max_new_tokens", "7", "--learner.kl_estimator=k3"])
    assert cfg.learner.lr == pytest.approx(1e-4)
    assert cfg.rollout.max_new_tokens == 7
    assert cfg.learner.kl_estimator == "k3"
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize("override, fragment", [
    ("learner.zero_stage=4", "learner.zero_stage=4 must be 0, 1, 2 or 3"),
    ("learner.lrr=1", "did you mean 'learner.lr'"),
    ("rollout.temperature=0", "rollout.temperature=0.0 must be > 0"),
    ("learner.lr=fast", "learner.lr='fast' must be a number"),
    ("learner.num_minibatches=3", "must split evenly over learner.num_ranks * learner.num_minibatches = 6"),
    ("sync.transport=carrier-pigeon", "sync.transport='carrier-pigeon'"),
    ("reward.timeout_s=0", "every remote wait needs a timeout"),
    ("data.source=gsm8k", "data.path"),
    ("model.dtype=float16", "trains without loss scaling"),
    ("rollout.top_p=0.9", "set rollout.top_p=1.0"),
    ("rollout.top_k=40", "rollout.top_k=40 must be -1 or 0: top-k truncates"),
    ("learner.forward_batch_size=0", "learner.forward_batch_size=0 must be >= 1"),
    ("learner.value_clip=0", "learner.value_clip=0.0 must be > 0"),
    ("learner.kl_coef=.nan", "learner.kl_coef=nan must be a finite number"),
    ("learner.vf_coef=-1", "learner.vf_coef=-1.0 must be >= 0"),
    ("sync.on_policy_action=ignore", "sync.on_policy_action='ignore' must be 'error' or 'warn'"),
    ("sync.on_policy_max_frac=1", "sync.on_policy_max_frac=1.0 must be in [0, 1)"),
    ("learner.update_autocast=float16", "learner.update_autocast='float16' must be '' (off) or 'bfloat16'"),
    ("learner.old_logprobs=engine", "learner.old_logprobs='engine' must be 'auto', 'forward' or 'update'"),
    ("learner.old_logprobs=update", "learner.old_logprobs=update needs a critic-free learner.algorithm"),
    ("learner.algorithm=grpo learner.kl_in_loss=false", "set learner.kl_in_loss=true"),
    ("learner.algorithm=a2c", "learner.algorithm='a2c' must be one of ppo, grpo, rloo, reinforce_pp, gspo, dapo"),
    ("learner.rollout_correction=is", "learner.rollout_correction='is' must be 'tis', 'mis', 'seq' or 'none'"),
    ("learner.mis_level=batch", "learner.mis_level='batch' must be 'token' or 'sequence'"),
    ("learner.dynamic_sampling=true", "learner.dynamic_sampling drops groups"),
    ("learner.overlong_buffer=16", "learner.overlong_buffer=16 must be below rollout.max_new_tokens=16"),
    ("learner.algorithm=rloo learner.kl_in_loss=true rollout.samples_per_prompt=1",
     "rollout.samples_per_prompt=1 must be >= 2"),
    ("rollout.async_steps=2", "rollout.async_steps=2 must be 0 or 1: 0 on-policy, 1 one-step-off"),
    ("learner.importance_cap=0", "learner.importance_cap=0.0 must be > 0"),
    ("learner.loss_aggregation=sum", "learner.loss_aggregation='sum' must be"),
    ("learner.ref_dtype=float16", "learner.ref_dtype='float16' must be"),
    ("learner.ref_dtype=bfloat16", "the reference's logprobs would differ from the policy's by rounding alone"),
    ("learner.gae_lambda=1.5", "learner.gae_lambda=1.5 must be in [0, 1]"),
    ("sync.canary_tolerance=0", "sync.canary_tolerance=0.0 must be > 0"),
    ("sync.on_policy_tolerance=-1", "sync.on_policy_tolerance=-1.0 must be > 0"),
    ("sync.canary_every=-1", "sync.canary_every=-1 must be >= 0"),
    ("sync.bucket_mb=0", "sync.bucket_mb=0 must be >= 1"),
    ("reward.url=ftp://host/score", "reward.url='ftp://host/score' must start with http:// or https://"),
    ("reward.kind=none", "reward.kind=none needs another backend"),
    ("reward.clip=-1", "reward.clip=-1.0 must be >= 0"),
    ("checkpoint_keep=0", "checkpoint_keep=0 must be >= 1"),
    ("iterations=0", "iterations=0 must be >= 1"),
    ("rollout.max_restarts=-1", "rollout.max_restarts=-1 must be >= 0"),
    ("data.max_rows=-5", "data.max_rows=-5 must be >= 0"),
    ("sync.canary_samples=-1", "sync.canary_samples=-1 must be >= 1"),
    ("reward.model_batch_size=0", "reward.model_batch_size=0 must be >= 1"),
    ("learner.num_cpus=-1", "learner.num_cpus=-1.0 must be > 0"),
    ("model.dtype=bfloat16", "model.dtype=bfloat16 with sync.on_policy_tolerance=0.001 and "
                             "sync.canary_tolerance=0.001"),
])
def test_bad_values_name_the_field(override, fragment):
    overrides = override.split()  # one case, one or more overrides
    if override == "data.source=gsm8k":
        overrides.append("data.path=/nonexistent/train.jsonl")
    with pytest.raises(ConfigError) as err:
        load_config(REPO_ROOT / "configs" / "smoke.yaml", overrides)
    assert fragment in str(err.value)


def test_malformed_overrides_are_refused():
    with pytest.raises(ConfigError, match="override '--learner.lr' has no value; write it as learner.lr=VALUE"):
        parse_overrides(["iterations=2", "--learner.lr"])
    with pytest.raises(ConfigError, match="override 'learner.lr.x' conflicts with an earlier override of 'lr'"):
        parse_overrides(["learner.lr=1e-4", "learner.lr.x=1"])


def test_missing_config_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_old_logprobs_update_needs_one_on_policy_step_per_batch():
    """learner.old_logprobs=update is allowed exactly where update()'s forward sees the engine's weights."""
    from oirl.config import fused_old_logprobs_blockers

    grpo = ["learner.algorithm=grpo", "learner.kl_in_loss=true", "learner.num_minibatches=1", "learner.ppo_epochs=1"]
    assert fused_old_logprobs_blockers(load_config(REPO_ROOT / "configs" / "smoke.yaml", grpo)) == []
    load_config(REPO_ROOT / "configs" / "smoke.yaml", grpo + ["learner.old_logprobs=update"])
    for extra, fragment in (("learner.num_minibatches=2", "learner.num_minibatches=2 must both be 1"),
                            ("learner.ppo_epochs=2", "learner.ppo_epochs=2"),
                            ("rollout.async_steps=1", "rollout.async_steps=0")):
        with pytest.raises(ConfigError, match="learner.old_logprobs=update needs") as err:
            load_config(REPO_ROOT / "configs" / "smoke.yaml", grpo + [extra, "learner.old_logprobs=update"])
        assert fragment in str(err.value)


def _numeric_fields(node, prefix=""):
    """(dotted path, field) for every int/float field of the config tree, found by introspection."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_fields(value, f"{prefix}{f.name}.")
        elif is_numeric(f):
            yield f"{prefix}{f.name}", f


def _outside(f, rng):
    """Values just outside each finite side of the range, in the field's type."""
    kind = type(f.default)
    below = [rng.ge - 1 if rng.ge is not None else rng.gt] if (rng.ge, rng.gt) != (None, None) else []
    above = [rng.le + 1 if rng.le is not None else rng.lt] if (rng.le, rng.lt) != (None, None) else []
    return [kind(v) for v in below + above]


NUMERIC = list(_numeric_fields(RunConfig()))


def test_the_walk_sees_every_role():
    assert {path.split(".")[0] for path, _ in NUMERIC} >= {"model", "data", "rollout", "learner", "reward", "sync",
                                                          "iterations"}
    assert len(NUMERIC) > 60


@pytest.mark.parametrize("path, f", NUMERIC, ids=[p for p, _ in NUMERIC])
def test_every_numeric_field_declares_its_range_and_a_value_outside_it_is_refused(path, f):
    """A new int/float field without bounds(...) or any_value(why) beside it fails here."""
    rng = field_range(f)
    assert rng is not None, f"{path} has no range: add metadata=bounds(...) or any_value(why) beside the field"
    if rng.any_value:
        assert rng.why, f"{path}: any_value needs the reason any value is meaningful"
        return
    for value in _outside(f, rng):
        with pytest.raises(ConfigError) as err:
            load_config(REPO_ROOT / "configs" / "smoke.yaml", [f"{path}={value!r}"])
        assert str(err.value).startswith(f"{path}={value!r} must be {rng.text(isinstance(value, int))}"), str(err.value)
    assert rng.contains(f.default), f"{path}'s default {f.default!r} is outside {rng.text()}"


def test_bf16_is_accepted_with_bf16_tolerances():
    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["model.dtype=bfloat16", "sync.on_policy_tolerance=0.1",
                                                             "sync.on_policy_max_frac=0.01", "sync.canary_tolerance=0.05"])
    assert cfg.model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"with sync.canary_tolerance=0.001: .* set sync.on_policy_tolerance=0.1"):
        load_config(REPO_ROOT / "configs" / "smoke.yaml", ["model.dtype=bfloat16", "sync.on_policy_tolerance=0.1"])


def test_an_algorithm_brings_its_recipe_for_the_settings_left_unset():
    """learner.algorithm=dapo alone runs DAPO (clip-higher, dynamic sampling, overlong shaping, KL off); a setting
    the user gives wins over the recipe."""
    smoke = str(REPO_ROOT / "configs" / "smoke.yaml")  # sets learner.kl_coef=0.01 itself
    dapo = load_config(smoke, ["learner.algorithm=dapo"]).learner
    assert (dapo.clip_ratio, dapo.clip_ratio_high, dapo.dynamic_sampling, dapo.overlong_buffer) == (0.2, 0.28, True, 3)
    assert dapo.kl_in_loss and dapo.kl_coef == 0.01  # the file's kl_coef is the user's
    gspo = load_config(smoke, ["learner.algorithm=gspo", "learner.clip_ratio_high=0.001"]).learner
    assert (gspo.clip_ratio, gspo.clip_ratio_high) == (3e-4, 1e-3)
    assert (gspo.loss_aggregation, gspo.rollout_correction) == ("seq_mean_token_mean", "seq")
    assert load_config(smoke, ["learner.algorithm=grpo"]).learner.kl_in_loss
    ppo = load_config(smoke).learner
    assert not ppo.kl_in_loss and not ppo.dynamic_sampling and ppo.clip_ratio_high == 0


PROVENANCE_YAML = """\
model: {path: tiny}
data: {source: synthetic}
reward: {kind: synthetic_digits}
learner:
  algorithm: gspo
  clip_ratio: 0.1
  ppo_epochs: 3
"""
PROVENANCE_OVERRIDES = ["learner.lr=0.002", "--rollout.temperature", "0.7", "learner.ppo_epochs=1",
                        "learner.loss_aggregation=token_mean"]


def _expected_provenance():
    """(value, source) by hand: the file's GSPO keeps the file's clip_ratio; GSPO's recipe (arXiv:2507.18071) fills
    the learner fields set nowhere else; the command line wins over the file and the recipe."""
    from actors.rollout_worker import RolloutConfig

    return {
        "learner.algorithm": ("gspo", "config file"),
        "learner.clip_ratio": (0.1, "config file"),
        "model.path": ("tiny", "config file"),
        "learner.clip_ratio_high": (4e-4, "algorithm recipe (gspo)"),
        "learner.kl_coef": (0.0, "algorithm recipe (gspo)"),
        "learner.rollout_correction": ("seq", "algorithm recipe (gspo)"),
        "learner.lr": (0.002, "command line"),
        "rollout.temperature": (0.7, "command line"),
        "learner.ppo_epochs": (1, "command line"),
        "learner.loss_aggregation": ("token_mean", "command line"),
        "rollout.top_p": (RolloutConfig().top_p, "default"),
        "data.path": ("data/gsm8k/train.jsonl", "default"),
    }


def test_value_sources_name_default_recipe_file_and_command_line(tmp_path):
    from oirl.config import value_sources

    (tmp_path / "p.yaml").write_text(PROVENANCE_YAML)
    cfg = load_config(tmp_path / "p.yaml", PROVENANCE_OVERRIDES)
    sources = value_sources(cfg, tmp_path / "p.yaml", PROVENANCE_OVERRIDES)
    for key, expected in _expected_provenance().items():
        assert sources[key] == expected, key
    assert set(sources) == set(_flat_keys(cfg.to_dict()))  # every field, each once
    assert {s for _, s in sources.values()} == {"default", "config file", "command line", "algorithm recipe (gspo)"}


def _flat_keys(tree, prefix=""):
    for key, value in tree.items():
        yield from _flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]


def test_show_config_provenance_prints_each_fields_source(tmp_path):
    import json
    import re
    import subprocess
    import sys

    (tmp_path / "p.yaml").write_text(PROVENANCE_YAML)
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "show-config", "--config", str(tmp_path / "p.yaml"),
                           "--provenance", *PROVENANCE_OVERRIDES], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = re.compile(r"^(\S+)\s+(.*?)\s+(default|config file|command line|algorithm recipe \(\w+\))$")
    shown = {}
    for text in proc.stdout.splitlines()[1:]:
        m = line.match(text)
        assert m, text
        shown[m.group(1)] = (json.loads(m.group(2)), m.group(3))
    assert proc.stdout.splitlines()[0] == f"# config file: {tmp_path / 'p.yaml'}"
    for key, expected in _expected_provenance().items():
        assert shown[key] == expected, key
