"""The DAPORun CustomResourceDefinition, generated from the pydantic spec model.

`dapo crd` prints it; `crds/daporun.yaml` is this output committed (a test fails on drift). It
lives beside the spec, in the runtime, because it is a pure function of `dapo.spec` and
`dapo.contracts`: the operator imports it from here, the runtime never imports the operator.

Kubernetes wants a *structural* OpenAPI v3.0 schema, while pydantic emits JSON Schema 2020-12.
The translation below does the minimum to bridge the two:

- ``$ref`` to ``$defs`` is inlined (structural schemas cannot reference);
- ``anyOf: [X, {type: null}]`` becomes ``X`` with ``nullable: true``;
- ``anyOf: [string, integer]`` (resource quantities) becomes ``x-kubernetes-int-or-string``;
- free-form objects (``dict[str, Any]``) get ``x-kubernetes-preserve-unknown-fields``;
- numeric ``exclusiveMinimum: v`` (2020-12) becomes ``minimum: v, exclusiveMinimum: true`` (3.0);
- ``title`` and ``additionalProperties: false`` are dropped (unknown fields are pruned or, with
  kubectl's strict field validation, rejected by the API server anyway);
- ``default: null`` is dropped; nested objects built with ``default_factory`` get ``default: {}``
  so the API server fills their inner defaults and the CEL rules can read every field.

Cross-field rules come from ``dapo.spec.CROSS_FIELD_RULES`` and immutable fields from
``dapo.spec.IMMUTABLE_FIELDS`` as ``x-kubernetes-validations``.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from dapo.contracts import RunStatus
from dapo.spec import API_GROUP, API_VERSION, CROSS_FIELD_RULES, IMMUTABLE_FIELDS, KIND, PLURAL, DAPORunSpec, ObjectMeta

SHORT_NAMES = ["dr", "dapo"]
SINGULAR = "daporun"

# Pod names are RUN-rollout-1023 and must stay a DNS label (63 chars); spec.ObjectMeta allows 40.
MAX_NAME_LENGTH = 40


def _name_pattern() -> str:
    """The metadata.name pattern of the spec model (a DNS label), so CRD and pydantic share it.

    The API server only checks names as DNS subdomains, which allow dots; a dotted run name
    would pass the server and then fail in the operator (pod host names must be DNS labels).
    """
    return next(m.pattern for m in ObjectMeta.model_fields["name"].metadata if getattr(m, "pattern", None))


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """Replace every ``{"$ref": "#/$defs/X"}`` by a copy of X (recursively), keeping siblings."""
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        target.update(siblings)
        return _inline_refs(target, defs)
    return {key: _inline_refs(value, defs) for key, value in node.items()}


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Translate one (already inlined) JSON-Schema node into a structural OpenAPI v3.0 node."""
    node = dict(node)
    node.pop("title", None)
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")

    any_of = node.pop("anyOf", None)
    if any_of is not None:
        options = [option for option in any_of if not _is_null(option)]
        nullable = len(options) < len(any_of)
        types = sorted(option.get("type") for option in options)
        if types == ["integer", "string"]:
            merged: dict[str, Any] = {"x-kubernetes-int-or-string": True}
        elif len(options) == 1:
            merged = _structural(options[0])
        else:
            raise ValueError(f"cannot express anyOf {any_of} in a structural schema; simplify the spec field")
        merged.update({k: v for k, v in node.items() if k != "default" or v is not None})
        if nullable:
            merged["nullable"] = True
        node = merged

    if node.get("default", 0) is None:
        node.pop("default")

    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(bound)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            node[inclusive] = value
            node[bound] = True

    if node.get("type") == "object":
        extra = node.get("additionalProperties")
        if extra is True or (extra is None and "properties" not in node):
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
        elif isinstance(extra, dict):
            node["additionalProperties"] = _structural(extra)
        if "properties" in node:
            required = set(node.get("required", []))
            properties = {}
            for name, child in node["properties"].items():
                child = _structural(child)
                # default_factory sub-objects: default {} lets the API server default inside them.
                if (
                    child.get("type") == "object"
                    and "properties" in child
                    and name not in required
                    and "default" not in child
                    and not child.get("required")
                    and not child.get("nullable")
                ):
                    child["default"] = {}
                properties[name] = child
            node["properties"] = properties
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        node["items"] = _structural(node["items"])
    return node


def _set_at(schema: dict[str, Any], scope: str) -> dict[str, Any]:
    """The schema node at a dotted path relative to ``schema`` ("" is the node itself)."""
    node = schema
    for part in [p for p in scope.split(".") if p]:
        node = node["properties"][part]
    return node


def spec_schema() -> dict[str, Any]:
    """The structural schema of ``spec`` with the CEL rules attached."""
    raw = DAPORunSpec.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    schema = _structural(_inline_refs(raw, defs))
    schema["description"] = "What to train and how: the DAPO run file's spec (see `dapo crd`)."
    for rule in CROSS_FIELD_RULES:
        target = _set_at(schema, rule.cel_scope)
        target.setdefault("x-kubernetes-validations", []).append({"rule": rule.cel, "message": rule.message})
    for field, message in IMMUTABLE_FIELDS.items():
        target = _set_at(schema, field)
        target.setdefault("x-kubernetes-validations", []).append({"rule": "self == oldSelf", "message": message})
    return schema


def _pydantic_schema(model) -> dict[str, Any]:
    """The structural schema of a pydantic model (refs inlined, JSON Schema -> OpenAPI 3.0)."""
    raw = model.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    return _structural(_inline_refs(raw, defs))


def status_schema() -> dict[str, Any]:
    """Schema of the status the operator writes, generated from ``dapo.contracts.RunStatus``
    (what dapo_operator.status.compute_status returns is validated against the same model)."""
    schema = _pydantic_schema(RunStatus)
    schema["description"] = "Observed state, written by the operator."
    phase = schema["properties"]["phase"]
    phase.pop("nullable", None)
    conditions = schema["properties"]["conditions"]
    conditions.pop("default", None)
    # one condition per type: server-side apply and kubectl merge them by type
    conditions.update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    schema["properties"]["warnings"].pop("default", None)
    return schema


def build_crd() -> dict[str, Any]:
    """The full CustomResourceDefinition object."""
    root = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (pod names RUN-rollout-N must stay DNS labels)",
            },
            {
                "rule": f"self.metadata.name.matches('{_name_pattern()}')",
                "message": "metadata.name must be a DNS label: lowercase letters, digits and '-', no dots "
                "(it prefixes the pods' host names)",
            },
        ],
    }
    columns = [
        ("Phase", "string", ".status.phase", 0),
        ("Step", "integer", ".status.step", 0),
        ("Score", "number", ".status.score", 0),
        ("Acc", "number", ".status.acc", 0),
        ("Rollout ready", "string", ".status.rolloutReady", 0),
        ("Learner ready", "string", ".status.learnerReady", 0),
        ("Restarts", "integer", ".status.restartCount", 1),
        ("Age", "date", ".metadata.creationTimestamp", 0),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}", "labels": {"app.kubernetes.io/name": "dapo"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT_NAMES, "categories": ["all"]},
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": name, "type": kind, "jsonPath": path, **({"priority": prio} if prio else {})}
                        for name, kind, path, prio in columns
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as the YAML text committed in crds/daporun.yaml."""
    header = "# Generated by `dapo crd` from runtime/dapo/spec.py and runtime/dapo/contracts.py. Do not edit: regenerate.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill ``default`` values the way the API server does before validation (a copy).

    Used to evaluate the CEL rules on a run file as the API server would see it.
    """
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for name, child in schema.get("properties", {}).items():
            if name not in out and "default" in child:
                out[name] = copy.deepcopy(child["default"])
            if name in out:
                out[name] = apply_defaults(child, out[name])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def main(args: Any = None) -> int:
    sys.stdout.write(render_crd())
    return 0
