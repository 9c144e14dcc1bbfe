"""Offline validation of KubeRay manifests: CRD OpenAPI v3 schemas converted to strict JSON Schema.

No Kubernetes API server runs here, so we do what it would do with the CRD: the ``openAPIV3Schema`` of the served
version becomes a JSON Schema (Kubernetes extensions mapped: int-or-string -> integer|string, preserve-unknown-
fields -> open object, every other object closed with ``additionalProperties: false``, which is what the API server's
pruning plus kubectl's strict field validation enforce). Each pod template is also checked as a Kubernetes
PodTemplateSpec, using the PodTemplateSpec schema embedded in the CRD.

    schema = crd_json_schema(REPO/../shared/data/kuberay-crds/ray.io_rayclusters.yaml)
    errors = validate(manifest, schema)
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from oirl.config import REPO_ROOT

CRD_DIR = REPO_ROOT.parent / "shared" / "data" / "kuberay-crds"
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


def crd_json_schema(crd_path: Path, version: str = "v1") -> dict[str, Any]:
    """JSON Schema of one CRD version (cached per file; callers must not modify it)."""
    return _crd_json_schema(Path(crd_path).resolve(), version)


@functools.lru_cache(maxsize=8)
def _crd_json_schema(crd_path: Path, version: str) -> dict[str, Any]:
    if not crd_path.is_file():
        raise FileNotFoundError(
            f"KubeRay CRD {crd_path} not found; the v1.7.0 CRDs are expected in ../shared/data/kuberay-crds "
            "beside the repository"
        )
    crd = yaml.load(crd_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = _convert(v["schema"]["openAPIV3Schema"])
            # metadata is validated by the API server itself, not by the CRD; require a name as kubectl does.
            schema["properties"]["metadata"] = {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                               "namespace": {"type": "string"}, "labels": {"type": "object"},
                               "annotations": {"type": "object"}},
                "additionalProperties": False,
            }
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
    if kind not in CRD_FILES:
        return [f"kind: expected one of {sorted(CRD_FILES)}, got {kind!r}"]
    errors = validate(manifest, crd_json_schema(crd_dir / CRD_FILES[kind]))
    pod_schema = pod_template_schema(crd_json_schema(crd_dir / CRD_FILES["RayCluster"]))
    for where, tmpl in pod_templates(manifest):
        errors += [f"{where} (PodTemplateSpec): {e}" for e in validate(tmpl, pod_schema)]
    return errors
