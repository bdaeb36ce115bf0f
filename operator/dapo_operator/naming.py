"""Names, labels and DNS addresses of a DAPORun's children.

Roles, ports and the run-file path are the runtime's contracts (dapo.contracts), re-exported
here so the builders read as one vocabulary; docs/architecture.md lists them.
"""

from __future__ import annotations

from dapo.contracts import (DIST_PORT, GANG_ROLES, HTTP_PORT, ROLES, RUN_FILE, RUN_FILE_DIR, RUN_FILE_ERROR_EXIT_CODE,
                            WEIGHT_SYNC_PORT)

__all__ = ["DIST_PORT", "GANG_ROLES", "HTTP_PORT", "ROLES", "RUN_FILE", "RUN_FILE_DIR", "WEIGHT_SYNC_PORT"]

LABEL_RUN = "dapo.dev/run"
LABEL_ROLE = "dapo.dev/role"
LABEL_GANG = "dapo.dev/gang-generation"
LABEL_EVAL_STEP = "dapo.dev/eval-step"  # the checkpoint an evaluation pod evaluates
EVAL_ROLE = "eval"  # the role label of evaluation pods (not a gang role: they never restart the gang)
CHECK_ROLE = "check"  # the role label of the preflight pod (`dapo check` on CPU before any GPU pod)

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_TOTAL_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_GATE = "kueue.x-k8s.io/admission"

# `dapo`'s exit code after a run-file error (every command and role): restarting cannot fix it.
SPEC_ERROR_EXIT_CODE = RUN_FILE_ERROR_EXIT_CODE


def pod_name(run: str, role: str, index: int) -> str:
    return f"{run}-{role}-{index}"


def eval_pod_name(run: str, step: int) -> str:
    """The evaluation pod of checkpoint ``step`` (spec.eval.separatePod)."""
    return f"{run}-eval-{step}"


def check_pod_name(run: str) -> str:
    """The preflight pod (spec.preflight): one per run, before the first gang."""
    return f"{run}-check"


def service_name(run: str, role: str) -> str:
    return f"{run}-{role}"


def config_map_name(run: str) -> str:
    return f"{run}-spec"


def pod_dns(run: str, role: str, index: int, namespace: str) -> str:
    """DNS name of a pod through its role's headless Service: RUN-ROLE-i.RUN-ROLE.NS.svc."""
    return f"{pod_name(run, role, index)}.{service_name(run, role)}.{namespace}.svc"


def child_labels(run: str, component: str) -> dict[str, str]:
    """Labels on every child object; ``component`` is a role or 'config'."""
    return {
        "app.kubernetes.io/name": "dapo",
        "app.kubernetes.io/instance": run,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "dapo-operator",
        LABEL_RUN: run,
        LABEL_ROLE: component,
    }


def run_selector(run: str) -> str:
    """Label selector of every pod of a run."""
    return f"{LABEL_RUN}={run}"


def kueue_group_name(run: str, gang_generation: int) -> str:
    """One Kueue pod group (workload) per gang generation: a restarted gang is a new workload."""
    return f"{run}-g{gang_generation}"
