"""A bare clone works: the repository's tracked files, copied into an empty folder with nothing beside them (no
../shared), load the default job's data, check the KubeRay manifests against the shipped CRDs and train.

The copy's own `oirl` package is the one imported (cwd first on sys.path, and PYTHONPATH for Ray's workers), so
a file the repository reads but does not track fails here even if the development checkout has it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_loopback

from oirl.config import REPO_ROOT


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The tracked tree (as it is in the working tree) in an empty folder with nothing beside it."""
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing tells which files the repository tracks")
    root = tmp_path_factory.mktemp("bare") / "oirl"
    for rel in tracked_files():
        src = REPO_ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is not part of the clone
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    assert not (root.parent / "shared").exists() and sorted(p.name for p in root.parent.iterdir()) == ["oirl"]
    return root


def run_in(root: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_clone_imports_its_own_package_and_resolves_the_default_data(clone):
    """`oirl train`'s default config (configs/demo.yaml, GSM8K) validates with its local-file checks on, and
    data.path is the copy's own file: GSM8K ships with the repository, under its license."""
    probe = ("import json, oirl; from oirl.config import load_config, resolve_path\n"
             "cfg = load_config(None, check_paths=True)\n"
             "print(json.dumps({'package': oirl.__file__, 'data': str(resolve_path(cfg.data.path).resolve())}))")
    proc = run_in(clone, "-c", probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).resolve() == (clone / "oirl" / "__init__.py").resolve()
    assert Path(found["data"]) == (clone / "data" / "gsm8k" / "train.jsonl").resolve()
    rows = (clone / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()
    assert len(rows) == 7473 and {"question", "answer"} <= set(json.loads(rows[0]))
    assert "MIT License" in (clone / "data" / "gsm8k" / "LICENSE").read_text()
    assert "Apache License" in (clone / "deploy" / "kuberay" / "crds" / "LICENSE").read_text()


@pytest.mark.parametrize("config", ["configs/smoke.yaml", "configs/demo.yaml"])
def test_show_config_runs_in_the_clone(clone, config):
    proc = run_in(clone, "-m", "oirl.cli", "show-config", "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert shown["data"]["path"] == "data/gsm8k/train.jsonl"


def test_plan_check_validates_the_manifests_against_the_shipped_crds(clone):
    manifests = sorted(str(p.relative_to(clone)) for p in (clone / "deploy" / "kuberay").glob("*.yaml"))
    assert manifests == ["deploy/kuberay/raycluster.yaml", "deploy/kuberay/rayjob.yaml"]
    proc = run_in(clone, "-m", "oirl.cli", "plan", "--config", "configs/gpu.yaml", "--check", *manifests)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checked = [line for line in proc.stdout.splitlines() if line.startswith("ok   deploy/kuberay/")]
    assert any("(RayCluster " in line for line in checked) and any("(RayJob " in line for line in checked)
    # The schemas really come from the copy's CRDs: without them the same check fails, naming where they belong.
    shutil.move(clone / "deploy" / "kuberay" / "crds", clone / "crds-away")
    try:
        gone = run_in(clone, "-m", "oirl.cli", "plan", "--config", "configs/gpu.yaml", "--check", *manifests)
    finally:
        shutil.move(clone / "crds-away", clone / "deploy" / "kuberay" / "crds")
    assert gone.returncode != 0 and "deploy/kuberay/crds" in gone.stderr


@pytest.mark.slow
@requires_loopback
def test_train_one_iteration_in_the_clone_on_the_shipped_gsm8k(clone, tmp_path):
    """configs/smoke.yaml for one iteration, on the shipped GSM8K prompts scored by the GSM8K rule."""
    out = tmp_path / "run"
    proc = run_in(clone, "-m", "oirl.cli", "train", "--config", "configs/smoke.yaml", "--out", str(out),
                  "--no-progress", "iterations=1", "checkpoint_every=0", "data.source=gsm8k", "data.max_rows=64",
                  "data.max_prompt_tokens=1024", "reward.kind=gsm8k", timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["iteration"] for r in rows] == [0]
    assert rows[0]["rollout/on_policy_checked"] == 1 and rows[0]["sync/bytes"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["source"] == "gsm8k" and config["data"]["path"] == "data/gsm8k/train.jsonl"
    assert (out / "final" / "config.json").is_file()
