"""infra/kuberay/ stays deployable: every YAML document validates offline and the audit entrypoint's flags parse.

- `ray.io` kinds against KubeRay's CRD schemas (../shared/data/kuberay/), strict like `kubectl --validate=strict`:
  a field the schema does not declare is an error. CEL rules (`x-kubernetes-validations`) are not evaluated.
- Core kinds (CronJob, ServiceAccount, Role, …) with `kubernetes-validate`'s bundled schemas, strict, for a pinned
  Kubernetes version.
- The flags after `jobs/audit.py` in a RayJob / RayCronJob entrypoint parse and validate with AuditConfig.from_argv,
  the parser `auditor audit` and the job itself use.
- Secure by default: every Ray cluster requires Ray's token (authOptions), a NetworkPolicy of the folder admits
  to its head only its own pods, its submitter (8265), the KubeRay operator (8265) and Prometheus (metrics ports),
  its pods run as a workload-identity ServiceAccount, and the submitter gets no Secret.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shlex
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from auditor.config import AuditConfig, FilterConfig, ParsedConfig
from auditor.errors import ConfigError

MANIFESTS = Path(__file__).parents[2] / "infra" / "kuberay"
KUBERAY_CRDS = Path(__file__).parents[2].parent / "shared" / "data" / "kuberay"
# The cluster version the manifests are written for: the CronJob's kubectl image is 1.31, and CronJob.timeZone
# (used) is GA since 1.27. kubernetes-validate bundles one schema set per minor version.
K8S_VERSION = "1.31.0"
# Ray Job entrypoints and the config that parses their flags.
ENTRYPOINT_CONFIGS: dict[str, type[ParsedConfig]] = {
    "jobs/audit.py": AuditConfig,
    "jobs/filter.py": FilterConfig,
}


# 1. Reading manifests ----------------------------------------------------------------------------------------------
# libyaml's loader when PyYAML has it: the three CRDs are 3 MB of YAML (~10 s with the pure-Python loader).
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file, in order."""
    with open(path) as f:
        return [doc for doc in yaml.load_all(f, Loader=YAML_LOADER) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.iterdir() if p.suffix in (".yaml", ".yml"))


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(`file#index Kind`, document) for every document of every manifest."""
    return [
        (f"{path.name}#{i} {doc.get('kind')}", doc)
        for path in manifest_files()
        for i, doc in enumerate(load_documents(path))
    ]


def is_ray_kind(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).split("/")[0] == "ray.io"


def entrypoints(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, entrypoint) of the Ray Jobs this document runs: a RayJob's own, a RayCronJob's template's."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob" and "entrypoint" in spec:
        return [("spec.entrypoint", spec["entrypoint"])]
    if doc.get("kind") == "RayCronJob" and "entrypoint" in (spec.get("jobTemplate") or {}):
        return [("spec.jobTemplate.entrypoint", spec["jobTemplate"]["entrypoint"])]
    return []


# 2. Strict schemas -----------------------------------------------------------------------------------------------
SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a CRD's OpenAPI v3 schema that jsonschema checks the way the API server does with strict fields.

    - an object schema with `properties` and no `additionalProperties` rejects other fields (the API server prunes
      them and `kubectl --validate=strict` reports them), unless `x-kubernetes-preserve-unknown-fields`;
    - `x-kubernetes-embedded-resource` objects also accept apiVersion, kind and metadata;
    - `x-kubernetes-int-or-string` accepts an integer or a string (controller-gen also writes the anyOf);
    - `nullable: true` accepts null.
    """
    node = copy.deepcopy(schema)
    _make_strict(node)
    return node


def _make_strict(node: dict[str, Any]) -> None:
    if node.get("x-kubernetes-int-or-string") and not any(k in node for k in ("type", *SUBSCHEMA_LISTS)):
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"] if isinstance(node["type"], str) else [*node["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = node.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    for child in (node.get("properties") or {}).values():
        _make_strict(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            _make_strict(node[key])
    for key in SUBSCHEMA_LISTS:
        for child in node.get(key) or []:
            _make_strict(child)


@cache
def crd_validators(folder: Path = KUBERAY_CRDS) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a strict validator, for every served version of every CRD in `folder`."""
    validators = {}
    for path in sorted(folder.glob("*.yaml")):
        for crd in load_documents(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schema = strict_schema(version["schema"]["openAPIV3Schema"])
                    # OpenAPI v3.0 schemas are JSON Schema draft 4 (plus the x- extensions handled above).
                    validators[f"{group}/{version['name']}", kind] = jsonschema.Draft4Validator(schema)
    return validators


# 3. Checks: each returns problems as text, [] when valid -----------------------------------------------------------
def _where(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(root)"


def ray_kind_problems(doc: dict[str, Any], folder: Path = KUBERAY_CRDS) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    validator = crd_validators(folder).get(key)
    if validator is None:
        known = ", ".join(f"{a} {k}" for a, k in sorted(crd_validators(folder)))
        return [f"no KubeRay CRD for {key[0]} {key[1]} in {folder}; known: {known}"]
    problems = [
        f"{_where(e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    # The CRD schema leaves metadata open (the API server checks it as ObjectMeta): check it as a ConfigMap's.
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata") or {}}
    return problems + core_kind_problems(meta)


def core_kind_problems(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_where(e.path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def entrypoint_problems(doc: dict[str, Any]) -> list[str]:
    """The flags after a known jobs/ script must build its config (argparse errors and ConfigError alike).

    Flags must also be spelled out: argparse takes `--unit-row` for `--unit-rows`, until a new flag makes the
    prefix ambiguous and the scheduled job fails.
    """
    problems = []
    for field_path, entrypoint in entrypoints(doc):
        words = shlex.split(entrypoint)
        script = next((w for w in words if w.endswith(tuple(ENTRYPOINT_CONFIGS))), None)
        if script is None:
            problems.append(f"{field_path}: runs none of {', '.join(ENTRYPOINT_CONFIGS)}: {entrypoint!r}")
            continue
        config = next(c for s, c in ENTRYPOINT_CONFIGS.items() if script.endswith(s))
        argv = words[words.index(script) + 1 :]
        exact = config.parser()
        exact.allow_abbrev = False
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                config.from_argv(argv)  # what the job runs
                exact.parse_args(argv)
        except SystemExit:
            lines = stderr.getvalue().strip().splitlines()
            problems.append(f"{field_path}: {lines[-1] if lines else 'argparse exited'}")
        except ConfigError as e:
            problems.append(f"{field_path}: {e}")
    return problems


def manifest_problems(path: Path, crds: Path = KUBERAY_CRDS) -> list[str]:
    """Everything wrong with one manifest file, each problem prefixed with `file#document Kind`."""
    problems = []
    for i, doc in enumerate(load_documents(path)):
        found = ray_kind_problems(doc, crds) if is_ray_kind(doc) else core_kind_problems(doc)
        found += entrypoint_problems(doc)
        problems += [f"{path.name}#{i} {doc.get('kind')}: {p}" for p in found]
    return problems


# 4. The manifests ------------------------------------------------------------------------------------------------
needs_crds = pytest.mark.skipif(
    not KUBERAY_CRDS.is_dir(), reason=f"KubeRay CRD schemas not found at {KUBERAY_CRDS}"
)
DOCUMENTS = documents()
RAY_DOCS = [pytest.param(doc, id=name) for name, doc in DOCUMENTS if is_ray_kind(doc)]
CORE_DOCS = [pytest.param(doc, id=name) for name, doc in DOCUMENTS if not is_ray_kind(doc)]
JOB_DOCS = [pytest.param(doc, id=name) for name, doc in DOCUMENTS if entrypoints(doc)]


def test_every_manifest_is_checked():
    names = {p.name for p in manifest_files()}
    assert {
        "rayjob-audit.yaml",
        "raycronjob-audit.yaml",
        "cronjob-audit.yaml",
        "auditor-namespace.yaml",
    } <= names
    assert all("apiVersion" in doc and "kind" in doc for _, doc in DOCUMENTS)
    assert len(RAY_DOCS) >= 2 and len(CORE_DOCS) >= 4 and len(JOB_DOCS) >= 2


@needs_crds
@pytest.mark.parametrize("doc", RAY_DOCS)
def test_ray_kinds_match_the_kuberay_crds(doc):
    assert ray_kind_problems(doc) == []


@pytest.mark.parametrize("doc", CORE_DOCS)
def test_core_kinds_match_the_kubernetes_schemas(doc):
    assert core_kind_problems(doc) == []


@pytest.mark.parametrize("doc", JOB_DOCS)
def test_entrypoint_flags_parse_with_the_job_config(doc):
    assert entrypoint_problems(doc) == []


def test_the_cronjob_creates_the_rayjob_of_this_folder():
    """cronjob-audit.yaml runs `kubectl create -f` on a ConfigMap key: that file is here, so it is checked above."""
    (cronjob,) = [d for d in load_documents(MANIFESTS / "cronjob-audit.yaml") if d["kind"] == "CronJob"]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    created = Path(container["command"][container["command"].index("-f") + 1])
    (mount,) = [m for m in container["volumeMounts"] if created.is_relative_to(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "auditor-rayjob"
    assert (MANIFESTS / created.name).is_file()
    assert entrypoints(load_documents(MANIFESTS / created.name)[0])


# 5. The checks can fail ------------------------------------------------------------------------------------------
def _edited_copy(tmp_path: Path, name: str, edit: Callable[[list[dict[str, Any]]], None]) -> Path:
    docs = load_documents(MANIFESTS / name)
    edit(docs)
    copy_path = tmp_path / name
    copy_path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return copy_path


def _head_container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_the_unchanged_copy_is_valid(tmp_path):
    """The negative tests below change one thing; without it the same copy must pass."""
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {KUBERAY_CRDS}")
    assert manifest_problems(_edited_copy(tmp_path, "rayjob-audit.yaml", lambda docs: None)) == []


@needs_crds
def test_an_unknown_field_in_a_ray_kind_is_reported(tmp_path):
    def edit(docs):
        container = _head_container(docs[0])
        container["resource"] = container.pop("resources")  # a typo: pruned silently without strict checking
        docs[0]["metadata"]["labelz"] = {"a": "b"}

    problems = manifest_problems(_edited_copy(tmp_path, "rayjob-audit.yaml", edit))
    assert len(problems) == 2, problems
    assert problems[0].startswith(
        "rayjob-audit.yaml#0 RayJob: spec.rayClusterSpec.headGroupSpec.template.spec."
    )
    assert "'resource' was unexpected" in problems[0]
    assert "'labelz' was unexpected" in problems[1]


@needs_crds
def test_a_wrong_type_and_an_unknown_kind_are_reported(tmp_path):
    def edit(docs):
        _head_container(docs[0])["resources"]["requests"]["cpu"] = ["2"]  # int-or-string, not a list
        docs.append({"apiVersion": "ray.io/v1", "kind": "RayServe", "metadata": {"name": "x"}})

    problems = manifest_problems(_edited_copy(tmp_path, "rayjob-audit.yaml", edit))
    assert len(problems) == 2, problems
    assert "requests.cpu: ['2'] is not valid under any of the given schemas" in problems[0]
    assert problems[1].startswith("rayjob-audit.yaml#1 RayServe: no KubeRay CRD for ray.io/v1 RayServe")


def test_an_unknown_field_in_a_core_kind_is_reported(tmp_path):
    def edit(docs):
        (cronjob,) = [d for d in docs if d["kind"] == "CronJob"]
        cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicyy"] = "Never"

    problems = manifest_problems(_edited_copy(tmp_path, "cronjob-audit.yaml", edit))
    assert len(problems) == 1, problems
    assert problems[0].startswith("cronjob-audit.yaml#3 CronJob: spec.jobTemplate.spec.template.spec:")
    assert "restartPolicyy" in problems[0]


@pytest.mark.parametrize(
    ("replace", "by", "match"),
    [
        ("--unit-rows", "--unit_rows", "unrecognized arguments: --unit_rows"),
        ("--unit-rows", "--unit-row", "unrecognized arguments: --unit-row 100000"),
        ("--batch-size 64", "--batch-size 0", "--batch-size must be an int >= 1, got 0"),
        ("jobs/audit.py", "jobs/audit_v2.py", "runs none of jobs/audit.py, jobs/filter.py"),
    ],
)
def test_a_wrong_entrypoint_flag_is_reported(tmp_path, replace, by, match):
    def edit(docs):
        spec = docs[0]["spec"]["jobTemplate"]
        assert replace in spec["entrypoint"]
        spec["entrypoint"] = spec["entrypoint"].replace(replace, by)

    problems = entrypoint_problems(load_documents(_edited_copy(tmp_path, "raycronjob-audit.yaml", edit))[0])
    assert len(problems) == 1, problems
    assert problems[0].startswith("spec.jobTemplate.entrypoint: ")
    assert match in problems[0]


def test_strict_schema_handles_the_kubernetes_extensions():
    validator = jsonschema.Draft4Validator(
        strict_schema(
            {
                "type": "object",
                "properties": {
                    "qty": {"x-kubernetes-int-or-string": True},
                    "open": {
                        "type": "object",
                        "properties": {"a": {}},
                        "x-kubernetes-preserve-unknown-fields": True,
                    },
                    "map": {"type": "object", "additionalProperties": {"type": "string"}},
                    "pod": {
                        "type": "object",
                        "x-kubernetes-embedded-resource": True,
                        "properties": {"spec": {}},
                    },
                    "maybe": {"type": "string", "nullable": True},
                },
            }
        )
    )
    good = {
        "qty": 2,
        "open": {"a": 1, "anything": True},
        "map": {"k": "v"},
        "pod": {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {}},
        "maybe": None,
    }
    assert list(validator.iter_errors(good)) == []
    assert validator.is_valid({"qty": "500m"})
    assert not validator.is_valid({"qty": [1]})
    assert not validator.is_valid({"extra": 1})
    assert not validator.is_valid({"pod": {"extra": 1}})
    assert not validator.is_valid({"map": {"k": 1}})


# 6. Secure by default: token auth, a NetworkPolicy around every Ray cluster, credentials only where needed ---------
# The ports a head serves and who may reach them (README, Security).
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6379, 8265, 10001
METRICS_PORTS = (
    8080,
    44217,
    44227,
)  # KubeRay's --metrics-export-port on every pod; autoscaler, dashboard on the head
NAMESPACE = {"kubernetes.io/metadata.name": "audits"}  # where the manifests are applied (any one namespace)
PROMETHEUS = ({"kubernetes.io/metadata.name": "prometheus-system"}, {"app.kubernetes.io/name": "prometheus"})
OPERATOR = ({"kubernetes.io/metadata.name": "kuberay-system"}, {"app.kubernetes.io/name": "kuberay-operator"})
WORKLOAD_IDENTITY = ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account")


def ray_cluster_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(field path, rayClusterSpec) of every Ray cluster a document creates: RayJob, RayCronJob, RayCluster."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob" and "rayClusterSpec" in spec:
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])]
    if doc.get("kind") == "RayCronJob" and "rayClusterSpec" in (spec.get("jobTemplate") or {}):
        return [("spec.jobTemplate.rayClusterSpec", spec["jobTemplate"]["rayClusterSpec"])]
    if doc.get("kind") == "RayCluster":
        return [("spec", spec)]
    return []


def submitter_template(doc: dict[str, Any]) -> dict[str, Any] | None:
    spec = doc.get("spec") or {}
    job = spec.get("jobTemplate") if doc.get("kind") == "RayCronJob" else spec
    return (job or {}).get("submitterPodTemplate")


def ray_pod_templates(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, pod template) of the head and of every worker group."""
    templates = [("head", cluster["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs") or []]
    return templates


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against labels; {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def ingress_allowed(
    policies: list[dict[str, Any]],
    pod_labels: dict[str, str],
    peer_labels: dict[str, str],
    port: int,
    peer_namespace: dict[str, str] = NAMESPACE,
) -> bool:
    """Whether a pod with `pod_labels` (in NAMESPACE) accepts TCP `port` from a peer pod, as NetworkPolicy says:
    no policy selecting the pod allows everything; else any rule of any selecting policy must allow it."""
    selecting = [
        p
        for p in policies
        if selects(p["spec"]["podSelector"], pod_labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == "TCP" and p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                if "namespaceSelector" in peer:
                    namespace_ok = selects(peer["namespaceSelector"], peer_namespace)
                else:
                    namespace_ok = peer_namespace == NAMESPACE  # a bare podSelector: the policy's namespace
                if namespace_ok and ("podSelector" not in peer or selects(peer["podSelector"], peer_labels)):
                    return True
    return False


def security_problems(doc: dict[str, Any], folder: Path = MANIFESTS) -> list[str]:
    """What leaves a Ray cluster of this document open: token auth off, no NetworkPolicy of `folder` closing its
    head to other pods, credentials where no bucket is read, no workload identity."""
    problems = []
    folder_docs = [d for p in sorted(folder.glob("*.y*ml")) for d in load_documents(p)]
    policies = [d for d in folder_docs if d.get("kind") == "NetworkPolicy"]
    accounts = {d["metadata"]["name"]: d for d in folder_docs if d.get("kind") == "ServiceAccount"}
    for where, cluster in ray_cluster_specs(doc):
        mode = (cluster.get("authOptions") or {}).get("mode")
        if mode != "token":
            problems.append(
                f"{where}.authOptions.mode is {mode!r}: Ray token authentication is off (want 'token')"
            )
        pods = ray_pod_templates(cluster)
        head_labels = (pods[0][1].get("metadata") or {}).get("labels") or {}
        for group, template in pods:
            labels = (template.get("metadata") or {}).get("labels") or {}
            if not any(selects(p["spec"]["podSelector"], labels) for p in policies):
                problems.append(
                    f"{where} {group}: no NetworkPolicy in {folder.name}/ selects its pods {labels}"
                )
            elif not ingress_allowed(policies, head_labels, labels, GCS_PORT):
                problems.append(f"{where} {group}: its pods cannot reach the head's GCS port {GCS_PORT}")
            account = template["spec"].get("serviceAccountName")
            annotations = (accounts.get(account) or {}).get("metadata", {}).get("annotations") or {}
            if not any(a in annotations for a in WORKLOAD_IDENTITY):
                problems.append(
                    f"{where} {group}: runs as ServiceAccount {account!r}, which is not one of {folder.name}/ "
                    f"with a workload identity annotation ({', '.join(WORKLOAD_IDENTITY)})"
                )
        outsider = {"app": "anything-else"}
        for port in (GCS_PORT, DASHBOARD_PORT, CLIENT_PORT):
            if ingress_allowed(policies, head_labels, outsider, port):
                problems.append(f"{where}: the head's port {port} accepts any pod of the namespace")
        for port in METRICS_PORTS:
            if not ingress_allowed(policies, head_labels, PROMETHEUS[1], port, PROMETHEUS[0]):
                problems.append(f"{where}: Prometheus cannot scrape the head's metrics port {port}")
        if not ingress_allowed(policies, head_labels, OPERATOR[1], DASHBOARD_PORT, OPERATOR[0]):
            problems.append(
                f"{where}: the KubeRay operator cannot read the job's status on port {DASHBOARD_PORT}"
            )
        submitter = submitter_template(doc)
        if doc.get("kind") in ("RayJob", "RayCronJob"):
            labels = ((submitter or {}).get("metadata") or {}).get("labels") or {}
            if not ingress_allowed(policies, head_labels, labels, DASHBOARD_PORT):
                problems.append(f"{where}: the submitter pod {labels} cannot reach the head's jobs API")
            for port in (GCS_PORT, CLIENT_PORT):
                if ingress_allowed(policies, head_labels, labels, port):
                    problems.append(
                        f"{where}: the submitter pod reaches the head's port {port} (it needs 8265 only)"
                    )
            for container in ((submitter or {}).get("spec") or {}).get("containers") or []:
                if container.get("envFrom") or any("valueFrom" in e for e in container.get("env") or []):
                    problems.append(f"{where}: the submitter container {container['name']} gets a Secret")
    return problems


def test_every_ray_cluster_requires_a_token_and_is_closed_to_other_pods():
    clusters = [(name, doc) for name, doc in DOCUMENTS if ray_cluster_specs(doc)]
    assert len(clusters) >= 2, [name for name, _ in DOCUMENTS]
    assert {name: security_problems(doc) for name, doc in clusters} == {name: [] for name, _ in clusters}


def test_the_network_policy_opens_what_the_audit_needs_and_nothing_else():
    policies = [doc for _, doc in DOCUMENTS if doc["kind"] == "NetworkPolicy"]
    ray = {"app.kubernetes.io/name": "auditor", "app.kubernetes.io/component": "ray"}
    submitter = {"app.kubernetes.io/name": "auditor", "app.kubernetes.io/component": "ray-job-submitter"}
    for port in (GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, 12345):  # 12345: a worker or object-manager port
        assert ingress_allowed(policies, ray, ray, port)
        assert not ingress_allowed(policies, ray, {"app.kubernetes.io/name": "auditor"}, port)
        # the same labels in another namespace: another team's pod
        assert not ingress_allowed(policies, ray, ray, port, {"kubernetes.io/metadata.name": "other"})
        assert not ingress_allowed(policies, ray, PROMETHEUS[1], port, PROMETHEUS[0])
    assert ingress_allowed(policies, ray, submitter, DASHBOARD_PORT)
    assert not ingress_allowed(policies, ray, submitter, GCS_PORT)
    assert not ingress_allowed(policies, ray, OPERATOR[1], GCS_PORT, OPERATOR[0])
    # Prometheus in its own namespace only, on the metrics ports only
    assert all(ingress_allowed(policies, ray, PROMETHEUS[1], p, PROMETHEUS[0]) for p in METRICS_PORTS)
    assert not ingress_allowed(policies, ray, PROMETHEUS[1], METRICS_PORTS[0])
    # pods that are not Ray's are not this policy's business
    assert ingress_allowed(policies, {"app": "web"}, {"app": "x"}, 80)


def test_the_selector_and_ingress_helpers_follow_kubernetes():
    assert selects({}, {"a": "1"}) and selects(None, {})
    assert selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"})
    assert selects({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"})
    assert not selects(
        {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"}
    )
    deny_all = [{"spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}]
    assert not ingress_allowed(deny_all, {"x": "y"}, {"x": "y"}, 80)
    allow_all = [{"spec": {"podSelector": {}, "ingress": [{}]}}]
    assert ingress_allowed(allow_all, {"x": "y"}, {}, 80, {"kubernetes.io/metadata.name": "elsewhere"})
    egress_only = [{"spec": {"podSelector": {}, "policyTypes": ["Egress"]}}]
    assert ingress_allowed(egress_only, {"x": "y"}, {}, 80)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda docs: docs[0]["spec"]["rayClusterSpec"].pop("authOptions"), "authOptions.mode is None"),
        (
            lambda docs: docs[0]["spec"]["rayClusterSpec"].update(authOptions={"mode": "disabled"}),
            "authOptions.mode is 'disabled'",
        ),
        (
            lambda docs: docs[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["metadata"][
                "labels"
            ].pop("app.kubernetes.io/component"),
            "gpu: no NetworkPolicy in kuberay/ selects its pods",
        ),
        (
            lambda docs: (
                _head_container(docs[0]).__setitem__(
                    "envFrom", [{"secretRef": {"name": "auditor-s3-credentials"}}]
                )
                or docs[0]["spec"]["submitterPodTemplate"]["spec"]["containers"][0].__setitem__(
                    "envFrom", [{"secretRef": {"name": "auditor-s3-credentials"}}]
                )
            ),
            "the submitter container ray-job-submitter gets a Secret",
        ),
        (
            lambda docs: docs[0]["spec"]["submitterPodTemplate"]["metadata"].pop("labels"),
            "the submitter pod {} cannot reach the head's jobs API",
        ),
        (
            lambda docs: docs[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].pop(
                "serviceAccountName"
            ),
            "head: runs as ServiceAccount None",
        ),
    ],
    ids=[
        "no-auth",
        "auth-disabled",
        "unlabelled-workers",
        "secret-in-submitter",
        "unlabelled-submitter",
        "no-sa",
    ],
)
def test_an_open_cluster_is_reported(tmp_path, edit, match):
    folder = tmp_path / "kuberay"
    shutil.copytree(MANIFESTS, folder)
    docs = load_documents(folder / "rayjob-audit.yaml")
    edit(docs)
    (folder / "rayjob-audit.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    problems = security_problems(load_documents(folder / "rayjob-audit.yaml")[0], folder)
    assert len(problems) == 1, problems
    assert match in problems[0]


def test_an_open_network_policy_is_reported(tmp_path):
    folder = tmp_path / "kuberay"
    shutil.copytree(MANIFESTS, folder)
    docs = load_documents(folder / "auditor-namespace.yaml")
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    policy["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]})  # from anyone
    (folder / "auditor-namespace.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    problems = security_problems(load_documents(folder / "rayjob-audit.yaml")[0], folder)
    assert problems == ["spec.rayClusterSpec: the head's port 8265 accepts any pod of the namespace"]
