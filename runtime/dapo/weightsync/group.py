"""The weight-sync process group: TCP-store rendezvous, heartbeats, bounded waits and the
diagnosis that names a dead peer (rank, host, address, pid, how far it got)."""

from __future__ import annotations

import datetime
import logging
import json
import os
import socket
import threading
import time

import torch
import torch.distributed as dist

from dapo.weightsync.config import WeightSyncConfig, WeightSyncError, resolve_backend

log = logging.getLogger("dapo.weightsync")

_STORE_PREFIX = "dapo-weight-sync"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

def first_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of an exception's text (c10d errors append long C++ traces)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit]


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _heartbeat_interval(timeout_s: float) -> float:
    """Beat often enough that a dead peer is spotted well inside one timeout."""
    return min(2.0, max(0.2, timeout_s / 20.0))


def _self_address() -> dict:
    """Host name, best-effort IP and pid of this process, for error messages."""
    host = socket.gethostname()
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        ip = "?"
    return {"host": host, "ip": ip, "pid": os.getpid()}

class Group:
    """Rendezvous, process group, heartbeats and peer naming shared by sender and receiver."""

    def __init__(self, config: WeightSyncConfig):
        self.config = config
        self.rank = config.rank
        self.world_size = config.world_size
        self.timeout = _timedelta(config.timeout_s)
        self.backend = resolve_backend(config.backend)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if self.backend == "nccl" else torch.device("cpu"))
        self.roster: dict[int, dict] = {}
        self.broken: str | None = None
        self._stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.store = self._connect_store()
        self._rendezvous()
        self.pg = self._make_process_group()
        if self.rank != 0:
            self._start_heartbeat()

    # -- rendezvous
    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def _connect_store(self) -> dist.Store:
        cfg = self.config
        try:
            raw = dist.TCPStore(cfg.host, cfg.port, None, self.rank == 0,
                                timeout=self.timeout, wait_for_workers=False)
        except Exception as exc:  # c10d raises DistNetworkError / DistStoreError / RuntimeError
            if self.rank == 0:
                raise WeightSyncError(
                    f"weight-sync sender (rank 0) could not serve its rendezvous store on port "
                    f"{cfg.port}: {first_line(exc)}. Pick a free port for the weight-sync "
                    "group (it must differ from the learner's MASTER_PORT).") from exc
            raise WeightSyncError(
                f"weight-sync rank {self.rank} could not reach the sender (learner rank 0) at "
                f"{self._where()} within {cfg.timeout_s:g} s: {first_line(exc)}. Check that "
                "learner rank 0 is running and that host/port are its weight-sync address.") from exc
        return dist.PrefixStore(_STORE_PREFIX, raw)

    def _rendezvous(self) -> None:
        me = _self_address()
        self.roster[self.rank] = me
        self.store.set(f"peer/{self.rank}", json.dumps(me))
        if self.rank == 0:
            self.store.set("meta", json.dumps({"backend": self.backend,
                                               "world_size": self.world_size}))
            deadline = time.monotonic() + self.config.timeout_s
            for rank in range(1, self.world_size):
                left = deadline - time.monotonic()
                try:
                    self.store.wait([f"peer/{rank}"], _timedelta(max(left, 0.01)))
                except Exception as exc:
                    missing = [r for r in range(rank, self.world_size)
                               if not self.store.check([f"peer/{r}"])]
                    raise WeightSyncError(
                        f"weight-sync sender at {self._where()}: rank(s) {missing} did not join "
                        f"within {self.config.timeout_s:g} s ({first_line(exc)}). Check that "
                        f"every rollout worker is up and configured with world_size="
                        f"{self.world_size} and this host/port.") from exc
                self.roster[rank] = json.loads(self.store.get(f"peer/{rank}"))
        else:
            try:
                meta = json.loads(self.store.get("meta"))
                self.roster[0] = json.loads(self.store.get("peer/0"))
            except Exception as exc:
                raise WeightSyncError(
                    f"weight-sync rank {self.rank}: the sender at {self._where()} did not publish "
                    f"its group settings within {self.config.timeout_s:g} s: "
                    f"{first_line(exc)}") from exc
            if meta["world_size"] != self.world_size or meta["backend"] != self.backend:
                raise WeightSyncError(
                    f"weight-sync rank {self.rank}: sender at {self._where()} uses "
                    f"world_size={meta['world_size']} backend={meta['backend']}, this rank "
                    f"world_size={self.world_size} backend={self.backend}; give every rank the "
                    "same world_size and backend")

    def _make_process_group(self):
        pg_store = dist.PrefixStore("pg", self.store)
        try:
            if self.backend == "gloo":
                opts = dist.ProcessGroupGloo._Options()
                opts._timeout = self.timeout
                opts._devices = [self._gloo_device()]
                return dist.ProcessGroupGloo(pg_store, self.rank, self.world_size, opts)
            if not hasattr(dist, "ProcessGroupNCCL"):
                raise WeightSyncError("backend 'nccl' needs a CUDA build of torch; use 'gloo'")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            return dist.ProcessGroupNCCL(pg_store, self.rank, self.world_size, opts)
        except WeightSyncError:
            raise
        except Exception as exc:
            raise WeightSyncError(
                f"weight-sync rank {self.rank}: creating the {self.backend} group via "
                f"{self._where()} failed: {first_line(exc)}. {self.peers_text()}") from exc

    def _gloo_device(self):
        """Bind gloo to GLOO_SOCKET_IFNAME if set, to loopback for a loopback group."""
        iface = os.environ.get("GLOO_SOCKET_IFNAME")
        if iface:
            return dist.ProcessGroupGloo.create_device(interface=iface.split(",")[0])
        if self.config.host in _LOOPBACK_HOSTS:
            return dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
        return dist.ProcessGroupGloo.create_default_device()

    # -- liveness and naming
    def _start_heartbeat(self) -> None:
        interval = _heartbeat_interval(self.config.timeout_s)
        key = f"alive/{self.rank}"

        def beat() -> None:
            while not self._stop.is_set():
                try:
                    self.store.add(key, 1)
                except Exception:  # store gone (sender died): receive() reports that
                    return
                self._stop.wait(interval)

        self._beat_thread = threading.Thread(target=beat, name="weight-sync-heartbeat",
                                             daemon=True)
        self._beat_thread.start()

    def describe(self, rank: int) -> str:
        """'rank 2 (host rollout-1, ip 10.0.0.5, pid 77)'."""
        info = self.roster.get(rank, {})
        text = (f"rank {rank} (host {info.get('host', '?')}, ip {info.get('ip', '?')}, "
                f"pid {info.get('pid', '?')}")
        if rank == 0:
            text += f", store {self._where()}"
        return text + ")"

    def peers_text(self) -> str:
        return "Group: " + "; ".join(self.describe(r) for r in sorted(self.roster)) + "."

    def set_progress(self, text: str) -> None:
        try:
            self.store.set(f"progress/{self.rank}", text)
        except Exception:
            pass  # diagnostics only; a dead store is reported by the collective itself

    def diagnose(self, version: int | None) -> str:
        """Name the peers that stopped beating, their progress and any error they posted."""
        if self.rank != 0:
            return self._diagnose_from_receiver()
        receivers = range(1, self.world_size)
        wait_s = 3 * _heartbeat_interval(self.config.timeout_s)
        try:
            self.store.set_timeout(_timedelta(2.0))
            first = {r: self.store.add(f"alive/{r}", 0) for r in receivers}
            time.sleep(wait_s)
            second = {r: self.store.add(f"alive/{r}", 0) for r in receivers}
        except Exception as exc:
            return f"(could not probe peers: {first_line(exc)}) {self.peers_text()}"
        dead = [r for r in receivers if first[r] == second[r]]
        parts = []
        if dead:
            parts.append("Peer(s) that stopped heart-beating (process gone or frozen): "
                         + "; ".join(self.describe(r) for r in dead) + ".")
        else:
            parts.append(f"All receivers still heart-beat; one is slow or stuck "
                         f"(e.g. in load_fn) past timeout_s={self.config.timeout_s:g}.")
        for r in receivers:
            progress = self._try_get(f"progress/{r}")
            error = self._try_get(f"err/{version}/{r}") if version is not None else None
            line = f"{self.describe(r)}: last applied {progress or 'nothing'}"
            parts.append(line + (f", reported error: {error}" if error else "") + ";")
        return " ".join(parts)

    def _diagnose_from_receiver(self) -> str:
        try:
            self.store.set_timeout(_timedelta(2.0))
            self.store.check(["meta"])
            return f"The sender {self.describe(0)} still serves its store (it may have failed " \
                   "on another peer or be stuck)."
        except Exception:
            return f"The sender {self.describe(0)} is gone (its store does not answer)."
        finally:
            try:
                self.store.set_timeout(self.timeout)
            except (RuntimeError, OSError) as exc:  # the store is gone: the diagnosis above says so
                log.debug("could not restore the store timeout: %s", exc)

    def _try_get(self, key: str) -> str | None:
        try:
            if self.store.check([key]):
                return self.store.get(key).decode()
        except (RuntimeError, OSError):  # a dead store has no note to add to the diagnosis
            return None
        return None

    # -- collectives, every one bounded and failing loudly
    def broadcast(self, tensor: torch.Tensor):
        """Post a broadcast from rank 0; a failure to even post it breaks the group too."""
        try:
            return self.pg.broadcast(tensor, 0, self.timeout)
        except Exception as exc:
            self.broken = f"posting a broadcast: {first_line(exc)}"
            raise WeightSyncError(
                f"weight sync on {self.describe(self.rank)} could not post a broadcast: "
                f"{first_line(exc)}. {self.peers_text()}") from exc

    def wait(self, work, what: str, version: int | None) -> None:
        try:
            work.wait(self.timeout)
        except Exception as exc:
            self.broken = f"{what}: {first_line(exc)}"
            raise WeightSyncError(
                f"weight sync of version {version} failed on {self.describe(self.rank)} during "
                f"{what} (timeout {self.config.timeout_s:g} s): {first_line(exc)}. "
                f"{self.diagnose(version)} The group is unusable now: close() every side and "
                "rendezvous again.") from exc

    def allgather(self, tensor: torch.Tensor, what: str, version: int | None) -> list[torch.Tensor]:
        outputs = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self.wait(self.pg.allgather(outputs, tensor, self.timeout), what, version)
        return outputs

    def check_usable(self) -> None:
        if self.broken is not None:
            raise WeightSyncError(
                f"weight-sync group on {self.describe(self.rank)} is broken by an earlier "
                f"failure ({self.broken}); close() and create a new sender/receiver")

    def close(self) -> None:
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)
        try:
            self.pg.shutdown()
        except Exception:
            pass  # shutting down a group whose peer died may itself fail; nothing to save
