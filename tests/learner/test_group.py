"""LearnerGroup's start-up on real Ray actors: every rank checks, before anything is loaded, that it sees the file
the driver wrote under --out (shared storage for multi-node checkpoints)."""

import pytest
import ray

from learner.group import LearnerGroup
from learner.learner_worker import LearnerConfig
from oirl import checkpoint
from oirl.remote import RemoteError


@pytest.mark.slow
def test_every_rank_checks_the_drivers_file_before_setup(ray_cluster, tiny_model_path, tmp_path):
    driver_out = tmp_path / "driver"
    driver_out.mkdir()
    checkpoint.write_storage_probe(driver_out, "run-x")
    # The ranks are pointed at a directory the driver did not write: as on a node whose --out is its local disk.
    absent = str(tmp_path / "rank-local" / checkpoint.STORAGE_PROBE)
    with pytest.raises(RemoteError, match=r"(?s)checking --out from every learner rank: learner rank \d \(oirl-learner-"
                                          r"probe-rank\d\) failed: .*learner rank \d on node .*\(Ray node [0-9a-f]+\) "
                                          r"does not see the file the driver wrote under --out"):
        LearnerGroup(LearnerConfig(num_ranks=2, num_cpus=1, timeout_s=120), tiny_model_path, "float32", 0, 1.0,
                     "probe", micro_batch=1, storage_probe=(absent, "run-x"))
    (state,) = [g["state"] for g in ray.util.placement_group_table().values() if g["name"] == "oirl-learner-probe"]
    assert state == "REMOVED"  # nothing of the failed start keeps its claim on the cluster
