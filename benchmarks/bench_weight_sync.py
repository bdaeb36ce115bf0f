"""Weight-sync throughput for Qwen2.5-0.5B-shaped tensors vs a raw broadcast of the same bytes.

Tensors: the 290 named parameters of Qwen2.5-0.5B (hidden 896, 24 layers, 14/2 heads,
intermediate 4864, vocab 151936, tied embedding), built directly (no download), bf16 by
default (~0.99 GB). Sender in this process, receivers spawned; gloo over loopback on CPU.

Each round runs a raw broadcast then a weight sync (interleaved, so both see the same load
on a shared machine); each starts after a tiny all-reduce barrier and ends when every
receiver acknowledged:
- ``raw``: one flat uint8 tensor of the same byte count, ``ProcessGroup.broadcast`` + ack
  all-gather (the ceiling for this transport);
- ``sync``: ``WeightSender.send`` with receivers whose ``load_fn`` copies each tensor into a
  preallocated copy of the model (what a HF engine does with ``param.copy_``).
Median of ``--trials`` (default 3) rounds, after one warm-up round. Each configuration also checks that
the receivers' tensors hash equal to the sender's (``state_checksum``).

Run: ``.venv/bin/python benchmarks/bench_weight_sync.py [--dtype bf16|fp32] [--out FILE]``
Memory (bf16): sender ~1 GB tensors + 2 buckets (+1 GB flat during raw), each receiver the same.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from dapo.weightsync import (  # noqa: E402
    WeightReceiver,
    WeightSender,
    WeightSyncConfig,
    state_checksum,
)

MIB = 1 << 20
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def qwen25_05b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of Qwen2.5-0.5B (tied lm_head is not a separate tensor)."""
    hidden, inter, layers, vocab, kv = 896, 4864, 24, 151936, 2 * 64
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.q_proj.bias", (hidden,)),
            (p + "self_attn.k_proj.weight", (kv, hidden)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return shapes + [("model.norm.weight", (hidden,))]


def make_tensors(dtype: torch.dtype, fill: bool) -> dict[str, torch.Tensor]:
    tensors = {name: torch.empty(shape, dtype=dtype) for name, shape in qwen25_05b_shapes()}
    if fill:
        generator = torch.Generator().manual_seed(0)
        for tensor in tensors.values():
            tensor.copy_(torch.rand(tensor.shape, generator=generator))
    else:
        for tensor in tensors.values():
            tensor.zero_()  # touch the pages now, not inside the first timed trial
    return tensors


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def barrier(group) -> None:
    group.wait(group.pg.allreduce([torch.zeros(1)]), "barrier", None)


def raw_round(group, flat: torch.Tensor) -> None:
    """One flat broadcast + the same acknowledgement all-gather that send() ends with."""
    group.wait(group.broadcast(flat), "raw broadcast", None)
    group.allgather(torch.zeros(3, dtype=torch.int64), "raw ack", None)


def receiver_main(rank: int, commands, results, dtype_name: str, load_mode: str) -> None:
    torch.set_num_threads(1)
    model = make_tensors(DTYPES[dtype_name], fill=False)

    def load(batch):
        if load_mode == "copy":
            for name, tensor in batch:
                model[name].copy_(tensor)
        # load_mode "none": transport + packing only, the views are dropped

    receiver = None
    while True:
        command, arg = commands.get()
        if command == "join":
            receiver = WeightReceiver(WeightSyncConfig(**arg))
            results.put((rank, "joined"))
        elif command == "trials":
            flat = torch.empty(arg[0], dtype=torch.uint8)
            for _ in range(arg[1]):
                barrier(receiver._group)
                raw_round(receiver._group, flat)
                barrier(receiver._group)
                receiver.receive(load)
            del flat
            results.put((rank, state_checksum(model) if load_mode == "copy" else None))
        elif command == "close":
            receiver.close()
            results.put((rank, "closed"))
        else:
            return


class Bench:
    def __init__(self, receivers: int, dtype_name: str, load_mode: str):
        ctx = mp.get_context("spawn")
        self.receivers, self.dtype_name = receivers, dtype_name
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(receivers)]
        self.procs = [ctx.Process(target=receiver_main, args=(r + 1, q, self.results, dtype_name, load_mode),
                                  daemon=True) for r, q in enumerate(self.commands)]
        for proc in self.procs:
            proc.start()

    def post(self, command, arg=None):
        for queue in self.commands:
            queue.put((command, arg))

    def collect(self) -> list:
        return [self.results.get(timeout=900)[1] for _ in range(self.receivers)]

    def open(self, bucket_bytes: int) -> WeightSender:
        port = free_port()
        common = dict(host="127.0.0.1", port=port, world_size=self.receivers + 1,
                      backend="gloo", bucket_bytes=bucket_bytes, timeout_s=300.0)
        for rank, queue in enumerate(self.commands, start=1):
            queue.put(("join", dict(common, rank=rank)))
        sender = WeightSender(WeightSyncConfig(rank=0, **common))
        self.collect()
        return sender

    def close(self, sender: WeightSender) -> None:
        self.post("close")
        sender.close()
        self.collect()

    def stop(self) -> None:
        self.post("stop")
        for proc in self.procs:
            proc.join(timeout=30)


def time_trials(bench: Bench, sender: WeightSender, tensors: dict, trials: int,
                version: int) -> tuple[list[float], list[float], int, bool]:
    """``trials`` + 1 (warm-up) rounds of raw broadcast then weight sync, interleaved so both
    see the same machine load; returns raw times, sync times, buckets, bytes-identical."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    flat = torch.ones(nbytes, dtype=torch.uint8)
    bench.post("trials", (nbytes, trials + 1))
    raw_times, sync_times, buckets = [], [], 0
    for i in range(trials + 1):
        barrier(sender._group)
        start = time.perf_counter()
        raw_round(sender._group, flat)
        raw_times.append(time.perf_counter() - start)
        barrier(sender._group)
        start = time.perf_counter()
        stats = sender.send(tensors.items(), version + i)
        sync_times.append(time.perf_counter() - start)
        buckets = stats.buckets
    del flat
    digests = bench.collect()
    identical = (all(digest == state_checksum(tensors) for digest in digests)
                 if None not in digests else None)
    return raw_times[1:], sync_times[1:], buckets, identical


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--sweep", type=int, nargs="+", default=[16, 64, 256, 1024],
                        help="bucket sizes in MiB for the 1-receiver sweep")
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--load", choices=["copy", "none"], default="copy",
                        help="receiver load_fn: copy into a preallocated model (realistic) or "
                             "nothing (transport + packing only; bytes not checked)")
    parser.add_argument("--out", type=Path, default=Path("bench_weight_sync.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    tensors = make_tensors(DTYPES[args.dtype], fill=True)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{len(tensors)} tensors, {sum(t.numel() for t in tensors.values()) / 1e6:.1f} M "
          f"params, {nbytes / 1e9:.3f} GB {args.dtype}; gloo on loopback; receiver load_fn="
          f"{args.load}; median of {args.trials}", flush=True)
    rows, version = [], 1
    plan = sorted({(r, 256) for r in args.receivers} | {(1, b) for b in args.sweep})
    benches: dict[int, Bench] = {}
    try:
        for receivers, bucket_mib in plan:
            if receivers not in benches:
                for other in list(benches):
                    benches.pop(other).stop()
                benches[receivers] = Bench(receivers, args.dtype, args.load)
            bench = benches[receivers]
            sender = bench.open(bucket_mib * MIB)
            try:
                raw_times, sync_times, buckets, identical = time_trials(
                    bench, sender, tensors, args.trials, version)
            finally:
                bench.close(sender)
            version += args.trials + 1
            raw, sync = statistics.median(raw_times), statistics.median(sync_times)
            rows.append(dict(receivers=receivers, bucket_mib=bucket_mib, buckets=buckets,
                             raw_s=raw, sync_s=sync, raw_gb_per_s=nbytes / raw / 1e9,
                             sync_gb_per_s=nbytes / sync / 1e9, of_raw=raw / sync,
                             identical=identical, raw_all=raw_times, sync_all=sync_times))
            print(rows[-1], flush=True)
    finally:
        for bench in benches.values():
            bench.stop()

    print("\n| receivers | bucket MiB | buckets | raw s | raw GB/s | sync s | sync GB/s | "
          "sync / raw | bytes identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['receivers']} | {row['bucket_mib']} | {row['buckets']} | "
              f"{row['raw_s']:.3f} | {row['raw_gb_per_s']:.2f} | {row['sync_s']:.3f} | "
              f"{row['sync_gb_per_s']:.2f} | {100 * row['of_raw']:.0f}% | {row['identical']} |")
    args.out.write_text(json.dumps({"dtype": args.dtype, "load": args.load, "bytes": nbytes,
                                    "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")
    return 0 if all(row["identical"] in (True, None) for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
