"""CRD schema validation, defaulting, pruning, CEL rules, selectors' grammar."""

from __future__ import annotations

from typing import Any

import pytest
from apiserver_helpers import WIDGETS, Kube, widget

from testapiserver.cel import RuleSet
from testapiserver.errors import APIError
from testapiserver.selectors import labels_match, parse_field_selector, parse_label_selector


async def test_validation_failures_are_422_with_causes(kube: Kube, crd: dict[str, Any]) -> None:
    body = widget("w1", size=50, mode="turbo", port=[1])
    del body["spec"]["disk"]
    status, err, _ = await kube.post(WIDGETS, body)
    assert (status, err["reason"]) == (422, "Invalid")
    causes = {c["field"]: c for c in err["details"]["causes"]}
    assert causes["spec.disk"]["reason"] == "FieldValueRequired"
    assert causes["spec.mode"]["reason"] == "FieldValueNotSupported"
    assert "less than or equal to 10" in causes["spec.size"]["message"]
    assert "spec.port" in causes
    assert err["message"].startswith('Widget.example.test "w1" is invalid: [')
    assert err["details"]["kind"] == "Widget"


async def test_int_or_string_nullable_and_defaults(kube: Kube, crd: dict[str, Any]) -> None:
    status, obj, _ = await kube.post(WIDGETS, widget("a", port="http", note=None, limits={}))
    assert status == 201, obj
    assert obj["spec"]["note"] is None  # nullable keeps the null
    assert obj["spec"]["limits"] == {"rate": 5}  # nested default
    status, obj, _ = await kube.post(WIDGETS, widget("b", port=8080, size=None))
    assert status == 201 and obj["spec"]["size"] == 3  # null of a non-nullable field is defaulted


async def test_unknown_fields_pruned_warned_or_refused(kube: Kube, crd: dict[str, Any]) -> None:
    body = widget("w1", bogus=1, extra={"free": {"form": True}})
    status, obj, headers = await kube.post(WIDGETS, body)
    assert status == 201
    assert "bogus" not in obj["spec"] and obj["spec"]["extra"] == {"free": {"form": True}}
    assert 'unknown field \\"spec.bogus\\"' in headers.get("Warning", "") or (
        'unknown field "spec.bogus"' in headers.get("Warning", "")
    )
    status, err, _ = await kube.post(WIDGETS, widget("w2", bogus=1), params={"fieldValidation": "Strict"})
    assert status == 400 and "spec.bogus" in err["message"]


async def test_immutability_rule(kube: Kube, crd: dict[str, Any]) -> None:
    await kube.post(WIDGETS, widget("w1"))
    status, err, _ = await kube.patch(f"{WIDGETS}/w1", {"spec": {"disk": "/other.qcow2"}})
    assert status == 422
    assert err["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "field": "spec.disk",
            "message": 'Invalid value: "string": Value is immutable',
        }
    ]
    status, _, _ = await kube.patch(f"{WIDGETS}/w1", {"spec": {"size": 2}})
    assert status == 200


async def test_other_cel_rules(kube: Kube, crd: dict[str, Any]) -> None:
    status, err, _ = await kube.post(WIDGETS, widget("w1", limits={"rate": 500}))
    assert status == 422
    assert err["details"]["causes"][0]["field"] == "spec.limits"
    assert "rate must be at most 100" in err["details"]["causes"][0]["message"]


SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "disk": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf"}]},
                "other": {"type": "string", "x-kubernetes-validations": [{"rule": "self.size() < 3"}]},
                "q": {
                    "type": "string",
                    "x-kubernetes-validations": [{"rule": "quantity(self).isGreaterThan(quantity('1'))"}],
                },
            },
        }
    },
}


def test_immutability_without_celpy() -> None:
    rules = RuleSet(SCHEMA, use_celpy=False)
    old = {"spec": {"disk": "a", "other": "long"}}
    assert rules.evaluate({"spec": {"disk": "a", "other": "longer"}}, old) == []
    (cause,) = rules.evaluate({"spec": {"disk": "b"}}, old)
    assert cause.field == "spec.disk"
    assert any("self.size()" in s for s in rules.skipped)


def test_rules_needing_kubernetes_libraries_are_skipped_not_failed() -> None:
    rules = RuleSet(SCHEMA)
    assert rules.evaluate({"spec": {"q": "2Gi"}}, None) == []
    assert any("quantity" in s for s in rules.skipped)
    (cause,) = rules.evaluate({"spec": {"other": "long"}}, None)
    assert cause.field == "spec.other" and "failed rule" in cause.message


def test_label_selector_grammar() -> None:
    obj = {"metadata": {"labels": {"app": "bp", "tier": "node", "n": "5"}}}
    cases = {
        "app=bp": True,
        "app==bp": True,
        "app!=bp": False,
        "missing!=x": True,
        "tier in (node, web)": True,
        "tier notin (node)": False,
        "missing notin (a)": True,
        "app": True,
        "!app": False,
        "!missing": True,
        "n>4": True,
        "n<5": False,
        "app=bp,tier in (node),!missing": True,
        "app=bp,tier=web": False,
    }
    for text, expected in cases.items():
        assert labels_match(parse_label_selector(text), obj) is expected, text
    with pytest.raises(APIError):
        parse_label_selector("app===x")


def test_field_selector_grammar() -> None:
    fields = frozenset({"metadata.name", "metadata.namespace"})
    (req,) = parse_field_selector("metadata.name!=x", fields)
    assert req.negate and req.value == "x"
    with pytest.raises(APIError) as info:
        parse_field_selector("spec.size=1", fields)
    assert info.value.code == 400


async def test_selectors_over_http(kube: Kube, crd: dict[str, Any]) -> None:
    for name, labels in (("a", {"node": "n1"}), ("b", {"node": "n2"}), ("c", {})):
        body = widget(name)
        body["metadata"]["labels"] = labels
        await kube.post(WIDGETS, body)

    async def names(**params: str) -> list[str]:
        status, listing, _ = await kube.get(WIDGETS, params=params)
        assert status == 200, listing
        return [i["metadata"]["name"] for i in listing["items"]]

    assert await names(labelSelector="node=n1") == ["a"]
    assert await names(labelSelector="node!=n1") == ["b", "c"]
    assert await names(labelSelector="node in (n1,n2)") == ["a", "b"]
    assert await names(labelSelector="!node") == ["c"]
    assert await names(fieldSelector="metadata.name=b") == ["b"]
    assert await names(fieldSelector="metadata.namespace=default,metadata.name!=b") == ["a", "c"]
    status, _, _ = await kube.get(WIDGETS, params={"fieldSelector": "spec.size=3"})
    assert status == 400
