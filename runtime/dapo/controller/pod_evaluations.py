"""The results of evaluation pods (spec.eval.separatePod on a cluster), read back into the run.

Each evaluation pod runs `dapo eval CHECKPOINT --store-result`, which stores its result beside the
checkpoint (``{checkpoint root}/evals/step-N.json``, with the metric names of an in-process
evaluation). Learner-0 looks for new results after every step: each becomes the evaluation line
of step N in metrics.jsonl (marked ``eval/separate_pod``) and the newest one the status's
val/acc/mean. At the end of training it waits (bounded) for the last checkpoint's result.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("dapo.controller.pod_evaluations")

# how long the end of training waits for the evaluation of its last checkpoint
FINAL_EVALUATION_WAIT_S = 1800.0


class PodEvaluations:
    """New evaluation results of a checkpoint store, as metrics records (module docstring)."""

    def __init__(self, store, metrics=None):
        self.store = store
        self.metrics = metrics
        self.seen: set[int] = set()

    def collect(self) -> list[dict]:
        """The results stored since the last call, as evaluation records (written to metrics.jsonl)."""
        records = []
        for step in self.store.evaluated_steps():
            if step in self.seen:
                continue
            result = self.store.read_evaluation(step)
            record = {"step": step, **result.get("metrics", {}), "timing_s/eval": result.get("seconds"),
                      "eval/separate_pod": 1}
            self.seen.add(step)
            if self.metrics is not None:
                self.metrics.write(record)
            log.info("evaluation pod: checkpoint step %d val/acc/mean %s", step, record.get("val/acc/mean"))
            records.append(record)
        return records

    def wait_for(self, step: int, timeout_s: float = FINAL_EVALUATION_WAIT_S, poll_s: float = 10.0) -> list[dict]:
        """Collect until the result of checkpoint ``step`` is there, at most ``timeout_s``; returns
        every record collected meanwhile."""
        deadline = time.monotonic() + timeout_s
        records = self.collect()
        while step not in self.seen:
            if time.monotonic() >= deadline:
                log.warning("no evaluation of checkpoint step %d after %.0f s; finishing without it", step, timeout_s)
                break
            time.sleep(poll_s)
            records += self.collect()
        return records
