"""CEL validation rules (``x-kubernetes-validations``) of CRD schemas.

Owns finding the rules in a schema, binding ``self`` (and ``oldSelf`` for transition rules) at the
right node, and turning failures into field causes as a real server words them.

Evaluation uses ``celpy`` (PyPI ``cel-python``) when it is importable. It lacks the Kubernetes CEL
libraries (``quantity()``, ``url()``, ``isSorted()``, ``format``, optional types ...): a rule that
needs one cannot be evaluated here and is skipped with a warning (see ``RuleSet.skipped``), never
failed, so a valid CRD is not rejected by the stand-in. Without ``celpy`` only the immutability
shape ``self == oldSelf`` (either operand order) is enforced; other rules are skipped likewise.

Transition rules (those mentioning ``oldSelf``) run only on updates where the old value can be
correlated: object properties by name, map values by key, and ``x-kubernetes-list-type: map``
items by their ``x-kubernetes-list-map-keys``; as in a real server, not for other list items.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from testapiserver.errors import Cause
from testapiserver.schema import join_path

logger = logging.getLogger(__name__)
# celpy logs every compiled parse tree at DEBUG; that buries test failure output.
logging.getLogger("celpy").setLevel(logging.INFO)

try:  # optional: the stand-in still enforces ``self == oldSelf`` without it
    import celpy
    from celpy.adapter import json_to_cel
    from celpy.celparser import CELParseError
    from celpy.evaluation import CELEvalError

    HAVE_CELPY = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_CELPY = False

_OLD_SELF = re.compile(r"\boldSelf\b")
_IMMUTABLE = {"self==oldSelf", "oldSelf==self"}


@dataclass
class Rule:
    rule: str
    message: str | None
    message_expression: str | None
    field_path: str | None
    reason: str | None
    optional_old_self: bool
    program: Any = None  # a celpy Runner, when compiled

    @property
    def is_transition(self) -> bool:
        return bool(_OLD_SELF.search(self.rule))

    @property
    def is_immutability(self) -> bool:
        return re.sub(r"\s+", "", self.rule) in _IMMUTABLE


class RuleCompileError(Exception):
    """A rule that does not parse; the CRD carrying it is rejected, as a real server does."""


class RuleSet:
    """All ``x-kubernetes-validations`` of one CRD version schema, compiled once."""

    def __init__(self, schema: dict[str, Any], *, use_celpy: bool = HAVE_CELPY) -> None:
        self.schema = schema
        self.use_celpy = use_celpy and HAVE_CELPY
        self.skipped: list[str] = []  # rules (or rule failures) the stand-in could not evaluate
        self._rules: dict[int, list[Rule]] = {}  # id(schema node) -> rules
        self._env: Any = celpy.Environment() if self.use_celpy else None
        self._compile(schema, "")

    @property
    def empty(self) -> bool:
        return not self._rules

    def _compile(self, node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        raw_rules = node.get("x-kubernetes-validations")
        if isinstance(raw_rules, list) and raw_rules:
            compiled: list[Rule] = []
            for raw in raw_rules:
                if not isinstance(raw, dict) or not isinstance(raw.get("rule"), str):
                    continue
                rule = Rule(
                    rule=raw["rule"],
                    message=raw.get("message"),
                    message_expression=raw.get("messageExpression"),
                    field_path=raw.get("fieldPath"),
                    reason=raw.get("reason"),
                    optional_old_self=bool(raw.get("optionalOldSelf")),
                )
                if self.use_celpy:
                    try:
                        rule.program = self._env.program(self._env.compile(rule.rule))
                    except CELParseError as exc:
                        raise RuleCompileError(
                            f"{path or '<root>'}: compilation failed: {rule.rule}: {exc}"
                        ) from exc
                elif not rule.is_immutability:
                    self._skip(f"{rule.rule} (celpy is not installed)")
                compiled.append(rule)
            self._rules[id(node)] = compiled
        for key in ("properties",):
            props = node.get(key)
            if isinstance(props, dict):
                for name, sub in props.items():
                    self._compile(sub, join_path(path, name))
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                self._compile(node[key], f"{path}[*]")

    def _skip(self, what: str) -> None:
        if what not in self.skipped:
            logger.warning("CEL rule not evaluated by the test API server: %s", what)
            self.skipped.append(what)

    # --- evaluation ----------------------------------------------------------------------------

    def evaluate(self, new: dict[str, Any], old: dict[str, Any] | None) -> list[Cause]:
        causes: list[Cause] = []
        root_new = _root_view(new)
        root_old = _root_view(old) if old is not None else None
        self._walk(self.schema, root_new, root_old, old is not None, path="", causes=causes)
        return causes

    def _walk(
        self, node: Any, value: Any, old: Any, has_old: bool, *, path: str, causes: list[Cause]
    ) -> None:
        if not isinstance(node, dict) or value is None:
            return
        for rule in self._rules.get(id(node), []):
            if rule.is_transition and not has_old:
                continue  # transition rules are skipped on create and for uncorrelated values
            self._check(rule, value, old, path, causes)
        if isinstance(value, dict):
            props = node.get("properties")
            addl = node.get("additionalProperties")
            for key, item in value.items():
                sub = props.get(key) if isinstance(props, dict) else None
                if sub is None and isinstance(addl, dict):
                    sub = addl
                if not isinstance(sub, dict):
                    continue
                old_has = has_old and isinstance(old, dict) and key in old
                self._walk(
                    sub,
                    item,
                    old[key] if old_has else None,
                    old_has,
                    path=join_path(path, key),
                    causes=causes,
                )
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            items = node["items"]
            keys = node.get("x-kubernetes-list-map-keys")
            correlate = (
                has_old
                and node.get("x-kubernetes-list-type") == "map"
                and isinstance(keys, list)
                and isinstance(old, list)
            )
            olds: dict[tuple[Any, ...], Any] = {}
            if correlate and isinstance(keys, list) and isinstance(old, list):
                for item in old:
                    if isinstance(item, dict):
                        olds[tuple(item.get(k) for k in keys)] = item
            for index, item in enumerate(value):
                key_tuple = (
                    tuple(item.get(k) for k in keys)
                    if correlate and isinstance(item, dict) and isinstance(keys, list)
                    else None
                )
                old_item = olds.get(key_tuple) if key_tuple is not None else None
                self._walk(
                    items, item, old_item, old_item is not None, path=f"{path}[{index}]", causes=causes
                )

    def _check(self, rule: Rule, value: Any, old: Any, path: str, causes: list[Cause]) -> None:
        field = path
        if rule.field_path:
            field = (
                path + rule.field_path
                if rule.field_path.startswith((".", "["))
                else join_path(path, rule.field_path)
            )
        if not self.use_celpy:
            if rule.is_immutability and value != old:
                causes.append(self._cause(rule, field, value, None))
            return
        activation = {"self": json_to_cel(value)}
        if rule.is_transition:
            activation["oldSelf"] = json_to_cel(old)
        try:
            result = rule.program.evaluate(activation)
        except CELEvalError as exc:
            result = exc
        if isinstance(result, CELEvalError):
            text = str(result.args[0]) if result.args else str(result)
            if "undeclared reference" in text or "no such overload" in text.lower():
                self._skip(f"{rule.rule} ({text[:120]})")
                return
            causes.append(Cause(field, f"Invalid value: {_type_word(value)}: {rule.rule}: {text}"))
            return
        if not bool(result):
            message = None
            if rule.message_expression:
                try:
                    prog = self._env.program(self._env.compile(rule.message_expression))
                    out = prog.evaluate(activation)
                    if isinstance(out, str) and out.strip():
                        message = str(out)
                except Exception:  # a broken messageExpression falls back to message/rule
                    message = None
            causes.append(self._cause(rule, field, value, message))

    @staticmethod
    def _cause(rule: Rule, field: str, value: Any, message: str | None) -> Cause:
        text = message or rule.message or f"failed rule: {rule.rule}"
        reason = rule.reason or "FieldValueInvalid"
        if reason == "FieldValueForbidden":
            return Cause(field, f"Forbidden: {text}", reason)
        if reason == "FieldValueRequired":
            return Cause(field, f"Required value: {text}", reason)
        if reason == "FieldValueDuplicate":
            return Cause(field, f"Duplicate value: {text}", reason)
        return Cause(field, f"Invalid value: {_type_word(value)}: {text}", "FieldValueInvalid")


def _type_word(value: Any) -> str:
    # A real server shows the CEL type of `self` rather than its value in CEL failures.
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    if isinstance(value, bool):
        return '"boolean"'
    if isinstance(value, int):
        return '"integer"'
    if isinstance(value, float):
        return '"number"'
    return '"string"'


def _root_view(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    # At the root, a real server exposes only apiVersion, kind, metadata.name/generateName.
    if obj is None:
        return None
    view = dict(obj)
    meta = obj.get("metadata") or {}
    view["metadata"] = {k: meta[k] for k in ("name", "generateName") if k in meta}
    return view
