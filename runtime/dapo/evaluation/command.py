"""`dapo eval MODEL --data FILE [--n 32] [--k 1,8,32] [--engine hf|vllm]`: evaluate a policy.

MODEL is a run folder, a checkpoint (local or s3://, the latest committed one unless --step), a
Hugging Face folder, builtin:NAME or a .gguf file (dapo.storage.sources). The settings come from
the run file that trained the checkpoint (run.yaml beside it), else ``--run-file``, else the
platform's defaults; ``--set PATH=VALUE`` overrides any field, as for `dapo run`. The data, n, the
ks and the engine come from the command line. Sampling uses the run's evaluation temperature /
top_p and the seeds of the trainer's own evaluation at the checkpoint's step
(dapo.evaluation.sampling), so evaluating the step-s checkpoint with the run's n reproduces the
run's val/acc/mean at step s.

Prints one row per data source (avg@n, pass@k, maj@k for each k, mean score, mean response
length, truncated share) and writes them as JSON (``--json``), with the metrics a training run
logs for an evaluation under their names (``val/acc/mean``, ``val-core/...``); ``--samples FILE``
writes every sample as a JSON line (prompt, response, score, acc, pred, data_source);
``--store-result`` stores the JSON beside the checkpoint (``{root}/evals/step-N.json``), where the
run's learner picks it up (spec.eval.separatePod: what the evaluation pods run).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import yaml

from dapo.model.lora import policy_with_checkpoint_adapters, read_base_reference
from dapo.spec import DAPORun, SpecError, apply_overrides, parse_run

log = logging.getLogger("dapo.evaluation")


def parse_ks(text: str | None) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; SpecError names --k."""
    if not text:
        return []
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SpecError(f"--k {text!r}: give whole numbers separated by commas, e.g. --k 1,8,32") from None
    if any(k < 1 for k in ks):
        raise SpecError(f"--k {text!r}: every k must be >= 1")
    return ks


def lora_checkpoint(source) -> bool:
    """Whether ``source`` is a LoRA checkpoint (adapters + a base reference, dapo.model.lora)."""
    return not source.path.startswith("builtin:") and read_base_reference(Path(source.path)) is not None


def eval_run(source, args) -> DAPORun:
    """The run file the evaluation follows: the checkpoint's own, --run-file, or defaults; with the
    model, the data, n and the engine from the command line and --set overrides applied."""
    if args.run_file:
        doc = yaml.safe_load(Path(args.run_file).read_text())
    elif source.run_file:
        doc = yaml.safe_load(source.run_file)
    else:
        doc = {"apiVersion": "dapo.dev/v1alpha1", "kind": "DAPORun", "metadata": {"name": "eval"}, "spec": {}}
    spec = doc.setdefault("spec", {})
    if lora_checkpoint(source):  # the run file's base and spec.model.lora; `main` puts the adapters on
        if not spec.get("model", {}).get("lora"):
            raise SpecError(f"{source.describe()}: holds LoRA adapters; evaluate it with the run file that trained "
                            "it (the checkpoint's run.yaml, or --run-file naming its base and spec.model.lora)")
    else:
        spec["model"] = {**spec.get("model", {}), "path": source.path}
    if source.gguf_file:
        spec["model"]["ggufFile"] = source.gguf_file
    spec["data"] = {**spec.get("data", {}), "eval": args.data}
    spec["data"].setdefault("train", args.data)
    if args.n is not None:
        spec["eval"] = {**spec.get("eval", {}), "n": args.n}
    if args.engine:
        spec["rollout"] = {**spec.get("rollout", {}), "engine": args.engine}
    if args.overrides:
        doc = apply_overrides(doc, args.overrides)
    return parse_run(doc, source="the evaluation's run file")


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """The per-source rows as an aligned text table."""
    columns = list(dict.fromkeys(key for row in summary.values() for key in row))
    header = ["data source"] + columns
    rows = [[source] + [_cell(row.get(key)) for key in columns] for source, row in summary.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header)] + [line(r) for r in rows])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def main(args) -> int:
    """Entry point of `dapo eval` (see dapo.cli)."""
    from tqdm import tqdm

    from dapo import wiring
    from dapo.data.prompts import load_run_prompts
    from dapo.evaluation.metrics import summarize, validation_metrics
    from dapo.evaluation.sampling import sample_prompts
    from dapo.seeding import seed_all
    from dapo.storage.sources import resolve_model_source

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    ks = parse_ks(args.k)
    source = resolve_model_source(args.model, step=args.step, gguf_file=args.gguf_file)
    run = eval_run(source, args)
    spec = run.spec
    if ks and max(ks) > spec.eval.n:
        raise SpecError(f"--k {args.k}: pass@k and maj@k need k <= n = {spec.eval.n} samples per problem (--n)")
    step = source.checkpoint.step if source.checkpoint is not None else 0
    log.info("evaluating %s on %s: n=%d, temperature %g, top_p %g, seeds of step %d", source.describe(), args.data,
             spec.eval.n, spec.eval.temperature, spec.eval.top_p, step)
    seed_all(spec.learner.seed)
    device = wiring.pick_device()
    policy = wiring.load_policy(spec, device) if wiring.engine_kind(spec) == "hf" else None
    if lora_checkpoint(source):  # spec.model.lora needs the hf engine, so the policy is loaded here
        policy = (policy_with_checkpoint_adapters(policy[0], spec.model.lora, Path(source.path), source.describe()),
                  policy[1])
    engine = wiring.build_engine(spec, policy=policy, device=device, share_policy=True)
    tokenizer = policy[1] if policy is not None else wiring.load_tokenizer(spec)
    records = load_run_prompts(spec, "eval", spec.data.eval, spec.data.eval_max_prompts, tokenizer,
                               wiring.cache_dir(spec))
    scorer = wiring.build_scorer(spec)
    bar = tqdm(total=len(records), unit="prompt", file=sys.stderr, desc="eval")
    try:
        t0 = time.perf_counter()
        prompts = sample_prompts(engine, tokenizer, scorer, records, n=spec.eval.n, temperature=spec.eval.temperature,
                                 top_p=spec.eval.top_p, max_new_tokens=spec.rollout.max_response_length,
                                 seed=spec.learner.seed, step=step, chunk=spec.rollout.gen_batch_size,
                                 progress=lambda done, total, seconds: bar.update(done - bar.n))
        seconds = time.perf_counter() - t0
    finally:
        bar.close()
        engine.close()
        scorer.close()
    summary = summarize(prompts, ks)
    print(format_table(summary))
    result = {"model": source.describe(), "data": args.data, "n": spec.eval.n, "k": ks, "step_seeds": step,
              "temperature": spec.eval.temperature, "top_p": spec.eval.top_p, "seconds": round(seconds, 3),
              "by_source": summary, "metrics": validation_metrics(prompts, spec.eval.n, ks)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.store_result:
        if source.store is None:
            raise SpecError("--store-result: the model is not a committed checkpoint; nowhere to store the result")
        log.info("result stored at %s", source.store.write_evaluation(step, result))
    if args.samples:
        with open(args.samples, "w") as fh:
            for p in prompts:
                for response, score, acc, pred in zip(p.responses, p.scores, p.accs, p.preds):
                    fh.write(json.dumps({"data_source": p.data_source, "prompt": p.prompt, "response": response,
                                         "score": score, "acc": acc, "pred": pred}) + "\n")
    return 0
