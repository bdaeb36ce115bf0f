"""Experiment trackers (spec.tracking) fed by a quickstart-like `dapo run` (the quickstart's run
file, a few tiny steps), each read back with its own library: TensorBoard event files with
TensorBoard's EventAccumulator, MLflow through MlflowClient on a local sqlite store, W&B's offline
run folder through W&B's own protobuf records. The libraries are the `tracking` extra (also in
`test`); without them these tests are skipped with that reason."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import yaml

from _dapo_tiny import inject_tiny_policy
from dapo.cli import main as cli_main
from dapo.controller.metrics import MetricsWriter
from dapo.spec import SpecError, load_run_file, parse_run
from dapo.controller.tracking import MlflowTracker, TrackingError, flat_params, numeric_metrics

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
MISSING = "the tracking libraries are not installed: pip install -e '.[tracking]' (they are in the test extra)"


def _quickstart_run_file(tmp_path: Path, tracking: dict) -> Path:
    """examples/quickstart.yaml cut down to 3 steps of 4 prompts x 4 responses, with ``tracking``."""
    doc = yaml.safe_load((REPO / "examples/quickstart.yaml").read_text())
    spec = doc["spec"]
    spec["data"].update(train=str(REPO / spec["data"]["train"]), eval=str(REPO / spec["data"]["eval"]),
                        evalMaxPrompts=8)
    spec["rollout"].update(n=4, genBatchSize=8, maxPromptLength=64)  # the test policy's chat template is longer
    spec["learner"].update(trainBatchSize=4, miniBatchSize=2, totalSteps=3)
    spec["algorithm"]["dynamicSampling"]["enabled"] = False
    spec["eval"].update(everySteps=3, n=2)
    spec["checkpoint"].update(everySteps=0)
    spec["tracking"] = tracking
    path = tmp_path / "quickstart-tracked.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (run-ID.wandb): a 7-byte header (":W&B",
    magic 0xBEE1, version 0), then LevelDB-log framing in 32 KiB blocks (4-byte CRC, 2-byte
    length, 1-byte type: 1 full, 2 first, 3 middle, 4 last); payloads are wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.integration
def test_quickstart_run_feeds_tensorboard_mlflow_and_wandb(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason=MISSING)
    pytest.importorskip("mlflow", reason=MISSING)
    pytest.importorskip("wandb", reason=MISSING)
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    inject_tiny_policy(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_file = _quickstart_run_file(tmp_path, {
        "tensorboard": True,
        "mlflow": {"trackingUri": store, "experiment": "quickstart"},
        "wandb": {"project": "dapo-quickstart", "mode": "offline", "tags": ["ci"]},
    })
    run_dir = tmp_path / "run"
    assert cli_main(["run", str(run_file), "--output-dir", str(run_dir)]) == 0
    records = _metrics(run_dir)
    steps = [r for r in records if "actor/pg_loss" in r]
    evals = [r for r in records if "val/acc/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [0, 3]

    # TensorBoard: one scalar series per verl metric name, the values of metrics.jsonl
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for key in ("critic/score/mean", "actor/pg_loss", "actor/entropy", "response_length/mean", "val/acc/mean"):
        assert key in scalars, key
    score = events.Scalars("critic/score/mean")
    assert [e.step for e in score] == [1, 2, 3]
    # TensorBoard stores float32: the value rounded once (<= 6e-8 relative); rel 1e-6 is ~16x that (also val below)
    assert [e.value for e in score] == pytest.approx([r["critic/score/mean"] for r in steps], rel=1e-6)
    val = events.Scalars("val/acc/mean")
    assert [e.step for e in val] == [r["step"] for r in evals]
    assert [e.value for e in val] == pytest.approx([r["val/acc/mean"] for r in evals], rel=1e-6)

    # MLflow: params = the resolved spec, a point per step, the final checkpoint referenced
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("quickstart")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    resolved = load_run_file(run_dir / "run.yaml")
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "quickstart"
    assert mlrun.data.params["spec.learner.lr"] == str(resolved.spec.learner.lr)
    assert mlrun.data.params["spec.model.path"] == "builtin:arith-tiny"
    assert mlrun.data.params["spec.tracking.mlflow.trackingUri"] == store
    history = client.get_metric_history(mlrun.info.run_id, "critic/score/mean")
    assert [m.step for m in history] == [r["step"] for r in steps]
    assert [m.value for m in history] == pytest.approx([r["critic/score/mean"] for r in steps])  # float64 stored: equal
    final = run_dir / "checkpoints" / "step-00000003"
    assert mlrun.data.tags["dapo.checkpoint.step"] == "3" and mlrun.data.tags["dapo.checkpoint.uri"].endswith(final.name)
    assert [a.path for a in client.list_artifacts(mlrun.info.run_id)] == ["checkpoint.json"]
    artifact = Path(client.download_artifacts(mlrun.info.run_id, "checkpoint.json", str(tmp_path)))
    assert json.loads(artifact.read_text()) == {"uri": mlrun.data.tags["dapo.checkpoint.uri"], "step": 3}
    assert (tmp_path / "mlartifacts").is_dir()  # beside the sqlite store, not in some working directory

    # W&B offline: the run folder under RUN_DIR/wandb, read through W&B's own record format
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    (log_file,) = folder.glob("run-*.wandb")
    wandb_records = read_wandb_records(log_file)
    history_steps = {}
    for record in wandb_records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history_steps.setdefault(int(items["_step"]), {}).update(items)
    assert sorted(history_steps) == [0, 1, 2, 3]
    for r in steps:  # JSON round trips of float64 values: equal; approx's default only tolerates a repr's last digit
        assert history_steps[r["step"]]["critic/score/mean"] == pytest.approx(r["critic/score/mean"])
        assert history_steps[r["step"]]["actor/pg_loss"] == pytest.approx(r["actor/pg_loss"])
    assert history_steps[3]["val/acc/mean"] == pytest.approx(evals[-1]["val/acc/mean"])  # a JSON round trip, as above
    run_record = next(r.run for r in wandb_records if r.WhichOneof("record_type") == "run")
    assert run_record.project == "dapo-quickstart" and list(run_record.tags) == ["ci"]
    config = list(run_record.config.update) + [
        item for r in wandb_records if r.WhichOneof("record_type") == "config" for item in r.config.update]
    learner = json.loads(next(item.value_json for item in config if item.key == "learner"))
    assert learner.get("value", learner)["totalSteps"] == 3  # the resolved spec is the run's config


class _Broken:
    name = "broken"

    def __init__(self):
        self.calls = 0

    def log(self, metrics, step):
        self.calls += 1
        raise ConnectionError("tracking server down")

    def close(self, final_checkpoint=None, succeeded=True):
        raise ConnectionError("still down")


class _Recorder:
    name = "recorder"

    def __init__(self):
        self.points, self.closed = [], None

    def log(self, metrics, step):
        self.points.append((step, metrics))

    def close(self, final_checkpoint=None, succeeded=True):
        self.closed = (final_checkpoint, succeeded)


def test_metrics_writer_feeds_trackers_and_survives_a_broken_one(tmp_path, caplog):
    broken, recorder = _Broken(), _Recorder()
    writer = MetricsWriter(tmp_path, trackers=[broken, recorder])
    with caplog.at_level(logging.WARNING, logger="dapo.controller.metrics"):
        writer.write({"step": 1, "actor/pg_loss": 0.5, "critic/score/mean": float("nan"), "train/flag": True,
                      "note": "text"})
        writer.write({"step": 2, "actor/pg_loss": 0.25})
        writer.close(final_checkpoint={"step": 2, "uri": "s3://b/run/step-2"})
    assert broken.calls == 1  # dropped after its first failure
    assert recorder.points == [(1, {"actor/pg_loss": 0.5, "train/flag": 1.0}), (2, {"actor/pg_loss": 0.25})]
    assert recorder.closed == ({"step": 2, "uri": "s3://b/run/step-2"}, True)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert any("tracker broken failed at step 1" in m for m in caplog.messages)
    assert any("closing tracker broken failed: still down" in m for m in caplog.messages)


def test_numeric_metrics_and_flat_params():
    assert numeric_metrics({"step": 3, "a": 1, "b": float("inf"), "c": None, "d": "x", "e": 2.5}) == {"a": 1.0, "e": 2.5}
    assert flat_params({"learner": {"lr": 1e-6, "seed": 1}, "reward": {"scorers": [{"dataSource": "*"}]}}) == {
        "spec.learner.lr": "1e-06", "spec.learner.seed": "1", "spec.reward.scorers": '[{"dataSource": "*"}]'}
    assert MlflowTracker.metric_key("val/acc/MATH-500") == "val/acc/MATH-500"
    assert MlflowTracker.metric_key("val/acc/bad(source)") == "val/acc/bad_source_"


# this module's run files: the minimal preset as run "t" of model "m" on t.jsonl, with spec.tracking
TRACKED = dict(name="t", model={"path": "m"}, data={"train": "t.jsonl"})


def test_credentials_never_in_the_run_file(run_doc):
    with pytest.raises(SpecError, match="trackingUri must not carry a password"):
        parse_run(run_doc(**TRACKED, tracking={"mlflow": {"trackingUri": "https://alice:hunter2@mlflow.example"}}))
    with pytest.raises(SpecError, match=r"spec.tracking.wandb.apiKey: unknown field"):
        parse_run(run_doc(**TRACKED, tracking={"wandb": {"project": "p", "apiKey": "abc"}}))
    run = parse_run(run_doc(**TRACKED, tracking={"mlflow": {"trackingUri": "https://mlflow.example"}}))
    assert run.spec.tracking.mlflow.experiment == "dapo"


def test_unreachable_mlflow_store_fails_at_start_naming_the_field(tmp_path, run_doc):
    pytest.importorskip("mlflow", reason=MISSING)
    from dapo.controller.tracking import build_trackers

    run = parse_run(run_doc(**TRACKED, tracking={"mlflow": {"trackingUri": "unknown-scheme://nowhere"}}))
    with pytest.raises(TrackingError, match=r"spec.tracking.mlflow.trackingUri 'unknown-scheme://nowhere': cannot start"):
        build_trackers(run, tmp_path)
