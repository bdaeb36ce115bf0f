"""`dapo check RUN_FILE`: everything about a run file that can be checked without training.

Each check is a small function that adds one-line problems (naming the field and the fix),
warnings and notes (what was found) to a :class:`CheckReport`:

- the schema (dapo.spec: one line per invalid field);
- the model: its config and tokenizer load (local folder, s3:// prefix, builtin:, package:,
  GGUF) without loading weights where the source allows (an s3:// folder: only its small files
  are downloaded; builtin: the recipe's config, the model is not built; a GGUF file: its
  metadata, the one file has to be read);
- the data sets: readable (local or s3://, staged as a run stages them), with the columns the
  template needs, and how many rows survive the loader's filtering (dapo.data.prompts' report),
  prompt lengths counted in the model's tokens after its chat template;
- the scorers: every run-file function imports, and on the first rows of each data set every
  scorer a row routes to (run-file or built-in) returns a valid result in the bounded worker pool
  the run uses. The response it is called with is ``"Answer: " + the row's ground truth`` (the
  format the built-in scorers read; a list / object ground truth as its JSON), so a built-in
  scorer that finds the row's own answer wrong is a warning (the data's answer format and the
  scorer disagree). Rows routed to spec.reward.remote are not sent: the check calls no service;
- memory per GPU (:func:`memory_estimates`) against spec.{learner,rollout}.resources.gpuMemoryGiB;
- the legal but surprising combinations (dapo.spec.run_warnings) as warnings.

`dapo run` runs :func:`check_run` first without the scorer calls (they start a worker pool; the
run scores its first batch seconds later anyway).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from dapo.contracts import cache_dir as resolve_cache_dir
from dapo.spec import DAPORun, DAPORunSpec, SpecError, load_run_file, run_warnings

log = logging.getLogger("dapo.preflight")

#: rows of each data set the scorers are called on
SAMPLE_ROWS = 3
GiB = float(1 << 30)
#: files of a model folder that hold weights: not downloaded to read the config and tokenizer
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")


class PreflightError(SpecError):
    """`dapo run` refused a run file that fails its checks; the message holds one line per problem."""


@dataclasses.dataclass
class CheckReport:
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass
class ModelFacts:
    """What the check read of spec.model: its config (a transformers PretrainedConfig) and tokenizer."""

    config: object
    tokenizer: object
    source: str


# --------------------------------------------------------------------------- schema


def schema_problems(message: str) -> list[str]:
    """The lines of a SpecError: one per invalid field (dapo.spec.format_validation_error)."""
    lines = message.splitlines()
    items = [line.strip()[2:] for line in lines[1:] if line.strip().startswith("- ")]
    return items or [message]


# --------------------------------------------------------------------------- model


@contextlib.contextmanager
def storage_environment(spec: DAPORunSpec):
    """spec.storage's endpoint and region as the pods get them (AWS_ENDPOINT_URL / AWS_REGION,
    unless the environment sets them already) for the duration of the block."""
    added = {}
    if spec.storage.endpoint_url and not os.environ.get("AWS_ENDPOINT_URL"):
        added["AWS_ENDPOINT_URL"] = spec.storage.endpoint_url
    if spec.storage.region and not os.environ.get("AWS_REGION"):
        added["AWS_REGION"] = spec.storage.region
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def stage_model_metadata(uri: str, dest: Path) -> tuple[Path, int]:
    """Download the files of the model folder at the s3:// prefix ``uri`` that are not weights
    (config.json, tokenizer files) into ``dest``; (dest, weight files left out)."""
    from dapo.storage import download_file, list_objects, split_s3

    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    objects = list_objects(f"s3://{bucket}/{prefix}")
    if not objects:
        raise SpecError(f"spec.model.path: nothing at {uri} (no objects under the prefix); fix the URI")
    skipped = 0
    for obj in objects:
        rel = obj.key[len(prefix):]
        if "/" in rel or rel.lower().endswith(WEIGHT_SUFFIXES):
            skipped += 1
            continue
        download_file(f"s3://{bucket}/{obj.key}", dest / rel)
    return dest, skipped


def load_model_facts(spec: DAPORunSpec, scratch: Path) -> ModelFacts:
    """spec.model's config and tokenizer, weights left alone where possible (module docstring).
    Raises SpecError / StorageError naming the field."""
    from transformers import AutoConfig, AutoTokenizer

    from dapo.model.loading import dequantised_config, resolve_model_dir

    model = spec.model
    if model.path.startswith("builtin:"):
        from dapo.model.builtin import BUILTINS, build_tokenizer, model_config

        name = model.path.removeprefix("builtin:")
        if name not in BUILTINS:
            raise SpecError(f"spec.model.path: unknown built-in model {model.path!r}; available: "
                            + ", ".join(f"builtin:{k}" for k in BUILTINS))
        tokenizer = build_tokenizer()
        config = model_config(BUILTINS[name], len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        return ModelFacts(config, tokenizer, f"{model.path} (the recipe's config; dapo run builds it on first use)")
    if model.path.startswith("s3://") and not model.gguf_file:
        folder, skipped = stage_model_metadata(model.path, scratch / "model")
        source = f"{model.path} (config and tokenizer files only; {skipped} weight files not downloaded)"
    else:  # a GGUF file holds the config and tokenizer beside the weights: it has to be read
        folder = resolve_model_dir(model, resolve_cache_dir(spec.storage))
        source = str(folder / model.gguf_file) if model.gguf_file else str(folder)
    gguf = {"gguf_file": model.gguf_file} if model.gguf_file else {}
    try:
        config = dequantised_config(AutoConfig.from_pretrained(folder, **gguf))
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad model for the user
        raise SpecError(f"spec.model.path: cannot read the model config from {folder} ({type(exc).__name__}: "
                        f"{exc}); give a Hugging Face model folder with config.json (or spec.model.ggufFile)") from None
    try:
        if model.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(Path(model.tokenizer).expanduser())
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
    except Exception as exc:  # noqa: BLE001
        field = "spec.model.tokenizer" if model.tokenizer else "spec.model.path"
        raise SpecError(f"{field}: cannot load the tokenizer ({type(exc).__name__}: {exc}); give a folder with "
                        "the tokenizer files (spec.model.tokenizer when they are not beside the model)") from None
    return ModelFacts(config, tokenizer, source)


def check_model(spec: DAPORunSpec, scratch: Path, report: CheckReport) -> ModelFacts | None:
    from dapo.storage import StorageError

    try:
        facts = load_model_facts(spec, scratch)
    except SpecError as exc:
        report.problems.append(str(exc))
        return None
    except (StorageError, OSError) as exc:
        report.problems.append(f"spec.model.path: {exc}")
        return None
    report.notes.append(f"model {facts.source}: {type(facts.config).__name__}, tokenizer of "
                        f"{len(facts.tokenizer)} tokens loaded")
    return facts


# --------------------------------------------------------------------------- data


def check_data(spec: DAPORunSpec, tokenizer, report: CheckReport) -> dict[str, list]:
    """Load each data set as the run does; the kept records by set ("train", "eval")."""
    from dapo.data.prompts import load_run_prompts_with_report
    from dapo.rollout.base import encode_prompt
    from dapo.storage import StorageError

    data, limit = spec.data, spec.rollout.max_prompt_length
    kept: dict[str, list] = {}
    for field, uri, max_prompts in (("train", data.train, data.max_prompts), ("eval", data.eval, data.eval_max_prompts)):
        if uri is None:
            continue
        try:
            records, loaded = load_run_prompts_with_report(spec, field, uri, max_prompts, tokenizer,
                                                           resolve_cache_dir(spec.storage))
        except SpecError as exc:
            report.problems.append(str(exc))
            continue
        except StorageError as exc:
            report.problems.append(f"spec.data.{field}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - the model's chat template raised on a row
            report.problems.append(f"spec.data.{field}: the prompts do not render with the model's chat template "
                                   f"({type(exc).__name__}: {exc}); fix spec.data.promptTemplate / the prompt column "
                                   "or give a tokenizer with a working template (spec.model.tokenizer)")
            continue
        kept[field] = records
        report.notes.append(f"spec.data.{field}: {loaded.rows_read} rows read, {loaded.kept} prompts kept "
                            f"(bad rows {loaded.bad_rows_total}, duplicates {loaded.duplicates_dropped}, "
                            f"conflicting {loaded.conflicting_rows_dropped}, cut by max prompts {loaded.truncated})")
        too_long = loaded.bad_rows.get("too long", 0)
        if too_long:
            report.warnings.append(f"spec.data.{field}: {too_long} of {loaded.rows_read} rows are longer than "
                                   f"spec.rollout.maxPromptLength ({limit} tokens) and are dropped; raise "
                                   "maxPromptLength to keep them")
        if tokenizer is not None:
            rendered = encode_prompt(tokenizer, records[0].prompt)
            report.notes.append(f"spec.data.{field}: its first prompt renders to {len(rendered)} tokens "
                                f"(spec.rollout.maxPromptLength {limit})")
    if tokenizer is None and kept:
        report.notes.append("prompt lengths not checked: the tokenizer did not load")
    train = kept.get("train")
    if train is not None and len(train) < spec.rollout.gen_batch_size:
        report.warnings.append(f"spec.rollout.genBatchSize ({spec.rollout.gen_batch_size}) is larger than the "
                               f"training set ({len(train)} prompts): one generation batch repeats prompts")
    return kept


# --------------------------------------------------------------------------- scorers


def plausible_response(ground_truth) -> str:
    """The response the scorers are called with: the row's own answer as the built-in scorers
    read it (module docstring)."""
    text = ground_truth if isinstance(ground_truth, str) else json.dumps(ground_truth)
    return f"Answer: {text}"


def check_scorers(spec: DAPORunSpec, records: dict[str, list], report: CheckReport) -> None:
    """Import every scorer; call each row's scorer on the first SAMPLE_ROWS rows of each set."""
    from dapo.errors import DapoError
    from dapo.reward import RewardScorer

    try:
        # one worker: a handful of rows; no stop after failed rows: every failure is reported
        scorer = RewardScorer.from_spec(spec, workers=1, warm_modules=(), stop_after_failed_rows=1 << 30)
    except DapoError as exc:  # a run-file function that does not import, an unknown built-in scorer
        report.problems.append(str(exc))
        return
    try:
        rows = [(field, r) for field, recs in records.items() for r in recs[:SAMPLE_ROWS]
                if not scorer.routes.is_remote(scorer.route(r.data_source))]
        skipped_remote = sum(min(len(recs), SAMPLE_ROWS) for recs in records.values()) - len(rows)
        if skipped_remote:
            report.notes.append(f"spec.reward.remote: {skipped_remote} sample rows route to the remote service, "
                                "which dapo check does not call")
        if not rows:
            return
        results = scorer.score_batch([plausible_response(r.ground_truth) for _, r in rows],
                                     [r.ground_truth for _, r in rows], [r.data_source for _, r in rows],
                                     response_lengths=[1] * len(rows), extra_infos=[r.extra_info for _, r in rows])
    finally:
        scorer.close()
    for (field, record), result in zip(rows, results):
        where = (f"row {record.extra.get('row_index', '?')} of spec.data.{field} "
                 f"(data_source {record.data_source!r})")
        named = scorer.routes.field(result.scorer)
        if result.error is not None:
            report.problems.append(
                f"{named or 'spec.reward.scorer'}: scorer {result.scorer} failed on {where}: {result.error}; "
                "fix it so that it returns a float or {score, acc?, pred?} for every row")
        elif named is None and not result.acc:
            report.warnings.append(
                f"spec.reward.scorer: built-in scorer {result.scorer} scores {where} as wrong when the response is "
                f"the row's own answer ({plausible_response(record.ground_truth)[:80]!r}); check the answer column "
                "(spec.data.columns.answer) or pick the scorer for this data_source (spec.reward.scorers)")
    report.notes.append(f"scorers: {len(rows)} sample rows scored ({', '.join(sorted({r.scorer for r in results}))})")


# --------------------------------------------------------------------------- memory


@dataclasses.dataclass
class MemoryEstimate:
    """One role's memory per GPU, in GiB, by part; ``budget`` is what the run file declares
    the role may use (None: gpuMemoryGiB not set)."""

    role: str
    parts: dict[str, float]
    budget: float | None
    budget_text: str
    fix: str

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget


def dtype_bytes(spec: DAPORunSpec) -> int:
    """Bytes per parameter on a GPU pod: auto is bfloat16 there (spec.model.dtype)."""
    return 4 if spec.model.dtype == "float32" else 2


def count_parameters(config) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def kv_bytes_per_token(config, dtype_size: int) -> int:
    """Keys and values of one token over all layers: 2 x layers x kv heads x head_dim x bytes."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_size


def memory_estimates(spec: DAPORunSpec, config, params: int) -> list[MemoryEstimate]:
    """Per-GPU memory of a learner pod and a rollout pod.

    Learner: weights, gradients and AdamW's two moments, all in the parameter dtype (the learners
    configure no fp32 master copy); ZeRO-2 shards gradients and moments across
    spec.learner.replicas, ZeRO-3 the weights too; one replica trains with plain torch
    (dapo.spec.run_warnings). Activations come on top (microBatchSize, gradientCheckpointing).
    Rollout: the weights and the KV cache of one group, maxPromptLength + n x maxResponseLength
    tokens (vLLM shares the prompt's cache across the n samples), split over tensorParallelSize;
    the budget is gpuMemoryGiB x gpuMemoryUtilization for vLLM (engine vllm / auto on a GPU pod),
    all of gpuMemoryGiB for the HF engine.
    """
    size = dtype_bytes(spec)
    weights = params * size / GiB
    learner, rollout = spec.learner, spec.rollout
    ranks = learner.replicas
    stage = {"deepspeed-zero2": 2, "deepspeed-zero3": 3}.get(learner.strategy, 0) if ranks > 1 else 0
    learner_parts = {"weights": weights / ranks if stage == 3 else weights,
                     "gradients": weights / ranks if stage >= 2 else weights,
                     "optimizer": 2 * weights / ranks if stage >= 2 else 2 * weights}
    learner_budget = learner.resources.gpu_memory_gib
    learner_est = MemoryEstimate(
        "learner", learner_parts, learner_budget, f"spec.learner.resources.gpuMemoryGiB {learner_budget}",
        "raise spec.learner.replicas (ZeRO shards across them), use spec.learner.strategy deepspeed-zero3, "
        "or a node pool with more GPU memory")

    tp = rollout.tensor_parallel_size
    tokens = rollout.max_prompt_length + rollout.n * rollout.max_response_length
    kv = tokens * kv_bytes_per_token(config, size) / tp / GiB
    gpu = rollout.resources.gpu_memory_gib
    vllm = rollout.engine in ("vllm", "auto")
    if gpu is None:
        budget, text = None, ""
    elif vllm and rollout.kv_cache_gib is not None:
        budget = min(gpu, weights / tp + rollout.kv_cache_gib)
        text = (f"spec.rollout.kvCacheGiB {rollout.kv_cache_gib} beside the weights, within "
                f"spec.rollout.resources.gpuMemoryGiB {gpu}")
    elif vllm:
        budget = gpu * rollout.gpu_memory_utilization
        text = (f"spec.rollout.resources.gpuMemoryGiB {gpu} x spec.rollout.gpuMemoryUtilization "
                f"{rollout.gpu_memory_utilization}")
    else:
        budget, text = gpu, f"spec.rollout.resources.gpuMemoryGiB {gpu}"
    rollout_est = MemoryEstimate(
        "rollout", {"weights": weights / tp, f"KV cache of {tokens} tokens": kv}, budget, text,
        "lower spec.rollout.n or maxResponseLength, raise spec.rollout.gpuMemoryUtilization (vLLM) or "
        "tensorParallelSize (engine vllm), or use a node pool with more GPU memory")
    return [learner_est, rollout_est]


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.2f} MiB"


def check_memory(spec: DAPORunSpec, config, report: CheckReport) -> None:
    try:
        params = count_parameters(config)
    except Exception as exc:  # noqa: BLE001 - an architecture transformers cannot build: no estimate
        report.warnings.append(f"spec.model.path: no memory estimate, the model cannot be built from its config "
                               f"({type(exc).__name__}: {exc})")
        return
    for est in memory_estimates(spec, config, params):
        parts = " + ".join(f"{name} {_size(gib)}" for name, gib in est.parts.items())
        line = f"memory per {est.role} GPU: ~{_size(est.total)} ({parts}; {params / 1e6:.1f}M parameters)"
        if est.fits is None:
            report.notes.append(f"{line}; not checked: spec.{est.role}.resources.gpuMemoryGiB is not set")
        elif est.fits:
            report.notes.append(f"{line}; fits {_size(est.budget)} ({est.budget_text})")
        else:
            report.problems.append(f"spec.{est.role}.resources.gpuMemoryGiB: a {est.role} pod needs ~{_size(est.total)} "
                                   f"per GPU ({parts}) but has {_size(est.budget)} ({est.budget_text}); "
                                   f"{est.fix}")


# --------------------------------------------------------------------------- warnings


def check_warnings(run: DAPORun, report: CheckReport) -> None:
    """dapo.spec.run_warnings (the operator's own spec warnings reach the DAPORun's status; the
    runtime never imports the operator package: tests/test_layout.py)."""
    report.warnings.extend(run_warnings(run.spec))


# --------------------------------------------------------------------------- all of it


def check_run(run: DAPORun, *, call_scorers: bool = True) -> CheckReport:
    """Every check of a validated run file (module docstring)."""
    report = CheckReport()
    spec = run.spec
    check_warnings(run, report)
    with tempfile.TemporaryDirectory(prefix="dapo-check-") as scratch, storage_environment(spec):
        facts = check_model(spec, Path(scratch), report)
        records = check_data(spec, facts.tokenizer if facts else None, report)
        if call_scorers:
            check_scorers(spec, records, report)
        else:
            from dapo.errors import DapoError
            from dapo.reward.routing import ScorerRoutes

            try:  # imports every run-file function; an unknown spec.reward.scorer is refused too
                ScorerRoutes([(r.data_source, r.function) for r in spec.reward.scorers], None, spec.reward.scorer)
            except DapoError as exc:
                report.problems.append(str(exc))
        if facts is not None:
            check_memory(spec, facts.config, report)
    return report


def check_run_file(path: str | Path, overrides: list[str] | None = None) -> CheckReport:
    try:
        run = load_run_file(path, overrides)
    except SpecError as exc:
        return CheckReport(problems=schema_problems(str(exc)))
    report = check_run(run)
    report.notes.insert(0, f"schema: {run.metadata.name} is a valid DAPORun")
    return report


def main(args) -> int:
    """Entry point of `dapo check` (see dapo.cli): the report, exit 2 on any problem."""
    from dapo.contracts import RUN_FILE_ERROR_EXIT_CODE

    started = time.perf_counter()
    report = check_run_file(args.file, list(getattr(args, "overrides", None) or []))
    for note in report.notes:
        print(f"  {note}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    for problem in report.problems:
        print(f"error: {problem}")
    seconds = time.perf_counter() - started
    if report.problems:
        print(f"dapo check {args.file}: {len(report.problems)} problem(s) in {seconds:.1f}s")
        return RUN_FILE_ERROR_EXIT_CODE
    print(f"dapo check {args.file}: ok ({len(report.warnings)} warning(s)) in {seconds:.1f}s")
    return 0


def preflight_run(run: DAPORun, source: str) -> None:
    """`dapo run`'s check before anything starts: PreflightError listing the problems."""
    report = check_run(run, call_scorers=False)
    for warning in report.warnings:
        log.warning("%s", warning)
    if report.problems:  # one line per problem, as dapo check prints them
        raise PreflightError("\n".join(report.problems))
