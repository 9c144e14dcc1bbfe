"""--resume continues a run only with the config it was started with (out/config.json): a changed field is refused
before anything starts, naming the field with its old and new value; only oirl.config.RESUMABLE fields may change.
No Ray: the driver's model resolution and Ray start are replaced by a tripwire, so reaching them is visible."""

import json

import pytest

import oirl.driver
from oirl.cli import main
from oirl.config import REPO_ROOT, RESUMABLE, ConfigError, RunConfig, load_config, resume_changes

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"


def test_changed_fields_are_named_with_old_and_new_value_and_only_resumable_ones_pass():
    recorded = json.loads(json.dumps(load_config(SMOKE, ["learner.lr=1e-6"]).to_dict()))
    assert resume_changes(recorded, load_config(SMOKE, ["learner.lr=1e-6"])) == ([], [])
    refused, allowed = resume_changes(recorded, load_config(
        SMOKE, ["iterations=9", "sync.timeout_s=60", "rollout.samples_per_prompt=2", "ray_address=auto"]))
    assert refused == ["rollout.samples_per_prompt: 4 -> 2", "learner.lr: 1e-06 -> 0.003"]
    assert allowed == ["iterations: 4 -> 9", "ray_address: '' -> 'auto'", "sync.timeout_s: 300.0 -> 60.0"]


def test_a_field_the_recorded_config_lacks_counts_as_its_default():
    """A run recorded before a field existed ran with the behaviour its default keeps."""
    recorded = json.loads(json.dumps(load_config(SMOKE).to_dict()))
    del recorded["learner"]["entropy_coef"]
    assert resume_changes(recorded, load_config(SMOKE)) == ([], [])
    refused, _ = resume_changes(recorded, load_config(SMOKE, ["learner.entropy_coef=0.1"]))
    assert refused == ["learner.entropy_coef: 0.0 -> 0.1"]


def test_every_resumable_entry_is_a_field_with_a_reason():
    tree = RunConfig().to_dict()
    paths = {k for k, v in tree.items() if not isinstance(v, dict)}
    paths |= {f"{k}.{sub}" for k, v in tree.items() if isinstance(v, dict) for sub in v}
    for path, why in RESUMABLE.items():
        assert path in paths and why, path


class Reached(Exception):
    """The driver got past its checks to model resolution or Ray."""


@pytest.fixture
def committed_run(tmp_path, monkeypatch):
    """An --out holding a run started with learner.lr=1e-6 and committed after iteration 2 (its DeepSpeed files are
    never read: the run must stop before that)."""
    out = tmp_path / "run"
    (out / "checkpoints" / "iter_000002").mkdir(parents=True)
    (out / "checkpoints" / "committed.json").write_text(json.dumps({"tag": "iter_000002", "iteration": 2}))
    (out / "config.json").write_text(json.dumps(load_config(SMOKE, ["learner.lr=1e-6"]).to_dict(), indent=2))

    def tripwire(*args, **kwargs):
        raise Reached()

    monkeypatch.setattr(oirl.driver, "resolve_model", tripwire)
    monkeypatch.setattr(oirl.driver, "start_ray", tripwire)
    return out


@pytest.mark.parametrize("flag", ["--resume", "--auto-resume"])
def test_resume_with_a_changed_config_is_refused_before_anything_starts(committed_run, flag, capsys):
    before = (committed_run / "config.json").read_text()
    rc = main(["train", "--config", str(SMOKE), "--out", str(committed_run), "--no-progress", flag,
               "rollout.max_new_tokens=8"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "learner.lr: 1e-06 -> 0.003" in err and "rollout.max_new_tokens: 16 -> 8" in err
    assert "A resume may change only: iterations," in err
    assert (committed_run / "config.json").read_text() == before  # the run's own config is kept


def test_resume_with_allowed_changes_goes_on_and_records_them(committed_run):
    with pytest.raises(Reached):
        main(["train", "--config", str(SMOKE), "--out", str(committed_run), "--no-progress", "--resume",
              "learner.lr=1e-6", "iterations=6", "learner.timeout_s=99"])
    recorded = json.loads((committed_run / "config.json").read_text())
    assert recorded["iterations"] == 6 and recorded["learner"]["timeout_s"] == 99.0
    assert recorded["learner"]["lr"] == 1e-6


def test_resume_cannot_end_before_the_committed_iteration(committed_run):
    with pytest.raises(ConfigError, match="iterations=1 but the run has committed iteration 2"):
        oirl.driver.train(load_config(SMOKE, ["learner.lr=1e-6", "iterations=1"]), committed_run, resume=True)
