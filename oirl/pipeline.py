"""`oirl pipeline`: SFT -> reward model -> PPO from one config, each stage feeding the next.

The three steps of RLHF read as online inverse RL (arXiv 2310.06147): behaviour cloning on demonstrations, the
"inverse" step (a reward learned offline from preferences), then on-policy improvement against that reward. Outputs
under --out:

    sft/           the behaviour-cloned policy, an HF folder (learner/sft.py)
    rm/            preferences.parquet (reference vs a wrong sample of the SFT policy) + the reward model's HF folder
    ppo/           `oirl train` with model.path = sft/ and reward.model_path = rm/ (plus reward.kind's rule)
    summary.json   every stage's held-out metrics and seconds

A stage is complete when its folder holds done.json (written last, atomically: metrics, seconds, the config that
made it). A complete stage is skipped; an incomplete one is redone from scratch, except PPO, which resumes from its
committed checkpoint (oirl/checkpoint.py). A stage that runs makes every later stage stale (its input changed), so
those are redone from scratch. A complete stage whose recorded config differs from the current one is an error.

The YAML is a RunConfig (the PPO run, as for `oirl train`) plus sections `sft` (SFTConfig), `preferences`
(PreferencesConfig) and `rm` (RMConfig). Fields one stage feeds another are set by the pipeline, never by hand.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from learner.reward_model import RMConfig
from learner.sft import SFTConfig, validate_sft
from oirl.config import ConfigError, RunConfig, _build, _merge, parse_overrides, resolve_path, validate

logger = logging.getLogger(__name__)

DONE = "done.json"
STAGES = ("sft", "rm", "ppo")
# Fields one stage receives from the top level or from an earlier stage, never set by hand.
FED = {
    "sft.data": "data.path", "sft.model": "model.path", "sft.dtype": "model.dtype",
    "sft.max_prompt_tokens": "data.max_prompt_tokens", "sft.use_chat_template": "data.use_chat_template",
    "rm.data": "", "reward.model_path": "",
}


@dataclass(frozen=True)
class PreferencesConfig:
    questions: int = 256
    """GSM8K questions (the first rows of data.path) the SFT policy answers to build preference pairs."""
    samples_per_question: int = 2
    """Samples per question; one with a wrong final answer becomes the rejected response."""


@dataclass(frozen=True)
class PipelineConfig:
    ppo: RunConfig = field(default_factory=RunConfig)
    """The PPO run (top level of the YAML, as for `oirl train`); model.path is the base policy SFT starts from."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Behaviour cloning on data.path (data and model fields come from the top level)."""
    preferences: PreferencesConfig = field(default_factory=PreferencesConfig)
    """How the preference set for the reward model is sampled from the SFT policy."""
    rm: RMConfig = field(default_factory=RMConfig)
    """Reward-model training; rm.backbone='sft' starts it from the SFT folder."""


def load_pipeline_config(path: str, overrides: list[str] | None = None) -> PipelineConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline config {p} does not exist; pass --config, e.g. configs/pipeline.yaml")
    data = _merge(yaml.safe_load(p.read_text()) or {}, parse_overrides(overrides or []))
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must be a mapping of field: value")
    sections = {name: data.pop(name, None) or {} for name in ("sft", "preferences", "rm")}
    for name, sec in sections.items():
        if not isinstance(sec, dict):
            raise ConfigError(f"{name} must be a mapping of field: value, got {type(sec).__name__}")
    for fed, source in FED.items():
        sec, key = fed.split(".")
        given = data.get(sec) if sec == "reward" else sections[sec]
        if isinstance(given, dict) and key in given:
            fix = (f"it is the top-level {source}: remove {fed} and set {source}" if source else
                   "the pipeline sets it to what the earlier stage built under --out: remove it")
            raise ConfigError(f"{fed} cannot be set in a pipeline config; {fix}")
    ppo = _build(RunConfig, data, "")
    d = ppo.data
    sft = _build(SFTConfig, {**sections["sft"], "data": d.path, "model": ppo.model.path, "dtype": ppo.model.dtype,
                             "max_prompt_tokens": d.max_prompt_tokens, "use_chat_template": d.use_chat_template},
                 "sft.")
    cfg = PipelineConfig(ppo=ppo, sft=sft, preferences=_build(PreferencesConfig, sections["preferences"],
                                                              "preferences."),
                         rm=_build(RMConfig, {"backbone": "sft", **sections["rm"]}, "rm."))
    validate_pipeline(cfg)
    return cfg


def validate_pipeline(cfg: PipelineConfig) -> None:
    """Every stage's config, before anything runs; each message names the field and the fix."""
    def check(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    ppo, pref, rm = cfg.ppo, cfg.preferences, cfg.rm
    check(ppo.data.source == "gsm8k",
          f"data.source={ppo.data.source!r}: the SFT stage clones demonstrations (GSM8K rows with 'question' and "
          "'answer'); set data.source=gsm8k")
    check(resolve_path(ppo.data.path).is_file(),
          f"data.path={ppo.data.path!r} not found (looked in {resolve_path(ppo.data.path)}); the repository ships "
          "GSM8K as data/gsm8k/train.jsonl")
    # PPO's reward.model_path is the RM the pipeline trains; a placeholder lets validate() check the rest now.
    validate(dataclasses.replace(ppo, reward=dataclasses.replace(ppo.reward, model_path="<out>/rm")), False)
    validate_sft(cfg.sft, "sft.")
    if cfg.sft.max_rows:
        n_train = cfg.sft.max_rows - max(1, round(cfg.sft.max_rows * cfg.sft.heldout_fraction))
        check(n_train >= cfg.sft.batch_size, f"sft.max_rows={cfg.sft.max_rows} leaves {n_train} training rows, "
                                             f"fewer than sft.batch_size={cfg.sft.batch_size}; raise max_rows")
    check(pref.questions >= 2, f"preferences.questions={pref.questions} must be >= 2 (train + held-out pairs)")
    check(pref.samples_per_question >= 1,
          f"preferences.samples_per_question={pref.samples_per_question} must be >= 1")
    check(rm.epochs >= 1 and rm.lr > 0, f"rm.epochs={rm.epochs} must be >= 1 and rm.lr={rm.lr} > 0")
    check(0 < rm.heldout_fraction < 1, f"rm.heldout_fraction={rm.heldout_fraction} must be in (0, 1)")
    check(rm.num_ranks >= 1 and rm.batch_size % rm.num_ranks == 0,
          f"rm.batch_size={rm.batch_size} must be a multiple of rm.num_ranks={rm.num_ranks}")
    check(rm.timeout_s > 0, f"rm.timeout_s={rm.timeout_s} must be > 0: every remote wait needs a timeout")
    most_train_pairs = pref.questions - max(1, round(pref.questions * rm.heldout_fraction))
    check(most_train_pairs >= rm.batch_size,
          f"preferences.questions={pref.questions} gives at most {most_train_pairs} training pairs, fewer than "
          f"rm.batch_size={rm.batch_size}; raise preferences.questions or lower rm.batch_size")
    check(rm.backbone in ("sft", "minilm", "tiny") or (resolve_path(rm.backbone) / "config.json").is_file(),
          f"rm.backbone={rm.backbone!r} must be 'sft' (the SFT folder), 'minilm', 'tiny' or an HF folder")


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def read_done(stage_dir: Path, want_config: dict, name: str) -> dict | None:
    """The stage's done.json if it is complete; an error if it was completed with another config."""
    path = stage_dir / DONE
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    changed = _diff(done["config"], _plain(want_config))
    if changed:
        raise ConfigError(f"{stage_dir} was completed with a different configuration ({'; '.join(changed[:5])}); "
                          f"use another --out, or delete {stage_dir} to redo the {name} stage and every later one")
    return done


def write_done(stage_dir: Path, record: dict) -> None:
    """done.json, written last and atomically: its presence means the stage's folder is complete."""
    tmp = stage_dir / f".{DONE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(_plain(record), indent=2) + "\n")
    os.replace(tmp, stage_dir / DONE)


class _RaySession:
    """Started on first use (a fully skipped pipeline starts nothing); stopped before PPO, whose driver starts
    its own (a second ray.init in one process is an error)."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.up = cfg, False

    def ensure(self) -> None:
        if not self.up:
            from oirl.driver import start_ray

            c = self.cfg
            cpus = max(4, os.cpu_count() or 1, int(c.sft.num_ranks * c.sft.num_cpus),
                       int(c.rm.num_ranks * c.rm.num_cpus), int(c.ppo.rollout.num_cpus))
            start_ray(c.ppo.ray_address, c.ppo.ray_num_cpus or cpus)
            self.up = True

    def stop(self) -> None:
        if self.up:
            import ray

            ray.shutdown()
            self.up = False


def _ppo_config(cfg: PipelineConfig, out: Path) -> RunConfig:
    ppo = cfg.ppo
    return dataclasses.replace(ppo, model=dataclasses.replace(ppo.model, path=str(out / "sft")),
                               reward=dataclasses.replace(ppo.reward, model_path=str(out / "rm")))


def _run_sft(cfg: PipelineConfig, out: Path, ray_session: _RaySession) -> dict:
    from learner.sft import train_sft
    from oirl.models import resolve_model

    sft = dataclasses.replace(cfg.sft, model=str(resolve_model(cfg.ppo.model)))
    ray_session.ensure()
    m = train_sft(sft, out / "sft")
    return {k: m[k] for k in ("heldout_loss_before", "heldout_loss", "train_loss", "train_rows", "heldout_rows",
                              "heldout_tokens", "truncated_rows")}


def _run_rm(cfg: PipelineConfig, out: Path, ray_session: _RaySession) -> dict:
    from learner.reward_model import train_reward_model
    from reward_server.preferences import build_gsm8k_preferences

    rm_dir = out / "rm"
    rm_dir.mkdir(parents=True)
    policy = dataclasses.replace(cfg.ppo, model=dataclasses.replace(cfg.ppo.model, path=str(out / "sft")))
    ray_session.ensure()
    prefs = build_gsm8k_preferences(policy, rm_dir / "preferences.parquet", cfg.preferences.questions,
                                    cfg.preferences.samples_per_question, cfg.ppo.seed)
    backbone = str(out / "sft") if cfg.rm.backbone == "sft" else cfg.rm.backbone
    m = train_reward_model(dataclasses.replace(cfg.rm, data=prefs["path"], backbone=backbone), rm_dir)
    return {"pairs": prefs["pairs"], "generate_seconds": prefs["generate_seconds"],
            **{k: m[k] for k in ("heldout_pairwise_accuracy", "heldout_pairwise_accuracy_before_training",
                                 "train_pairs", "heldout_pairs")}}


def _run_ppo(ppo: RunConfig, ppo_dir: Path, resume: bool) -> dict:
    from oirl.driver import train
    from oirl.metrics import read_metrics

    train(ppo, ppo_dir, resume=resume, progress=False)
    rows = read_metrics(ppo_dir / "metrics.jsonl")  # every iteration, also those before a resume
    first, last = rows[0], rows[-1]
    checked = "rollout/engine_learner_logprob_max_abs_diff"
    # The raw reward: with reward.normalize the trained-on reward/mean is ~0 by construction and shows no learning.
    return {"iterations": len(rows), "reward_mean_first": first["reward/raw_mean"],
            "reward_mean_final": last["reward/raw_mean"], "kl_mean_final": last["kl/mean"],
            "on_policy_max_abs_diff": max((r[checked] for r in rows if checked in r), default=float("nan")),
            "sync_seconds_final": last["sync/seconds"]}


def run_pipeline(cfg: PipelineConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run (or skip, or resume) every stage; write and return the summary."""
    from oirl import checkpoint

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ppo_cfg = _ppo_config(cfg, out)
    wanted = {"sft": {"sft": asdict(cfg.sft), "model": asdict(cfg.ppo.model)},
              "rm": {"preferences": asdict(cfg.preferences), "rm": asdict(cfg.rm), "data": asdict(cfg.ppo.data),
                     "rollout": asdict(cfg.ppo.rollout), "seed": cfg.ppo.seed},
              "ppo": ppo_cfg.to_dict()}
    ray_session = _RaySession(cfg)
    summary: dict[str, Any] = {"out": str(out), "stages": {}}
    t_all = time.perf_counter()
    stale = False  # an earlier stage ran in this invocation: every later one is redone from scratch
    try:
        for name in STAGES:
            stage_dir = out / name
            done = None if stale else read_done(stage_dir, wanted[name], name)
            if done is not None:
                logger.info("stage %s: complete (%s), skipped", name, stage_dir / DONE)
                summary["stages"][name] = {"status": "skipped", "seconds": done["seconds"], **done["metrics"]}
                continue
            status = "ran"
            t0 = time.perf_counter()
            if name == "ppo":
                ray_session.stop()
                committed = None if stale else checkpoint.read_commit(stage_dir / "checkpoints")
                if committed is not None:
                    recorded = json.loads((stage_dir / "config.json").read_text())
                    changed = _diff(recorded, _plain(wanted["ppo"]))
                    if changed:
                        raise ConfigError(f"{stage_dir} holds a partial PPO run with a different configuration "
                                          f"({'; '.join(changed[:5])}); use another --out or delete {stage_dir}")
                    status = f"resumed from iteration {committed['iteration']}"
                elif stage_dir.exists():
                    shutil.rmtree(stage_dir)
                logger.info("stage ppo: %s", "resuming" if committed else "starting")
                metrics = _run_ppo(ppo_cfg, stage_dir, resume=committed is not None)
            else:
                if stage_dir.exists():
                    logger.info("stage %s: incomplete output in %s, redoing it", name, stage_dir)
                    shutil.rmtree(stage_dir)
                logger.info("stage %s: starting", name)
                metrics = (_run_sft if name == "sft" else _run_rm)(cfg, out, ray_session)
            seconds = time.perf_counter() - t0
            write_done(stage_dir, {"stage": name, "metrics": metrics, "seconds": seconds, "config": wanted[name]})
            summary["stages"][name] = {"status": status, "seconds": seconds, **metrics}
            stale = True
    finally:
        ray_session.stop()
    summary["seconds"] = time.perf_counter() - t_all
    (out / "summary.json").write_text(json.dumps(_plain(summary), indent=2) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    keys = {"sft": ("heldout_loss_before", "heldout_loss"),
            "rm": ("heldout_pairwise_accuracy_before_training", "heldout_pairwise_accuracy", "pairs"),
            "ppo": ("reward_mean_first", "reward_mean_final", "kl_mean_final", "on_policy_max_abs_diff")}
    lines = []
    for name, s in summary["stages"].items():
        vals = ", ".join(f"{k}={s[k]:.4g}" for k in keys[name] if k in s)
        lines.append(f"{name:4s} {s['status']:<28s} {s['seconds']:8.1f}s  {vals}")
    lines.append(f"total {summary['seconds']:.1f}s this invocation; summary in {summary['out']}/summary.json")
    return "\n".join(lines)
