"""Experiment trackers (``spec.tracking``): TensorBoard, MLflow and Weights & Biases, fed the same
records as metrics.jsonl (verl's metric names: ``actor/pg_loss``, ``critic/score/mean``,
``val/acc/mean``, ...; x axis = the training step).

Each tracker uses its own library, installed with the optional extra ``tracking``
(``pip install 'dapo-platform[tracking]'``): tensorboard (``torch.utils.tensorboard``), mlflow-skinny
(+ SQLAlchemy / alembic for a ``sqlite:`` store), wandb. Credentials are never in the run file: the
libraries read their usual environment variables (``MLFLOW_TRACKING_TOKEN`` / ``_USERNAME`` /
``_PASSWORD``, ``WANDB_API_KEY``), which a Kubernetes Secret provides (spec.tracking.credentialsSecret).

A tracker that fails while training (server down) logs a warning and keeps the run going:
metrics.jsonl stays the record. One that cannot start (library missing, bad URI) fails the run at
start, with :class:`TrackingError` naming the field.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from dapo.spec import DAPORun, SpecError

__all__ = ["MlflowTracker", "TensorBoardTracker", "TrackingError", "WandbTracker", "build_trackers", "flat_params",
           "numeric_metrics"]

log = logging.getLogger("dapo.controller.tracking")

INSTALL_HINT = "pip install 'dapo-platform[tracking]'"


class TrackingError(SpecError):
    """A tracker of spec.tracking cannot start; the message names the field and the fix."""


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl record, ``step`` excluded (bools count as 0 / 1)."""
    out = {}
    for key, value in record.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


def flat_params(value: Any, prefix: str = "spec") -> dict[str, str]:
    """``{"spec.learner.lr": "1e-06", ...}``: every leaf of the resolved run file as a string
    (lists as JSON), the shape MLflow params take."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(flat_params(inner, f"{prefix}.{key}"))
        return out
    if isinstance(value, (list, tuple)):
        return {prefix: json.dumps(value)}
    return {prefix: str(value)}


def _resolved_spec(run: DAPORun) -> dict[str, Any]:
    return run.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})["spec"]


class TensorBoardTracker:
    """Event files under ``log_dir`` (RUN_DIR/tensorboard): one scalar series per metric."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrackingError(f"spec.tracking.tensorboard: the tensorboard package is missing ({exc}); {INSTALL_HINT}") from None
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()  # `tensorboard --logdir` sees a running training

    def close(self, final_checkpoint: dict | None = None, succeeded: bool = True) -> None:
        if final_checkpoint:
            self._writer.add_text("checkpoint", f"{final_checkpoint.get('uri')} (step {final_checkpoint.get('step')})",
                                  global_step=int(final_checkpoint.get("step") or 0))
        self._writer.close()


class MlflowTracker:
    """One MLflow run: params = the resolved spec (flattened), a metric point per step, the final
    checkpoint as tags plus a ``checkpoint.json`` artifact that references it (the weights stay
    where spec.checkpoint.uri put them)."""

    name = "mlflow"
    _MAX_PARAMS_PER_CALL = 100
    _MAX_METRICS_PER_CALL = 1000
    _MAX_PARAM_CHARS = 6000

    def __init__(self, run: DAPORun, tracking_uri: str, experiment: str, run_name: str | None = None):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackingError(f"spec.tracking.mlflow: the mlflow package is missing ({exc}); {INSTALL_HINT}") from None
        self.tracking_uri = tracking_uri
        try:
            self._client = MlflowClient(tracking_uri=tracking_uri)
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else \
                self._client.create_experiment(experiment, artifact_location=self._local_artifacts(tracking_uri))
            created = self._client.create_run(experiment_id, run_name=run_name or run.metadata.name,
                                              tags={"dapo.run": run.metadata.name, "dapo.kind": "DAPORun"})
        except Exception as exc:  # noqa: BLE001 - the store's own error says what is wrong
            raise TrackingError(f"spec.tracking.mlflow.trackingUri {tracking_uri!r}: cannot start an MLflow run "
                                f"({type(exc).__name__}: {str(exc)[:300]}); check the URI and that the server is up") from None
        self.run_id = created.info.run_id
        self.experiment_id = experiment_id
        params = [Param(k, v[: self._MAX_PARAM_CHARS]) for k, v in flat_params(_resolved_spec(run)).items()]
        for start in range(0, len(params), self._MAX_PARAMS_PER_CALL):
            self._client.log_batch(self.run_id, params=params[start:start + self._MAX_PARAMS_PER_CALL])

    @staticmethod
    def _local_artifacts(tracking_uri: str) -> str | None:
        """Artifacts of a ``sqlite:///DIR/x.db`` store go to DIR/mlartifacts (MLflow's default is
        ./mlruns in whatever directory the run started in); servers keep their own default."""
        if tracking_uri.startswith("sqlite:///"):
            return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
        return None

    @staticmethod
    def metric_key(key: str) -> str:
        """MLflow accepts letters, digits, ``_ - . / :`` and spaces; anything else becomes ``_``."""
        return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", key)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        points = [Metric(self.metric_key(k), v, stamp, step) for k, v in metrics.items()]
        for start in range(0, len(points), self._MAX_METRICS_PER_CALL):
            self._client.log_batch(self.run_id, metrics=points[start:start + self._MAX_METRICS_PER_CALL])

    def close(self, final_checkpoint: dict | None = None, succeeded: bool = True) -> None:
        if final_checkpoint and final_checkpoint.get("uri"):
            self._client.set_tag(self.run_id, "dapo.checkpoint.uri", str(final_checkpoint["uri"]))
            self._client.set_tag(self.run_id, "dapo.checkpoint.step", str(final_checkpoint.get("step")))
            self._client.log_dict(self.run_id, {"uri": final_checkpoint["uri"], "step": final_checkpoint.get("step")},
                                  "checkpoint.json")
        self._client.set_terminated(self.run_id, "FINISHED" if succeeded else "FAILED")


class WandbTracker:
    """One W&B run (online, or offline into RUN_DIR/wandb for a later ``wandb sync``); config =
    the resolved spec."""

    name = "wandb"

    def __init__(self, run: DAPORun, run_dir: str | Path, project: str, mode: str = "online", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, name: str | None = None):
        try:
            import wandb
        except ImportError as exc:
            raise TrackingError(f"spec.tracking.wandb: the wandb package is missing ({exc}); {INSTALL_HINT}") from None
        try:
            self._run = wandb.init(project=project, entity=entity, group=group, tags=list(tags or []) or None,
                                   name=name or run.metadata.name, mode=mode, dir=str(run_dir),
                                   config=_resolved_spec(run), reinit="create_new")
        except Exception as exc:  # noqa: BLE001 - e.g. online without WANDB_API_KEY
            raise TrackingError(f"spec.tracking.wandb: cannot start a W&B run in {mode} mode ({type(exc).__name__}: "
                                f"{str(exc)[:300]}); online mode needs WANDB_API_KEY in the environment "
                                "(spec.tracking.credentialsSecret on Kubernetes), or use mode: offline") from None
        self.run_dir = Path(self._run.dir).parent if getattr(self._run, "dir", None) else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self, final_checkpoint: dict | None = None, succeeded: bool = True) -> None:
        if final_checkpoint and final_checkpoint.get("uri"):
            self._run.summary["checkpoint/uri"] = str(final_checkpoint["uri"])
            self._run.summary["checkpoint/step"] = final_checkpoint.get("step")
        self._run.finish(exit_code=0 if succeeded else 1)


def build_trackers(run: DAPORun, run_dir: str | Path) -> list:
    """The trackers spec.tracking asks for (empty when none)."""
    tracking = run.spec.tracking
    trackers: list = []
    try:
        if tracking.tensorboard:
            trackers.append(TensorBoardTracker(Path(run_dir) / "tensorboard"))
        if tracking.mlflow is not None:
            m = tracking.mlflow
            trackers.append(MlflowTracker(run, m.tracking_uri, m.experiment, m.run_name))
        if tracking.wandb is not None:
            w = tracking.wandb
            trackers.append(WandbTracker(run, run_dir, w.project, w.mode, w.entity, w.group, w.tags, w.name))
    except BaseException:
        for tracker in trackers:  # the ones already started must not stay open as "running"
            tracker.close(succeeded=False)
        raise
    if trackers:
        log.info("experiment trackers: %s", ", ".join(t.name for t in trackers))
    return trackers
