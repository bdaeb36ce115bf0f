"""S3 transfer throughput: dapo.storage's TransferConfig vs boto3's defaults, against moto.

    .venv/bin/python benchmarks/bench_s3.py [--big-mib 200] [--files 64] [--file-mib 4] [--repeats 3]
                                            [--endpoint URL] [--out results.json]

Measures upload and download MB/s (1 MB = 1e6 bytes) of one big file and of a folder of many
files, median of ``--repeats`` runs, and prints a table. Without ``--endpoint`` it starts
moto's ThreadedMotoServer on 127.0.0.1 (fake credentials); with it, it uses the AWS chain
(point it at a MinIO or a real bucket to measure a real store: bucket from ``--bucket``).
moto keeps objects in memory and is CPU-bound in Python, so its numbers are a floor on what
the client side can do, not a prediction for AWS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from dapo import storage  # noqa: E402

MiB = 1024 * 1024


def _write_random(path: Path, nbytes: int) -> None:
    """Random bytes (incompressible), written in 4 MiB blocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(4 * MiB)
    with open(path, "wb") as fh:
        left = nbytes
        while left > 0:
            fh.write(block[: min(left, len(block))])
            left -= len(block)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_rate(nbytes: int, seconds: list[float]) -> float:
    """MB/s of the median run: bytes / 1e6 / median(seconds)."""
    return nbytes / 1e6 / statistics.median(seconds)


def bench(client, bucket: str, work: Path, configs: dict, big: Path, folder: Path, repeats: int) -> list[dict]:
    big_bytes = big.stat().st_size
    dir_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    rows = []
    for name, config in configs.items():
        runs: dict[str, list[float]] = {k: [] for k in ("file_up", "file_down", "dir_up", "dir_down")}
        for rep in range(repeats):
            key = f"bench/{name}/big.bin"
            runs["file_up"].append(_timed(lambda: storage.upload_file(big, f"s3://{bucket}/{key}", client=client, config=config)))
            out_file = work / "down" / "big.bin"
            runs["file_down"].append(_timed(lambda: storage.download_file(f"s3://{bucket}/{key}", out_file, client=client, config=config)))
            assert out_file.stat().st_size == big_bytes
            out_file.unlink()
            prefix = f"s3://{bucket}/bench/{name}/dir"
            runs["dir_up"].append(_timed(lambda: storage.upload_dir(folder, prefix, client=client, config=config)))
            out_dir = work / "down" / "dir"
            runs["dir_down"].append(_timed(lambda: storage.download_dir(prefix, out_dir, client=client, config=config)))
            shutil.rmtree(out_dir)
            print(f"  {name} run {rep + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items()), flush=True)
        rows.append({
            "config": name,
            "file_upload_MBps": _median_rate(big_bytes, runs["file_up"]),
            "file_download_MBps": _median_rate(big_bytes, runs["file_down"]),
            "dir_upload_MBps": _median_rate(dir_bytes, runs["dir_up"]),
            "dir_download_MBps": _median_rate(dir_bytes, runs["dir_down"]),
            "seconds": runs,
        })
    return rows


def _print_table(rows: list[dict], big_mib: int, nfiles: int, file_mib: int) -> None:
    head = (f"{'TransferConfig':<16} {f'{big_mib} MiB up':>12} {f'{big_mib} MiB down':>14} "
            f"{f'{nfiles}x{file_mib} MiB up':>14} {f'{nfiles}x{file_mib} MiB down':>16}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:<16} {r['file_upload_MBps']:>12.1f} {r['file_download_MBps']:>14.1f} "
              f"{r['dir_upload_MBps']:>14.1f} {r['dir_download_MBps']:>16.1f}")
    print("(MB/s, 1 MB = 1e6 bytes, median of runs)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mib", type=int, default=200)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--file-mib", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--endpoint", default=None, help="S3 endpoint to measure instead of a local moto server")
    parser.add_argument("--bucket", default=None, help="existing bucket (with --endpoint); default: create one")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from boto3.s3.transfer import TransferConfig

    server = None
    if args.endpoint is None:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}.items():
            os.environ.setdefault(k, v)
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    else:
        endpoint = args.endpoint
    client = storage.s3_client(endpoint_url=endpoint)
    bucket = args.bucket or f"dapo-bench-{uuid.uuid4().hex[:8]}"
    if not args.bucket:
        client.create_bucket(Bucket=bucket)

    tuned = storage.transfer_config()
    configs = {"dapo (tuned)": tuned, "boto3 default": TransferConfig()}
    print(f"endpoint {endpoint}; tuned: part {tuned.multipart_chunksize // MiB} MiB from "
          f"{tuned.multipart_threshold // MiB} MiB, {tuned.max_concurrency} threads; "
          f"default: part 8 MiB, 10 threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="dapo-bench-s3-") as tmp:
        work = Path(tmp)
        big = work / "src" / "big.bin"
        _write_random(big, args.big_mib * MiB)
        folder = work / "src" / "dir"
        for i in range(args.files):
            _write_random(folder / f"shard-{i:03d}.bin", args.file_mib * MiB)
        try:
            rows = bench(client, bucket, work, configs, big, folder, args.repeats)
        finally:
            if server is not None:
                server.stop()
    _print_table(rows, args.big_mib, args.files, args.file_mib)
    if args.out:
        Path(args.out).write_text(json.dumps({"endpoint": endpoint, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
