"""The generated CRD: drift against crds/daporun.yaml, structural schema, CEL rules (celpy)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import _run_files
from _crd_schema import cel_failures, root_schema, schema_errors
from dapo.spec import CROSS_FIELD_RULES, IMMUTABLE_FIELDS, SpecError, parse_run
from dapo.crd import build_crd, render_crd

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crd_matches_the_spec_model():
    committed = (ROOT / "crds" / "daporun.yaml").read_text()
    assert committed == render_crd(), "crds/daporun.yaml drifted: regenerate with `dapo crd > crds/daporun.yaml`"


def test_crd_names_and_printer_columns():
    crd = build_crd()
    assert crd["spec"]["group"] == "dapo.dev" and crd["spec"]["names"]["kind"] == "DAPORun"
    assert crd["spec"]["names"]["plural"] == "daporuns" and "dr" in crd["spec"]["names"]["shortNames"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    for wanted in ("Phase", "Step", "Score", "Acc", "Rollout ready", "Learner ready", "Age"):
        assert wanted in names


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_schema_is_structural():
    """Rules of structural schemas that pydantic output breaks unless translated."""
    schema = root_schema()
    for path, node in _walk(schema):
        for banned in ("$ref", "anyOf", "title", "$defs"):
            assert banned not in node, f"{path} has {banned}"
        if "properties" in node:
            assert node.get("type") == "object", f"{path}: properties without type object"
            assert node.get("additionalProperties") in (None,), f"{path}: additionalProperties next to properties"
        if node.get("exclusiveMinimum") is not None:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if "default" in node:
            assert node["default"] is not None, path
    spec = schema["properties"]["spec"]["properties"]
    assert spec["learner"]["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["learner"]["properties"]["affinity"]["nullable"] is True
    assert spec["learner"]["properties"]["tolerations"]["items"]["x-kubernetes-preserve-unknown-fields"] is True
    quantity = spec["learner"]["properties"]["resources"]["properties"]["requests"]["additionalProperties"]
    assert quantity == {"x-kubernetes-int-or-string": True}
    assert spec["model"]["properties"]["path"]["description"]


GOOD_FILES = [_run_files.run_doc(preset="operator"), yaml.safe_load((ROOT / "examples" / "k8s-run.yaml").read_text())]


@pytest.mark.parametrize("doc", GOOD_FILES, ids=["small", "example"])
def test_good_files_pass_schema_and_cel(doc):
    parse_run(doc)  # and pydantic agrees
    assert schema_errors(doc) == []
    assert cel_failures(doc) == []


def _bad(path: str, value: Any) -> dict[str, Any]:
    doc = _run_files.run_doc(preset="operator")
    node = doc
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return doc


@pytest.mark.parametrize("path,value", [
    ("spec.learner.replicas", 0),
    ("spec.learner.lr", "fast"),
    ("spec.algorithm.epsLow", 0.0),             # exclusiveMinimum
    ("spec.rollout.engine", "tgi"),
    ("spec.learner.strategy", "zero4"),
    ("spec.learner.unknownKnob", 1),             # unknown field
    ("spec.model.path", ""),
    ("spec.reward.timeoutSeconds", 601),
])
def test_bad_fields_fail_schema_and_pydantic(path, value):
    doc = _bad(path, value)
    assert schema_errors(doc), f"{path}={value!r} passed the schema"
    with pytest.raises(SpecError):
        parse_run(doc)


def test_missing_required_fails_schema(run_doc):
    doc = run_doc(preset="operator")
    del doc["spec"]["model"]
    assert schema_errors(doc)


@pytest.mark.parametrize("path,value,rule_index", [
    ("spec.learner.miniBatchSize", 16, 0),       # > trainBatchSize 8
    ("spec.learner.miniBatchSize", 3, 1),        # 8 % 3 != 0
    ("spec.algorithm.epsHigh", 0.1, 2),          # < epsLow 0.2
    ("spec.algorithm.overlong.bufferLength", 256, 3),  # == maxResponseLength
    ("spec.rollout.tensorParallelSize", 2, 4),   # engine is not vllm
    ("spec.rollout.genBatchSize", 2, 5),         # < miniBatchSize
])
def test_cel_rules_match_pydantic(path, value, rule_index):
    doc = _bad(path, value)
    assert schema_errors(doc) == []  # each value is fine on its own
    assert CROSS_FIELD_RULES[rule_index].message in cel_failures(doc)
    with pytest.raises(SpecError, match="must be"):
        parse_run(doc)


def test_cel_rules_see_defaults(run_doc):
    """Omitted sections are defaulted before CEL runs (default {} on nested objects)."""
    doc = run_doc(preset="operator")
    del doc["spec"]["algorithm"]  # default bufferLength 4096 vs maxResponseLength 256: must fail
    assert CROSS_FIELD_RULES[3].message in cel_failures(doc)


def test_immutable_fields_are_transition_rules(run_doc):
    old = run_doc(preset="operator")
    new = copy.deepcopy(old)
    new["spec"]["learner"]["lr"] = 2e-6
    assert cel_failures(new, old) == []  # mutable field: fine
    for field, message in IMMUTABLE_FIELDS.items():
        changed = copy.deepcopy(old)
        changed["spec"][field] = dict(changed["spec"][field], **({"path": "other"} if field == "model" else {"train": "other"}))
        assert message in cel_failures(changed, old)
        assert message not in cel_failures(changed)  # creation has no oldSelf


def test_name_length_rule(run_doc):
    doc = run_doc("x" * 41, "operator")
    assert any("metadata.name" in m for m in cel_failures(doc))


def test_policy_loss_params_are_checked_at_admission_and_by_pydantic(run_doc):
    """A parameter the selected policy loss does not have fails the API server's CEL rule and the
    run-file parser (naming the parameter and the accepted ones); the loss's own parameters pass."""
    rule = CROSS_FIELD_RULES[-1]
    bad = run_doc(preset="operator")
    bad["spec"]["algorithm"] = {**bad["spec"].get("algorithm", {}), "policyLoss": "gspo", "policyLossParams": {"foo": 1.0}}
    assert schema_errors(bad) == [] and rule.message in cel_failures(bad)
    with pytest.raises(SpecError, match=r"policy loss 'gspo' has no parameter\(s\) foo; it accepts: eps_low, eps_high"):
        parse_run(bad)
    good = copy.deepcopy(bad)
    good["spec"]["algorithm"]["policyLossParams"] = {"eps_low": 1e-4, "eps_high": 2e-4}
    assert rule.message not in cel_failures(good)
    parse_run(good)
    dapo_with_param = copy.deepcopy(good)
    dapo_with_param["spec"]["algorithm"]["policyLoss"] = "dapo"  # dapo's clip range is epsLow / epsHigh, no params
    assert rule.message in cel_failures(dapo_with_param)


def test_guardrail_bounds_are_checked_at_admission_and_by_pydantic(run_doc):
    """A guardrail with both above and below (or neither) fails the API server's CEL rule and the
    run-file parser; one bound passes both."""
    rule = next(r for r in CROSS_FIELD_RULES if "guardrails" in r.cel)
    good = run_doc(preset="operator")
    good["spec"]["guardrails"] = [{"metric": "actor/entropy", "below": 0.05, "action": "fail"}]
    assert schema_errors(good) == [] and rule.message not in cel_failures(good)
    assert parse_run(good).spec.guardrails[0].below == 0.05
    for bounds in ({"above": 1.0, "below": 0.05}, {}):
        bad = copy.deepcopy(good)
        bad["spec"]["guardrails"] = [{"metric": "actor/entropy", "action": "fail", **bounds}]
        assert schema_errors(bad) == [] and rule.message in cel_failures(bad)
        with pytest.raises(SpecError, match="metric actor/entropy.*exactly one of above / below"):
            parse_run(bad)


def test_lora_with_deepspeed_ranks_is_checked_at_admission_and_by_pydantic(run_doc):
    """spec.model.lora with several DeepSpeed learner ranks fails the API server's CEL rule and the
    run-file parser alike; one rank, or ranks of the torch strategy, pass both (and the lora fields
    pass the schema: rank, alpha, dropout, targetModules)."""
    rule = next(r for r in CROSS_FIELD_RULES if "self.model.lora" in r.cel)
    good = run_doc(preset="operator")
    good["spec"]["model"]["lora"] = {"rank": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]}
    good["spec"]["learner"]["replicas"] = 1
    assert schema_errors(good) == [] and cel_failures(good) == []
    parse_run(good)
    data_parallel = copy.deepcopy(good)
    data_parallel["spec"]["learner"].update({"replicas": 2, "strategy": "torch"})
    assert cel_failures(data_parallel) == []
    parse_run(data_parallel)
    bad = copy.deepcopy(good)
    bad["spec"]["learner"]["replicas"] = 2  # the default strategy, deepspeed-zero3
    assert schema_errors(bad) == [] and cel_failures(bad) == [rule.message]
    with pytest.raises(SpecError, match="spec.model.lora with several learner ranks needs spec.learner.strategy torch"):
        parse_run(bad)
    plain = copy.deepcopy(bad)
    del plain["spec"]["model"]["lora"]
    assert cel_failures(plain) == []  # full fine-tuning: the rule does not apply
    bad_rank = copy.deepcopy(good)
    bad_rank["spec"]["model"]["lora"]["rank"] = 0
    assert schema_errors(bad_rank)
