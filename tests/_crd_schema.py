"""The API server's checks of a DAPORun, approximated for tests: the generated CRD's OpenAPI schema
as jsonschema (strict field validation) and its CEL rules evaluated with celpy (shared by
tests/operator/test_crd.py, tests/test_security.py and tests/test_hostile_input.py)."""

from __future__ import annotations

from typing import Any

import celpy
import jsonschema

from dapo.crd import apply_defaults, build_crd


def root_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def strict_schema(schema: Any) -> Any:
    """jsonschema approximation of the API server: OpenAPI bits mapped, unknown fields rejected
    (kubectl's strict field validation), nullable -> allows null."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(bound) is True:
            out[bound] = out.pop(inclusive)
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if schema.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else out["type"] + ["null"]
    if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out.pop("type")
        out["type"] = "object"
    return out


def schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(strict_schema(root_schema()))
    return [e.message for e in validator.iter_errors(doc)]


def cel_failures(doc: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Evaluate every x-kubernetes-validations rule where it is attached, after defaulting.

    Transition rules (oldSelf) run only when an old object exists, as in the API server."""
    schema = root_schema()
    doc = apply_defaults(schema, doc)
    old = apply_defaults(schema, old) if old is not None else None
    env = celpy.Environment()
    failures = []

    def visit(node: dict[str, Any], value: Any, old_value: Any) -> None:
        for rule in node.get("x-kubernetes-validations", []):
            uses_old = "oldSelf" in rule["rule"]
            if uses_old and old_value is None:
                continue
            activation = {"self": celpy.json_to_cel(value)}
            if uses_old:
                activation["oldSelf"] = celpy.json_to_cel(old_value)
            if not bool(env.program(env.compile(rule["rule"])).evaluate(activation)):
                failures.append(rule["message"])
        for name, child in (node.get("properties") or {}).items():
            if isinstance(value, dict) and name in value:
                visit(child, value[name], old_value.get(name) if isinstance(old_value, dict) else None)

    visit(schema, doc, old)
    return failures
