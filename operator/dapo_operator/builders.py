"""Pure builders: a validated DAPORun in, the Kubernetes objects the operator creates out.

No I/O and no clock here, so `dapo-operator render` and the operator print / create the same objects and
tests check them directly. Names, labels, ports and the role environment come from dapo.contracts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

from dapo.contracts import Addresses, EnvVar, role_environment
from dapo.spec import API_GROUP, API_VERSION, KIND, SCORER_MOUNT_DIR, DAPORun, PodPlacement, dump_run, run_warnings

from . import naming as n

DEFAULT_IMAGE_ENV = "DAPO_DEFAULT_IMAGE"
FALLBACK_IMAGE = "ghcr.io/dapo-platform/dapo:latest"
RUNTIME_UID = 10001  # the image user (Dockerfile)


@dataclass(frozen=True)
class Owner:
    """The DAPORun that owns the children (its uid comes from the API server)."""

    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def default_image() -> str:
    """Operator-wide runtime image: env DAPO_DEFAULT_IMAGE, else the project's published image."""
    return os.environ.get(DEFAULT_IMAGE_ENV) or FALLBACK_IMAGE


def role_spec(run: DAPORun, role: str) -> PodPlacement:
    return getattr(run.spec, role)


def kueue_queue(run: DAPORun) -> str | None:
    """The Kueue LocalQueue the run asks for via its label, or None (no Kueue)."""
    return run.metadata.labels.get(n.KUEUE_QUEUE_LABEL)


def gang_roles(run: DAPORun) -> tuple[str, ...]:
    """Roles restarted together. Under Kueue every pod belongs to one pod group per gang
    generation, so reward pods join the gang (a lone replacement would join a dead group)."""
    return n.ROLES if kueue_queue(run) else n.GANG_ROLES


def total_pods(run: DAPORun) -> int:
    return sum(role_spec(run, role).replicas for role in n.ROLES)


def checkpoint_uri(run: DAPORun) -> str:
    """spec.checkpoint.uri, or a folder under the cache emptyDir (lost when the gang restarts)."""
    return run.spec.checkpoint.uri or f"{run.spec.storage.cache_dir.rstrip('/')}/checkpoints"


def spec_warnings(run: DAPORun) -> list[str]:
    """Settings that work but lose something on a cluster; shown in status.warnings."""
    warnings = []
    if not run.spec.checkpoint.uri:
        warnings.append(
            "spec.checkpoint.uri is not set: checkpoints go to an emptyDir and a gang restart starts from step 0; "
            "set spec.checkpoint.uri to an s3:// prefix"
        )
    elif not run.spec.checkpoint.uri.startswith("s3://"):
        warnings.append(
            f"spec.checkpoint.uri {run.spec.checkpoint.uri!r} is a pod-local path: it does not survive a gang restart; "
            "use an s3:// prefix"
        )
    return warnings + run_warnings(run.spec)


def _meta(run: DAPORun, name: str, namespace: str, component: str, owner: Owner | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": n.child_labels(run.metadata.name, component)}
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    return meta


def pod_run_file(run: DAPORun) -> str:
    """The run file the pods read: apiVersion, kind, the run's name and the resolved spec (every
    default filled in), nothing else of the DAPORun's metadata. The API server rewrites the rest
    (resourceVersion on every status write, generation, managedFields, kopf's annotations and
    finalizers): copied into the ConfigMap, it would change the ConfigMap at every write."""
    doc = yaml.safe_load(dump_run(run))
    doc["metadata"] = {"name": run.metadata.name}
    return yaml.safe_dump(doc, sort_keys=False)


def build_config_map(run: DAPORun, namespace: str, owner: Owner | None = None) -> dict[str, Any]:
    """ConfigMap RUN-spec holding the pods' run file (`pod_run_file`)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(run, n.config_map_name(run.metadata.name), namespace, "config", owner),
        "data": {"run.yaml": pod_run_file(run)},
    }


def build_service(run: DAPORun, role: str, namespace: str, owner: Owner | None = None) -> dict[str, Any]:
    """Headless Service RUN-ROLE giving each pod the stable DNS name RUN-ROLE-i.RUN-ROLE.NS.svc."""
    ports = [{"name": "http", "port": n.HTTP_PORT, "targetPort": "http"}]
    if role == "learner":
        ports += [
            {"name": "dist", "port": n.DIST_PORT, "targetPort": "dist"},
            {"name": "weight-sync", "port": n.WEIGHT_SYNC_PORT, "targetPort": "weight-sync"},
        ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(run, n.service_name(run.metadata.name, role), namespace, role, owner),
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve each other before they are ready (rendezvous happens first).
            "publishNotReadyAddresses": True,
            "selector": {n.LABEL_RUN: run.metadata.name, n.LABEL_ROLE: role},
            "ports": ports,
        },
    }


def _resources(placement: PodPlacement) -> dict[str, Any]:
    requests = {k: str(v) for k, v in placement.resources.requests.items()}
    limits = {k: str(v) for k, v in placement.resources.limits.items()}
    if placement.resources.gpus:
        limits["nvidia.com/gpu"] = str(placement.resources.gpus)
        requests.setdefault("nvidia.com/gpu", str(placement.resources.gpus))
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pod_env(run: DAPORun, role: str, index: int, namespace: str, gang_generation: int) -> list[dict[str, Any]]:
    """Environment of one runtime pod: the contract variables (dapo.contracts.role_environment)
    with cluster DNS addresses, plus what the pod's read-only filesystem and S3 need."""
    name = run.metadata.name
    spec = run.spec
    contract = role_environment(
        run_name=name, namespace=namespace, role=role, index=index,
        replicas={r: role_spec(run, r).replicas for r in n.ROLES}, run_file=n.RUN_FILE,
        gang_generation=gang_generation, checkpoint_uri=checkpoint_uri(run), cache_dir=spec.storage.cache_dir,
        addresses=Addresses(host=lambda peer, i: n.pod_dns(name, peer, i, namespace)))
    env: list[dict[str, Any]] = [{"name": key, "value": value} for key, value in contract.items()]
    env += [
    # readOnlyRootFilesystem: every library cache must point at a writable volume.
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{spec.storage.cache_dir.rstrip('/')}/huggingface"},
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{spec.storage.cache_dir.rstrip('/')}/torch_extensions"},
    ]
    if spec.storage.endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint_url})
    if spec.storage.region:
        env.append({"name": "AWS_REGION", "value": spec.storage.region})
    if spec.storage.credentials_secret and role != "reward":
        # least privilege: reward pods read nothing from S3 and run user scorer code, so the storage
        # keys never reach them (learners: data, model, checkpoints; rollout: the model)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": spec.storage.credentials_secret, "key": key}}})
    if role == "reward" and spec.reward.remote is not None and spec.reward.remote.headers_secret:
        # the remote reward service's headers (e.g. Authorization): a Secret, never the run file
        env.append({"name": EnvVar.REWARD_REMOTE_HEADERS, "valueFrom": {"secretKeyRef": {
            "name": spec.reward.remote.headers_secret, "key": "headers"}}})
    return env


def build_pod(
    run: DAPORun,
    role: str,
    index: int,
    namespace: str,
    gang_generation: int,
    image: str | None = None,
    owner: Owner | None = None,
) -> dict[str, Any]:
    """Pod RUN-ROLE-i. Image: role image > spec.image > ``image`` (operator default)."""
    name = run.metadata.name
    placement = role_spec(run, role)
    meta = _meta(run, n.pod_name(name, role, index), namespace, role, owner)
    meta["labels"][n.LABEL_GANG] = str(gang_generation)
    ports = [{"name": "http", "containerPort": n.HTTP_PORT}]
    if role == "learner":
        ports += [{"name": "dist", "containerPort": n.DIST_PORT}, {"name": "weight-sync", "containerPort": n.WEIGHT_SYNC_PORT}]
    container = {
        "name": role,
        "image": placement.image or run.spec.image or image or default_image(),
        "imagePullPolicy": "IfNotPresent",
        "command": ["dapo", "role", role],
        "env": pod_env(run, role, index, namespace, gang_generation),
        "ports": ports,
        "resources": _resources(placement),
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3},
        # A role that stops on a run-file error prints it last: the tail of the log becomes the
        # termination message, which the operator copies into the DAPORun's status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "run-file", "mountPath": n.RUN_FILE_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": run.spec.storage.cache_dir},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": n.pod_name(name, role, index),
        "subdomain": n.service_name(name, role),
        # Training pods get no Kubernetes API rights: no token is mounted at all.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "run-file", "configMap": {"name": n.config_map_name(name)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            # torch / NCCL exchange tensors through /dev/shm; the container default is 64 MiB.
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if role == "reward":
        # A reward replica that stops answering (frozen, deadlocked) is taken out of rotation by the
        # learner at once (dapo.services.http.ReplicaPool); the kubelet then kills it (the pod
        # fails: restartPolicy Never) and the operator replaces that pod alone. Reward replicas
        # are stateless, so this costs nothing; a gang pod gets no liveness probe, since killing one
        # restarts the gang (a frozen learner or rollout is caught by the weight-sync and learner
        # timeouts instead). The startup probe gives the scorer pool its start-up time first.
        container["startupProbe"] = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5,
                                     "failureThreshold": 120}
        container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                                      "timeoutSeconds": 5, "failureThreshold": 3}
    if role == "reward" and run.spec.reward.scorer_config_map:
        # run-file scorers shipped as files: spec.reward.scorers[i].function = /etc/dapo/scorers/FILE.py:NAME
        container["volumeMounts"].append({"name": "scorers", "mountPath": SCORER_MOUNT_DIR, "readOnly": True})
        pod_spec["volumes"].append({"name": "scorers", "configMap": {"name": run.spec.reward.scorer_config_map}})
    if role == "learner" and run.spec.tracking.credentials_secret:
        # tracker credentials (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...) for learner-0's trackers
        container["envFrom"] = [{"secretRef": {"name": run.spec.tracking.credentials_secret}}]
    if placement.node_selector:
        pod_spec["nodeSelector"] = dict(placement.node_selector)
    if placement.affinity:
        pod_spec["affinity"] = placement.affinity
    if placement.tolerations:
        pod_spec["tolerations"] = list(placement.tolerations)
    if placement.priority_class_name:
        pod_spec["priorityClassName"] = placement.priority_class_name
    queue = kueue_queue(run)
    if queue:
        # Kueue plain-pod groups: queue + group labels, total count annotation, admission gate
        # (Kueue's webhook adds the gate too; setting it here keeps the pods gated without it).
        meta["labels"][n.KUEUE_QUEUE_LABEL] = queue
        meta["labels"][n.KUEUE_GROUP_LABEL] = n.kueue_group_name(name, gang_generation)
        meta["annotations"] = {n.KUEUE_TOTAL_ANNOTATION: str(total_pods(run))}
        pod_spec["schedulingGates"] = [{"name": n.KUEUE_GATE}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def build_eval_pod(run: DAPORun, step: int, namespace: str, image: str | None = None,
                   owner: Owner | None = None) -> dict[str, Any]:
    """Pod RUN-eval-STEP (spec.eval.separatePod): `dapo eval` of committed checkpoint STEP from
    spec.checkpoint.uri, with the run file's evaluation settings, on the rollout pool (spec.rollout's
    image, resources and placement), storing its result beside the checkpoint for the learner to
    pick up. A rollout pod's security and volumes; no Service name, no ports, no gang label."""
    pod = build_pod(run, "rollout", 0, namespace, 0, image, owner)
    name = n.eval_pod_name(run.metadata.name, step)
    meta = pod["metadata"]
    meta["name"] = name
    meta["labels"] = {**n.child_labels(run.metadata.name, n.EVAL_ROLE), n.LABEL_EVAL_STEP: str(step)}
    meta.pop("annotations", None)  # not part of the gang's Kueue pod group
    spec = pod["spec"]
    for key in ("hostname", "subdomain", "schedulingGates"):
        spec.pop(key, None)
    container = spec["containers"][0]
    container["name"] = n.EVAL_ROLE
    ev = run.spec.eval
    container["command"] = ["dapo", "eval", checkpoint_uri(run), "--step", str(step), "--data", run.spec.data.eval or "",
                            "--run-file", n.RUN_FILE, "--store-result",
                            *(["--k", ",".join(map(str, ev.pass_k))] if ev.pass_k else [])]
    for key in ("ports", "readinessProbe", "startupProbe", "livenessProbe"):
        container.pop(key, None)
    return pod


#: The check pod's share of a CPU node: enough for the tokenizer, a few data rows and the scorer
#: worker pool (`dapo check` loads no weights); its memory limit keeps a runaway scorer from
#: starving the node.
CHECK_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}


def build_check_pod(run: DAPORun, namespace: str, image: str | None = None,
                    owner: Owner | None = None) -> dict[str, Any]:
    """Pod RUN-check (spec.preflight): `dapo check` of the mounted run file on a CPU node, before
    any learner / rollout pod exists, so a run file that cannot work never holds a GPU.

    It sees what the check reads: the run file, the scorer files (spec.reward.scorerConfigMap),
    the storage credentials (data and the model's config / tokenizer may be s3://) and the cache
    volume; never the tracker credentials or the remote reward headers (the check calls neither).
    The reward pods' image (where user scorer code is importable), no GPU, no placement of the
    GPU pools, no Service name or ports, no gang label, not part of a Kueue pod group."""
    pod = build_pod(run, "reward", 0, namespace, 0, image, owner)
    name = n.check_pod_name(run.metadata.name)
    meta = pod["metadata"]
    meta["name"] = name
    meta["labels"] = n.child_labels(run.metadata.name, n.CHECK_ROLE)
    meta.pop("annotations", None)
    spec = pod["spec"]
    for key in ("hostname", "subdomain", "schedulingGates", "nodeSelector", "affinity", "tolerations",
                "priorityClassName"):
        spec.pop(key, None)
    # The kubelet stops it at the deadline too (reason DeadlineExceeded), should the operator be down.
    spec["activeDeadlineSeconds"] = run.spec.preflight.timeout_seconds
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "shm"]
    container = spec["containers"][0]
    container["name"] = n.CHECK_ROLE
    container["command"] = ["dapo", "check", n.RUN_FILE]
    container["resources"] = {kind: dict(values) for kind, values in CHECK_RESOURCES.items()}
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "shm"]
    env = [e for e in container["env"] if e["name"] != EnvVar.REWARD_REMOTE_HEADERS]
    if run.spec.storage.credentials_secret:
        # unlike a reward pod, the check reads the data sets and the model's small files
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": run.spec.storage.credentials_secret,
                                                                    "key": key}}})
    container["env"] = env
    container.pop("envFrom", None)
    for key in ("ports", "readinessProbe", "startupProbe", "livenessProbe"):
        container.pop(key, None)
    return pod


def desired_pod_names(run: DAPORun) -> list[tuple[str, int, str]]:
    """(role, index, pod name) of every pod the run wants, learner-0 first."""
    return [
        (role, i, n.pod_name(run.metadata.name, role, i))
        for role in n.ROLES
        for i in range(role_spec(run, role).replicas)
    ]


def build_all(
    run: DAPORun, namespace: str, gang_generation: int = 0, image: str | None = None, owner: Owner | None = None
) -> list[dict[str, Any]]:
    """Every object of a run: ConfigMap, a headless Service per role, every Pod."""
    objects = [build_config_map(run, namespace, owner)]
    objects += [build_service(run, role, namespace, owner) for role in n.ROLES]
    objects += [build_pod(run, role, i, namespace, gang_generation, image, owner) for role, i, _ in desired_pod_names(run)]
    return objects
