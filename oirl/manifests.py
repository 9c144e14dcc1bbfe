"""Offline validation of KubeRay manifests: CRD OpenAPI v3 schemas converted to strict JSON Schema.

No Kubernetes API server runs here, so we do what it would do with the CRD: the ``openAPIV3Schema`` of the served
version becomes a JSON Schema (Kubernetes extensions mapped: int-or-string -> integer|string, preserve-unknown-
fields -> open object, every other object closed with ``additionalProperties: false``, which is what the API server's
pruning plus kubectl's strict field validation enforce). Each pod template is also checked as a Kubernetes
PodTemplateSpec, using the PodTemplateSpec schema embedded in the CRD.

    schema = crd_json_schema(REPO/deploy/kuberay/crds/ray.io_rayclusters.yaml)
    errors = validate(manifest, schema)

A manifest file holds the RayCluster or RayJob and the PersistentVolumeClaims it defines (``load_documents``); a
claim is validated against the PersistentVolumeClaimSpec schema the same CRD embeds (``claim_schema``).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from oirl.config import REPO_ROOT

CRD_DIR = REPO_ROOT / "deploy" / "kuberay" / "crds"  # KubeRay v1.7.0, Apache-2.0 (LICENSE beside them)
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("format", "default"):
            continue  # formats like int32/quantity are not JSON Schema formats; defaults are not constraints
        if key in ("properties", "patternProperties"):
            out[key] = {k: _convert(v) for k, v in value.items()}
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = _convert(value)
        else:
            out[key] = _convert(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    if node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", True)
    elif out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False  # strict: unknown fields are errors, not silently pruned
    return out


_METADATA = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                   "namespace": {"type": "string"}, "labels": {"type": "object"},
                   "annotations": {"type": "object"}},
    "additionalProperties": False,
}


def crd_json_schema(crd_path: Path, version: str = "v1") -> dict[str, Any]:
    """JSON Schema of one CRD version (cached per file; callers must not modify it)."""
    return _crd_json_schema(Path(crd_path).resolve(), version)


@functools.lru_cache(maxsize=8)
def _crd_json_schema(crd_path: Path, version: str) -> dict[str, Any]:
    if not crd_path.is_file():
        raise FileNotFoundError(
            f"KubeRay CRD {crd_path} not found; the repository ships the v1.7.0 CRDs in "
            "deploy/kuberay/crds/"
        )
    crd = yaml.load(crd_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = _convert(v["schema"]["openAPIV3Schema"])
            # metadata is validated by the API server itself, not by the CRD; require a name as kubectl does.
            schema["properties"]["metadata"] = copy.deepcopy(_METADATA)
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
            schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
            schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
            return schema
    raise ValueError(f"{crd_path} has no version {version}")


def pod_template_schema(raycluster_schema: dict[str, Any]) -> dict[str, Any]:
    """The Kubernetes PodTemplateSpec schema, as embedded in the RayCluster CRD (head group template)."""
    tmpl = raycluster_schema["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    schema = copy.deepcopy(tmpl)
    # A PodTemplate must have a pod spec with at least one container that has a name and an image.
    schema["required"] = sorted(set(schema.get("required", [])) | {"spec"})
    containers = schema["properties"]["spec"]["properties"]["containers"]
    containers["minItems"] = 1
    containers["items"]["required"] = sorted(set(containers["items"].get("required", [])) | {"name", "image"})
    return schema


def claim_schema(raycluster_schema: dict[str, Any]) -> dict[str, Any]:
    """A PersistentVolumeClaim's schema: its spec is the PersistentVolumeClaimSpec that the RayCluster CRD embeds (a
    pod volume's ephemeral.volumeClaimTemplate), with accessModes and a storage request required."""
    pod = raycluster_schema["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    volume = pod["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]
    spec = copy.deepcopy(volume["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"])
    spec["required"] = sorted(set(spec.get("required", [])) | {"accessModes", "resources"})
    spec["properties"]["accessModes"]["minItems"] = 1
    requests = spec["properties"]["resources"]
    requests["required"] = ["requests"]
    requests["properties"]["requests"]["required"] = ["storage"]
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": "v1"}, "kind": {"const": "PersistentVolumeClaim"},
                           "metadata": copy.deepcopy(_METADATA), "spec": spec}}


def load_documents(path: Path | str) -> list[dict[str, Any]]:
    """Every document of a manifest file (a RayCluster or RayJob, and the PersistentVolumeClaims it mounts)."""
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def ray_manifest(path: Path | str) -> dict[str, Any]:
    """The one RayCluster or RayJob of a manifest file."""
    (doc,) = [d for d in load_documents(path) if d.get("kind") in CRD_FILES]
    return doc


def claims_in(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The PersistentVolumeClaims among ``docs``, by name."""
    return {d["metadata"]["name"]: d for d in docs
            if d.get("kind") == "PersistentVolumeClaim" and isinstance(d.get("metadata"), dict)
            and "name" in d["metadata"]}


# The GPU image's stack: vllm 0.32.0's wheel pins torch==2.13.0, and torch 2.13.0's PyPI wheels are CUDA 13.0 builds
# (their metadata requires cuda-toolkit 13.0.3, nvidia-nccl-cu13 2.29.7). The CPU extra pins the same torch.
GPU_STACK = {"vllm": "0.32.0", "torch": "2.13.0", "cuda": "13.0"}


def dockerfile_problems(text: str) -> list[str]:
    """What deploy/Dockerfile must get right for GPU_STACK: vLLM pinned to its version, and a CUDA base image of
    the CUDA that vLLM's torch was built with (DeepSpeed JIT-builds its ops with the image's nvcc and refuses a
    CUDA other than torch's)."""
    import re

    problems = []
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    cuda = [m.group(1) for b in bases if (m := re.match(r"nvidia/cuda:(\d+\.\d+)", b))]
    if cuda != [GPU_STACK["cuda"]]:
        problems.append(f"base image {bases}: use one nvidia/cuda:{GPU_STACK['cuda']}.x-devel image: vllm "
                        f"{GPU_STACK['vllm']} runs torch {GPU_STACK['torch']}, a CUDA {GPU_STACK['cuda']} build")
    if not re.search(rf"pip install[^\n]*[\"']?vllm=={re.escape(GPU_STACK['vllm'])}(?![\w.])", text):
        problems.append(f"pin vLLM: pip install \"vllm=={GPU_STACK['vllm']}\" (the version the CPU build and the "
                        "tests run, and whose torch fixes the image's CUDA)")
    return problems


def validate(instance: Any, schema: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


def pod_templates(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = manifest["spec"]["rayClusterSpec"] if manifest.get("kind") == "RayJob" else manifest["spec"]
    out = [("headGroupSpec", spec["headGroupSpec"]["template"])]
    out += [(f"workerGroupSpecs/{g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    if manifest.get("kind") == "RayJob" and "submitterPodTemplate" in manifest["spec"]:
        out.append(("submitterPodTemplate", manifest["spec"]["submitterPodTemplate"]))
    return out


def validate_manifest(manifest: dict[str, Any], crd_dir: Path = CRD_DIR) -> list[str]:
    """Schema errors of a RayCluster/RayJob manifest, including each pod template as a PodTemplateSpec."""
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    if kind == "PersistentVolumeClaim":
        return validate(manifest, claim_schema(crd_json_schema(crd_dir / CRD_FILES["RayCluster"])))
    if kind not in CRD_FILES:
        return [f"kind: expected one of {sorted(CRD_FILES)} or PersistentVolumeClaim, got {kind!r}"]
    errors = validate(manifest, crd_json_schema(crd_dir / CRD_FILES[kind]))
    pod_schema = pod_template_schema(crd_json_schema(crd_dir / CRD_FILES["RayCluster"]))
    for where, tmpl in pod_templates(manifest):
        errors += [f"{where} (PodTemplateSpec): {e}" for e in validate(tmpl, pod_schema)]
    return errors
