"""Security of what the operator creates (issue 7, item 3).

Every pod `dapo_operator.builders.build_all` makes, for run files with GPUs, a credentials
Secret and a Kueue queue: non-root, no privilege escalation, no capabilities, read-only root
filesystem, seccomp, no host access, no API token, secrets only by reference. The learner's
/status reply reaches the DAPORun status only through the contract's fields.

Chart RBAC (no wildcards, no secrets) and the NetworkPolicy shape are tested in
tests/test_helm.py; here the chart's run-pod policy is checked against the pods the builders
actually make (the two are written in different places and could drift).
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import _run_files
from _crd_schema import strict_schema  # jsonschema form of the CRD's OpenAPI schema
from dapo.spec import SpecError, parse_run
from dapo_operator import naming as n
from dapo_operator.builders import build_all, pod_run_file
from dapo.crd import status_schema
from dapo_operator.status import MAX_MESSAGE_CHARS, compute_status

ROOT = Path(__file__).resolve().parents[1]

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"  # a value that must never appear in output
SECRETISH_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


# this module's small run: the cluster preset as team-a's "sec" run with S3 checkpoints
SEC = dict(name="sec", preset="cluster", namespace="team-a", checkpoint={"uri": "s3://ckpt/sec"})

RUN_FILES = {
    "cpu-no-credentials": _run_files.run_doc(**SEC),
    "gpus-credentials-kueue": yaml.safe_load((ROOT / "examples" / "k8s-run.yaml").read_text()),
    "endpoint-without-secret": _run_files.run_doc(**SEC,
                                                  storage={"endpointUrl": "http://minio:9000", "region": "eu-1"}),
    "limits-and-secret": _run_files.run_doc(
        **SEC,
        storage={"credentialsSecret": "s3-creds"},
        learner={"replicas": 1, "trainBatchSize": 8, "miniBatchSize": 4,
                 "resources": {"gpus": 2, "requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}}},
        reward={"resources": {"requests": {"cpu": 1}, "limits": {"cpu": 2, "memory": "2Gi"}}},
    ),
}


def pods_of(name: str) -> tuple[Any, list[dict[str, Any]]]:
    run = parse_run(copy.deepcopy(RUN_FILES[name]))
    objects = build_all(run, run.metadata.namespace or "default", gang_generation=1, image="img:1")
    return run, [o for o in objects if o["kind"] == "Pod"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return spec.get("initContainers", []) + spec["containers"] + spec.get("ephemeralContainers", [])


@pytest.mark.parametrize("name", sorted(RUN_FILES))
def test_pods_are_hardened(name):
    _, pods = pods_of(name)
    assert pods
    for pod in pods:
        where = pod["metadata"]["name"]
        spec = pod["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc.get("runAsUser", 1) != 0, where
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        # Training pods get no Kubernetes API rights: no token mounted, no host access.
        assert spec["automountServiceAccountToken"] is False, where
        for host_flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host_flag), f"{where}: {host_flag}"
        for volume in spec["volumes"]:
            assert set(volume) - {"name"} <= {"emptyDir", "configMap"}, f"{where}: volume {volume}"
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert not sc.get("privileged") and sc.get("runAsUser", 1) != 0, where
            assert all("hostPort" not in p for p in c["ports"]), where
            # A read-only root needs every written path on a volume; the run file mount is read-only.
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts[n.RUN_FILE_DIR]["readOnly"] is True and "/tmp" in mounts, where


@pytest.mark.parametrize("name", sorted(RUN_FILES))
def test_resources_are_the_specs_and_gpus_are_limited(name):
    """Requests / limits come from spec.ROLE.resources only (no hidden defaults in the builder)."""
    run, pods = pods_of(name)
    for pod in pods:
        role = pod["metadata"]["labels"][n.LABEL_ROLE]
        placement = getattr(run.spec, role).resources
        resources = pod["spec"]["containers"][0]["resources"]
        limits = dict(resources.get("limits", {}))
        if placement.gpus:
            assert limits.pop("nvidia.com/gpu") == str(placement.gpus)
            assert resources["requests"]["nvidia.com/gpu"] == str(placement.gpus)
        assert limits == {k: str(v) for k, v in placement.limits.items()}, pod["metadata"]["name"]


@pytest.mark.parametrize("name", sorted(RUN_FILES))
def test_secrets_only_by_reference(name):
    run, pods = pods_of(name)
    secret_name = run.spec.storage.credentials_secret
    for pod in pods:
        for c in containers(pod):
            assert "envFrom" not in c or all(set(e) == {"secretRef"} and e["secretRef"]["name"] == secret_name
                                              for e in c["envFrom"]), pod["metadata"]["name"]
            by_name = {e["name"]: e for e in c["env"]}
            for var, entry in by_name.items():
                if SECRETISH_NAME.search(var):
                    assert "value" not in entry, f"{var} has a literal value"
                    assert entry["valueFrom"]["secretKeyRef"]["name"] == secret_name, var
            aws_keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            if secret_name and pod["metadata"]["labels"]["dapo.dev/role"] != "reward":
                assert aws_keys <= set(by_name)
            else:  # no Secret, or a reward pod (no S3 use, user scorer code): no keys
                assert not aws_keys & set(by_name), "AWS keys without spec.storage.credentialsSecret or in a reward pod"


def test_credentials_cannot_be_written_into_the_run_file(run_doc):
    """The spec has no field for key material: it is an unknown-field error, so it never
    reaches the ConfigMap (which any pod and anyone reading ConfigMaps sees)."""
    for field in ("accessKeyId", "secretAccessKey", "awsSecretAccessKey", "sessionToken"):
        with pytest.raises(SpecError, match=rf"spec\.storage\.{field}: unknown field"):
            parse_run(run_doc(**SEC, storage={"credentialsSecret": "s3-creds", field: SECRET}))
    run = parse_run(run_doc(**SEC, storage={"credentialsSecret": "s3-creds"}))
    config_map = build_all(run, "team-a")[0]
    assert config_map["kind"] == "ConfigMap" and config_map["data"]["run.yaml"] == pod_run_file(run)
    assert "credentialsSecret: s3-creds" in config_map["data"]["run.yaml"]


@pytest.mark.parametrize("name", sorted(RUN_FILES))
def test_services_are_internal_and_ports_are_the_contracts(name):
    run = parse_run(copy.deepcopy(RUN_FILES[name]))
    objects = build_all(run, "team-a")
    for service in (o for o in objects if o["kind"] == "Service"):
        spec = service["spec"]
        assert spec["clusterIP"] == "None" and spec.get("type", "ClusterIP") == "ClusterIP"
        assert "externalIPs" not in spec and "loadBalancerIP" not in spec
    allowed = {n.HTTP_PORT, n.DIST_PORT, n.WEIGHT_SYNC_PORT}
    for pod in (o for o in objects if o["kind"] == "Pod"):
        assert {p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]} <= allowed


def test_chart_network_policy_covers_the_pods_the_operator_makes():
    """Every run pod is selected by the chart's run-pod NetworkPolicy, and every port it
    listens on is one the policy restricts to run pods (plus the operator on 8000)."""
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the test extra: pip install -e '.[test]'")
    chart = helm.Chart.load(str(ROOT / "charts"))
    values = {"networkPolicy": {"enabled": True, "runPods": {"namespaces": ["team-a"]}}}
    manifests = chart.render(values, name="dapo", namespace="dapo-system")
    objects = [d for path, text in manifests.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == "team-a"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports_allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert all(peer.get("podSelector") for peer in peers), "an ingress peer without a pod selector admits a whole namespace"
    for name in RUN_FILES:
        _, pods = pods_of(name)
        for pod in pods:
            assert selector.items() <= pod["metadata"]["labels"].items(), pod["metadata"]["name"]
            listening = {p["containerPort"] for c in containers(pod) for p in c["ports"]}
            assert listening <= ports_allowed, pod["metadata"]["name"]


# ----------------------------------------------------------------------------- learner /status

NOW = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def running_pods(run) -> list[dict[str, Any]]:
    pods = [o for o in build_all(run, "team-a") if o["kind"] == "Pod"]
    for pod in pods:
        pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    return pods


def status_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict_schema(status_schema()))


HOSTILE_REPLIES = {
    "unknown keys": {
        "state": "running", "step": 3, "AWS_SECRET_ACCESS_KEY": SECRET, "env": {"AWS_SECRET_ACCESS_KEY": SECRET},
        "metrics": {"critic/score/mean": 0.5, "AWS_SECRET_ACCESS_KEY": SECRET},
        "lastCheckpoint": {"step": 2, "uri": "s3://ckpt/sec/2", "credentials": SECRET},
    },
    "wrong types": {"state": {"x": SECRET}, "step": SECRET, "metrics": [SECRET], "lastCheckpoint": SECRET,
                    "message": 5, "weightVersion": [1], "totalSteps": 1e308},
    "secret in a metric value": {"state": "running", "metrics": {"critic/score/mean": SECRET, "train/acc/mean": float("nan")}},
    "huge message": {"state": "running", "message": "m" * (1 << 20)},
    "bools and negatives": {"state": "running", "step": True, "totalSteps": -5, "weightVersion": 2**70},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REPLIES))
def test_learner_status_reaches_the_cr_only_through_contract_fields(case, run_doc):
    run = parse_run(run_doc(**SEC))
    status = compute_status(run, 1, running_pods(run), copy.deepcopy(HOSTILE_REPLIES[case]), None, NOW)
    assert SECRET not in repr(status)
    errors = [e.message for e in status_validator().iter_errors(status)]
    assert errors == [], f"the API server would refuse this status patch on every poll: {errors}"
    assert len(status["message"]) <= MAX_MESSAGE_CHARS
    assert all(len(c["message"]) <= MAX_MESSAGE_CHARS for c in status["conditions"])


def test_contract_fields_still_arrive(run_doc):
    run = parse_run(run_doc(**SEC))
    reply = {"state": "running", "step": 7, "totalSteps": 20, "weightVersion": 7,
             "metrics": {"critic/score/mean": 0.25, "train/acc/mean": 0.5, "response_length/mean": 120, "val/acc/mean": None},
             "lastCheckpoint": {"step": 5, "uri": "s3://ckpt/sec/5"}, "message": "step 7", "updatedAt": "2025-01-01T00:00:00Z"}
    status = compute_status(run, 1, running_pods(run), reply, None, NOW)
    assert (status["phase"], status["step"], status["totalSteps"], status["weightVersion"]) == ("Running", 7, 20, 7)
    # metric values are carried through, never computed: exact
    assert (status["score"], status["acc"], status["responseLength"]) == (0.25, 0.5, 120.0) and "valAcc" not in status
    assert status["lastCheckpoint"] == {"step": 5, "uri": "s3://ckpt/sec/5"} and status["message"] == "step 7"
