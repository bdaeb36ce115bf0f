"""The contracts between the platform's processes: roles, ports, environment, /status.

One module that the runtime (pods, local processes) and the operator both import, so that a
name, a port or a status field exists once. docs/architecture.md explains them for people.

- Roles and ports: what the operator creates and what `dapo role ROLE` serves.
- The role environment (:func:`role_environment`): the variables a role process reads, built by
  the operator for pods (cluster DNS names) and by `dapo run --launcher processes` for local
  processes (loopback), from the same function with a different :class:`Addresses`.
- Reading that environment (:class:`Env`): one parser, errors naming the variable.
- Learner-0's ``GET /status`` document (:class:`LearnerStatus`): written by the trainer, served
  by the status server, read (and sanitised) by the operator.
- The DAPORun status the operator writes (:class:`RunStatus`): the CRD's status schema is
  generated from it (dapo.crd), as the spec schema is generated from dapo.spec.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from datetime import datetime, timezone
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dapo.errors import ConfigError

# --------------------------------------------------------------------------- roles and ports

ROLES = ("learner", "rollout", "reward")
# A dead pod of these roles restarts every pod of them (they share a process group);
# a dead reward pod is replaced alone (it is a stateless scoring service).
GANG_ROLES = ("learner", "rollout")

HTTP_PORT = 8000  # rollout / reward services and learner-0's /status
DIST_PORT = 29500  # torch.distributed rendezvous of the learner ranks (MASTER_PORT)
WEIGHT_SYNC_PORT = 29600  # learner-0's weight-sync store (learner -> rollout broadcast group)

RUN_FILE_DIR = "/etc/dapo"
RUN_FILE = f"{RUN_FILE_DIR}/run.yaml"  # where pods find the run file (the run ConfigMap)

# --------------------------------------------------------------------------- environment


class EnvVar:
    """Names of the variables a role process reads (the environment contract)."""

    # identity of the process
    RUN_NAME = "DAPO_RUN_NAME"
    NAMESPACE = "DAPO_NAMESPACE"
    ROLE = "DAPO_ROLE"
    REPLICA_INDEX = "DAPO_REPLICA_INDEX"
    REPLICAS = "DAPO_REPLICAS"
    RUN_FILE = "DAPO_RUN_FILE"
    GANG_GENERATION = "DAPO_GANG_GENERATION"  # > 0: resume from the latest committed checkpoint
    # learner ranks (torch.distributed env://)
    RANK = "RANK"
    WORLD_SIZE = "WORLD_SIZE"
    MASTER_ADDR = "MASTER_ADDR"
    MASTER_PORT = "MASTER_PORT"
    # wiring between roles
    WEIGHT_SYNC_ADDR = "DAPO_WEIGHT_SYNC_ADDR"  # host:port of learner-0's weight-sync store
    ROLLOUT_URLS = "DAPO_ROLLOUT_URLS"  # comma list of http://host:port
    REWARD_URLS = "DAPO_REWARD_URLS"
    # storage
    CHECKPOINT_URI = "DAPO_CHECKPOINT_URI"  # overrides spec.checkpoint.uri
    CACHE_DIR = "DAPO_CACHE_DIR"  # overrides spec.storage.cacheDir (staged data / models)
    # optional knobs (local runs, tests)
    HTTP_HOST = "DAPO_HTTP_HOST"
    HTTP_PORT = "DAPO_HTTP_PORT"
    RUN_DIR = "DAPO_RUN_DIR"
    STATUS_GRACE_S = "DAPO_STATUS_GRACE_S"
    SERVICE_WAIT_S = "DAPO_SERVICE_WAIT_S"
    ROLLOUT_REQUEST_TIMEOUT_S = "DAPO_ROLLOUT_REQUEST_TIMEOUT_S"  # one replica's answer to /generate
    # a replica with a request outstanding and /healthz silent this long is taken out of rotation
    # (dapo.services.http.ReplicaPool); 0 turns the watch off
    REPLICA_LIVENESS_S = "DAPO_REPLICA_LIVENESS_S"
    WEIGHT_SYNC_TIMEOUT_S = "DAPO_WEIGHT_SYNC_TIMEOUT_S"
    LEARNER_TIMEOUT_S = "DAPO_LEARNER_TIMEOUT_S"
    VERIFY_WEIGHT_SYNC = "DAPO_VERIFY_WEIGHT_SYNC"
    TORCH_THREADS = "DAPO_TORCH_THREADS"  # a number: torch threads of every compute thread, fixed
    THREAD_BUDGET = "DAPO_THREAD_BUDGET"  # "off": torch keeps its own thread count (dapo.controller.threads)
    ENGINE_MAX_ROWS = "DAPO_ENGINE_MAX_ROWS"
    # S3 client (dapo.storage.s3): attempts, timeouts and transfer sizes
    S3_MAX_ATTEMPTS = "DAPO_S3_MAX_ATTEMPTS"
    S3_CONNECT_TIMEOUT = "DAPO_S3_CONNECT_TIMEOUT"
    S3_READ_TIMEOUT = "DAPO_S3_READ_TIMEOUT"
    S3_CHUNK_MB = "DAPO_S3_CHUNK_MB"
    S3_MAX_CONCURRENCY = "DAPO_S3_MAX_CONCURRENCY"
    # secrets (never in the run file): the remote reward service's HTTP headers, a JSON object
    REWARD_REMOTE_HEADERS = "DAPO_REWARD_REMOTE_HEADERS"


class Env:
    """Typed reads of the environment; a malformed value is a :class:`ConfigError` naming it."""

    def __init__(self, environ: dict[str, str] | None = None):
        self._environ = os.environ if environ is None else environ

    def str(self, name: str, default: str = "") -> str:
        return self._environ.get(name, "").strip() or default

    def int(self, name: str, default: int) -> int:
        raw = self.str(name)
        if not raw:
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} must be an integer") from None

    def float(self, name: str, default: float) -> float:
        raw = self.str(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} must be a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"environment variable {name}={raw!r} must be a finite number")
        return value

    def flag(self, name: str) -> bool:
        return self.str(name).lower() in ("1", "true", "yes", "on")

    def host_port(self, name: str) -> tuple[str, int] | None:
        """'host:port' (or '[v6]:port') -> (host, port); None when unset."""
        text = self.str(name)
        if not text:
            return None
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"{name}={text!r}: expected HOST:PORT, e.g. run-learner-0.run-learner.ns.svc:29600")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Addresses:
    """Where each role listens: ``host(role, index)`` and the ports; the operator gives cluster
    DNS names and the contract ports, the local launcher gives loopback and free ports."""

    host: Callable[[str, int], str]
    http_port: Callable[[str, int], int] = lambda role, index: HTTP_PORT
    dist_port: int = DIST_PORT
    weight_sync_port: int = WEIGHT_SYNC_PORT


def role_environment(*, run_name: str, namespace: str, role: str, index: int, replicas: dict[str, int],
                     run_file: str, gang_generation: int, checkpoint_uri: str, cache_dir: str | None,
                     addresses: Addresses) -> dict[str, str]:
    """The contract variables of one role process (``replicas``: count per role).

    Every role gets the peers' addresses (learner-0's weight-sync store, every rollout and
    reward URL); learner ranks get torch.distributed's env:// variables too.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r}: use one of {ROLES}")
    learner0 = addresses.host("learner", 0)
    env = {
        EnvVar.RUN_NAME: run_name,
        EnvVar.NAMESPACE: namespace,
        EnvVar.ROLE: role,
        EnvVar.REPLICA_INDEX: str(index),
        EnvVar.REPLICAS: str(replicas[role]),
        EnvVar.RUN_FILE: run_file,
        EnvVar.GANG_GENERATION: str(gang_generation),
    }
    if role == "learner":
        env.update({EnvVar.RANK: str(index), EnvVar.WORLD_SIZE: str(replicas["learner"]),
                    EnvVar.MASTER_ADDR: learner0, EnvVar.MASTER_PORT: str(addresses.dist_port)})
    env.update({
        EnvVar.WEIGHT_SYNC_ADDR: f"{learner0}:{addresses.weight_sync_port}",
        EnvVar.ROLLOUT_URLS: ",".join(f"http://{addresses.host('rollout', i)}:{addresses.http_port('rollout', i)}"
                                      for i in range(replicas["rollout"])),
        EnvVar.REWARD_URLS: ",".join(f"http://{addresses.host('reward', i)}:{addresses.http_port('reward', i)}"
                                     for i in range(replicas["reward"])),
        EnvVar.CHECKPOINT_URI: checkpoint_uri,
    })
    if cache_dir:
        env[EnvVar.CACHE_DIR] = cache_dir
    return env


# --------------------------------------------------------------------------- HTTP bodies between roles
# The rollout replica's /generate, /sync, /leave and the reward replica's /score: each body is one
# model, validated where it is sent and where it is received (strict types: a bool is not an int,
# a string is not a number), so the two sides cannot drift apart.


def contract_violation(exc) -> str:
    """One line for a body that breaks its contract (a pydantic ValidationError): the first
    field and what is wrong with it."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "body"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    def wire(self) -> dict[str, Any]:
        """The JSON-able body."""
        return self.model_dump(mode="json")


class GenerateRequest(_Wire):
    """POST /generate: n responses to each prompt (token ids), sampled with ``seed``."""

    prompts: list[list[int]] = Field(..., min_length=1)
    n: int = Field(..., ge=1)
    temperature: float = Field(..., gt=0.0)
    top_p: float = Field(..., gt=0.0, le=1.0)
    max_new_tokens: int = Field(..., ge=1)
    seed: int

    @field_validator("prompts")
    @classmethod
    def _prompts_not_empty(cls, prompts: list[list[int]]) -> list[list[int]]:
        if not all(prompts):
            raise ValueError("every prompt must hold at least one token id")
        return prompts


# A log-probability is <= 0; engines report tiny positive rounding (a token of probability 1)
MAX_LOG_PROB = 1e-4


class GenerateAnswer(_Wire):
    """The answer to /generate, one column per field, one row per sample (prompt by prompt, n
    each); the weight version that sampled them. Each sample has one finite log-probability <= 0
    per response token: the learner's rollout correction needs them all."""

    weight_version: int = Field(..., ge=0)
    prompt_index: list[int]
    response_ids: list[list[int]]
    log_probs: list[list[float]]
    finish_reason: list[str]

    @model_validator(mode="after")
    def _one_row_per_sample(self) -> "GenerateAnswer":
        lengths = {len(self.prompt_index), len(self.response_ids), len(self.log_probs), len(self.finish_reason)}
        if len(lengths) != 1:
            raise ValueError(f"columns of different lengths {sorted(lengths)}")
        for i, (ids, probs) in enumerate(zip(self.response_ids, self.log_probs)):
            if len(probs) != len(ids) or not all(-math.inf < x <= MAX_LOG_PROB for x in probs):
                raise ValueError(f"sample {i} has {len(ids)} tokens but log-probs {str(probs)[:80]} (one finite "
                                 "log-probability <= 0 per token is needed)")
        return self


class SyncRequest(_Wire):
    """POST /sync: the controller announces weight version ``version``; the replica receives it."""

    version: int = Field(..., ge=0)


class SyncAnswer(_Wire):
    """The replica applied ``version``; ``checksum`` of its weights (None: its engine cannot hash them)."""

    version: int = Field(..., ge=0)
    checksum: str | None = None
    replica: int = Field(..., ge=0)


class LeaveAnswer(_Wire):
    """POST /leave (empty body): whether the replica was in the weight-sync group."""

    left: bool
    replica: int = Field(..., ge=0)


JsonValue = Any  # a JSON value: ground truths of code data sets are lists / objects


class ScoreRequest(_Wire):
    """POST /score: the responses and, per response, what its scorer needs. Optional columns are
    null or as long as ``responses``."""

    responses: list[str]
    ground_truths: list[JsonValue]
    data_sources: list[str | None] | None = None
    response_lengths: list[int] | None = None
    truncated: list[bool] | None = None
    extra_infos: list[dict[str, JsonValue] | None] | None = None

    @model_validator(mode="after")
    def _columns_as_long_as_responses(self) -> "ScoreRequest":
        count = len(self.responses)
        for name in ("ground_truths", "data_sources", "response_lengths", "truncated", "extra_infos"):
            value = getattr(self, name)
            if value is not None and len(value) != count:
                raise ValueError(f"{name} must be null or a list as long as responses ({count}), not {len(value)}")
        return self


class ScoreResult(_Wire):
    """One scored response (the fields of `dapo.reward.result.RewardResult`)."""

    score: float
    acc: bool
    pred: str
    truncated: bool
    correctness: float
    overlong_penalty: float
    timed_out: bool
    scorer: str
    error: str | None = None


class ScoreAnswer(_Wire):
    """The answer to /score: one result per response, in order."""

    results: list[ScoreResult]


# --------------------------------------------------------------------------- learner-0 /status


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Contract(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")


class LearnerMetrics(_Contract):
    """The latest metrics learner-0 reports (verl's names); None before the first step / eval."""

    score: float | None = Field(None, alias="critic/score/mean", description="Latest critic/score/mean.")
    acc: float | None = Field(None, alias="train/acc/mean", description="Latest train/acc/mean.")
    response_length: float | None = Field(None, alias="response_length/mean", description="Latest response_length/mean.")
    val_acc: float | None = Field(None, alias="val/acc/mean", description="Latest val/acc/mean (avg@n).")
    version_lag: float | None = Field(None, alias="async/version_lag_mean",
                                      description="Latest async/version_lag_mean (weight versions; 0 when synchronous).")


class CheckpointRef(_Contract):
    step: int = Field(..., ge=0, description="Training step of the checkpoint.")
    uri: str = Field(..., description="Where the committed checkpoint is.")


# Every `dapo` command and role exits with this code after a run-file or configuration error
# (SpecError, ConfigError): restarting the process with the same file cannot fix it, so the
# operator fails the DAPORun instead of restarting the gang.
RUN_FILE_ERROR_EXIT_CODE = 2

# A guardrail with action fail / suspend stopped training (the learner's /status says which in
# ``guardrail``; the termination message's last line starts "guardrail:"). Distinct codes because the
# operator may see the exit before it reads /status: fail ends the DAPORun Failed, suspend sets
# spec.suspend; neither restarts the gang (it would trip again).
GUARDRAIL_FAIL_EXIT_CODE = 3
GUARDRAIL_SUSPEND_EXIT_CODE = 4

LearnerState = Literal["starting", "running", "succeeded", "failed", "suspended"]
LEARNER_STATES: tuple[str, ...] = LearnerState.__args__  # type: ignore[attr-defined]


class GuardrailTrip(_Contract):
    """One guardrail firing, as learner-0 reports it and the DAPORun's GuardrailTripped condition shows it."""

    metric: str
    value: float | None = Field(None, description="The checked value (the metric, or its change); None if not finite.")
    step: int = Field(..., ge=0, description="The training step whose metrics tripped it.")
    action: Literal["rollback", "suspend", "fail"]
    rule: str = Field(..., description="The guardrail in words, e.g. 'actor/entropy below 0.05 for 3 steps'.")
    message: str = Field("", description="What was done: rolled back to which checkpoint, suspended, failed.")
    rollbacks: int = Field(0, ge=0, description="Rollbacks this run has made so far.")

    def line(self) -> str:
        """One line for logs, events and the condition message."""
        shown = "non-finite" if self.value is None else f"{self.value:.6g}"
        return f"guardrail {self.rule} tripped at step {self.step} ({self.metric} {shown}): {self.message}"


class LearnerStatus(_Contract):
    """Learner-0's ``GET /status`` document: the trainer writes it, the operator reads it."""

    state: LearnerState = "starting"
    step: int = Field(0, ge=0)
    total_steps: int = Field(0, ge=0, alias="totalSteps")
    weight_version: int = Field(0, ge=0, alias="weightVersion")
    metrics: LearnerMetrics = Field(default_factory=LearnerMetrics)
    last_checkpoint: CheckpointRef | None = Field(None, alias="lastCheckpoint")
    message: str = ""
    # state "failed" because of the run file or configuration (exit RUN_FILE_ERROR_EXIT_CODE follows)
    run_file_error: bool = Field(False, alias="runFileError")
    # the newest guardrail firing of this learner process (None: none fired)
    guardrail: GuardrailTrip | None = None
    updated_at: str = Field(default_factory=now_rfc3339, alias="updatedAt")

    def document(self) -> dict[str, Any]:
        """The JSON document served at /status."""
        return self.model_dump(mode="json", by_alias=True)


def finite_or_none(value: Any) -> float | None:
    """A metric value for the status: NaN, inf, bools and non-numbers become None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# --------------------------------------------------------------------------- DAPORun status

PHASES = ("Pending", "Starting", "Running", "Suspended", "Succeeded", "Failed")
CONDITION_TYPES = ("Ready", "Progressing", "Succeeded", "Failed", "Suspended")

# LearnerMetrics field -> the DAPORun status field that carries it
STATUS_METRIC_FIELDS = {"score": "score", "acc": "acc", "response_length": "responseLength", "val_acc": "valAcc",
                        "version_lag": "versionLag"}


class Condition(_Contract):
    type: str = Field(..., description="Ready, Progressing, Succeeded, Failed, Suspended, Degraded, "
                      "Stalled, Validated or GuardrailTripped.")
    status: Literal["True", "False", "Unknown"]
    reason: str | None = Field(None, description="CamelCase machine-readable reason.")
    message: str | None = Field(None, description="Human-readable detail.")
    last_transition_time: str | None = Field(None, alias="lastTransitionTime", json_schema_extra={"format": "date-time"})


class RunStatus(_Contract):
    """The status the operator writes on a DAPORun (dapo_operator.status.compute_status)."""

    phase: Literal[PHASES] | None = None  # type: ignore[valid-type]
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = Field(None, alias="observedGeneration", json_schema_extra={"format": "int64"})
    learner_ready: str | None = Field(None, alias="learnerReady", description="Ready learner pods / replicas, e.g. 2/2.")
    rollout_ready: str | None = Field(None, alias="rolloutReady", description="Ready rollout pods / replicas.")
    reward_ready: str | None = Field(None, alias="rewardReady", description="Ready reward pods / replicas.")
    step: int | None = Field(None, description="Last finished training step.")
    total_steps: int | None = Field(None, alias="totalSteps")
    weight_version: int | None = Field(None, alias="weightVersion")
    score: float | None = Field(None, description="Latest critic/score/mean.")
    acc: float | None = Field(None, description="Latest train/acc/mean.")
    response_length: float | None = Field(None, alias="responseLength", description="Latest response_length/mean.")
    val_acc: float | None = Field(None, alias="valAcc", description="Latest val/acc/mean (avg@n).")
    version_lag: float | None = Field(None, alias="versionLag",
                                      description="Latest async/version_lag_mean: how stale the trained samples were.")
    learner_state: str | None = Field(None, alias="learnerState", description="state from learner-0's /status.")
    reason: str | None = Field(None, description="CamelCase reason of the current phase.")
    message: str | None = Field(None, description="Latest human line from the learner or operator.")
    last_checkpoint: CheckpointRef | None = Field(None, alias="lastCheckpoint")
    restart_count: int | None = Field(None, alias="restartCount",
                                      description="Gang restarts after a learner or rollout pod died.")
    gang_generation: int | None = Field(None, alias="gangGeneration",
                                        description="Generation of the current set of gang pods.")
    created_gang_generation: int | None = Field(None, alias="createdGangGeneration",
                                                description="Highest gang generation whose pods were all created.")
    last_progress_time: str | None = Field(
        None, alias="lastProgressTime", json_schema_extra={"format": "date-time"},
        description="When training last moved: the run entered Running or the step advanced (the Stalled clock).")
    start_time: str | None = Field(None, alias="startTime", json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(None, alias="completionTime", json_schema_extra={"format": "date-time"})
    warnings: list[str] = Field(default_factory=list)
    guardrail: GuardrailTrip | None = Field(None, description=(
        "The newest guardrail trip learner-0 reported (condition GuardrailTripped), kept after the learner is gone."))


# --------------------------------------------------------------------------- the local cache


def cache_dir(storage_spec=None, environ: dict[str, str] | None = None) -> Path:
    """Where datasets, models and built-in models are staged, for every process of a run:
    ``$DAPO_CACHE_DIR`` (the operator sets it from spec.storage.cacheDir in pods), else
    spec.storage.cacheDir when the run file sets it, else ``~/.cache/dapo`` (the field's
    default, /cache, is a pod volume that a laptop does not have)."""
    explicit = Env(environ).str(EnvVar.CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    if storage_spec is not None and "cache_dir" in storage_spec.model_fields_set:
        return Path(storage_spec.cache_dir).expanduser()
    return Path.home() / ".cache" / "dapo"
