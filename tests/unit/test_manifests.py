"""infra/kuberay/ stays deployable: every YAML document validates offline and the audit entrypoint's flags parse.

- `ray.io` kinds against KubeRay's CRD schemas (../shared/data/kuberay/), strict like `kubectl --validate=strict`:
  a field the schema does not declare is an error. CEL rules (`x-kubernetes-validations`) are not evaluated.
- Core kinds (CronJob, ServiceAccount, Role, …) with `kubernetes-validate`'s bundled schemas, strict, for a pinned
  Kubernetes version.
- The flags after `jobs/audit.py` in a RayJob / RayCronJob entrypoint parse and validate with AuditConfig.from_argv,
  the parser `auditor audit` and the job itself use.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shlex
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
    assert {"rayjob-audit.yaml", "raycronjob-audit.yaml", "cronjob-audit.yaml"} <= names
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
