"""The DAPO controller: one training step as the controller sees it (docs/architecture.md).

    1. next prompts from the resumable sampler          (PromptSampler)
    2. n responses per prompt                           (RolloutEngine.generate)
    3. score: shaped score + unshaped accuracy          (RewardScorer.score_batch)
    4. dynamic sampling: keep groups whose accuracy varies, repeat 1-3 until the batch holds
       train_batch_size groups; carry surplus groups to the next step; explain the cap
    5. advantages (spec.algorithm.advantageEstimator) + overlong filtering + the engine's behaviour
       log-probs and weight versions; proximal log-probs, then the update (learner)
    6. new weights to the engine, version + 1
    7. metrics, evaluation, checkpoint

Everything the loop needs comes in through the constructor (engine, learner, scorer, data,
checkpoint store), so the same controller drives the in-process run, the local multi-process run
and the learner-0 pod; only the objects behind those interfaces change.

Over 500 lines because the step is one story read top to bottom (the numbered list above), with
the two surfaces others call beside it: the state a checkpoint saves and restores
(`Checkpointable`) and the status learner-0 serves. The asynchronous generator lives apart in
controller/pipeline.py.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from dapo.algo import ADVANTAGE_ESTIMATORS, dynamic_sampling_filter, overlong_filter_mask
from dapo.contracts import LearnerMetrics, LearnerStatus, finite_or_none
from dapo.controller.guardrails import GuardrailStop, Guardrails, unknown_metric_error
from dapo.controller.pipeline import RolloutPipeline
from dapo.controller.pod_evaluations import PodEvaluations
from dapo.controller.state import (collection_from_state, collection_to_state, groups_from_state,
                                  groups_to_state)
from dapo.controller.threads import thread_budget
from dapo.errors import DapoError
from dapo.learner.base import Learner
from dapo.model.lora import base_reference, check_base, is_lora
from dapo.data.sampler import steps_for_epochs
from dapo.learner.batch import TrainBatch, make_batch
from dapo.learner.torch_learner import with_learning_rate
from dapo.reward.base import Scorer
from dapo.rollout.base import RolloutEngine, Sample, encode_prompt
from dapo.evaluation.metrics import validation_metrics
from dapo.evaluation.sampling import sample_prompts
from dapo.seeding import GENERATION, seed_for
from dapo.spec import SpecError, dynamic_sampling_metric
from dapo.storage.checkpointer import CheckpointContents

log = logging.getLogger("dapo.controller.trainer")

class DynamicSamplingError(DapoError, RuntimeError):
    """The generation-batch cap was hit before the batch filled; the message says why and what to change."""


@dataclass
class Group:
    """The n scored responses to one prompt."""

    uid: str
    record_index: int
    prompt_ids: list[int]
    samples: list[Sample]
    scores: list[float]  # shaped (correctness + overlong penalty): the advantage input
    accs: list[bool]  # unshaped accuracy: the dynamic-sampling filter input (metric acc)
    weight_version: int  # version of the policy that sampled it
    correctness: list[float] = field(default_factory=list)  # the scorer's unshaped score (metric score)

    def sample_versions(self) -> list[int]:
        """Weight version of each sample (the engine's stamp; the group's for samples restored
        from checkpoints written before samples carried one)."""
        return [self.weight_version if s.weight_version is None else int(s.weight_version) for s in self.samples]

    def to_state(self) -> dict:
        state = asdict(self)
        state["samples"] = [asdict(s) for s in self.samples]
        return state

    @classmethod
    def from_state(cls, state: dict) -> "Group":
        return cls(**{**state, "samples": [Sample(**s) for s in state["samples"]]})

    def unshaped_scores(self) -> list[float]:
        """The scorer's scores before overlong shaping (shaped scores for groups restored from
        checkpoints written before groups kept them)."""
        return self.correctness or self.scores


@dataclass
class BatchCollection:
    """What step 1-4 produced: the groups to train on and how they were obtained."""

    groups: list[Group]
    num_gen_batches: int = 0
    groups_generated: int = 0
    groups_kept: int = 0
    all_correct: int = 0
    all_wrong: int = 0
    uniform: int = 0  # dropped for a constant score with mixed accuracy (dynamicSampling.metric score)
    surplus_used: int = 0
    surplus_dropped: int = 0
    generated_accs: list[bool] = field(default_factory=list)
    gen_seconds: float = 0.0
    reward_seconds: float = 0.0
    gen_tokens: int = 0
    stale_samples_dropped: int = 0  # samples of the dropped surplus groups
    surplus_left: int = 0  # surplus groups carried on after this collection
    epoch: int = 0  # the sampler's epoch after this collection
    consumed: int = 0  # prompts the sampler had handed out after this collection (epoch accounting)
    rollout_idle_seconds: float = 0.0  # the rollout waited for the learner's weights (async)
    learner_idle_seconds: float = 0.0  # the learner waited for this batch (async)


def uids_digest(uids: Sequence[str]) -> str:
    """First 16 hex digits of SHA-256 over the trained groups' prompt uids in batch order (one
    per line): two runs trained step s on the same prompts exactly when their digests agree, so
    a resumed run can be checked against an uninterrupted one from metrics.jsonl alone."""
    return hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16]


def dynamic_sampling_message(*, have: int, need: int, batches: int, generated: int, all_correct: int,
                             all_wrong: int, n: int, uniform: int = 0, metric: str = "acc") -> str:
    """The actionable explanation when max_gen_batches is reached before the batch fills."""
    if uniform > max(all_correct, all_wrong):
        verdict = (f"most dropped groups had the SAME SCORE for all {n} samples (with mixed accuracy): the scorer "
                   "grades too coarsely to rank the samples. Check the scorer's scores on a few responses")
    elif all_correct >= all_wrong:
        verdict = (f"most dropped groups were ALL-CORRECT: the data is too easy for the model (every one of the "
                   f"{n} samples already gets it right, so there is nothing to learn). Use harder prompts")
    else:
        verdict = ("most dropped groups were ALL-WRONG: the data is too hard for the model, or the answers are not "
                   "being parsed (check that responses end with 'Answer: ...' and that spec.data.promptTemplate / "
                   "spec.reward.scorer fit the data). Use easier prompts or a stronger base model")
    varying = "accuracy" if metric == "acc" else "scores"
    dropped = f"{all_correct} were all-correct and {all_wrong} were all-wrong"
    if metric == "score":
        dropped = f"{all_correct + all_wrong + uniform} had one score for every sample ({all_correct} all-correct, " \
                  f"{all_wrong} all-wrong, {uniform} of mixed accuracy)"
    return (
        f"dynamic sampling could not fill the training batch: after {batches} generation batches "
        f"(spec.algorithm.dynamicSampling.maxGenBatches) only {have} of the {need} groups needed "
        f"(spec.learner.trainBatchSize) had varying {varying} (spec.algorithm.dynamicSampling.metric: {metric}). "
        f"Of {generated} groups generated in this step, {dropped}: {verdict}. "
        f"Or raise spec.algorithm.dynamicSampling.maxGenBatches, spec.rollout.genBatchSize (prompts per "
        f"generation batch) or spec.rollout.n (more samples per prompt make mixed groups likelier), or set "
        f"spec.algorithm.dynamicSampling.enabled=false to train on every group."
    )


class Trainer:
    """Drives DAPO training steps; see the module docstring for the step."""

    def __init__(
        self,
        spec,
        *,
        engine: RolloutEngine,
        learner: Learner,
        scorer: Scorer,
        tokenizer,
        train_records: Sequence,
        eval_records: Sequence = (),
        sampler,
        metrics=None,
        progress=None,
        checkpointer=None,
        eval_in_pods: bool = False,
    ):
        self.spec = spec
        self.engine = engine
        self.learner = learner
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.train_records = list(train_records)
        self.eval_records = list(eval_records)
        self.sampler = sampler
        self.metrics = metrics
        self.progress = progress
        self.checkpointer = checkpointer
        # spec.eval.separatePod on a cluster: evaluation pods evaluate the committed checkpoints, and
        # this trainer only reads their results back (controller/pod_evaluations.py); never in process
        self.eval_in_pods = bool(eval_in_pods)
        self.pod_evaluations = PodEvaluations(checkpointer.store, metrics) if eval_in_pods else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ls = spec.learner
        # totalEpochs = passes over the training prompts (as verl, whose loop ends when its prompt
        # loader is exhausted): training ends after the step in which the sampler hands out the
        # last prompt of the last pass. Every trained group used up one prompt, so the step count
        # is at most ceil(epochs * prompts / trainBatchSize): the bound shown as totalSteps until
        # the passes are done (fewer steps when dynamic sampling drops groups).
        self.epoch_limit = None if ls.total_steps else ls.total_epochs
        self.trained_consumed = 0  # prompts handed out for the batches trained so far
        self.total_steps = ls.total_steps or steps_for_epochs(ls.total_epochs, len(self.train_records), ls.train_batch_size)
        self.step = 0
        self.weight_version = engine.weight_version
        self.surplus: list[Group] = []
        # The controller's own Python RNG, checkpointed and restored: loop code that needs Python
        # randomness draws from it. The global `random` is seeded (seed_all) but not checkpointed:
        # libraries draw from it too (botocore's retry jitter), so its state depends on how many
        # S3 requests were retried and could never match an uninterrupted run's.
        self.rng = random.Random(ls.seed)
        self.last_metrics: dict[str, Any] = {}
        self.last_val: dict[str, float] = {}
        self.last_checkpoint: dict | None = None
        self.state = "starting"
        self.message = ""
        self._prompt_ids: dict[int, list[int]] = {}
        # async rollout (spec.rollout.maxStaleness >= 1): the generator thread while train() runs,
        # and collected-but-untrained batches restored from a checkpoint (controller/pipeline.py)
        self.pipeline: RolloutPipeline | None = None
        self.ds_metric = dynamic_sampling_metric(spec)  # what must vary within a kept group
        self.in_flight: list[BatchCollection] = []
        # spec.guardrails (controller/guardrails.py): checked after every step
        self.guardrails = Guardrails(spec.guardrails)
        self._guardrail_names_checked = False
        self._held = True  # every guardrail held at the last step: recorded in its checkpoint
        self._rollback_from: tuple[int, float] | None = None  # (weight version, lr scale) during a rollback
        self.last_sync_bytes: int | None = None  # tensor bytes of the last weight sync (perf/weight_sync_bytes)

    def sync_tensors(self):
        """The learner's weights for the rollout engine (`Learner.named_parameters_for_sync`),
        counting their bytes into ``last_sync_bytes`` as the engine (or the pipeline's copy) takes
        them: a LoRA run sends its adapters only, and this is where that shows."""
        self.last_sync_bytes = 0
        for name, tensor in self.learner.named_parameters_for_sync():
            self.last_sync_bytes += tensor.numel() * tensor.element_size()
            yield name, tensor

    # ------------------------------------------------------------------ data helpers

    def prompt_ids(self, record_index: int, records: Sequence | None = None) -> list[int]:
        if records is not None and records is not self.train_records:
            return encode_prompt(self.tokenizer, records[record_index].prompt)
        ids = self._prompt_ids.get(record_index)
        if ids is None:
            ids = self._prompt_ids[record_index] = encode_prompt(self.tokenizer, self.train_records[record_index].prompt)
        return ids

    def generate_groups(self, records: Sequence, indices: Sequence[int], *, n: int, temperature: float, top_p: float,
                        seed: int, stats: BatchCollection | None = None) -> list[Group]:
        """Steps 2-3 for a list of prompts: sample n responses each and score them."""
        prompts = [self.prompt_ids(i, records) for i in indices]
        t0 = time.perf_counter()
        samples = self.engine.generate(prompts, n=n, temperature=temperature, top_p=top_p,
                                       max_new_tokens=self.spec.rollout.max_response_length, seed=seed)
        t1 = time.perf_counter()
        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        rows = [records[indices[s.prompt_index]] for s in samples]
        results = self.scorer.score_batch(
            texts, [r.ground_truth for r in rows], [r.data_source for r in rows],
            [len(s.response_ids) for s in samples], [s.truncated for s in samples],
            extra_infos=[r.extra_info for r in rows])
        t2 = time.perf_counter()
        if stats is not None:
            stats.gen_seconds += t1 - t0
            stats.reward_seconds += t2 - t1
            stats.gen_tokens += sum(len(s.response_ids) for s in samples)
        groups = []
        for k, index in enumerate(indices):
            chunk = slice(k * n, (k + 1) * n)
            groups.append(Group(
                uid=records[index].uid, record_index=index, prompt_ids=prompts[k], samples=samples[chunk],
                scores=[float(r.score) for r in results[chunk]], accs=[bool(r.acc) for r in results[chunk]],
                weight_version=self.engine.weight_version, correctness=[float(r.correctness) for r in results[chunk]]))
        return groups

    # ------------------------------------------------------------------ step 1-4

    def collect_groups(self, step: int | None = None, version: int | None = None,
                       train_version: int | None = None) -> BatchCollection:
        """Fill the training batch of ``step`` (default: the current one) generated with weight
        ``version`` and trained with ``train_version`` (default: both the current one; the async
        pipeline passes all three): surplus from the last collection first, then generation
        batches; with dynamic sampling only groups whose metric varies count.

        spec.rollout.maxStaleness = k bounds every trained sample: surplus sampled more than k
        versions before ``train_version`` is dropped (counted in ``surplus_dropped`` and
        ``stale_samples_dropped``), so with k = 0 the synchronous loop trains on-policy only."""
        step = self.step if step is None else step
        version = self.weight_version if version is None else version
        train_version = version if train_version is None else train_version
        need = self.spec.learner.train_batch_size
        ds = self.spec.algorithm.dynamic_sampling
        ro = self.spec.rollout
        oldest = train_version - ro.max_staleness
        fresh = [g for g in self.surplus if min(g.sample_versions()) >= oldest]
        out = BatchCollection(groups=fresh[:need], surplus_used=min(len(fresh), need),
                              surplus_dropped=len(self.surplus) - len(fresh),
                              stale_samples_dropped=sum(len(g.samples) for g in self.surplus) -
                              sum(len(g.samples) for g in fresh))
        leftover = fresh[need:]
        while len(out.groups) < need:
            if ds.enabled and out.num_gen_batches >= ds.max_gen_batches:
                raise DynamicSamplingError(dynamic_sampling_message(
                    have=len(out.groups), need=need, batches=out.num_gen_batches, generated=out.groups_generated,
                    all_correct=out.all_correct, all_wrong=out.all_wrong, n=ro.n, uniform=out.uniform,
                    metric=self.ds_metric))
            indices = self.sampler.next_indices(ro.gen_batch_size)
            groups = self.generate_groups(self.train_records, indices, n=ro.n, temperature=ro.temperature,
                                          top_p=ro.top_p, seed=seed_for(self.spec.learner.seed + GENERATION, step,
                                                                        out.num_gen_batches), stats=out)
            out.num_gen_batches += 1
            out.groups_generated += len(groups)
            out.generated_accs.extend(a for g in groups for a in g.accs)
            if ds.enabled:
                flat_acc = [a for g in groups for a in g.accs]
                gids = [k for k, g in enumerate(groups) for _ in g.accs]
                scores = [c for g in groups for c in g.unshaped_scores()] if self.ds_metric == "score" else None
                verdict = dynamic_sampling_filter(flat_acc, gids, scores=scores)
                out.all_correct += len(verdict.all_correct_groups)
                out.all_wrong += len(verdict.all_wrong_groups)
                out.uniform += len(verdict.uniform_groups)
                groups = [groups[k] for k in verdict.kept_groups]
            out.groups_kept += len(groups)
            room = need - len(out.groups)
            out.groups.extend(groups[:room])
            leftover.extend(groups[room:])
        self.surplus = leftover
        out.surplus_left, out.epoch, out.consumed = len(leftover), self.sampler.epoch, self.sampler.consumed
        return out

    # ------------------------------------------------------------------ step 5

    def build_batch(self, groups: list[Group]) -> tuple[TrainBatch, dict[str, float]]:
        """Padded batch with advantages on the shaped score (spec.algorithm.advantageEstimator),
        overlong filtering, and for every row the engine's behaviour log-probs and the weight
        version that sampled it (the learner's rollout correction needs both)."""
        samples = [s for g in groups for s in g.samples]
        batch = make_batch([g.prompt_ids for g in groups for _ in g.samples], [s.response_ids for s in samples],
                           self.pad_id)
        scores = torch.tensor([x for g in groups for x in g.scores], dtype=torch.float32)
        group_ids = [k for k, g in enumerate(groups) for _ in g.samples]
        estimator = ADVANTAGE_ESTIMATORS.resolve(self.spec.algorithm.advantage_estimator)
        batch.advantages = estimator(scores, group_ids)
        batch.behaviour_log_probs = torch.zeros_like(batch.response_mask)
        for row, s in enumerate(samples):
            if len(s.log_probs) != len(s.response_ids):
                raise ValueError(f"the rollout engine returned {len(s.log_probs)} log-probs for a response of "
                                 f"{len(s.response_ids)} tokens: every engine must report one per sampled token")
            batch.behaviour_log_probs[row, : len(s.log_probs)] = torch.tensor(s.log_probs, dtype=torch.float32)
        versions = [v for g in groups for v in g.sample_versions()]
        batch.weight_versions = torch.tensor(versions, dtype=torch.long)
        batch.policy_version = self.weight_version
        truncated = torch.tensor([s.truncated for s in samples], dtype=torch.bool)
        if self.spec.algorithm.overlong.filtering:
            batch.response_mask = overlong_filter_mask(batch.response_mask, truncated)
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
        accs = torch.tensor([float(a) for g in groups for a in g.accs])
        info = {
            "critic/score/mean": float(scores.mean()),
            "critic/score/max": float(scores.max()),
            "critic/score/min": float(scores.min()),
            "critic/advantages/mean": float(batch.advantages.mean()),
            "train/acc/mean": float(accs.mean()),
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "response_length/min": float(lengths.min()),
            "response_length/clip_ratio": float(truncated.float().mean()),
            "prompt_length/mean": float(sum(len(g.prompt_ids) for g in groups) / max(len(groups), 1)),
        }
        # the share of trained samples by version lag is reported once, by _async_metrics
        return batch, info

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, Any]:
        """One training step (1-6 of the module docstring); returns its metrics."""
        t_step = time.perf_counter()
        thread_budget().apply()  # this thread's torch threads: the CPUs this run may use now
        if self.pipeline is not None:
            collection = self.pipeline.take()
        elif self.in_flight:  # an async run's checkpoint resumed synchronously: its batches first
            collection = self.in_flight.pop(0)
        else:
            collection = self.collect_groups()
        # the generator may be ahead (async): epochs count the prompts of the batches trained so far
        self.trained_consumed = collection.consumed
        t_collected = time.perf_counter()
        batch, info = self.build_batch(collection.groups)

        t_update = time.perf_counter()
        update_metrics = self.learner.update(batch)  # takes the proximal log-probs itself
        t_updated = time.perf_counter()
        proximal_seconds = self.learner.proximal_seconds
        lags = [self.weight_version - v for g in collection.groups for v in g.sample_versions()]
        self.weight_version += 1
        if self.pipeline is None:
            self.engine.update_weights(self.sync_tensors(), self.weight_version)
        elif not self._pause_due(self.step + 1):  # else train() publishes after evaluation / checkpoint
            self.pipeline.publish(self.weight_version, self.sync_tensors)
        t_synced = time.perf_counter()
        self.step += 1

        step_seconds = time.perf_counter() - t_step
        total_tokens = int(batch.attention_mask.sum())
        metrics: dict[str, Any] = {"step": self.step, **update_metrics, **info}
        metrics.update({
            "train/acc/generated_mean": (sum(collection.generated_accs) / len(collection.generated_accs)
                                         if collection.generated_accs else None),
            "train/num_gen_batches": collection.num_gen_batches,
            "train/num_groups_kept": collection.groups_kept,
            "train/groups_all_correct": collection.all_correct,
            "train/groups_all_wrong": collection.all_wrong,
            "train/groups_uniform_score": collection.uniform,
            "train/surplus_used": collection.surplus_used,
            "train/surplus_dropped": collection.surplus_dropped,
            "train/surplus_groups": collection.surplus_left,
            "train/epoch": collection.epoch,
            "train/prompt_uids_digest": uids_digest([g.uid for g in collection.groups]),
            "train/weight_version": self.weight_version,
            "timing_s/gen": collection.gen_seconds,
            "timing_s/reward": collection.reward_seconds,
            "timing_s/old_log_prob": proximal_seconds,
            "timing_s/update_actor": t_updated - t_update - proximal_seconds,
            "timing_s/sync_weights": t_synced - t_updated,
            "timing_s/step": step_seconds,
            **self._async_metrics(collection, lags, sync_idle=(t_collected - t_step, t_synced - t_collected)),
            "perf/throughput": total_tokens / step_seconds if step_seconds > 0 else 0.0,
            "perf/weight_sync_bytes": self.last_sync_bytes,  # the last sync's (async: the newest published)
            "perf/torch_threads": torch.get_num_threads(),  # dapo.controller.threads: the CPUs this step had
            "perf/gen_tokens_per_s": (collection.gen_tokens / collection.gen_seconds
                                      if collection.gen_seconds > 0 else 0.0),
        })
        return metrics

    def _pipeline_collect(self, start_step: int, start_version: int):
        """The pipeline's collect(step, version): step s trains with version V0 + (s - S0)."""
        return lambda step, version: self.collect_groups(step, version,
                                                         train_version=start_version + step - start_step)

    def _async_metrics(self, collection: BatchCollection, lags: list[int], *, sync_idle) -> dict[str, Any]:
        """Version lag of the trained samples (training version - generating version), samples
        dropped for staleness, and how long each side waited for the other. Synchronous: the
        learner waits while the batch is collected, the rollout while the learner trains."""
        k = self.spec.rollout.max_staleness
        out: dict[str, Any] = {
            "async/version_lag_mean": sum(lags) / len(lags) if lags else 0.0,
            "async/version_lag_max": max(lags, default=0),
            "async/stale_samples_dropped": collection.stale_samples_dropped,
        }
        for lag in range(k + 1):
            out[f"async/lag_{lag}_frac"] = lags.count(lag) / len(lags) if lags else 0.0
        if self.pipeline is None:
            out["timing_s/learner_idle"], out["timing_s/rollout_idle"] = sync_idle
        else:
            out["timing_s/learner_idle"] = collection.learner_idle_seconds
            out["timing_s/rollout_idle"] = collection.rollout_idle_seconds
        return out

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, Any]:
        """The evaluation set with the eval n / temperature / top_p (dapo.evaluation.sampling: the
        same calls `dapo eval` makes): avg@n accuracy, mean score and response length, and per
        data source verl's ``val-core/<data_source>/acc/mean@n`` plus pass@k / maj@k for each k of
        spec.eval.passK (``val/pass@k`` over all prompts)."""
        ev = self.spec.eval
        t0 = time.perf_counter()
        prompts = sample_prompts(self.engine, self.tokenizer, self.scorer, self.eval_records, n=ev.n,
                                 temperature=ev.temperature, top_p=ev.top_p,
                                 max_new_tokens=self.spec.rollout.max_response_length, seed=self.spec.learner.seed,
                                 step=self.step, chunk=self.spec.rollout.gen_batch_size)
        return {"step": self.step, **validation_metrics(prompts, ev.n, ev.pass_k),
                "timing_s/eval": time.perf_counter() - t0}

    # ------------------------------------------------------------------ the loop

    def _eval_due(self, step: int | None = None) -> bool:
        """Does step ``step`` (default: the current one) end with an evaluation (in this process)?"""
        step = self.step if step is None else step
        every = self.spec.eval.every_steps
        return bool(self.eval_records) and not self.eval_in_pods and every > 0 and (
            step % every == 0 or step == self.total_steps or self.epochs_done())

    def _take_pod_evaluations(self, records: list[dict]) -> None:
        """The newest evaluation pod's result is the status's val/acc/mean."""
        for record in records:
            if record["step"] >= int(self.last_val.get("step", -1)):
                self.last_val = record

    def _checkpoint_due(self, step: int | None = None) -> bool:
        """Does step ``step`` (default: the current one) end with a checkpoint?"""
        step = self.step if step is None else step
        every = self.spec.checkpoint.every_steps
        return step == self.total_steps or self.epochs_done() or (every > 0 and step % every == 0)

    def epochs_done(self) -> bool:
        """With totalEpochs (no totalSteps): the sampler has handed out every prompt of the last pass."""
        return self.epoch_limit is not None and self.trained_consumed >= self.epoch_limit * self.sampler.num_items

    def _pause_due(self, step: int) -> bool:
        """Will step ``step`` end with an evaluation or a checkpoint (both drain the pipeline)?"""
        return self._eval_due(step) or (self.checkpointer is not None and self._checkpoint_due(step))

    def run_eval(self) -> None:
        t0 = time.perf_counter()
        if self.pipeline is not None:
            # evaluate the current weights: let the generator finish what it may generate with older
            # ones, then load the current version into the now idle engine (the generator needs it next)
            self.pipeline.drain()
            self.engine.update_weights(self.sync_tensors(), self.weight_version)
            self.pipeline.engine_loaded(self.weight_version)
        drained = time.perf_counter() - t0
        val = self.evaluate()
        if self.pipeline is not None:
            val["timing_s/eval_drain"] = drained  # the learner waited for the generator before evaluating
        self.last_val = val
        if self.metrics is not None:
            self.metrics.write(val)
        log.info("eval at step %d: val/acc/mean %.4f (avg@%d over %d prompts), val/score/mean %.4f, %.1fs",
                 self.step, val["val/acc/mean"], self.spec.eval.n, len(self.eval_records), val["val/score/mean"],
                 val["timing_s/eval"])

    def train(self) -> dict[str, Any]:
        """Run until total_steps (data epochs wrap inside the sampler: never a silent stop)."""
        self.state = "running"
        log.info("training steps %d -> %d (train prompts %d, eval prompts %d, weight version %d)",
                 self.step, self.total_steps, len(self.train_records), len(self.eval_records), self.weight_version)
        try:
            if self.step == 0 and self.eval_records and self.spec.eval.before_train and not self.eval_in_pods:
                self.run_eval()
            self._save_start_checkpoint()
            while self._train_until_done_or_rollback():
                pass  # a guardrail rolled training back to a checkpoint: go on from there
        except GuardrailStop as exc:
            self.state = "suspended" if exc.suspend else "failed"
            self.message = str(exc)
            raise
        except Exception as exc:
            self.state = "failed"
            self.message = str(exc)
            raise
        if self.epochs_done():
            log.info("finished %d pass(es) over the %d training prompts in %d steps (at most %d were possible)",
                     self.epoch_limit, len(self.train_records), self.step, self.total_steps)
            self.total_steps = self.step
        if self.pod_evaluations is not None and self.eval_records and self.last_checkpoint is not None:
            # the last checkpoint's evaluation pod starts while this learner still reports "running"
            final = int(self.last_checkpoint["step"])
            self.message = f"waiting for the evaluation pod of checkpoint step {final}"
            self._take_pod_evaluations(self.pod_evaluations.wait_for(final))
        self.state = "succeeded"
        self.message = f"finished {self.step} steps"
        return self.last_metrics

    def _train_until_done_or_rollback(self) -> bool:
        """Train steps until the run is done (False) or a rollback guardrail tripped and training
        was rolled back to a checkpoint (True: call again)."""
        rollback = None
        try:
            if self.spec.rollout.max_staleness > 0 and self.step < self.total_steps and not self.epochs_done():
                self.pipeline = RolloutPipeline(
                    engine=self.engine, collect=self._pipeline_collect(self.step, self.weight_version),
                    max_staleness=self.spec.rollout.max_staleness, start_step=self.step,
                    start_version=self.weight_version, total_steps=self.total_steps, in_flight=self.in_flight)
                self.in_flight = []
            while self.step < self.total_steps and not self.epochs_done():
                metrics = self.train_step()
                if self.guardrails:
                    metrics.update({"guardrail/lr_scale": self.guardrails.lr_scale,
                                    "guardrail/rollbacks": sum(self.guardrails.rollbacks)})
                self.last_metrics = metrics
                if self.metrics is not None:
                    self.metrics.write(metrics)
                if self._eval_due():
                    self.run_eval()
                if self.progress is not None:
                    self.progress.step(metrics, self.total_steps, self.last_val.get("val/acc/mean"))
                rollback = self._check_guardrails(metrics)  # suspend / fail raise GuardrailStop
                if rollback is not None:
                    break  # this step's state is the collapse: no checkpoint of it
                if self.checkpointer is not None and self._checkpoint_due():
                    info = self.checkpointer.save(self)
                    self.last_checkpoint = {"step": info.step, "uri": info.uri}
                if self.pod_evaluations is not None:
                    self._take_pod_evaluations(self.pod_evaluations.collect())
                if self.pipeline is not None and self._pause_due(self.step):
                    self.pipeline.publish(self.weight_version, self.sync_tensors)
        finally:
            if self.pipeline is not None:
                self.pipeline.close()
                self.pipeline = None
        if rollback is None:
            return False
        self._roll_back(rollback)
        return True

    # ------------------------------------------------------------------ guardrails

    def _save_start_checkpoint(self) -> None:
        """A rollback guardrail needs a checkpoint to return to: a fresh run commits step 0 first."""
        if (self.guardrails.can_roll_back and self.checkpointer is not None and self.step == 0
                and self.checkpointer.store.latest() is None):
            info = self.checkpointer.save(self)
            self.last_checkpoint = {"step": info.step, "uri": info.uri}

    def _check_guardrails(self, metrics: dict[str, Any]):
        """spec.guardrails on this step's metrics (and its evaluation's): None, or (index, trip) of a
        rollback guardrail to carry out; suspend and fail raise `GuardrailStop`."""
        if not self.guardrails:
            return None
        if not self._guardrail_names_checked:
            self._guardrail_names_checked = True
            problem = unknown_metric_error(self.guardrails.rules, metrics)
            if problem:
                raise SpecError(problem)
        evaluated = self.last_val if self.last_val.get("step") == self.step else {}
        verdict = self.guardrails.observe(self.step, {**metrics, **evaluated})
        self._held = verdict.held
        trip = verdict.trip
        if trip is None:
            return None
        if trip.action == "rollback":
            counted = self.guardrails.begin_rollback(verdict.trip_index, trip)
            if counted is not None:
                return verdict.trip_index, counted
            rule = self.guardrails.rules[verdict.trip_index]
            self._stop(trip.model_copy(update={"action": "fail", "message": (
                f"it tripped again after spec.guardrails[{verdict.trip_index}].maxRollbacks={rule.max_rollbacks} "
                "rollbacks: the run fails (raise maxRollbacks, or lower learningRateScale or spec.learner.lr)")}))
        if trip.action == "suspend":
            self._stop(trip.model_copy(update={"message": (
                "training suspended with its checkpoints kept; look at the run, then resume (spec.suspend: false on a "
                "cluster, `dapo run --resume` here) from the last checkpoint")}))
        self._stop(trip.model_copy(update={"message": "the run fails (spec.guardrails action fail)"}))

    def _announce(self, trip) -> None:
        """Every firing: kept in the guardrail state (the learner's /status), a metrics line, a log line."""
        self.guardrails.record(trip)
        if self.metrics is not None:
            self.metrics.write({"step": trip.step, "guardrail/tripped": 1, "guardrail/metric": trip.metric,
                                "guardrail/value": trip.value, "guardrail/action": trip.action,
                                "guardrail/rollbacks": trip.rollbacks, "guardrail/lr_scale": self.guardrails.lr_scale})
        log.warning("%s", trip.line())

    def _stop(self, trip) -> None:
        self._announce(trip)
        raise GuardrailStop(trip)

    def _roll_back(self, tripped: tuple[int, Any]) -> None:
        """Restore the newest committed checkpoint at which every guardrail held, from before the
        breach began; the weight versions go on upwards (rollout engines refuse older ones) and the
        learning rate is the run file's times every rollback's learningRateScale so far."""
        index, trip = tripped
        rule = self.guardrails.rules[index]
        first_bad = trip.step - rule.for_steps + 1
        healthy = [c for c in self.checkpointer.store.list_committed() if c.step < first_bad
                   and c.manifest.get("meta", {}).get("guardrails_held", True)]
        if not healthy:
            self._stop(trip.model_copy(update={"action": "fail", "message": (
                f"no committed checkpoint before step {first_bad} at which every guardrail held is left to roll back "
                "to (spec.checkpoint.keep / everySteps keep too few): the run fails")}))
        target = healthy[-1]
        for newer in self.checkpointer.store.list_committed():
            if newer.step > target.step:  # trained again from the target: committed again later
                self.checkpointer.store.uncommit(newer.step)
        kept = self.guardrails.state_dict()
        self._rollback_from = (self.weight_version, self.guardrails.lr_scale)
        try:
            self.checkpointer.restore(self, target)
        finally:
            self._rollback_from = None
        self.guardrails.load_state_dict(kept)
        self._held = True
        self._announce(trip.model_copy(update={"message": (
            f"rolled back to checkpoint step {target.step} (weight version now {self.weight_version}); learning rate "
            f"x{self.guardrails.lr_scale:g} of spec.learner.lr")}))

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The controller's resumable state: position, surplus, in-flight batches, versions, its
        RNG. JSON-able; with ``tensors`` (a dict) the groups' token arrays go there instead of
        inline (dapo.controller.state: what a checkpoint writes)."""
        in_flight = [collection_to_state(c, f"in_flight.{k}", tensors)  # first: drains the pipeline
                     for k, c in enumerate(self._in_flight())]
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "weight_version": self.weight_version,
            "sampler": self.sampler.state_dict(),
            "surplus": groups_to_state(self.surplus, "surplus", tensors),
            "in_flight": in_flight,
            "trained_consumed": self.trained_consumed,
            "last_val": self.last_val,
            "python_random": _encode_py_random(self.rng.getstate()),
            "guardrails": self.guardrails.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.step = int(state["step"])
        self.weight_version = int(state["weight_version"])
        self.sampler.load_state_dict(state["sampler"])
        self.surplus = groups_from_state(state["surplus"], "surplus", tensors, Group)
        self.in_flight = [collection_from_state(c, f"in_flight.{k}", tensors, BatchCollection, Group)
                          for k, c in enumerate(state.get("in_flight", []))]
        self.trained_consumed = int(state.get("trained_consumed", self.sampler.consumed))
        self.last_val = dict(state.get("last_val") or {})
        if "python_random" in state:
            self.rng.setstate(_decode_py_random(state["python_random"]))
        self.guardrails.load_state_dict(state.get("guardrails"))
        if self._rollback_from is not None:
            self._renumber_versions(self._rollback_from[0] + 1 - self.weight_version)

    def _renumber_versions(self, offset: int) -> None:
        """Shift every weight version (the trainer's, and the sampling version of every restored
        group) by ``offset``: after a rollback the restored weights are published as a new,
        higher version, and the restored groups keep their lag behind it."""
        self.weight_version += offset
        groups = list(self.surplus) + [g for c in self.in_flight for g in c.groups]
        for group in groups:
            group.weight_version += offset
            for sample in group.samples:
                if sample.weight_version is not None:
                    sample.weight_version = int(sample.weight_version) + offset

    def _in_flight(self) -> list[BatchCollection]:
        """Collected, untrained batches; with the pipeline running, after it has drained (so the
        sampler and surplus saved beside them are the generator's, consistent with them)."""
        if self.pipeline is None:
            return list(self.in_flight)
        self.pipeline.drain()
        return self.pipeline.in_flight()

    # ------------------------------------------------------------------ checkpoints
    # the `dapo.storage.checkpointer.Checkpointable` surface: the checkpointer uses only these

    def checkpoint_contents(self) -> CheckpointContents:
        """Everything a checkpoint holds; the weights first (a ZeRO-3 learner gathers them with
        collectives, and no other learner call may come between its gathers)."""
        model_state = self.learner.full_state_dict_for_save()
        tensors: dict[str, torch.Tensor] = {}
        trainer_state = self.state_dict(tensors)
        base = base_reference(self.learner.model, self.spec.model.path) if is_lora(self.learner.model) else None
        return CheckpointContents(model=self.learner.model, model_state=model_state, base_model=base,
                                  learner_state=self.learner.state_dict(), trainer_state=trainer_state,
                                  trainer_tensors=tensors,
                                  meta={"weight_version": self.weight_version, "total_steps": self.total_steps,
                                        **({"guardrails_held": self._held} if self.guardrails else {})})

    def load_model_weights(self, state) -> None:
        self.learner.load_model_weights(state)

    def check_base_model(self, reference: dict, where: str) -> None:
        if not is_lora(self.learner.model):
            raise RuntimeError(f"{where}: holds LoRA adapters (base {reference.get('path')}); this run file trains every "
                               "weight: set spec.model.lora as in the run that saved it")
        check_base(self.learner.model, reference, where)

    def load_checkpoint_state(self, learner_state: dict, trainer_state: dict,
                              trainer_tensors: dict[str, torch.Tensor] | None = None) -> None:
        # The base learning rate is the run file's (edited before a resume: the edit applies) times
        # the guardrails' scale: the rollback's own, else the checkpoint's. Unchanged run file and
        # no rollback: exactly the saved one.
        scale = self._rollback_from[1] if self._rollback_from is not None else \
            float((trainer_state.get("guardrails") or {}).get("lr_scale", 1.0))
        self.learner.load_state_dict(with_learning_rate(learner_state, self.spec.learner.lr * scale))
        self.load_state_dict(trainer_state, trainer_tensors)

    def after_restore(self, step: int, uri: str) -> str:
        """The engine serves the restored weights under the restored version; the checkpoint is
        the last one; returns where the run stands."""
        self.engine.update_weights(self.sync_tensors(), self.weight_version)
        self.last_checkpoint = {"step": step, "uri": uri}
        return (f"weight version {self.weight_version}, sampler epoch {self.sampler.epoch} position "
                f"{self.sampler.position}, {len(self.surplus)} surplus groups")

    def status(self) -> dict[str, Any]:
        """The learner-0 /status document (dapo.contracts.LearnerStatus)."""
        latest = {**self.last_metrics, **{k: v for k, v in self.last_val.items() if k == "val/acc/mean"}}
        metrics = LearnerMetrics.model_validate(
            {field.alias: finite_or_none(latest.get(field.alias)) for field in LearnerMetrics.model_fields.values()})
        return LearnerStatus(
            state=self.state, step=self.step, total_steps=self.total_steps, weight_version=self.weight_version,
            metrics=metrics, last_checkpoint=self.last_checkpoint, message=self.message,
            guardrail=self.guardrails.last_trip,
        ).document()


def _encode_py_random(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_py_random(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
