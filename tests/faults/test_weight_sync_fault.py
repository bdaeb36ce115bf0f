"""A weight-sync peer dying mid-broadcast: the sender (learner-0) raises WeightSyncError naming
the dead rank within a bounded time, never hangs. Real processes: two receivers run
`dapo.weightsync.WeightReceiver` in their own interpreters; one is SIGKILLed while it is
applying the buckets of version 1. What a run does next (learner-0 fails, the gang restarts
and resumes) is tests/faults/test_runtime_faults.py's weight-sync scenario."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from report import FaultResult, record

pytestmark = [pytest.mark.faults, pytest.mark.processes]  # receiver interpreters, one SIGKILLed

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 5.0

RECEIVER = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from dapo.weightsync import WeightReceiver, WeightSyncConfig
    rank, port, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    print("ready", flush=True)
    receiver = WeightReceiver(WeightSyncConfig(host="127.0.0.1", port=port, world_size=3, rank=rank,
                                               timeout_s=float(sys.argv[4]), bucket_bytes=4096))
    def load(batch):  # slow appliers: the broadcast of 40 buckets takes ~8 s
        with open(marker, "a") as fh:
            fh.write("bucket\\n")
        time.sleep(0.2)
    try:
        receiver.receive(load)
    except Exception as exc:
        print(f"receiver {rank}: {type(exc).__name__}: {exc}", flush=True)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_weight_sync_peer_killed_mid_broadcast_errors_in_bounded_time(tmp_path):
    from dapo.weightsync import WeightSender, WeightSyncConfig, WeightSyncError

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")]))
    markers = {rank: tmp_path / f"rank{rank}.buckets" for rank in (1, 2)}
    children = {rank: subprocess.Popen([sys.executable, "-c", RECEIVER, str(rank), str(port), str(markers[rank]),
                                        str(TIMEOUT_S)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True) for rank in (1, 2)}
    try:
        for child in children.values():  # importing torch on a loaded machine can take longer than the timeout
            assert child.stdout.readline().strip() == "ready"
        sender = WeightSender(WeightSyncConfig(host="127.0.0.1", port=port, world_size=3, rank=0,
                                               timeout_s=TIMEOUT_S, bucket_bytes=4096))
        tensors = [(f"layer.{i}.weight", torch.full((1024,), float(i))) for i in range(40)]
        killed = {}

        def kill_when_receiving() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (markers[2].exists() and markers[2].read_text().count("\n") >= 3):
                time.sleep(0.02)
            os.kill(children[2].pid, signal.SIGKILL)
            killed["at"] = time.monotonic()

        killer = threading.Thread(target=kill_when_receiving, daemon=True)
        killer.start()
        try:
            with pytest.raises(WeightSyncError) as caught:
                sender.send(tensors, 1)
            raised_at = time.monotonic()
        finally:
            sender.close()
        killer.join(5)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
            child.wait(10)
    buckets_before_kill = markers[2].read_text().count("\n")
    assert 3 <= buckets_before_kill < 40, "the kill must land mid-broadcast"
    error_s = raised_at - killed["at"]
    message = str(caught.value)
    assert re.search(r"rank 2 \(host", message), message
    # bounded: the dead peer is found by the heartbeat or the collective's timeout, never later
    assert error_s < 2 * TIMEOUT_S + 5, f"the sender took {error_s:.1f} s to notice"
    record(FaultResult("weight-sync peer dies mid-broadcast",
                       f"SIGKILL receiver rank 2 (of 2) after {buckets_before_kill} of 40 buckets, timeout_s={TIMEOUT_S:g}",
                       "real SIGKILL of a receiver process (sender and receivers only, no training run)",
                       "sender raised WeightSyncError naming rank 2 (host, pid, stopped heart-beating); no hang",
                       error_s, None, "", None,
                       "no training state; the gang restart that follows is the scenario "
                       "'weight-sync peer stops answering (gang restart)'", "weight sync peer"))
