"""`oirl pipeline` (SFT -> reward model -> PPO), for real on configs/pipeline_smoke.yaml.

- every stage runs and feeds the next (PPO's policy is the SFT folder, its reward the RM folder); the summary holds
  each stage's held-out metrics;
- a second invocation skips every stage (from the summary, the log, and unchanged file mtimes) and starts no Ray;
- deleting PPO's done.json reruns only PPO, resumed from its committed checkpoint;
- scheduling without Ray: a stage that runs makes every later one stale; a partial stage is redone from scratch;
  a complete stage made with another config is an error;
- config errors name the field and the fix.
"""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import oirl_cmd, requires_loopback

from oirl import pipeline
from oirl.config import REPO_ROOT, ConfigError

SMOKE = REPO_ROOT / "configs" / "pipeline_smoke.yaml"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("pipeline*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_recipe_loads(path):
    cfg = pipeline.load_pipeline_config(str(path))
    assert cfg.ppo.data.source == "gsm8k" and cfg.sft.data == cfg.ppo.data.path
    assert cfg.sft.model == cfg.ppo.model.path and cfg.sft.max_prompt_tokens == cfg.ppo.data.max_prompt_tokens


@pytest.mark.parametrize("overrides, message", [
    (["sft.data=x.jsonl"], "sft.data cannot be set in a pipeline config; it is the top-level data.path"),
    (["reward.model_path=runs/rm"], "reward.model_path cannot be set in a pipeline config; the pipeline sets it"),
    (["rm.data=p.parquet"], "rm.data cannot be set in a pipeline config"),
    (["sft.batch_size=6"], "sft.batch_size=6 must split evenly into num_ranks * micro_batch_size"),
    (["sft.lrr=1"], "unknown config field 'sft.lrr'; did you mean 'sft.lr'?"),
    (["preferences.questions=8"], "preferences.questions=8 gives at most 6 training pairs, fewer than rm.batch_size=8"),
    (["data.source=synthetic", "reward.kind=synthetic_digits"], "data.source='synthetic': the SFT stage clones"),
    (["rm.backbone=/nonexistent"], "rm.backbone='/nonexistent' must be 'sft'"),
    (["learner.num_minibatches=3"], "must split evenly over learner.num_ranks * learner.num_minibatches"),
    (["sft.max_rows=8"], "sft.max_rows=8 leaves 6 training rows, fewer than sft.batch_size=8"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=None) as e:
        pipeline.load_pipeline_config(str(SMOKE), overrides)
    assert message in str(e.value), str(e.value)


def test_stage_scheduling(tmp_path, monkeypatch):
    """The scheduler alone (stage bodies replaced by a recorder; the real stages run in the slow test below)."""
    calls = []

    def fake(name):
        def run(cfg, out, *rest):
            calls.append(name)
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "output").write_text(name)
            return {"stage_metric": 1.0}
        return run

    def fake_ppo(ppo, ppo_dir, resume):
        calls.append(("ppo", resume))
        ppo_dir.mkdir(parents=True, exist_ok=True)
        return {"reward_mean_final": 0.5}

    monkeypatch.setattr(pipeline, "_run_sft", fake("sft"))
    monkeypatch.setattr(pipeline, "_run_rm", fake("rm"))
    monkeypatch.setattr(pipeline, "_run_ppo", fake_ppo)
    cfg = pipeline.load_pipeline_config(str(SMOKE))
    pipeline.run_pipeline(cfg, tmp_path)
    assert calls == ["sft", "rm", ("ppo", False)]
    calls.clear()
    assert {s["status"] for s in pipeline.run_pipeline(cfg, tmp_path)["stages"].values()} == {"skipped"}
    assert calls == []
    # A partial RM folder (no done.json) is redone from scratch, and PPO after it too (its reward changed).
    (tmp_path / "rm" / "done.json").unlink()
    (tmp_path / "rm" / "leftover").write_text("half-written")
    summary = pipeline.run_pipeline(cfg, tmp_path)
    assert calls == ["rm", ("ppo", False)] and not (tmp_path / "rm" / "leftover").exists()
    assert [s["status"] for s in summary["stages"].values()] == ["skipped", "ran", "ran"]
    # A complete stage made with another config is an error naming the change, never silently reused.
    with pytest.raises(ConfigError, match=r"sft was completed with a different configuration \(sft\.lr: 0\.003 -> "):
        pipeline.run_pipeline(pipeline.load_pipeline_config(str(SMOKE), ["sft.lr=0.01"]), tmp_path)


def tree_mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def run_pipeline_cli(out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([*oirl_cmd(), "pipeline", "--config", str(SMOKE), "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three invocations on one output folder: fresh, again (all complete), again after deleting PPO's marker."""
    out = tmp_path_factory.mktemp("pipeline")
    result = {"out": out}
    run_pipeline_cli(out)
    result["first"] = json.loads((out / "summary.json").read_text())
    result["mtimes_first"] = {s: tree_mtimes(out / s) for s in pipeline.STAGES}
    result["second_proc"] = run_pipeline_cli(out)
    result["second"] = json.loads((out / "summary.json").read_text())
    result["mtimes_second"] = {s: tree_mtimes(out / s) for s in pipeline.STAGES}
    (out / "ppo" / "done.json").unlink()
    run_pipeline_cli(out)
    result["third"] = json.loads((out / "summary.json").read_text())
    result["mtimes_third"] = {s: tree_mtimes(out / s) for s in pipeline.STAGES}
    return result


@pytest.mark.slow
@requires_loopback
def test_pipeline_runs_every_stage_each_feeding_the_next(runs):
    out, s = runs["out"], runs["first"]["stages"]
    assert [v["status"] for v in s.values()] == ["ran", "ran", "ran"]
    assert s["sft"]["heldout_loss"] < s["sft"]["heldout_loss_before"] - 0.5
    assert s["rm"]["pairs"] >= 16 and 0 <= s["rm"]["heldout_pairwise_accuracy"] <= 1
    assert s["ppo"]["iterations"] == 2 and s["ppo"]["on_policy_max_abs_diff"] < 1e-3
    ppo_cfg = json.loads((out / "ppo" / "config.json").read_text())
    assert ppo_cfg["model"]["path"] == str(out / "sft") and ppo_cfg["reward"]["model_path"] == str(out / "rm")
    rm_cfg = json.loads((out / "rm" / "config.json").read_text())
    assert rm_cfg["architectures"] == ["LlamaForSequenceClassification"]  # the RM started from the SFT folder
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward/std"] > 0 for r in rows)  # the learned RM scores each sample (the tiny policy gets no rule reward)
    for name in pipeline.STAGES:
        done = json.loads((out / name / "done.json").read_text())
        assert done["metrics"].items() <= runs["first"]["stages"][name].items()


@pytest.mark.slow
@requires_loopback
def test_second_invocation_skips_every_stage(runs):
    s = runs["second"]["stages"]
    assert [v["status"] for v in s.values()] == ["skipped"] * 3
    assert {k: {m: v for m, v in st.items() if m != "status"} for k, st in s.items()} == \
        {k: {m: v for m, v in st.items() if m != "status"} for k, st in runs["first"]["stages"].items()}
    assert runs["mtimes_second"] == runs["mtimes_first"]
    err = runs["second_proc"].stderr
    assert err.count("complete (") == 3 and "Started a local Ray instance" not in err


@pytest.mark.slow
@requires_loopback
def test_deleting_the_ppo_marker_reruns_only_ppo(runs):
    s = runs["third"]["stages"]
    assert [s["sft"]["status"], s["rm"]["status"]] == ["skipped", "skipped"]
    assert s["ppo"]["status"] == "resumed from iteration 2"
    assert s["ppo"]["iterations"] == 2
    assert s["ppo"]["reward_mean_final"] == runs["first"]["stages"]["ppo"]["reward_mean_final"]
    for name in ("sft", "rm"):
        assert runs["mtimes_third"][name] == runs["mtimes_first"][name]
    assert runs["mtimes_third"]["ppo"]["done.json"] != runs["mtimes_first"]["ppo"]["done.json"]
    assert runs["mtimes_third"]["ppo"]["final/model.safetensors"] != runs["mtimes_first"]["ppo"]["final/model.safetensors"]
