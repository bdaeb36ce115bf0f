"""Shared pieces of the evidence benchmarks (side by side with TRL, ablation, micro, SmolLM2).

Everything here is small and pure where it can be: data paths, the held-out evaluator both
sides of a comparison use, child-process peak memory, medians and ratios, tables and JSON.

Conventions every benchmark follows (docs/benchmarks.md, "Method"):
  * a figure is the median of repeated runs; a comparison is a ratio of medians measured in the
    same invocation, the two systems alternating so a busy machine slows both alike;
  * training wall time excludes held-out evaluation (both systems evaluate with the same
    definition: avg@n at temperature 1.0, top_p 1.0, scored by ``dapo.reward.score_math_dapo``);
  * every script writes its raw per-run numbers to JSON next to the printed table.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
BENCH_CACHE = Path(os.environ.get("DAPO_BENCH_CACHE", REPO / ".bench-cache"))


# --------------------------------------------------------------------------- data


def arith_data_paths() -> tuple[Path, Path]:
    """(train, eval) JSONL files of the quickstart arithmetic task (examples/data, regenerated
    with ``dapo.model.builtin.write_arith_data`` when a checkout lacks them)."""
    train, held_out = REPO / "examples/data/arith-train.jsonl", REPO / "examples/data/arith-eval.jsonl"
    if not (train.is_file() and held_out.is_file()):
        from dapo.model import builtin

        builtin.write_arith_data(train.parent)
    return train, held_out


def read_prompt_set(path: Path | str, *, template: str = "none", limit: int | None = None,
                    max_prompt_length: int | None = None, tokenizer=None) -> list[tuple[list[dict], str]]:
    """(chat messages, ground truth) pairs of a prompt set, read by the trainer's own loader
    (``dapo.data.prompts.load_prompts``: .jsonl or DAPO .parquet, the same template, de-duplication,
    conflict drop, token-length filter and first-``limit`` cut as ``dapo run``), so a benchmark
    that drives another framework sees exactly the prompts our trainer sees."""
    from dapo.data.prompts import load_prompts
    from dapo.rollout.base import encode_prompt

    measure = (lambda messages: len(encode_prompt(tokenizer, messages))) if tokenizer is not None else None
    try:
        records, _ = load_prompts(str(path), template=template, max_prompts=limit,
                                  max_prompt_length=max_prompt_length if measure else None, prompt_length=measure)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"{path}: {exc}") from None
    return [(record.prompt, record.ground_truth) for record in records]


def tiny_model_path() -> Path:
    """The built ``builtin:arith-tiny`` folder (built and cached on first use)."""
    from dapo.model.builtin import builtin_path

    return builtin_path("arith-tiny")


# --------------------------------------------------------------------------- evaluation


def left_padded(rows: Sequence[Sequence[int]], pad_id: int):
    """Token rows left-padded to the longest, and their attention mask (both [rows, width] long
    tensors): the layout ``model.generate`` continues from."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        if len(row):
            ids[r, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[r, width - len(row):] = 1
    return ids, mask


def heldout_accuracy(model, tokenizer, problems: Sequence[tuple[list[dict], str]], *, n: int, max_new_tokens: int,
                     temperature: float = 1.0, seed: int = 0, batch_rows: int = 256) -> float:
    """avg@n: the mean over problems and n samples of acc(score_math_dapo(response, answer)).

    ``problems`` are (chat messages, ground truth) pairs (``read_prompt_set``). Sampling is plain
    ``model.generate`` (temperature, top_p 1, top_k off), prompts encoded as our engine encodes
    them; the same definition as the trainer's ``val/acc/mean``."""
    import torch

    from dapo.rollout.base import encode_prompt
    from dapo.reward import score_math_dapo

    was_training = model.training
    model.eval()
    prompts = []
    for messages, answer in problems:
        prompts.extend([(encode_prompt(tokenizer, messages), answer)] * n)
    correct = 0
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in range(0, len(prompts), batch_rows):
            chunk = prompts[start:start + batch_rows]
            pad = tokenizer.pad_token_id
            input_ids, attention = left_padded([ids for ids, _ in chunk], pad)
            width = input_ids.shape[1]
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                                     temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            correct += sum(acc_of(score_math_dapo(text, answer)) for text, (_, answer) in zip(texts, chunk))
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return correct / len(prompts)


def acc_of(result: Any) -> bool:
    """``acc`` of a scorer result, mapping or object alike."""
    return bool(result["acc"] if isinstance(result, dict) else result.acc)


def score_of(result: Any) -> float:
    return float(result["score"] if isinstance(result, dict) else result.score)


# --------------------------------------------------------------------------- measuring


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(cmd: Sequence[str], *, env: dict | None = None, log_path: Path | None = None,
              timeout_s: float | None = None) -> dict:
    """Run a command; return rc, wall seconds and the child's own peak RSS (os.wait4 rusage).

    A separate process per run makes peak memory comparable between systems: each starts from
    an empty interpreter and nothing of the other stays resident."""
    started = time.perf_counter()
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = None if timeout_s is None else started + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    finally:
        if log_path:
            out.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - started, "peak_rss_mib": usage.ru_maxrss / 1024,
            "cmd": list(cmd), "log": str(log_path) if log_path else None}


def bench_env(threads: int) -> dict:
    """Environment for a child run: ``threads`` torch/OpenMP threads, offline, no telemetry."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "DAPO_TORCH_THREADS": str(threads),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "runtime"), str(REPO / "operator"),
                                                       env.get("PYTHONPATH")]))
    return env


def pod_cpus(threads_per_process: int) -> list[str]:
    """`dapo run --launcher processes` options that give the learner and the rollout (with the
    reward process) disjoint cores, ``threads_per_process`` each, as separate pods get: the
    learner this process's first t CPUs, rollout and reward the next t."""
    t = threads_per_process
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 * t:
        raise SystemExit(f"pinning needs {2 * t} CPUs, this process may use {len(cpus)}: pass --no-pin or fewer threads")
    return ["--cpus", "learner=" + ",".join(map(str, cpus[:t])),
            "--cpus", "rollout,reward=" + ",".join(map(str, cpus[t:2 * t]))]


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def spread(values: Iterable[float]) -> tuple[float, float]:
    """(min, max) of the values: with 3-5 repeats the range says more than a standard deviation."""
    values = [v for v in values if v is not None]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


def acc_at_time(curve: Sequence[tuple[float, float]], t: float) -> float | None:
    """Held-out accuracy a run had reached at training wall time ``t``: the last evaluation at
    or before ``t`` (a step function; no interpolation invents numbers between evaluations)."""
    best = None
    for when, acc in sorted(curve):
        if when <= t + 1e-9:
            best = acc
    return best


def load_average() -> list[float]:
    """The 1/5/15-minute load averages `uptime` prints (the machine these ran on was shared)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "load_avg_at_start": load_average()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- output


def write_json(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pastes straight into docs/benchmarks.md)."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
