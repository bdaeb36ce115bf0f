"""`dapo-operator render FILE`: the objects the operator would create for a run file, as YAML.

Uses the same pure builders as the operator. ownerReferences are left out: the owner's uid
exists only once the API server stored the DAPORun.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from dapo.spec import load_run_file, refuse_lora_on_a_cluster

from .builders import build_all, build_check_pod


def render_objects(file: str, namespace: str = "default", image: str | None = None,
                   overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Validate the run file (raises SpecError) and build its ConfigMap, Services and Pods: the
    check pod first (spec.preflight.enabled; the operator creates the others once it passed)."""
    run = load_run_file(file, overrides or [])
    refuse_lora_on_a_cluster(run.spec)
    namespace = run.metadata.namespace or namespace
    objects = build_all(run, namespace, gang_generation=0, image=image)
    if run.spec.preflight.enabled:
        first_pod = next(i for i, o in enumerate(objects) if o["kind"] == "Pod")
        objects.insert(first_pod, build_check_pod(run, namespace, image))
    return objects


def main(args: Any) -> int:
    objects = render_objects(args.file, getattr(args, "namespace", None) or "default",
                             getattr(args, "image", None), getattr(args, "overrides", None))
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, width=120))
    return 0
