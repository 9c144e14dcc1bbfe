"""Placement plan: the one source of truth for what a config asks of a cluster.

``placement_plan(cfg)`` lists every role (rollout engines, learner ranks, reward actor) with its count, CPUs, GPUs
and the KubeRay worker group it belongs to. The driver spawns actors with ``actor_options(cfg, role)``, and
``check_manifest`` checks a RayCluster/RayJob manifest against the same plan, so the two cannot drift apart.

With ``cluster.pin_node_groups`` each actor also asks for 1 unit of the custom resource ``oirl_<group>`` that its
worker group advertises (``rayStartParams.resources``), so engines land on the rollout nodes, ranks on the learner
nodes, and the reward actor on the reward nodes.

``check_manifest`` also checks authentication as KubeRay v1.7 does it: ``authOptions: {mode: token, secretName}``
on the cluster spec makes the operator put RAY_AUTH_MODE/RAY_AUTH_TOKEN into every Ray container and into a
RayJob's submitter. A manifest without it, with the token set by hand beside it, or whose RayJob submitter could
not get the token (hand-set token mode on the head, nothing for the submitter) is a problem.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

ROLES = ("rollout", "learner", "reward")


@dataclass(frozen=True)
class RolePlan:
    role: str
    count: int
    num_cpus: float
    num_gpus: float
    node_group: str

    @property
    def resource_name(self) -> str:
        return f"oirl_{self.node_group}"


def placement_plan(cfg: Any) -> list[RolePlan]:
    return [
        RolePlan("rollout", cfg.rollout.num_engines, cfg.rollout.num_cpus, cfg.rollout.num_gpus, "rollout"),
        RolePlan("learner", cfg.learner.num_ranks, cfg.learner.num_cpus, cfg.learner.num_gpus, "learner"),
        RolePlan("reward", 1, cfg.reward.num_cpus, cfg.reward.num_gpus, "reward"),
    ]


def actor_options(cfg: Any, role: str) -> dict[str, Any]:
    """Ray actor options for one actor of ``role`` (the driver and the placement test both use this)."""
    plan = {p.role: p for p in placement_plan(cfg)}[role]
    opts: dict[str, Any] = {"num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus}
    if cfg.pin_node_groups:
        opts["resources"] = {plan.resource_name: 1}
    return opts


def missing_node_groups(cfg: Any, available: dict[str, float]) -> list[str]:
    """With ``pin_node_groups``, every custom resource ``oirl_<group>`` the plan's actors ask for, short in
    ``available`` (``ray.cluster_resources()``): 'oirl_rollout (2 needed, 0 advertised)'. Empty when nothing is
    short or nothing is pinned."""
    if not cfg.pin_node_groups:
        return []
    needed: dict[str, int] = {}
    for p in placement_plan(cfg):
        if p.count:
            needed[p.resource_name] = needed.get(p.resource_name, 0) + p.count
    return [f"{name} ({n} needed, {available.get(name, 0):g} advertised)" for name, n in needed.items()
            if available.get(name, 0) < n]


NODE_GROUPS_WAIT_S = 60.0  # a joined cluster's worker nodes may still be registering when the job starts


def check_node_groups(cfg: Any, wait_s: float = 0.0) -> None:
    """Fail at start-up, before any actor is spawned, when ``pin_node_groups`` asks for custom resources no node
    advertises: each actor would otherwise wait for them until the learner's placement times out (30 minutes
    by default) and then report missing CPUs/GPUs. Polls ``ray.cluster_resources()`` for up to ``wait_s`` (nodes
    still joining a cluster); the embedded local cluster can gain none, so the driver passes 0 for it."""
    import time

    import ray

    from oirl.config import ConfigError

    deadline = time.monotonic() + wait_s
    while True:
        missing = missing_node_groups(cfg, ray.cluster_resources())
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(2.0)
    if missing:
        groups = ", ".join(f"{p.resource_name} on the {p.node_group} group" for p in placement_plan(cfg) if p.count)
        raise ConfigError(
            f"pin_node_groups=true, but the Ray cluster does not advertise what the actors ask for: "
            f"{'; '.join(missing)}. Each actor would wait for it until a timeout. Start each worker node with its "
            """group's resource (`ray start --address ... --resources='{"oirl_rollout": 1000}'`; KubeRay: """
            f"rayStartParams.resources of each worker group, as deploy/kuberay/*.yaml do: {groups}), or set "
            "pin_node_groups=false on a cluster without node groups")


def engine_config(cfg: Any, model_max_len: int | None = None) -> Any:
    """The rollout config the engines are built with (actors.rollout_worker.engine_kwargs): ``max_model_len`` and
    ``max_num_seqs`` resolved from the run when left at 0.

    max_model_len: the prompt budget + the response budget (data.max_prompt_tokens + rollout.max_new_tokens), at
    most ``model_max_len`` (the model's context window; a budget beyond it could not be generated anyway). Left to
    itself vLLM reserves room for the whole window, and on a GPU refuses to start a 32k- or 128k-context model
    whose window does not fit its KV cache. max_num_seqs: one engine's share of a batch (its prompts x
    rollout.samples_per_prompt), so every sample of its shard runs at once, at most MAX_NUM_SEQS."""
    import dataclasses

    from actors.agent.episodes import episode_budget
    from actors.rollout_worker import MAX_NUM_SEQS

    r = cfg.rollout
    response = episode_budget(r) if r.env else r.max_new_tokens  # multi-turn: the whole episode after the prompt
    length = r.max_model_len or cfg.data.max_prompt_tokens + response
    if model_max_len and length > model_max_len:
        logger.warning("data.max_prompt_tokens + rollout.max_new_tokens = %d exceeds the model's context window "
                       "(%d): the engines hold %d tokens per sequence", length, model_max_len, model_max_len)
        length = model_max_len
    per_engine = -(-cfg.data.prompts_per_iteration // r.num_engines) * r.samples_per_prompt
    return dataclasses.replace(r, max_model_len=length, max_num_seqs=r.max_num_seqs or min(per_engine, MAX_NUM_SEQS))


def model_context_window(model_path: str) -> int | None:
    """The model's context window from its config.json (max_position_embeddings, or n_positions); None if absent."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def learner_bundles(cfg: Any) -> list[dict[str, float]]:
    """The placement-group bundles LearnerGroup reserves (PACK) for this config's learner ranks."""
    from learner.group import rank_bundles

    return rank_bundles(cfg.learner, actor_options(cfg, "learner").get("resources"))


def format_plan(cfg: Any) -> str:
    rows = placement_plan(cfg)
    lines = [f"{'role':<8} {'count':>5} {'cpus':>6} {'gpus':>5}  node group (custom resource)"]
    for p in rows:
        lines.append(f"{p.role:<8} {p.count:>5} {p.num_cpus:>6g} {p.num_gpus:>5g}  {p.node_group} ({p.resource_name})")
    total_cpu = sum(p.count * p.num_cpus for p in rows)
    total_gpu = sum(p.count * p.num_gpus for p in rows)
    lines.append(f"total: {total_cpu:g} CPUs, {total_gpu:g} GPUs (+ the driver on the head node)")
    return "\n".join(lines)


def plan_json(cfg: Any) -> str:
    return json.dumps([asdict(p) for p in placement_plan(cfg)], indent=2)


# ---- manifests ---------------------------------------------------------------------------------------------------


def parse_cpu(q: Any) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _ray_container(template: dict) -> dict:
    containers = template.get("spec", {}).get("containers", [])
    for c in containers:
        if c.get("name") in ("ray-head", "ray-worker"):
            return c
    return containers[0] if containers else {}


def _gpu(resources: dict, kind: str) -> float:
    return float(resources.get(kind, {}).get("nvidia.com/gpu", 0))


def cluster_spec(manifest: dict) -> dict:
    kind = manifest.get("kind")
    if kind == "RayCluster":
        return manifest["spec"]
    if kind == "RayJob":
        return manifest["spec"]["rayClusterSpec"]
    raise ValueError(f"expected kind RayCluster or RayJob, got {kind!r}")


_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env", []) if isinstance(e, dict)}


def _has_token(container: dict) -> bool:
    env = _env(container)
    return "RAY_AUTH_TOKEN" in env or "RAY_AUTH_TOKEN_PATH" in env


def _token_mode(container: dict) -> bool:
    """Whether `ray start` in this container runs with token auth (Ray 2.60: RAY_AUTH_MODE, else on iff a token
    is given)."""
    mode = _env(container).get("RAY_AUTH_MODE", {}).get("value")
    return mode == "token" if mode is not None else _has_token(container)


def auth_problems(manifest: dict) -> list[str]:
    """Token authentication of a RayCluster/RayJob, including whether a RayJob's submitter can authenticate."""
    from oirl.manifests import pod_templates

    name = manifest.get("metadata", {}).get("name", "?")
    is_job = manifest.get("kind") == "RayJob"
    where = "spec.rayClusterSpec" if is_job else "spec"
    fix = f"set {where}.authOptions: {{mode: token, secretName: <Secret with key auth_token>}}"
    options = cluster_spec(manifest).get("authOptions") or {}
    templates = pod_templates(manifest)
    if options.get("mode") == "token":
        problems = []
        if is_job and options.get("enableK8sTokenAuth"):
            problems.append(f"{name}: KubeRay rejects authOptions.enableK8sTokenAuth on a RayJob; remove it (the "
                            "token from the Secret reaches the submitter)")
        for group, tmpl in templates:
            pod = tmpl.get("spec", {})
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                hand = [k for k in _AUTH_ENV if k in _env(c)]
                if hand:
                    problems.append(f"{name}/{group}/{c.get('name')}: {', '.join(hand)} set by hand; authOptions "
                                    "makes the operator inject them into every Ray container and the job submitter "
                                    "(it never overrides a hand-set value): remove them so the two cannot disagree")
        return problems
    head = _ray_container(templates[0][1])
    if not _token_mode(head):
        return [f"{name}: token auth is off: anyone who reaches the head's job API can run code on the cluster; "
                f"{fix}"]
    problems = [f"{name}/{group}: the head requires a token but this group's Ray container has no RAY_AUTH_TOKEN, "
                f"so its nodes cannot join; {fix} instead of setting the token by hand"
                for group, tmpl in templates[1:] if group != "submitterPodTemplate"
                and not _has_token(_ray_container(tmpl))]
    mode = manifest.get("spec", {}).get("submissionMode", "K8sJobMode")
    if is_job and mode != "InteractiveMode":
        submitter = manifest["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])
        if not (mode == "K8sJobMode" and submitter and _has_token(submitter[0])):
            problems.append(
                f"{name}: the RayJob's submitter cannot authenticate: the head runs with RAY_AUTH_MODE=token set by "
                f"hand, but the {mode} submitter gets no RAY_AUTH_TOKEN (the operator gives it one only through "
                f"authOptions), so `ray job submit` is refused and the job never starts; {fix} and remove the "
                "hand-set RAY_AUTH_* env")
    return problems


def check_manifest(cfg: Any, manifest: dict, ray_version: str) -> list[str]:
    """Rules the CRD schema cannot express. Returns a list of problems (empty = the manifest fits the plan)."""
    problems: list[str] = []
    name = manifest.get("metadata", {}).get("name", "?")
    spec = cluster_spec(manifest)
    if spec.get("rayVersion") != ray_version:
        problems.append(f"{name}: rayVersion {spec.get('rayVersion')!r} != installed Ray {ray_version!r}")
    head = spec.get("headGroupSpec", {})
    if head.get("serviceType", "ClusterIP") not in ("ClusterIP",):
        problems.append(f"{name}: head serviceType {head.get('serviceType')!r} exposes the dashboard and job API; "
                        "use ClusterIP and reach it with kubectl port-forward")
    if head.get("enableIngress"):
        problems.append(f"{name}: headGroupSpec.enableIngress exposes the dashboard and job API publicly")
    groups = {g.get("groupName"): g for g in spec.get("workerGroupSpecs", [])}
    templates = [("head", head.get("template", {}))] + [(n, g.get("template", {})) for n, g in groups.items()]
    for gname, tmpl in templates:
        pod = tmpl.get("spec", {})
        shm_volumes = {v["name"] for v in pod.get("volumes", [])
                       if v.get("emptyDir", {}).get("medium") == "Memory"}
        for c in pod.get("containers", []):
            res = c.get("resources", {})
            if _gpu(res, "limits") != _gpu(res, "requests"):
                problems.append(f"{name}/{gname}/{c.get('name')}: nvidia.com/gpu limits {_gpu(res, 'limits'):g} "
                                f"!= requests {_gpu(res, 'requests'):g}; set them equal")
        if any("persistentVolumeClaim" in v for v in pod.get("volumes", [])) and \
                "fsGroup" not in pod.get("securityContext", {}):
            problems.append(f"{name}/{gname}: set securityContext.fsGroup (1000, the image's user) so that the "
                            "pod can write its persistent volume (checkpoints); volumes are root-owned otherwise")
        ray_c = _ray_container(tmpl)
        mounts = {m.get("name"): m.get("mountPath") for m in ray_c.get("volumeMounts", [])}
        if not any(mounts.get(v) == "/dev/shm" for v in shm_volumes):
            problems.append(f"{name}/{gname}: mount an emptyDir with medium: Memory at /dev/shm (Ray's object "
                            "store and the shm weight transport need it)")
    for g in groups.values():
        lo, hi, n = g.get("minReplicas", 0), g.get("maxReplicas", 2**31), g.get("replicas", 0)
        if not lo <= n <= hi:
            problems.append(f"{name}/{g.get('groupName')}: replicas {n} outside [minReplicas {lo}, "
                            f"maxReplicas {hi}]")
    for p in placement_plan(cfg):
        if p.count == 0:
            continue
        g = groups.get(p.node_group)
        if g is None:
            problems.append(f"{name}: no worker group '{p.node_group}' for the {p.count} {p.role} actor(s)")
            continue
        params = g.get("rayStartParams", {})
        res_param = params.get("resources", "")
        if cfg.pin_node_groups and p.resource_name not in str(res_param):
            problems.append(f"{name}/{p.node_group}: rayStartParams.resources must advertise "
                            f"'{p.resource_name}' (cluster.pin_node_groups is on)")
        c = _ray_container(g.get("template", {}))
        limits = c.get("resources", {}).get("limits", {})
        node_cpu = parse_cpu(params.get("num-cpus", limits.get("cpu", 0)))
        node_gpu = float(params.get("num-gpus", _gpu(c.get("resources", {}), "limits")))
        fits = math.inf
        if p.num_cpus > 0:
            fits = min(fits, math.floor(node_cpu / p.num_cpus + 1e-9))
        if p.num_gpus > 0:
            fits = min(fits, math.floor(node_gpu / p.num_gpus + 1e-9))
        capacity = g.get("replicas", 0) * fits
        if capacity < p.count:
            problems.append(
                f"{name}/{p.node_group}: plan needs {p.count} {p.role} actor(s) x ({p.num_cpus:g} CPU, "
                f"{p.num_gpus:g} GPU) but {g.get('replicas', 0)} replica(s) of ({node_cpu:g} CPU, {node_gpu:g} GPU) "
                f"hold {capacity if capacity != math.inf else 'any number'}; raise replicas or node size"
            )
    return problems + nccl_problems(cfg, manifest) + retry_problems(manifest) + auth_problems(manifest)


GPUS_PER_NODE = 8  # the GPU nodes the recipes are written for (HGX/DGX-class); a pod is never larger than a node
NCCL_ENV = {"NCCL_SOCKET_IFNAME": "the pod network's interface (eth0): NCCL may otherwise pick another interface "
                                  "that peers in other pods cannot reach, and the first collective hangs",
            "NCCL_DEBUG": "WARN: NCCL's own reason for a failed collective reaches the logs"}


def nccl_problems(cfg: Any, manifest: dict) -> list[str]:
    """GPU worker groups talk NCCL (learner ranks; learner rank 0 and the engines' weight broadcast): their Ray
    containers set NCCL_ENV, and the learner's GPUs of a node sit in one pod (ranks in one pod reach each other
    over NVLink and shared memory; ranks in two pods of one node go through the pod network), i.e. each learner
    pod holds min(the plan's learner GPUs, GPUS_PER_NODE)."""
    name = manifest.get("metadata", {}).get("name", "?")
    problems = []
    for g in cluster_spec(manifest).get("workerGroupSpecs", []):
        c = _ray_container(g.get("template", {}))
        if _gpu(c.get("resources", {}), "limits") <= 0:
            continue
        env = _env(c)
        for var, why in NCCL_ENV.items():
            if var not in env:
                problems.append(f"{name}/{g.get('groupName')}: set {var} in the Ray container's env ({why})")
    learner = {p.role: p for p in placement_plan(cfg)}["learner"]
    group = {g.get("groupName"): g for g in cluster_spec(manifest).get("workerGroupSpecs", [])}.get("learner")
    need = learner.count * learner.num_gpus
    if group is not None and need > 0:
        per_pod = _gpu(_ray_container(group.get("template", {})).get("resources", {}), "limits")
        want = min(need, GPUS_PER_NODE)
        if per_pod < want:
            problems.append(
                f"{name}/learner: each learner pod holds {per_pod:g} GPU(s) but the plan's {learner.count} ranks "
                f"need {need:g}: put a node's learner GPUs in one pod (nvidia.com/gpu and num-gpus {want:g}, "
                f"replicas {math.ceil(need / want)}), so that NCCL between the ranks of a node uses NVLink and "
                "shared memory, not the pod network")
    return problems


CHECKPOINT_MOUNT = "/checkpoints"  # where a RayCluster's runs put --out (README: oirl submit ... --out /checkpoints/run)


def storage_problems(manifest: dict, claims: dict[str, dict]) -> list[str]:
    """--out must be one volume for the driver (head) and every learner rank: the ranks write their checkpoint
    files there and the driver commits them. The volume under --out (a RayJob's entrypoint; a RayCluster's runs:
    CHECKPOINT_MOUNT) must be mounted writable at the same path by the head and the learner group, from a
    PersistentVolumeClaim that the same file defines with accessModes ReadWriteMany (pods on several nodes)."""
    import shlex

    name = manifest.get("metadata", {}).get("name", "?")
    out = CHECKPOINT_MOUNT
    if manifest.get("kind") == "RayJob":
        argv = shlex.split(manifest.get("spec", {}).get("entrypoint", ""))
        if "--out" in argv[:-1]:
            out = argv[argv.index("--out") + 1]
        if not out.startswith("/"):
            return [f"{name}: --out {out!r} is relative: each node resolves it in its own working directory, so "
                    f"the ranks' checkpoint files and the driver's commit land apart; use an absolute path on the "
                    "ReadWriteMany volume (e.g. /checkpoints/<run>)"]
    spec = cluster_spec(manifest)
    pods = [("head", spec.get("headGroupSpec", {}).get("template", {}))]
    pods += [(g.get("groupName"), g.get("template", {})) for g in spec.get("workerGroupSpecs", [])
             if g.get("groupName") == "learner"]
    problems = []
    seen: dict[str, str] = {}  # pod group -> the claim under --out
    for group, tmpl in pods:
        volumes = {v.get("name"): v for v in tmpl.get("spec", {}).get("volumes", [])}
        mounts = [m for m in _ray_container(tmpl).get("volumeMounts", [])
                  if out == m.get("mountPath") or out.startswith(m.get("mountPath", "").rstrip("/") + "/")]
        mount = max(mounts, key=lambda m: len(m.get("mountPath", "")), default=None)
        where = f"{name}/{group}"
        if mount is None:
            problems.append(f"{where}: nothing is mounted at {out} (--out): mount the checkpoints volume there, "
                            "a PersistentVolumeClaim with accessModes [ReadWriteMany]")
            continue
        claim = volumes.get(mount.get("name"), {}).get("persistentVolumeClaim", {}).get("claimName")
        if claim is not None:
            seen[group] = claim
        if mount.get("readOnly") or claim is None:
            problems.append(f"{where}: {mount.get('mountPath')} (--out {out}) is "
                            f"{'read-only' if mount.get('readOnly') else 'not a PersistentVolumeClaim'}; mount a "
                            "writable ReadWriteMany claim there")
        elif claim not in claims:
            problems.append(f"{where}: the claim {claim!r} mounted at {mount.get('mountPath')} (--out) is not "
                            "defined in this file; define it (kind: PersistentVolumeClaim, accessModes: "
                            "[ReadWriteMany]) so that the manifest says what storage it needs")
        elif "ReadWriteMany" not in claims[claim].get("spec", {}).get("accessModes", []):
            problems.append(f"{where}: the claim {claim!r} under --out has accessModes "
                            f"{claims[claim].get('spec', {}).get('accessModes')}; the head and the learner pods on "
                            "other nodes write it at once, which needs ReadWriteMany")
    if len(set(seen.values())) > 1:
        problems.append(f"{name}: --out {out} is on different claims in different pods ({seen}); the driver and "
                        "every learner rank must write the same volume")
    return problems


def check_documents(cfg: Any, docs: list[dict], ray_version: str) -> list[tuple[str, list[str]]]:
    """Every document of one manifest file, checked: (kind and name, problems) each. Claims are checked against
    their schema; a RayCluster/RayJob against its CRD, the plan (``check_manifest``) and the claims the file
    defines (``storage_problems``)."""
    from oirl.manifests import claims_in, validate_manifest

    claims = claims_in(docs)
    out = []
    for doc in docs:
        problems = validate_manifest(doc)
        if doc.get("kind") in ("RayCluster", "RayJob"):
            problems += check_manifest(cfg, doc, ray_version) + storage_problems(doc, claims)
        out.append((f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}", problems))
    return out


def retry_problems(manifest: dict) -> list[str]:
    """A RayJob that retries `oirl train` (backoffLimit > 0) must let each retry continue the run: without
    --auto-resume a retry starts afresh in the same --out, over the failed attempt's checkpoints."""
    import shlex

    spec = manifest.get("spec", {})
    if manifest.get("kind") != "RayJob" or not spec.get("backoffLimit", 0):
        return []
    argv = shlex.split(spec.get("entrypoint", ""))
    if argv[:2] == ["oirl", "train"] and "--auto-resume" not in argv:
        name = manifest.get("metadata", {}).get("name", "?")
        return [f"{name}: backoffLimit {spec['backoffLimit']} retries the entrypoint, and each retry would start the "
                "run afresh; add --auto-resume to `oirl train` (or set backoffLimit: 0)"]
    return []
