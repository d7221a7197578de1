"""Offline checks of Kubernetes manifests: schema validation and the "restricted" Pod Security Standard.

* Core objects (PersistentVolumeClaim, NetworkPolicy, ServiceAccount, ...) are validated by
  kubernetes-validate against the Kubernetes OpenAPI schemas it ships, in strict mode (unknown fields fail).
* Custom resources (KubeRay RayCluster/RayJob, PodMonitor) against ``kuberay-subset.schema.yaml``, a
  hand-written subset of their CRDs whose embedded Kubernetes types (pod templates, security contexts,
  resources, ...) resolve to the same strict Kubernetes definitions.
* ``restricted_violations`` applies the Pod Security Standard "restricted" profile (which includes
  "baseline") to a pod template, as the PodSecurity admission controller of a namespace labelled
  ``pod-security.kubernetes.io/enforce=restricted`` would to the pods made from it. ``pod_templates`` lists
  every pod a RayCluster or RayJob produces, with the containers KubeRay adds to them.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml

# Kubernetes minor versions the manifests are validated against: the oldest we support and the newest
# kubernetes-validate knows.
K8S_VERSIONS = ("1.29", "latest")
K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
SUBSET = Path(__file__).with_name("kuberay-subset.schema.yaml")
CUSTOM_KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("monitoring.coreos.com/v1", "PodMonitor")}


def load_all(path: Path) -> List[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kv():
    try:
        import kubernetes_validate
    except ImportError as exc:  # a dev dependency: pyproject.toml [dev], pinned in tools/constraints.txt
        raise ImportError("kubernetes-validate is missing: pip install -c tools/constraints.txt -e '.[dev]'") from exc
    return kubernetes_validate


def k8s_version(version: str) -> str:
    """'1.29' or 'latest' (the newest Kubernetes minor version kubernetes-validate ships schemas for)."""
    _kv()
    from kubernetes_validate.utils import latest_version, major_minor

    return major_minor(latest_version() if version == "latest" else version)


def validate_core(doc: dict, version: str) -> None:
    """Raises kubernetes_validate.ValidationError (strict: unknown fields are errors)."""
    _kv().validate(doc, k8s_version(version), strict=True)


@functools.lru_cache(maxsize=None)
def _validators(version: str) -> Dict[str, Any]:
    import jsonschema
    from referencing import Registry, Resource

    _kv()
    minor = k8s_version(version)
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    (folder,) = [d for d in root.iterdir() if d.name.startswith(f"v{minor}.") and d.name.endswith("-local-strict")]
    definitions = json.loads((folder / "_definitions.json").read_text())
    subset = yaml.safe_load(SUBSET.read_text())

    def resolve_k8s(node):  # "k8s:NAME" -> the strict Kubernetes definition NAME
        if isinstance(node, dict):
            return {k: (K8S_DEFS + v[4:] if k == "$ref" and v.startswith("k8s:") else resolve_k8s(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [resolve_k8s(v) for v in node]
        return node

    subset = resolve_k8s(subset)
    registry = Registry().with_resources([(definitions["$id"], Resource.from_contents(definitions)),
                                          (subset["$id"], Resource.from_contents(subset))])
    return {kind: jsonschema.Draft202012Validator({"$ref": f"{subset['$id']}#/$defs/{kind}"}, registry=registry)
            for _, kind in CUSTOM_KINDS}


def custom_errors(doc: dict, version: str) -> List[str]:
    """Schema errors of a custom resource ('path: message'), empty when it is valid."""
    validator = _validators(version)[doc.get("kind")]
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def is_custom(doc: dict) -> bool:
    return (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_KINDS


# ------------------------------------------------------------------------------------------ pods
def _cluster_pods(spec: dict, where: str) -> Iterator[Tuple[str, dict, List[dict]]]:
    """(where, pod template, containers KubeRay adds) of a RayClusterSpec."""
    head = spec["headGroupSpec"]["template"]
    injected = []
    if spec.get("enableInTreeAutoscaling"):  # the autoscaler sidecar takes autoscalerOptions.securityContext
        options = spec.get("autoscalerOptions") or {}
        injected.append({"name": "autoscaler", "securityContext": options.get("securityContext")})
    yield f"{where}.headGroupSpec", head, injected
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        ray = group["template"]["spec"]["containers"][0]  # the wait-gcs-ready init container copies its context
        yield (f"{where}.workerGroupSpecs[{i}]", group["template"],
               [{"name": "wait-gcs-ready", "securityContext": copy.deepcopy(ray.get("securityContext"))}])


def pod_templates(doc: dict) -> Iterator[Tuple[str, dict, List[dict]]]:
    """Every pod a RayCluster or RayJob makes: (where, pod template, containers KubeRay adds)."""
    if doc["kind"] == "RayCluster":
        yield from _cluster_pods(doc["spec"], "spec")
    elif doc["kind"] == "RayJob":
        spec = doc["spec"]
        if "rayClusterSpec" in spec:
            yield from _cluster_pods(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
            # without a template KubeRay uses its own: the head's image, no security context
            default = {"spec": {"restartPolicy": "Never", "containers": [{"name": "ray-job-submitter"}]}}
            yield "spec.submitterPodTemplate", spec.get("submitterPodTemplate", default), []


# ------------------------------------------------------------------------------------------ restricted
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
CONFINED = {"RuntimeDefault", "Localhost"}


def restricted_violations(template: dict, *, where: str = "pod", injected: Sequence[dict] = ()) -> List[str]:
    """What the Pod Security Standard "restricted" (and with it "baseline") forbids in a pod template.

    ``injected``: containers a controller adds to the pods (their securityContext counts like the others).
    Container-level settings override the pod's securityContext, as at admission.
    """
    spec = template.get("spec") or {}
    pod_sc = spec.get("securityContext") or {}
    out: List[str] = []

    def bad(msg: str) -> None:
        out.append(f"{where}: {msg}")

    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad(f"{key} must be unset or false")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad(f"volume {vol.get('name')!r} is {sorted(kinds - RESTRICTED_VOLUMES)}: restricted allows only "
                f"{sorted(RESTRICTED_VOLUMES)}")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            bad(f"sysctl {sysctl.get('name')} is not in the safe set")
    _check_context(pod_sc, "pod securityContext", bad)
    if pod_sc.get("runAsNonRoot") is False:
        bad("pod securityContext.runAsNonRoot must not be false")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in CONFINED:
        bad(f"pod seccompProfile.type {pod_seccomp} is not RuntimeDefault or Localhost")

    containers = [(kind, c) for kind in ("containers", "initContainers", "ephemeralContainers")
                  for c in spec.get(kind) or []] + [("injected", c) for c in injected]
    for kind, c in containers:
        name = f"{kind} {c.get('name')!r}"
        sc = c.get("securityContext") or {}
        _check_context(sc, name, bad)
        if sc.get("privileged"):
            bad(f"{name}: privileged must be unset or false")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad(f"{name}: capabilities.drop must include ALL")
        added = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            bad(f"{name}: capabilities.add may only hold NET_BIND_SERVICE, not {sorted(added)}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            bad(f"{name}: runAsNonRoot must be true (in the pod or the container securityContext)")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in CONFINED:
            bad(f"{name}: seccompProfile.type must be RuntimeDefault or Localhost (pod or container), not {seccomp}")
        if sc.get("procMount") not in (None, "Default"):
            bad(f"{name}: procMount must be Default")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad(f"{name}: hostPort {port['hostPort']} is not allowed")
    return out


def _check_context(sc: dict, what: str, bad) -> None:
    """The checks that apply alike to the pod's and a container's securityContext."""
    if sc.get("runAsUser") == 0:
        bad(f"{what}: runAsUser must not be 0")
    se = sc.get("seLinuxOptions") or {}
    if se.get("type") not in SELINUX_TYPES or se.get("user") or se.get("role"):
        bad(f"{what}: seLinuxOptions may only set an allowed type")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, *CONFINED):
        bad(f"{what}: appArmorProfile.type {apparmor} is not allowed")
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        bad(f"{what}: windowsOptions.hostProcess must not be true")


def mutate(doc: dict, path: str, value: Any = None, *, delete: bool = False) -> dict:
    """A deep copy of ``doc`` with the dotted ``path`` (list indices as numbers) set to ``value`` or deleted."""
    out = copy.deepcopy(doc)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    node: Any = out
    for k in keys[:-1]:
        node = node[k]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return out


def quantity_gib(q: Optional[str]) -> float:
    """A Kubernetes memory/storage quantity in GiB ('120Gi', '100G', '512Mi')."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    s = str(q)
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * units[suffix] / 2**30
    return float(s) / 2**30
