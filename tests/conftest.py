"""Shared fixtures. Anything that starts Ray runs only inside a loopback-only network namespace
(deploy/loopback.sh sets OIRL_IN_LOOPBACK_NS=1): Ray would otherwise bind the machine's routable address."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from oirl.config import REPO_ROOT, ModelConfig
from oirl.models import resolve_model


def in_loopback_namespace() -> bool:
    return os.environ.get("OIRL_IN_LOOPBACK_NS") == "1"


requires_loopback = pytest.mark.skipif(
    not in_loopback_namespace(),
    reason="starts Ray: run the suite as `deploy/loopback.sh python -m pytest` (loopback-only namespace)",
)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    return str(resolve_model(ModelConfig(path="tiny")))


@pytest.fixture(scope="module")
def ray_cluster():
    if not in_loopback_namespace():
        pytest.skip("starts Ray: run the suite as `deploy/loopback.sh python -m pytest`")
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             _temp_dir=f"/tmp/oirl-ray-test-{os.getpid()}",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:8]


def oirl_cmd() -> list[str]:
    return [sys.executable, "-m", "oirl.cli"]
