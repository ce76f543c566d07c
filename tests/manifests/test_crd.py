"""The BlockPull CRD refuses what the contract says is invalid, and only that.

No API server here, so the CRD's openAPIV3Schema is checked with `jsonschema` (after the
translation an API server does implicitly: unknown fields are errors, as with kubectl's default
`--validate=strict`), its CEL rules with cel-python (`celpy`) under the API server's rules for
when a rule runs, and its patterns with RE2 (the regexp flavour of Go, hence of the API server).
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import celpy
import jsonschema
import pytest
import re2
from celpy import celtypes

from blockpull.quantity import parse_bandwidth

from .support import REPO, Doc

GROUP, VERSION, KIND = "blockpull.dev", "v1alpha1", "BlockPull"
IMMUTABLE = ("nodeName", "vm", "disk", "base", "onError")
MUTABLE = ("bandwidth", "paused", "activeDeadlineSeconds", "ttlSecondsAfterFinished")
MISSING = object()


# --- the schema, as an API server applies it -------------------------------------------------


def version_of(crd: Doc) -> Doc:
    (version,) = crd["spec"]["versions"]
    return version


def openapi_schema(crd: Doc) -> Doc:
    return version_of(crd)["schema"]["openAPIV3Schema"]


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3 structural schema -> JSON Schema with the API server's strictness."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: to_json_schema(value)
        for key, value in node.items()
        if not key.startswith("x-kubernetes-") and key not in ("nullable", "default")
    }
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()

    @checker.checks("int32")
    def int32(value: object) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def int64(value: object) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    @checker.checks("date-time", raises=ValueError)
    def date_time(value: object) -> bool:
        if isinstance(value, str):
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return "T" in value and parsed.tzinfo is not None
        return True

    return checker


def schema_errors(crd: Doc, obj: Doc) -> list[str]:
    """What the OpenAPI schema refuses in OBJ, as `path: message` lines."""
    validator = jsonschema.Draft202012Validator(
        to_json_schema(openapi_schema(crd)), format_checker=_format_checker()
    )
    return [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


def apply_defaults(schema: Doc, value: Any) -> Any:
    """Structural defaulting, as the API server does on requests and on reads from etcd."""
    if isinstance(value, dict):
        value = dict(value)
        for name, child in schema.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(child, value[name])
    return value


@cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _rules(schema: Doc, path: str = "") -> Iterator[tuple[str, Doc, Doc]]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, schema, rule
    for name, child in schema.get("properties", {}).items():
        yield from _rules(child, f"{path}.{name}")
    if "items" in schema:
        yield from _rules(schema["items"], f"{path}[]")


def cel_errors(crd: Doc, new: Doc, old: Doc | None = None) -> list[str]:
    """Messages of the CEL rules that refuse NEW (created, or updated from OLD).

    A rule runs where its field exists in the new object; a transition rule (one that uses
    oldSelf) only on update, and only where the field exists in the old object too.
    """
    schema = openapi_schema(crd)
    new = apply_defaults(schema, new)
    old = apply_defaults(schema, old) if old is not None else None
    messages = []

    def walk(node: Doc, value: Any, old_value: Any, path: str) -> None:
        for rule in node.get("x-kubernetes-validations", []):
            transition = "oldSelf" in rule["rule"]
            if transition and old_value is MISSING:
                continue
            activation = {"self": celpy.json_to_cel(value)}
            if transition:
                activation["oldSelf"] = celpy.json_to_cel(old_value)
            result = _program(rule["rule"]).evaluate(activation)
            assert isinstance(result, celtypes.BoolType), f"{path}: {rule['rule']!r} -> {result!r}"
            if not result:
                messages.append(f"{path or '<root>'}: {rule['message']}")
        for name, child in node.get("properties", {}).items():
            if isinstance(value, dict) and name in value:
                before = old_value.get(name, MISSING) if isinstance(old_value, dict) else MISSING
                walk(child, value[name], before, f"{path}.{name}")

    walk(schema, new, MISSING if old is None else old, "")
    return messages


def blockpull(**spec: Any) -> Doc:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": "flatten", "namespace": "vms"},
        "spec": {"nodeName": "worker-3", "vm": "web-1", "disk": "root", **spec},
    }


def without(field: str) -> Doc:
    obj = blockpull()
    del obj["spec"][field]
    return obj


# --- the CRD's shape -------------------------------------------------------------------------


def test_names_scope_and_version(crd: Doc) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"blockpulls.{GROUP}"
    spec = crd["spec"]
    assert spec["group"] == GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": KIND,
        "listKind": "BlockPullList",
        "plural": "blockpulls",
        "singular": "blockpull",
        "shortNames": ["bp"],
    }
    version = version_of(crd)
    assert (version["name"], version["served"], version["storage"]) == (VERSION, True, True)
    assert version["subresources"] == {"status": {}}


def test_agents_can_watch_only_their_nodes_objects(crd: Doc) -> None:
    """The agent watches with ?fieldSelector=spec.nodeName=NODE; the CRD must allow it."""
    assert version_of(crd)["selectableFields"] == [{"jsonPath": ".spec.nodeName"}]
    nodename = openapi_schema(crd)["properties"]["spec"]["properties"]["nodeName"]
    assert nodename["type"] == "string"
    handlers = REPO / "operator" / "blockpull" / "agent" / "handlers.py"
    if handlers.exists():
        assert "spec.nodeName=" in handlers.read_text(), "the agent no longer filters by node"


def test_printer_columns(crd: Doc) -> None:
    columns = [
        (column["name"], column["jsonPath"], column["type"], column.get("priority", 0))
        for column in version_of(crd)["additionalPrinterColumns"]
    ]
    assert columns == [
        ("Node", ".spec.nodeName", "string", 0),
        ("VM", ".spec.vm", "string", 0),
        ("Disk", ".spec.disk", "string", 0),
        ("Phase", ".status.phase", "string", 0),
        ("Progress", ".status.progress", "string", 0),
        ("Age", ".metadata.creationTimestamp", "date", 0),
        ("Reason", ".status.reason", "string", 1),
        ("Base", ".spec.base", "string", 1),
    ]


def _nodes(schema: Doc, path: str = "") -> Iterator[tuple[str, Doc]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if "items" in schema:
        yield from _nodes(schema["items"], f"{path}[]")


def test_schema_is_structural(crd: Doc) -> None:
    """The rules the API server enforces before it accepts the CRD at all."""
    for path, node in _nodes(openapi_schema(crd)):
        if node.get("x-kubernetes-int-or-string"):
            # The one spelling an API server accepts for int-or-string inside a structural schema.
            assert "type" not in node, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert node.get("type") in ("object", "array", "string", "integer", "boolean"), path
        if "properties" in node:
            assert node["type"] == "object", path
            assert set(node.get("required", [])) <= set(node["properties"]), path
        if node.get("x-kubernetes-list-type") == "map":
            assert set(node["x-kubernetes-list-map-keys"]) <= set(node["items"]["required"]), path
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message"), f"{path}: every rule says what is wrong"


def test_every_pattern_is_valid_re2(crd: Doc) -> None:
    """The API server is Go: look-arounds or back-references would make it refuse the CRD."""
    for path, node in _nodes(openapi_schema(crd)):
        if "pattern" in node:
            re2.compile(node["pattern"])
            re.compile(node["pattern"])
            assert node["pattern"].startswith("^") and node["pattern"].endswith("$"), path


def test_contract_fields(crd: Doc) -> None:
    schema = openapi_schema(crd)
    spec = schema["properties"]["spec"]
    assert schema["required"] == ["spec"]
    assert spec["required"] == ["nodeName", "vm", "disk"]
    assert set(spec["properties"]) == {*IMMUTABLE, *MUTABLE}
    assert spec["properties"]["onError"]["enum"] == ["report", "stop", "enospc", "ignore"]
    assert spec["properties"]["onError"]["default"] == "report"
    assert spec["properties"]["paused"]["default"] is False
    status = schema["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Running", "Paused", "Completed", "Failed"]
    condition = status["conditions"]["items"]
    assert condition["required"] == ["type", "status", "lastTransitionTime", "reason", "message"]
    assert condition["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_each_immutable_field_has_its_rule(crd: Doc) -> None:
    spec = openapi_schema(crd)["properties"]["spec"]
    for field in IMMUTABLE:
        rules = [rule["rule"] for rule in spec["properties"][field]["x-kubernetes-validations"]]
        assert "self == oldSelf" in rules, field
    for field in MUTABLE:
        assert "x-kubernetes-validations" not in spec["properties"][field], field
    assert [rule["rule"] for rule in spec["x-kubernetes-validations"]] == [
        "has(self.base) == has(oldSelf.base)"
    ]


def test_every_rule_compiles(crd: Doc) -> None:
    for path, _, rule in _rules(openapi_schema(crd)):
        try:
            _program(rule["rule"])
        except Exception as error:
            pytest.fail(f"{path}: {rule['rule']!r} does not compile: {error}")


# --- samples and specs -----------------------------------------------------------------------


def test_samples_are_valid_blockpulls(samples: dict[str, Doc], crd: Doc) -> None:
    assert set(samples) == {"full-pull.yaml", "pull-to-base.yaml", "throttled.yaml"}
    for name, sample in samples.items():
        assert (sample["apiVersion"], sample["kind"]) == (f"{GROUP}/{VERSION}", KIND), name
        assert sample["metadata"]["namespace"] == "vms", name
        assert schema_errors(crd, sample) == [], name
        assert cel_errors(crd, sample) == [], name


def test_samples_cover_the_common_cases(samples: dict[str, Doc]) -> None:
    assert "base" not in samples["full-pull.yaml"]["spec"]
    assert samples["pull-to-base.yaml"]["spec"]["base"].startswith("/")
    throttled = samples["throttled.yaml"]["spec"]
    assert throttled["bandwidth"] == "50Mi"
    assert throttled["activeDeadlineSeconds"] > 0
    assert throttled["ttlSecondsAfterFinished"] >= 0


GOOD_SPECS: dict[str, dict[str, Any]] = {
    "minimal": {},
    "node FQDN": {"nodeName": "ip-10-0-3-7.eu-west-1.compute.internal"},
    "vm 63 chars": {"vm": "v" * 63},
    "vm digits first": {"vm": "1web"},
    "disk qdev id": {"disk": "virtio-disk0"},
    "disk libvirt node-name": {"disk": "libvirt-1-format"},
    "disk drive id": {"disk": "drive-virtio-disk0"},
    "disk dotted id": {"disk": "ide0.0-hd0"},
    "disk path": {"disk": "/var/lib/libvirt/images/web 1 (copy).qcow2"},
    "disk hidden file": {"disk": "/images/.web-1.qcow2"},
    "base path": {"base": "/images/tmpl.qcow2"},
    "base node-name": {"base": "tmpl-fmt"},
    "base libvirt index": {"base": "vda[2]"},
    "bandwidth int": {"bandwidth": 52428800},
    "bandwidth zero": {"bandwidth": 0},
    "bandwidth zero string": {"bandwidth": "0"},
    "bandwidth plain string": {"bandwidth": "1048576"},
    "bandwidth binary": {"bandwidth": "200Mi"},
    "bandwidth decimal SI": {"bandwidth": "100M"},
    "bandwidth kilo": {"bandwidth": "512k"},
    "bandwidth fraction": {"bandwidth": "1.5Gi"},
    "bandwidth largest int": {"bandwidth": 2**63 - 1},
    "bandwidth 18 digits": {"bandwidth": "999999999999999999"},
    "bandwidth 7Ei": {"bandwidth": "7.99Ei"},
    "bandwidth 8E": {"bandwidth": "8.9E"},
    "bandwidth 999Pi": {"bandwidth": "999Pi"},
    "paused": {"paused": True},
    "every onError": {"onError": "enospc"},
    "deadline": {"activeDeadlineSeconds": 1},
    "ttl zero": {"ttlSecondsAfterFinished": 0},
}


@pytest.mark.parametrize("spec", GOOD_SPECS.values(), ids=GOOD_SPECS.keys())
def test_good_specs_are_accepted(crd: Doc, spec: dict[str, Any]) -> None:
    obj = blockpull(**spec)
    assert schema_errors(crd, obj) == []
    assert cel_errors(crd, obj) == []


# (field the error must point at, the object)
BAD_SPECS: dict[str, tuple[str, Doc]] = {
    "no spec": ("", {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {}}),
    "no nodeName": ("spec", without("nodeName")),
    "no vm": ("spec", without("vm")),
    "no disk": ("spec", without("disk")),
    "unknown field": ("spec", blockpull(bandwith="50Mi")),
    "nodeName upper case": ("spec.nodeName", blockpull(nodeName="Worker-3")),
    "nodeName with space": ("spec.nodeName", blockpull(nodeName="worker 3")),
    "nodeName too long": ("spec.nodeName", blockpull(nodeName="n" * 254)),
    "nodeName empty": ("spec.nodeName", blockpull(nodeName="")),
    "vm upper case": ("spec.vm", blockpull(vm="Web-1")),
    "vm underscore": ("spec.vm", blockpull(vm="web_1")),
    "vm leading dash": ("spec.vm", blockpull(vm="-web")),
    "vm trailing dash": ("spec.vm", blockpull(vm="web-")),
    "vm dotted": ("spec.vm", blockpull(vm="web.1")),
    "vm path": ("spec.vm", blockpull(vm="../etc")),
    "vm 64 chars": ("spec.vm", blockpull(vm="v" * 64)),
    "vm number": ("spec.vm", blockpull(vm=1)),
    "disk empty": ("spec.disk", blockpull(disk="")),
    "disk relative path": ("spec.disk", blockpull(disk="images/web.qcow2")),
    "disk with space": ("spec.disk", blockpull(disk="root disk")),
    "disk digit first": ("spec.disk", blockpull(disk="0disk")),
    "disk newline": ("spec.disk", blockpull(disk="/images/a\nb.qcow2")),
    "disk bare slash": ("spec.disk", blockpull(disk="/")),
    "disk too long": ("spec.disk", blockpull(disk="/" + "a" * 1024)),
    "base empty": ("spec.base", blockpull(base="")),
    "base relative": ("spec.base", blockpull(base="tmpl.qcow2/")),
    "base index without number": ("spec.base", blockpull(base="vda[]")),
    "base index with path": ("spec.base", blockpull(base="a/vda[2]")),
    "bandwidth negative": ("spec.bandwidth", blockpull(bandwidth=-1)),
    "bandwidth negative string": ("spec.bandwidth", blockpull(bandwidth="-1")),
    "bandwidth word": ("spec.bandwidth", blockpull(bandwidth="fast")),
    "bandwidth spaced": ("spec.bandwidth", blockpull(bandwidth="10 Mi")),
    "bandwidth per second": ("spec.bandwidth", blockpull(bandwidth="10Mi/s")),
    "bandwidth lower-case m": ("spec.bandwidth", blockpull(bandwidth="10mi")),
    "bandwidth milli": ("spec.bandwidth", blockpull(bandwidth="500m")),
    "bandwidth exponent": ("spec.bandwidth", blockpull(bandwidth="1e6")),
    "bandwidth float": ("spec.bandwidth", blockpull(bandwidth=1.5)),
    "bandwidth bool": ("spec.bandwidth", blockpull(bandwidth=True)),
    "bandwidth empty": ("spec.bandwidth", blockpull(bandwidth="")),
    "bandwidth past int64 Ei": ("spec.bandwidth", blockpull(bandwidth="100Ei")),
    "bandwidth 8Ei is 2^63": ("spec.bandwidth", blockpull(bandwidth="8Ei")),
    "bandwidth past int64 E": ("spec.bandwidth", blockpull(bandwidth="9.3E")),
    "bandwidth 19 digits": ("spec.bandwidth", blockpull(bandwidth="9999999999999999999")),
    "bandwidth past int64 int": ("spec.bandwidth", blockpull(bandwidth=2**63)),
    "paused string": ("spec.paused", blockpull(paused="yes")),
    "onError unknown": ("spec.onError", blockpull(onError="abort")),
    "onError case": ("spec.onError", blockpull(onError="Report")),
    "deadline zero": ("spec.activeDeadlineSeconds", blockpull(activeDeadlineSeconds=0)),
    "deadline negative": ("spec.activeDeadlineSeconds", blockpull(activeDeadlineSeconds=-5)),
    "deadline string": ("spec.activeDeadlineSeconds", blockpull(activeDeadlineSeconds="1h")),
    "ttl negative": ("spec.ttlSecondsAfterFinished", blockpull(ttlSecondsAfterFinished=-1)),
    "ttl over int32": ("spec.ttlSecondsAfterFinished", blockpull(ttlSecondsAfterFinished=2**31)),
}


@pytest.mark.parametrize(("field", "obj"), BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_specs_are_refused_by_the_schema(crd: Doc, field: str, obj: Doc) -> None:
    errors = schema_errors(crd, obj)
    assert errors, "accepted"
    assert any(error.startswith(f"{field}:") for error in errors), errors


@pytest.mark.parametrize(
    "value", [v["bandwidth"] for v in GOOD_SPECS.values() if isinstance(v.get("bandwidth"), str)]
)
def test_every_bandwidth_the_crd_accepts_the_agent_can_use(value: str) -> None:
    """No value passes the CRD that the agent would refuse (and warn about) forever."""
    assert 0 <= parse_bandwidth(value) <= 2**63 - 1


NOT_NORMALIZED = ["//images/a", "/images//a", "/images/./a", "/images/../a", "/images/", "/a/."]


@pytest.mark.parametrize("field", ["disk", "base"])
@pytest.mark.parametrize("path", NOT_NORMALIZED)
def test_paths_must_be_normalized(crd: Doc, field: str, path: str) -> None:
    """The agent compares paths with QEMU's filenames as they are; a CEL rule says so at once."""
    obj = blockpull(**{field: path})
    assert schema_errors(crd, obj) == []  # the pattern cannot express it without look-ahead
    assert cel_errors(crd, obj) == [
        f".spec.{field}: {field} must be a normalized absolute path"
        " (no '//', '.' or '..' components, no trailing '/')"
    ]


def _string_samples() -> Iterator[tuple[str, str]]:
    for spec in GOOD_SPECS.values():
        yield from ((k, v) for k, v in spec.items() if isinstance(v, str))
    for _, obj in BAD_SPECS.values():
        yield from ((k, v) for k, v in obj.get("spec", {}).items() if isinstance(v, str))


def test_python_and_re2_agree_on_every_sample_value(crd: Doc) -> None:
    """jsonschema matches with Python's re; make sure the API server's RE2 would agree."""
    properties = openapi_schema(crd)["properties"]["spec"]["properties"]
    checked = 0
    for field, value in _string_samples():
        pattern = properties.get(field, {}).get("pattern")
        if pattern is not None and "\n" not in value:  # Python's $ also matches before a \n
            assert bool(re.search(pattern, value)) == bool(re2.search(pattern, value)), value
            checked += 1
    assert checked > 30


def test_bandwidth_pattern_matches_the_agents_parser(crd: Doc) -> None:
    """What the API server lets through, the agent can parse, and the other way round."""
    from blockpull import errors, quantity  # noqa: PLC0415 - a missing module fails, never skips

    pattern = openapi_schema(crd)["properties"]["spec"]["properties"]["bandwidth"]["pattern"]
    values = [v for k, v in _string_samples() if k == "bandwidth"] + ["7Ei", "0.5k", "3T"]
    for value in values:
        try:
            quantity.parse_bandwidth(value)
            parsed = True
        except errors.InvalidSpec:
            parsed = False
        assert bool(re.search(pattern, value)) == parsed, value


# --- immutability (CEL transition rules) -----------------------------------------------------

CREATED = blockpull(base="/images/tmpl.qcow2", onError="stop", bandwidth="10Mi")

Change = Callable[[Doc], None]


def _set(field: str, value: Any) -> Change:
    def change(spec: Doc) -> None:
        spec[field] = value

    return change


def _drop(field: str) -> Change:
    def change(spec: Doc) -> None:
        del spec[field]

    return change


# (change to CREATED's spec, the messages the API server must answer with; [] = allowed)
UPDATES: dict[str, tuple[Change, list[str]]] = {
    "no change": (lambda spec: None, []),
    "nodeName": (_set("nodeName", "worker-4"), [".spec.nodeName: nodeName is immutable"]),
    "vm": (_set("vm", "web-2"), [".spec.vm: vm is immutable"]),
    "disk": (_set("disk", "data"), [".spec.disk: disk is immutable"]),
    "base changed": (_set("base", "/images/other.qcow2"), [".spec.base: base is immutable"]),
    "base removed": (
        _drop("base"),
        [".spec: base is immutable; it cannot be added or removed after creation"],
    ),
    "onError": (_set("onError", "report"), [".spec.onError: onError is immutable"]),
    "onError removed (defaults to report)": (
        _drop("onError"),
        [".spec.onError: onError is immutable"],
    ),
    "bandwidth": (_set("bandwidth", 0), []),
    "bandwidth removed": (_drop("bandwidth"), []),
    "paused": (_set("paused", True), []),
    "deadline added": (_set("activeDeadlineSeconds", 60), []),
    "ttl added": (_set("ttlSecondsAfterFinished", 0), []),
}


@pytest.mark.parametrize(("change", "expected"), UPDATES.values(), ids=UPDATES.keys())
def test_updates(crd: Doc, change: Change, expected: list[str]) -> None:
    new = copy.deepcopy(CREATED)
    change(new["spec"])
    assert cel_errors(crd, new, old=CREATED) == expected


def test_base_cannot_be_added(crd: Doc) -> None:
    old = blockpull()
    assert cel_errors(crd, blockpull(base="/images/tmpl.qcow2"), old=old) == [
        ".spec: base is immutable; it cannot be added or removed after creation"
    ]


def test_default_on_error_can_be_spelled_out(crd: Doc) -> None:
    """Created without onError, stored as report: writing report later is no change."""
    assert cel_errors(crd, blockpull(onError="report"), old=blockpull()) == []
    assert cel_errors(crd, blockpull(onError="stop"), old=blockpull()) == [
        ".spec.onError: onError is immutable"
    ]


def test_creation_runs_no_transition_rule(crd: Doc) -> None:
    assert cel_errors(crd, CREATED) == []


# --- status ----------------------------------------------------------------------------------

CONTRACT_STATUS = {
    "phase": "Running",
    "observedGeneration": 2,
    "nodeName": "worker-3",
    "jobId": "blockpull-5c1f0e2a",
    "target": {"node": "disk-root-fmt", "base": "tmpl-fmt"},
    "progress": "45.12%",
    "offset": 968884224,
    "length": 2147483648,
    "bandwidth": 209715200,
    "startTime": "2026-11-25T10:00:00Z",
    "completionTime": "2026-11-25T10:02:13Z",
    "releasedImages": ["/images/b.qcow2", "/images/tmpl.qcow2"],
    "message": "streamed 2.0 GiB from 2 backing images",
    "reason": "Started",
    "conditions": [
        {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": "",
            "lastTransitionTime": "2026-11-25T10:00:00Z",
            "observedGeneration": 2,
        }
        for kind, status, reason in [
            ("Running", "True", "Started"),
            ("Completed", "False", "Running"),
            ("Failed", "False", "Running"),
        ]
    ],
}


def test_contract_status_is_accepted(crd: Doc) -> None:
    assert schema_errors(crd, {**blockpull(), "status": CONTRACT_STATUS}) == []


def test_everything_the_agent_writes_is_in_the_schema(crd: Doc) -> None:
    """The API server silently prunes status fields the schema lacks; the agent would lose them."""
    from blockpull.agent import status  # noqa: PLC0415 - a missing module fails, never skips

    view = status.StatusView(
        phase=status.COMPLETED,
        reason="Completed",
        message="streamed 2.0 GiB from 2 backing images",
        job_id="blockpull-5c1f0e2a",
        target={"node": "disk-root-fmt", "base": None},
        chain=[{"node": "disk-root-fmt", "file": "/images/top.qcow2"}],
        offset=2147483648,
        length=2147483648,
        bandwidth=0,
        start_time="2026-11-25T10:00:00Z",
        completion_time="2026-11-25T10:02:13Z",
        released_images=["/images/b.qcow2"],
    )
    written = status.build_status(None, view, generation=1, now="2026-11-25T10:02:13Z", node_name="worker-3")
    assert schema_errors(crd, {**blockpull(), "status": written}) == []


def _condition(**change: Any) -> dict[str, Any]:
    """The contract's first condition with CHANGE; a None value leaves that field out."""
    condition = {**CONTRACT_STATUS["conditions"][0], **change}
    return {"conditions": [{k: v for k, v in condition.items() if v is not None}]}


BAD_STATUSES: dict[str, tuple[str, dict[str, Any]]] = {
    "unknown phase": ("status.phase", {"phase": "Done"}),
    "progress as a number": ("status.progress", {"progress": 45.12}),
    "negative generation": ("status.observedGeneration", {"observedGeneration": -1}),
    "start time not a time": ("status.startTime", {"startTime": "yesterday"}),
    "condition status": ("status.conditions.0.status", _condition(status="true")),
    "condition reason spaces": ("status.conditions.0.reason", _condition(reason="Not found")),
    "condition reason empty": ("status.conditions.0.reason", _condition(reason="")),
    "condition without message": ("status.conditions.0", _condition(message=None)),
    # kopf's own status fields are not in the schema: the agent keeps them in annotations.
    "field not in the schema": ("status", {"kopf": {"progress": {}}}),
}


@pytest.mark.parametrize(("field", "status"), BAD_STATUSES.values(), ids=BAD_STATUSES.keys())
def test_bad_statuses_are_refused(crd: Doc, field: str, status: dict[str, Any]) -> None:
    errors = schema_errors(crd, {**blockpull(), "status": status})
    assert any(error.startswith(f"{field}:") for error in errors), errors
