"""Checks for the deployment artefacts that no tool here can run: KubeRay's admission rules, PromQL names.

* :func:`crd_validator` — the ``v1`` openAPIV3Schema of a KubeRay CRD (tests/data/kuberay-crds, v1.7.0) as a
  jsonschema validator, made strict like ``kubectl apply`` (field validation "Strict"): an unknown field
  is an error instead of being pruned silently.
* :func:`kuberay_errors` — the rules KubeRay's webhook/controller enforce and the CRD cannot express
  (``ray-operator/controllers/ray/utils/validation.go``, the RayCluster webhook): name length and DNS-1035,
  RayJob needs ``rayClusterSpec`` or ``clusterSelector``, ≥ 1 container per group, 0 ≤ min ≤ max, with the
  autoscaler no suspended group and (v2) restartPolicy Never or unset, no
  resources in both ``rayStartParams`` and ``resources``, TTL only with ``shutdownAfterJobFinishes``...
* :func:`promql_metric_names` — the metric names a PromQL expression reads.
* :func:`ray_nodes` — the Ray resources each pod of a RayCluster spec will advertise, the way the operator
  derives ``ray start`` flags (CPU / GPU from container limits, custom ones from the group's ``resources``).
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "tests" / "data" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # the operator appends 6 chars to job/service names
# fields whose CRD rules are CEL (x-kubernetes-validations), which jsonschema cannot evaluate; our manifests
# must not use them, so the schema check stays complete for what they do use
CEL_FIELDS = ("managedBy", "deletionStrategy")
RAY_START_RESOURCE_KEYS = ("num-cpus", "num-gpus", "memory", "resources")


def load_yaml_documents(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


def _strict(schema):
    """Every object schema with listed properties rejects other keys (kubectl's strict field validation)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the KubeRay v1.7.0 CRD copies live in tests/data/kuberay-crds")
    crd = load_yaml_documents(path)[0]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def _group_errors(where: str, group: dict) -> list[str]:
    errors = []
    if not group.get("template", {}).get("spec", {}).get("containers"):
        errors.append(f"{where}: the pod template needs at least one container")
    params = group.get("rayStartParams") or {}
    if group.get("resources") and any(params.get(k) for k in RAY_START_RESOURCE_KEYS):
        errors.append(f"{where}: resources set in both rayStartParams and resources")
    if "labels" in params:
        errors.append(f"{where}: rayStartParams['labels'] is not supported; use the group's labels field")
    return errors


def cluster_spec_errors(spec: dict, where: str = "spec") -> list[str]:
    errors = _group_errors(f"{where}.headGroupSpec", spec.get("headGroupSpec", {}))
    names = [g.get("groupName") for g in spec.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names):
        errors.append(f"{where}.workerGroupSpecs: group names must be unique, got {names}")
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        at = f"{where}.workerGroupSpecs[{i}] ({group.get('groupName')})"
        errors += _group_errors(at, group)
        lo, hi, n = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1), group.get("replicas")
        if lo < 0 or hi < 0 or (n is not None and n < 0):
            errors.append(f"{at}: replica counts must be non-negative")
        if lo > hi:
            errors.append(f"{at}: minReplicas {lo} > maxReplicas {hi}")
        if n is not None and not lo <= n <= hi:
            errors.append(f"{at}: replicas {n} outside [minReplicas {lo}, maxReplicas {hi}]")
        if spec.get("enableInTreeAutoscaling") and group.get("suspend"):
            errors.append(f"{at}: a worker group cannot be suspended with the autoscaler enabled")
    if spec.get("enableInTreeAutoscaling") and (spec.get("autoscalerOptions") or {}).get("version") == "v2":
        for i, g in enumerate([spec.get("headGroupSpec", {}), *spec.get("workerGroupSpecs", [])]):
            if g.get("template", {}).get("spec", {}).get("restartPolicy", "Never") != "Never":
                errors.append(f"{where}: restartPolicy of {g.get('groupName', 'the head')} should be Never or unset "
                              "with autoscaler v2")
    return errors


def kuberay_errors(doc: dict) -> list[str]:
    """What KubeRay's webhook/controller would reject in ``doc`` beyond its CRD schema (empty = accepted)."""
    kind, name, spec = doc["kind"], doc.get("metadata", {}).get("name", ""), doc.get("spec", {})
    errors = []
    if len(name) > MAX_NAME[kind]:
        errors.append(f"metadata.name {name!r}: {kind} names are at most {MAX_NAME[kind]} characters")
    if not DNS1035.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
    errors += [f"spec.{f}: CEL-validated field not checked offline; keep it out" for f in CEL_FIELDS if f in spec]
    if kind == "RayCluster":
        errors += cluster_spec_errors(spec)
    elif kind == "RayService":
        errors += cluster_spec_errors(spec.get("rayClusterConfig", {}), "spec.rayClusterConfig")
    elif kind == "RayJob":
        selector = spec.get("clusterSelector") or {}
        if "rayClusterSpec" not in spec and not selector:
            errors.append("spec: a RayJob needs rayClusterSpec or clusterSelector")
        if selector and not selector.get("ray.io/cluster"):
            errors.append("spec.clusterSelector: the ray.io/cluster key must name a cluster")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec.suspend needs shutdownAfterJobFinishes: true")
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            errors.append("spec.ttlSecondsAfterFinished must be >= 0")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec.ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("backoffLimit", 0) < 0:
            errors.append("spec.backoffLimit must be >= 0")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
            errors.append("spec.backoffLimit is incompatible with InteractiveMode")
        if mode != "InteractiveMode" and not spec.get("entrypoint"):
            errors.append("spec.entrypoint is required outside InteractiveMode")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            errors.append("spec.activeDeadlineSeconds must be > 0")
        try:
            env = yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
            if not isinstance(env, dict):
                errors.append("spec.runtimeEnvYAML must hold a YAML mapping")
        except yaml.YAMLError as e:
            errors.append(f"spec.runtimeEnvYAML is not valid YAML: {str(e).splitlines()[0]}")
        if "rayClusterSpec" in spec:
            errors += cluster_spec_errors(spec["rayClusterSpec"], "spec.rayClusterSpec")
    return errors


def manifest_errors(doc: dict) -> list[str]:
    """Schema errors (the API server rejects the object before KubeRay sees it), else KubeRay's rule errors."""
    return schema_errors(doc) or kuberay_errors(doc)


def mutated(doc: dict, change) -> dict:
    out = copy.deepcopy(doc)
    change(out)
    return out


# -- Ray resources of a cluster spec ------------------------------------------------------------------
def _quantity(value) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def ray_nodes(spec: dict) -> list[dict[str, float]]:
    """One dict of Ray resources per pod (head first), as ``ray start`` will advertise them."""

    def node(group: dict) -> dict[str, float]:
        params = group.get("rayStartParams") or {}
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        cpus = params.get("num-cpus", limits.get("cpu", 0))
        gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
        out = {"CPU": float(int(_quantity(cpus))), "GPU": _quantity(gpus)}
        out.update({k: _quantity(v) for k, v in (group.get("resources") or {}).items()})
        return out

    nodes = [node(spec["headGroupSpec"])]
    for group in spec.get("workerGroupSpecs", []):
        nodes += [node(group)] * group.get("replicas", group.get("minReplicas", 0))
    return nodes


# -- PromQL --------------------------------------------------------------------------------------------
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                   "bool", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names read by ``expr``: identifiers that are not functions, keywords, labels or literals."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                      # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                                 # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                                # range / subquery windows
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?\d+[smhdwy0-9]*", " ", text)
    text = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", text)       # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", text):
        following = text[m.end():].lstrip()
        if m.group(0).lower() in PROMQL_KEYWORDS or following.startswith("("):
            continue
        names.add(m.group(0))
    return names
