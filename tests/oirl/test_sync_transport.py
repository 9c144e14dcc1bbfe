"""Choosing the weight transport: /dev/shm must hold a copy of the policy before `shm` is chosen (issue 17,
section 4). Under `auto` a /dev/shm too small for it means the collective transport; an explicit `shm` fails at
start-up naming the size needed. The size is the checkpoint's, from its safetensors headers."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from oirl.config import REPO_ROOT
from oirl.sync import SyncError, checkpoint_tensors, choose_transport, policy_bytes


def test_auto_takes_shm_only_when_it_holds_the_policy():
    assert choose_transport("auto", "n0", ["n0", "n0"], shm_free=1000, shm_needed=1000) == "shm"
    assert choose_transport("auto", "n0", ["n0", "n0"], shm_free=999, shm_needed=1000) == "collective"
    assert choose_transport("auto", "n0", ["n0", "n1"], shm_free=10**12, shm_needed=1000) == "collective"
    assert choose_transport("auto", "n0", ["n0"]) == "shm"  # nothing known: not checked
    assert choose_transport("collective", "n0", ["n0"], shm_free=0, shm_needed=1000) == "collective"


def test_explicit_shm_names_the_size_it_needs():
    assert choose_transport("shm", "n0", ["n0"], shm_free=3 * 2**30, shm_needed=2**30) == "shm"
    with pytest.raises(SyncError, match=r"sync.transport=shm needs 1.50 GiB \(1610612736 bytes\) free in /dev/shm on "
                                        r"learner rank 0's node \(one copy of the policy\) but it has 1.00 GiB "
                                        r"\(1073741824 bytes\); enlarge /dev/shm .* or use sync.transport=collective"):
        choose_transport("shm", "n0", ["n0"], shm_free=2**30, shm_needed=3 * 2**29)
    with pytest.raises(SyncError, match="needs every engine on learner rank 0's node"):
        choose_transport("shm", "n0", ["n1"], shm_free=2**40, shm_needed=1)


def test_policy_bytes_are_the_checkpoints_in_the_training_dtype(tiny_model_path):
    from pathlib import Path

    state = {}
    for f in sorted(Path(tiny_model_path).glob("*.safetensors")):
        state.update(load_file(f))
    state.pop("lm_head.weight", None)  # the tiny model ties its head: it travels as the embedding
    numel = sum(t.numel() for t in state.values())
    expected = checkpoint_tensors(tiny_model_path)
    assert policy_bytes(expected, "float32") == numel * 4
    assert policy_bytes(expected, "bfloat16") == numel * 2
    assert policy_bytes(None, "float32") is None
    assert numel == sum(int(np.prod(s)) for s in expected.values())


SMALL_SHM = """
import json, sys
from oirl.sync import SyncError, choose_transport
from oirl.weights import shm_free_bytes
free = shm_free_bytes(sys.argv[1])
need = 4 << 20  # a policy of 4 MiB against a 1 MiB /dev/shm
result = {"free": free, "auto": choose_transport("auto", "n0", ["n0"], free, need)}
try:
    choose_transport("shm", "n0", ["n0"], free, need)
except SyncError as e:
    result["shm_error"] = str(e)
print(json.dumps(result))
"""


def test_a_small_tmpfs_is_measured_and_refused(tmp_path):
    """A real 1 MiB tmpfs (private mount namespace) as /dev/shm: its free space is measured with statvfs, and a
    4 MiB policy does not go there."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "--mount", "bash", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace with tmpfs here: {probe.stderr.decode().strip()}")
    script = f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {sys.executable} -c \"$0\" {mnt}"
    proc = subprocess.run(["unshare", "--mount", "bash", "-c", script, SMALL_SHM], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["free"] == 2**20  # the whole tmpfs: nothing written there yet
    assert result["auto"] == "collective"
    assert "needs 0.00 GiB (4194304 bytes) free in /dev/shm" in result["shm_error"]
    assert "it has 0.00 GiB (1048576 bytes)" in result["shm_error"]
