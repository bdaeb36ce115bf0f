"""dapo.contracts: one definition of the role environment, /status and the DAPORun status,
used by every producer and consumer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydantic import ValidationError

import _run_files
from dapo.contracts import (
    LEARNER_STATES,
    Env,
    EnvVar,
    LearnerStatus,
    RunStatus,
    cache_dir,
)
from dapo.controller.status_server import placeholder_status
from dapo.entry.processes import process_env
from dapo.errors import ConfigError, DapoError
from dapo.spec import SpecError, StorageSpec, parse_run
from dapo_operator.builders import pod_env
from dapo_operator.status import compute_status, sanitize_learner_status

RUN = _run_files.run_doc(preset="cluster", reward={"replicas": 1})  # "demo" in ns1: 2 learners, 2 rollouts, 1 reward


def _pod(name: str, role: str, ready: bool = True) -> dict:
    return {"metadata": {"name": name, "labels": {"dapo.dev/run": "demo", "dapo.dev/role": role,
                                                  "dapo.dev/gang-generation": "0"}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_pods_and_local_processes_get_the_same_contract_variables(tmp_path):
    """The operator (cluster DNS) and the local launcher (loopback) set the same variable names
    for every role: both come from dapo.contracts.role_environment."""
    run = parse_run(RUN)
    local = process_env(run, tmp_path, resume=False, base_env={})
    for role, count in (("learner", 2), ("rollout", 2), ("reward", 1)):
        for i in range(count):
            in_pod = {e["name"] for e in pod_env(run, role, i, "ns1", 0)}
            in_process = set(local[f"{role}-{i}"])
            contract = {v for k, v in vars(EnvVar).items() if k.isupper()} & in_pod
            assert contract <= in_process, f"{role}-{i}: {sorted(contract - in_process)} missing locally"
            assert EnvVar.ROLLOUT_URLS in contract and EnvVar.WEIGHT_SYNC_ADDR in contract
            assert (EnvVar.MASTER_ADDR in contract) == (role == "learner")


def test_compute_status_output_is_a_run_status():
    """What the operator writes validates against RunStatus (extra fields forbidden), the model the
    CRD status schema is generated from."""
    run = parse_run(RUN)
    pods = [_pod(f"demo-{role}-{i}", role) for role, n in (("learner", 2), ("rollout", 2), ("reward", 1))
            for i in range(n)]
    learner = {**placeholder_status("running", step=3, total_steps=10, weight_version=3),
               "metrics": {"critic/score/mean": 0.5, "train/acc/mean": 0.25, "response_length/mean": 12.0,
                           "val/acc/mean": None},
               "lastCheckpoint": {"step": 2, "uri": "s3://ckpt/demo/step-00000002"}}
    status = compute_status(run, 1, pods, learner, None, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    parsed = RunStatus.model_validate(status)
    # metric values are carried through, never computed: exact
    assert parsed.phase == "Running" and parsed.step == 3 and parsed.score == 0.5 and parsed.acc == 0.25
    assert parsed.last_checkpoint is not None and parsed.last_checkpoint.step == 2
    with pytest.raises(ValidationError):
        RunStatus.model_validate({**status, "unexpected": 1})


def test_learner_status_document_round_trips_through_the_operator_sanitiser():
    doc = LearnerStatus(state="running", step=4, total_steps=9, weight_version=4,
                        metrics={"critic/score/mean": 0.1}, message="training").document()
    assert set(doc) == {"state", "step", "totalSteps", "weightVersion", "metrics", "lastCheckpoint", "message",
                        "runFileError", "guardrail", "updatedAt"}
    clean = sanitize_learner_status({**doc, "environment": {"AWS_SECRET_ACCESS_KEY": "x"}})
    assert "environment" not in clean
    assert clean["state"] == "running" and clean["step"] == 4 and clean["metrics"] == {"critic/score/mean": 0.1}
    assert set(LEARNER_STATES) == {"starting", "running", "succeeded", "failed", "suspended"}
    with pytest.raises(ValidationError):
        LearnerStatus(state="exploded")


def test_env_parser_names_the_variable():
    env = Env({"DAPO_REPLICA_INDEX": "two", "DAPO_WEIGHT_SYNC_ADDR": "no-port", "X": " 7 ", "F": "nan"})
    with pytest.raises(ConfigError, match="DAPO_REPLICA_INDEX='two' must be an integer"):
        env.int(EnvVar.REPLICA_INDEX, 0)
    with pytest.raises(ConfigError, match="DAPO_WEIGHT_SYNC_ADDR='no-port': expected HOST:PORT"):
        env.host_port(EnvVar.WEIGHT_SYNC_ADDR)
    with pytest.raises(ConfigError, match="finite"):
        env.float("F", 1.0)
    assert env.int("X", 0) == 7 and env.int("MISSING", 3) == 3
    assert Env({"A": "[::1]:29600"}).host_port("A") == ("::1", 29600)
    assert issubclass(ConfigError, DapoError) and issubclass(SpecError, DapoError)


def test_cache_dir_rule(tmp_path):
    """$DAPO_CACHE_DIR, else spec.storage.cacheDir when the run file sets it, else ~/.cache/dapo."""
    assert cache_dir(StorageSpec(), {"DAPO_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert cache_dir(StorageSpec(cacheDir="/data/cache"), {}) == Path("/data/cache")
    assert cache_dir(StorageSpec(), {}) == Path.home() / ".cache" / "dapo"
    assert cache_dir(None, {}) == Path.home() / ".cache" / "dapo"


def test_http_bodies_are_one_model_each_and_refuse_what_the_hand_checks_refused():
    """/generate, /sync, /score bodies: strict types (a bool is not an int, "4" is not a number),
    columns of one length, one finite log-prob <= 0 per token; the /score result has exactly
    RewardResult's fields."""
    import dataclasses

    import pytest
    from pydantic import ValidationError

    from dapo.contracts import GenerateAnswer, GenerateRequest, ScoreRequest, ScoreResult, SyncRequest
    from dapo.reward.result import RewardResult

    good = dict(prompts=[[1, 2]], n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=3)
    GenerateRequest.model_validate(good)
    for field, bad in (("n", True), ("max_new_tokens", "4"), ("prompts", [[]]), ("top_p", 1.5), ("seed", 1.0)):
        with pytest.raises(ValidationError, match=field):
            GenerateRequest.model_validate({**good, field: bad})
    answer = dict(weight_version=1, prompt_index=[0], response_ids=[[5, 6]], log_probs=[[-0.5, -1]], finish_reason=["stop"])
    assert GenerateAnswer.model_validate(answer).log_probs == [[-0.5, -1.0]]
    for bad in ({"log_probs": [[-0.5]]}, {"log_probs": [[-0.5, 0.3]]}, {"finish_reason": []}):
        with pytest.raises(ValidationError):
            GenerateAnswer.model_validate({**answer, **bad})
    with pytest.raises(ValidationError, match="version"):
        SyncRequest.model_validate({"version": "3"})
    with pytest.raises(ValidationError, match="extra_infos must be null or a list as long as responses"):
        ScoreRequest.model_validate({"responses": ["a"], "ground_truths": [{"tests": [1]}], "extra_infos": []})
    assert list(ScoreResult.model_fields) == [f.name for f in dataclasses.fields(RewardResult)]


def test_the_score_wire_body_has_exactly_the_reward_result_fields():
    """/score answers carry RewardResult's fields: the wire model (contracts, which the operator
    imports without the reward package) and the dataclass name the same fields, in the same order,
    with the same types and defaults, so a field added to one and not the other fails here."""
    import dataclasses
    import typing

    from dapo.contracts import ScoreResult as WireScoreResult
    from dapo.reward.result import RewardResult

    required = "required"  # dataclasses and pydantic spell "no default" differently
    hints = typing.get_type_hints(RewardResult)
    dataclass_fields = [(f.name, hints[f.name], required if f.default is dataclasses.MISSING else f.default)
                        for f in dataclasses.fields(RewardResult)]
    wire_fields = [(name, info.annotation, required if info.is_required() else info.default)
                   for name, info in WireScoreResult.model_fields.items()]
    assert wire_fields == dataclass_fields
