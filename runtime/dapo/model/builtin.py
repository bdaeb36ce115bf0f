"""Built-in models the project makes itself, so the quickstart needs no download.

``builtin:arith-tiny`` is a ~0.8M-parameter Qwen2-architecture model with a character-level
tokenizer that answers sums such as ``37+48`` with ``Answer: 85``. It is warmed up by a short
supervised pass that imitates a *sloppy teacher*: the teacher is right only ``teacher_acc`` of the
time and otherwise makes a plausible slip (one digit of the answer off by one, e.g. a lost carry).
The warmed-up policy therefore knows the algorithm (its greedy answer is right ~80-90% of the
time on held-out sums) but samples the right answer only ~30% of the time at temperature 1.0.
That is the regime where DAPO has signal: almost every group of n samples mixes right and wrong
answers, and a rule-based verifier lets RL beat its teacher, which shows as a steep
``val/acc/mean`` curve within minutes on a laptop CPU.

Why these choices (measured on 2 CPU cores, see the quickstart notes in ``examples/``):

* fresh problems every warm-up step (not a small fixed set): with 3000 fixed problems the model
  memorised them and reached 1-4% on held-out sums; with i.i.d. problems it generalises;
* operands 0..49: the 0..99 version needs ~1000 steps to generalise, 0..49 ~600;
* cosine learning-rate decay after a short linear warm-up: a constant 3e-3 trained, then
  destabilised (held-out accuracy fell from 85% to 50% between steps 900 and 1200).

The build is deterministic (fixed seeds, one torch thread) and cached under
``~/.cache/dapo/builtin/<name>-<recipe hash>`` so the second run starts in milliseconds.

The data files of the quickstart come from here too: ``python -m dapo.model.builtin write-data
examples/data`` rewrites ``arith-train.jsonl`` and ``arith-eval.jsonl``; the evaluation sums are
never shown to the warm-up and are disjoint from the training prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dapo.contracts import cache_dir as default_cache_dir

log = logging.getLogger("dapo.model.builtin")

ANSWER_TOKEN = "Answer:"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
# Characters of arithmetic prompts and answers. Anything else (e.g. the letters of the DAPO prompt
# template, if someone applies it to this model) maps to <unk>: harmless, just useless.
CHARS = list("0123456789+-*=() \n")
# The user message "37+48" becomes the prompt "37+48=": the model's whole "chat" format.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}={% endif %}"
)
DATA_SOURCE = "arith"
TRAIN_FILE, EVAL_FILE = "arith-train.jsonl", "arith-eval.jsonl"


@dataclass(frozen=True)
class ArithRecipe:
    """Everything that determines the task split and the built model; its hash names the cache folder."""

    operand_max: int = 49  # problems are a+b with 0 <= a, b <= operand_max
    eval_problems: int = 200  # held out: never in the warm-up, never in the training prompts
    split_seed: int = 7
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 64
    teacher_acc: float = 0.3  # share of warm-up answers that are right; the rest are one-digit slips
    warmup_steps: int = 600
    warmup_batch: int = 64
    warmup_lr: float = 3e-3
    lr_warmup_steps: int = 50  # linear ramp before the cosine decay
    grad_clip: float = 1.0
    seed: int = 1234
    version: int = 2  # bump when the build code changes what a recipe produces

    def digest(self) -> str:
        """12 hex chars of sha256 over the recipe's fields: the cache key."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


ARITH_TINY = ArithRecipe()
# name -> recipe of every built-in model (tests swap in a tiny recipe here).
BUILTINS: dict[str, ArithRecipe] = {"arith-tiny": ARITH_TINY}


# --------------------------------------------------------------------------- the task


def all_sums(operand_max: int) -> list[tuple[str, str]]:
    """Every problem ``a+b`` with 0 <= a, b <= operand_max and its answer, in a fixed order."""
    return [(f"{a}+{b}", str(a + b)) for a in range(operand_max + 1) for b in range(operand_max + 1)]


def split_problems(recipe: ArithRecipe = ARITH_TINY) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval): a seeded shuffle of all sums; the first ``eval_problems`` are held out.

    Train is everything else, so the warm-up (which samples from train) and the RL prompts never
    contain an evaluation problem.
    """
    problems = all_sums(recipe.operand_max)
    random.Random(recipe.split_seed).shuffle(problems)
    return problems[recipe.eval_problems :], problems[: recipe.eval_problems]


def sloppy_answer(answer: str, rng: random.Random) -> str:
    """A plausible slip: one digit place of ``answer`` off by one (answer +- 10**k), never negative."""
    place = 10 ** rng.randrange(len(answer))
    shifted = int(answer) + rng.choice((-1, 1)) * place
    return str(shifted if shifted >= 0 else int(answer) + place)


def teacher_answer(answer: str, teacher_acc: float, rng: random.Random) -> str:
    """The sloppy teacher: the true answer with probability ``teacher_acc``, else a slip."""
    return answer if rng.random() < teacher_acc else sloppy_answer(answer, rng)


def write_arith_jsonl(path: Path, problems: list[tuple[str, str]]) -> None:
    """One JSON object per line with the columns ``dapo.data.prompts.load_prompts`` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for problem, answer in problems:
            fh.write(json.dumps({"problem": problem, "answer": answer, "data_source": DATA_SOURCE}) + "\n")


def write_arith_data(out_dir: str | Path, recipe: ArithRecipe = ARITH_TINY) -> list[Path]:
    """Write the quickstart's ``arith-{train,eval}.jsonl`` and the same split as few-shot chat
    prompts (``sums-fewshot-{train,eval}.parquet``, for pretrained instruct models) into ``out_dir``."""
    train, evaluation = split_problems(recipe)
    out = Path(out_dir)
    write_arith_jsonl(out / TRAIN_FILE, train)
    write_arith_jsonl(out / EVAL_FILE, evaluation)
    write_fewshot_parquet(out / FEWSHOT_TRAIN_FILE, train)
    write_fewshot_parquet(out / FEWSHOT_EVAL_FILE, evaluation)
    return [out / TRAIN_FILE, out / EVAL_FILE, out / FEWSHOT_TRAIN_FILE, out / FEWSHOT_EVAL_FILE]


# Few-shot chat prompts of the same sums, for pretrained instruct models (SmolLM2-135M-Instruct):
# asked zero-shot it rambles and never writes "Answer: N" (0 % measured), with these three worked
# turns it answers in format and gets ~58 % of one-digit and ~10 % of two-digit sums right at
# temperature 1: room for DAPO to improve it.
FEWSHOT_SYSTEM = "You are a calculator. Reply with one line: Answer: N"
FEWSHOT_TURNS = (("What is 2 + 3?", "Answer: 5"), ("What is 14 + 7?", "Answer: 21"), ("What is 6 + 9?", "Answer: 15"))
FEWSHOT_TRAIN_FILE, FEWSHOT_EVAL_FILE = "sums-fewshot-train.parquet", "sums-fewshot-eval.parquet"


def fewshot_messages(problem: str) -> list[dict[str, str]]:
    """The chat prompt for ``a+b``: a system line, three worked examples, then the question."""
    a, b = problem.split("+")
    messages = [{"role": "system", "content": FEWSHOT_SYSTEM}]
    for question, answer in FEWSHOT_TURNS:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": f"What is {a} + {b}?"}]


def write_fewshot_parquet(path: Path, problems: list[tuple[str, str]]) -> None:
    """DAPO row format (data_source, prompt = chat messages, ability, reward_model, extra_info)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": DATA_SOURCE, "prompt": fewshot_messages(p), "ability": "arithmetic",
             "reward_model": {"ground_truth": a, "style": "rule"}, "extra_info": {"problem": p}} for p, a in problems]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# --------------------------------------------------------------------------- tokenizer and model


def build_tokenizer():
    """A character-level fast tokenizer where ``Answer:`` is one token; pads on the left."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [ANSWER_TOKEN] + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"Answer:|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(recipe: ArithRecipe, vocab_size: int, pad_id: int, eos_id: int):
    """The Qwen2Config of the recipe's model (what `dapo check` reads without building the model)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        use_sliding_window=False,
    )


def build_model(recipe: ArithRecipe, vocab_size: int, pad_id: int, eos_id: int):
    """A freshly initialised Qwen2ForCausalLM of the recipe's size (seeded, so reproducible)."""
    import torch
    from transformers import Qwen2ForCausalLM

    config = model_config(recipe, vocab_size, pad_id, eos_id)
    torch.manual_seed(recipe.seed)
    return Qwen2ForCausalLM(config)


def lr_at(step: int, recipe: ArithRecipe) -> float:
    """Linear ramp over ``lr_warmup_steps``, then cosine decay to 0 at ``warmup_steps``:
    lr * min(1, (s+1)/W) * (1 + cos(pi * s / S)) / 2."""
    ramp = min(1.0, (step + 1) / max(1, recipe.lr_warmup_steps))
    return recipe.warmup_lr * ramp * 0.5 * (1.0 + math.cos(math.pi * step / recipe.warmup_steps))


def _encode(tokenizer, problem: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of ``problem=`` -> ``Answer: N<eos>``, char by char."""
    prompt = tokenizer.convert_tokens_to_ids(list(problem) + ["="])
    response = tokenizer.convert_tokens_to_ids([ANSWER_TOKEN, " ", *answer, tokenizer.eos_token])
    return prompt, response


def _batch_tensors(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ids, attention mask and labels (-100 outside the response)."""
    import torch

    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (p, r) in enumerate(rows):
        seq = p + r
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(p) : len(seq)] = torch.tensor(r)
        attn[row, : len(seq)] = 1
    return ids, attn, labels


def warm_up(model, tokenizer, recipe: ArithRecipe, problems: list[tuple[str, str]]) -> dict:
    """Supervised pass on the sloppy teacher's answers to problems drawn i.i.d. from ``problems``
    (loss on the response tokens only). Returns summary stats."""
    import torch

    rng = random.Random(recipe.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.warmup_lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    started = time.time()
    for step in range(recipe.warmup_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        rows = []
        for _ in range(recipe.warmup_batch):
            problem, answer = problems[rng.randrange(len(problems))]
            rows.append(_encode(tokenizer, problem, teacher_answer(answer, recipe.teacher_acc, rng)))
        ids, attn, labels = _batch_tensors(rows, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("warm-up step %d/%d loss %.3f (%.0fs)", step + 1, recipe.warmup_steps,
                     sum(losses[-100:]) / len(losses[-100:]), time.time() - started)
    model.eval()
    tail = losses[-20:]
    return {"final_loss": sum(tail) / max(1, len(tail)), "steps": recipe.warmup_steps,
            "warmup_seconds": round(time.time() - started, 1)}


def build_arith_tiny(dest: str | Path, recipe: ArithRecipe = ARITH_TINY) -> Path:
    """Build, warm up and save ``builtin:arith-tiny`` as a Hugging Face folder at ``dest``.

    Written to a temporary sibling folder and renamed into place, so a crash never leaves a
    half-written model that a later run would take for a cached one.
    """
    import torch

    dest = Path(dest)
    started = time.time()
    tokenizer = build_tokenizer()
    model = build_model(recipe, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    train, _ = split_problems(recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same reduction order, so identical weights each build
    try:
        stats = warm_up(model, tokenizer, recipe, train)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "dapo_builtin.json").write_text(json.dumps({"recipe": asdict(recipe), **stats}, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log.info("built builtin:arith-tiny in %.1fs (warm-up loss %.3f) -> %s", time.time() - started, stats["final_loss"], dest)
    return dest


@contextlib.contextmanager
def _build_lock(lock_path: Path):
    """An exclusive file lock, so processes that start together build the model once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the tmp-then-rename write is still safe enough
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def builtin_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder of built-in model ``name`` (e.g. ``arith-tiny``), building it on first use.

    Cached at ``<cache_dir>/builtin/<name>-<recipe digest>``; a changed recipe gets a new folder.
    """
    if name not in BUILTINS:
        raise ValueError(f"spec.model.path: unknown built-in model 'builtin:{name}'; available: "
                         + ", ".join(f"builtin:{k}" for k in BUILTINS))
    recipe = BUILTINS[name]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    dest = root / "builtin" / f"{name}-{recipe.digest()}"
    if (dest / "config.json").exists():
        return dest
    with _build_lock(dest.with_name(dest.name + ".lock")):
        if not (dest / "config.json").exists():  # another process may have built it meanwhile
            log.info("building builtin:%s (first use, ~1 min on 2 CPU cores; cached in %s)", name, dest)
            build_arith_tiny(dest, recipe)
    return dest


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m dapo.model.builtin write-data DIR`` | ``build [--cache-dir DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m dapo.model.builtin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("write-data", help="write the arith-*.jsonl and sums-fewshot-*.parquet data files")
    data.add_argument("out_dir", nargs="?", default="examples/data")
    build = sub.add_parser("build", help="build (or find cached) builtin:arith-tiny and print its folder")
    build.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "write-data":
        for path in write_arith_data(args.out_dir):
            print(path)
    else:
        print(builtin_path("arith-tiny", args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
