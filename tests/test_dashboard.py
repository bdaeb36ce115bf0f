"""The chart's Grafana dashboard and the Prometheus metrics it reads.

Every metric name in a dashboard query must be one the code really exports: the operator's
(prometheus_client registry of dapo_operator.metrics) or learner-0's GET /metrics, scraped here
from a real StatusServer fed by one real training step (and an evaluation) of a tiny policy."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "charts" / "dashboards" / "dapo-training.json"

pytestmark = pytest.mark.timeout(300)

# PromQL words that look like names in an expression
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "le", "without", "avg", "max", "min"}


def dashboard_metric_names() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in doc["panels"]:
        for target in panel["targets"]:
            # drop label selectors, strings, ranges and by/without label lists
            expr = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)', "", target["expr"])
            names |= {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr) if w not in PROMQL_WORDS}
    return names


def operator_exported() -> set[str]:
    from prometheus_client import REGISTRY

    import dapo_operator.metrics  # noqa: F401 - registers the collectors

    # the sample names Prometheus stores for each family type (a labelled family has no samples
    # until a child exists, so the names come from the type, as prometheus_client writes them)
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}
    return {family.name + suffix for family in REGISTRY.collect() if family.name.startswith("dapo_operator")
            for suffix in suffixes[family.type]}


@pytest.fixture(scope="module")
def learner_exported(tmp_path_factory) -> set[str]:
    """Sample names of GET /metrics after one step + eval of a real Trainer (tiny policy, real
    reward pool), served by the StatusServer exactly as dapo.entry.roles.run_controller wires it."""
    from prometheus_client.parser import text_string_to_metric_families

    from _dapo_runs import write_data
    from _run_files import run_doc
    from _dapo_tiny import tiny_policy
    from dapo.entry.inprocess import build_embedded_run
    from dapo.controller.status_server import StatusServer
    from dapo.spec import parse_run

    tmp = tmp_path_factory.mktemp("learner")
    doc = run_doc("dash", "processes", model={"path": str(tmp / "unused-model")},
                  data={"train": str(write_data(tmp / "train.jsonl", 8))}, learner={"totalSteps": 1},
                  checkpoint={"everySteps": 0})
    doc["spec"]["data"]["eval"] = str(write_data(tmp / "eval.jsonl", 2))
    doc["spec"]["eval"] = {"everySteps": 1, "beforeTrain": False, "n": 1}
    embedded = build_embedded_run(parse_run(doc), tmp / "run", resume=False, policy=tiny_policy(32, 2, 0))
    status = StatusServer("127.0.0.1", 0, labels={"run": "dash"}).start()
    try:
        trainer = embedded.trainer
        status.set_source(trainer.status, latest=trainer.metrics.latest_values)
        trainer.train()
        with urllib.request.urlopen(f"http://127.0.0.1:{status.port}/metrics", timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain")
            text = answer.read().decode()
    finally:
        status.stop()
        embedded.close()
    families = list(text_string_to_metric_families(text))
    for family in families:
        for sample in family.samples:
            assert sample.labels.get("run") == "dash", sample
    return {sample.name for family in families for sample in family.samples}


@pytest.mark.integration
def test_every_dashboard_metric_is_exported(learner_exported):
    exported = learner_exported | operator_exported()
    used = dashboard_metric_names()
    assert used, "no metric names parsed from the dashboard"
    assert used - exported == set(), f"dashboard queries metrics nobody exports: {sorted(used - exported)}"


@pytest.mark.integration
def test_learner_metrics_follow_verl_names(learner_exported):
    for name in ("dapo_step", "dapo_total_steps", "dapo_weight_version", "dapo_training_state",
                 "dapo_critic_score_mean", "dapo_train_acc_mean", "dapo_val_acc_mean", "dapo_actor_entropy",
                 "dapo_actor_pg_clipfrac", "dapo_actor_pg_clipfrac_lower", "dapo_response_length_mean",
                 "dapo_perf_throughput", "dapo_train_weight_version"):
        assert name in learner_exported, name


def test_dashboard_has_the_promised_panels():
    doc = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in doc["panels"])
    for word in ("step", "score", "accuracy", "response length", "entropy", "clip fractions", "staleness",
                 "throughput", "reconcile", "restarts"):
        assert word in titles, word
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    assert {v["name"] for v in doc["templating"]["list"]} == {"datasource", "run"}


def test_chart_ships_the_dashboard_off_by_default():
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the test extra: pip install -e '.[test]'")
    chart = helm.Chart.load(str(REPO / "charts"))

    def objects(values):
        out = []
        for path, text in chart.render(values, name="dapo", namespace="dapo-system").items():
            if not path.endswith("NOTES.txt"):
                out += [d for d in yaml.safe_load_all(text) if d]
        return out

    assert not [o for o in objects({}) if o["kind"] in ("ConfigMap", "PodMonitor")]
    rendered = objects({"grafanaDashboard": {"enabled": True}, "podMonitor": {"enabled": True}})
    (config_map,) = [o for o in rendered if o["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["dapo-training.json"]) == json.loads(DASHBOARD.read_text())
    assert [o["kind"] for o in rendered].count("PodMonitor") == 1
