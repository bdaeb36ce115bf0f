"""`dapo run FILE --launcher processes`: every role of a distributed run as a local process.

The processes run exactly what the pods run (`python -m dapo.cli role ROLE --config RUN_DIR/run.yaml`)
with the contract environment (dapo.contracts.role_environment) pointed at loopback and free ports:

    reward-0..K-1, rollout-0..M-1    HTTP services (DAPO_HTTP_PORT each)
    learner-0..N-1                   torch.distributed over MASTER_ADDR=127.0.0.1; learner-0 also
                                     serves /status and the weight-sync store

``--cpus ROLE=CPUS`` pins a role's processes to those CPUs (what a pod's CPU request and a static
CPU manager give it): ``--cpus learner=0 --cpus rollout,reward=1`` keeps the learner on a core of
its own, so a pipelined run (``maxStaleness`` >= 1) does not slow the learner with generation.

Each process's output goes to RUN_DIR/logs/ROLE-i.log and to this terminal with a ``[ROLE-i]``
prefix. The launcher waits for learner-0; when any process exits non-zero first (or learner-0
fails), it stops everything and exits with that role's status (128 + N for a role killed by
signal N) after printing the failing role's last log lines. Ctrl-C (or SIGTERM) stops every process too.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dapo.contracts import ROLES, Addresses, EnvVar, cache_dir, role_environment
from dapo.entry.inprocess import interrupt
from dapo.errors import ConfigError
from dapo.spec import DAPORun, dump_run

log = logging.getLogger("dapo.entry.inprocess")

TAIL_LINES = 40


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


_MAX_CPUS = 1 << 16
_CPU_RANGE = re.compile(r"^\s*([0-9]+)(?:-([0-9]+))?\s*$", re.ASCII)


def _cpu_list(text: str) -> set[int]:
    """``"0"``, ``"0,2"``, ``"1-3"`` (the kernel's cpuset list form) -> a set of CPU numbers;
    ValueError names the part that is not a CPU number or an ascending range."""
    cpus: set[int] = set()
    for part in text.split(","):
        match = _CPU_RANGE.match(part)
        if match is None:
            raise ValueError(f"{part!r} is not a CPU number or a range like 1-3")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"the range {part.strip()} runs backwards: write {hi}-{lo}")
        if hi >= _MAX_CPUS:  # checked before the range is expanded into a set
            raise ValueError(f"CPU {hi} cannot exist (Linux numbers CPUs below {_MAX_CPUS})")
        cpus.update(range(lo, hi + 1))
    return cpus


def parse_cpus(items: list[str], available: set[int] | None = None) -> dict[str, set[int]]:
    """The ``--cpus`` options (``ROLE[,ROLE]=CPUS``, repeatable) -> {role kind: CPU set}; a
    ConfigError names the option and the fix when a role or a CPU is not usable here. Every
    process of a role kind gets the same set (two learner ranks share ``learner``'s CPUs)."""
    if not items:
        return {}
    if available is None:
        if not hasattr(os, "sched_getaffinity"):
            raise ConfigError("--cpus pins processes with the Linux CPU-affinity call, which this system lacks: "
                              "leave --cpus out")
        available = set(os.sched_getaffinity(0))
    pinned: dict[str, set[int]] = {}
    for item in items:
        roles, sep, cpu_text = item.partition("=")
        if not sep:
            raise ConfigError(f"--cpus {item}: use ROLE=CPUS with CPUS like 0, 0,2 or 1-3 "
                              f"(e.g. --cpus learner=0 --cpus rollout,reward=1)")
        try:
            cpus = _cpu_list(cpu_text)
        except ValueError as exc:
            raise ConfigError(f"--cpus {item}: {exc} (CPUS is like 0, 0,2 or 1-3)") from None
        if cpus - available:
            missing = sorted(cpus - available)
            raise ConfigError(f"--cpus {item}: CPUs {missing[:8]}{' ...' if len(missing) > 8 else ''} are not "
                              f"available to this process (it may use {sorted(available)}); pick from those")
        for role in (r.strip() for r in roles.split(",")):
            if role not in ROLES:
                raise ConfigError(f"--cpus {item}: unknown role {role!r}; roles are {', '.join(ROLES)}")
            if role in pinned:
                raise ConfigError(f"--cpus {item}: {role} is pinned by an earlier --cpus too; give each role once")
            pinned[role] = cpus
    return pinned


def _start_on(cpus: set[int] | None, command: list[str], **popen_args) -> subprocess.Popen:
    """Popen with the child's CPU affinity set to ``cpus`` from its first instruction: the
    affinity of this (launching) thread is what a forked child inherits, so it is switched around
    the fork and restored; torch's thread pool and the reward workers the child starts later
    inherit the child's. (Setting the child's affinity after Popen would race its start-up.)"""
    if not cpus:
        return subprocess.Popen(command, **popen_args)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)  # 0 = the calling thread only, on Linux
    try:
        return subprocess.Popen(command, **popen_args)
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class RoleProcess:
    """One launched role: its name (``rollout-1``), process and the last lines it printed."""

    name: str
    env: dict
    process: subprocess.Popen | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    pump: threading.Thread | None = None


def process_env(run: DAPORun, run_dir: Path, *, resume: bool, base_env: dict | None = None,
                ports: dict | None = None) -> dict[str, dict]:
    """The environment of every role process, by name (``learner-0``, ``rollout-1``, ...):
    the contract variables with loopback addresses and free ports."""
    spec = run.spec
    counts = {"learner": spec.learner.replicas, "rollout": spec.rollout.replicas, "reward": spec.reward.replicas}
    if ports is None:
        need = counts["rollout"] + counts["reward"] + 3
        pool = free_ports(need)
        ports = {"master": pool[0], "weight_sync": pool[1], "status": pool[2],
                 "rollout": pool[3:3 + counts["rollout"]], "reward": pool[3 + counts["rollout"]:]}
    base = dict(os.environ if base_env is None else base_env)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        base.pop(name, None)  # a launcher started under torchrun must not leak its own rank
    common = {
        EnvVar.RUN_DIR: str(run_dir), EnvVar.HTTP_HOST: "127.0.0.1",
        EnvVar.STATUS_GRACE_S: base.get(EnvVar.STATUS_GRACE_S, "0"),
        "PYTHONUNBUFFERED": "1",
    }
    if spec.storage.endpoint_url and not base.get("AWS_ENDPOINT_URL"):
        common["AWS_ENDPOINT_URL"] = spec.storage.endpoint_url
    if spec.storage.region and not base.get("AWS_REGION"):
        common["AWS_REGION"] = spec.storage.region
    addresses = Addresses(host=lambda role, index: "127.0.0.1",
                          http_port=lambda role, index: ports["status"] if role == "learner" else ports[role][index],
                          dist_port=ports["master"], weight_sync_port=ports["weight_sync"])
    envs: dict[str, dict] = {}
    for role in ("reward", "rollout", "learner"):
        for i in range(counts[role]):
            contract = role_environment(
                run_name=run.metadata.name, namespace="local", role=role, index=i, replicas=counts,
                run_file=str(run_dir / "run.yaml"), gang_generation=1 if resume else 0,
                checkpoint_uri=spec.checkpoint.uri or str(run_dir / "checkpoints"),
                cache_dir=str(cache_dir(spec.storage, base)), addresses=addresses)
            envs[f"{role}-{i}"] = {**base, **common, **contract,
                                   EnvVar.HTTP_PORT: str(addresses.http_port(role, i))}
    return envs


def _pump(role: RoleProcess, log_path: Path, echo) -> None:
    """Copy a process's output to its log file and (prefixed) to ``echo``, keeping a tail."""
    with log_path.open("a", encoding="utf-8", errors="replace") as fh:
        for raw in iter(role.process.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            role.tail.append(line)
            fh.write(line + "\n")
            fh.flush()
            if echo is not None:
                echo(f"[{role.name}] {line}")


class ProcessGang:
    """Start, watch and stop the role processes of one local run."""

    def __init__(self, envs: dict[str, dict], run_dir: Path, *, echo=None, cpus: dict[str, set[int]] | None = None):
        self.roles = [RoleProcess(name, env) for name, env in envs.items()]
        self.cpus = cpus or {}
        self.log_dir = run_dir / "logs"
        self.echo = echo if echo is not None else (lambda line: print(line, file=sys.stderr, flush=True))

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for role in self.roles:
            kind = role.name.rsplit("-", 1)[0]
            command = [sys.executable, "-m", "dapo.cli", "role", kind, "--config", role.env[EnvVar.RUN_FILE]]
            # own session: a stop signal reaches the role's helpers (reward workers) too
            role.process = _start_on(self.cpus.get(kind), command, env=role.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            role.pump = threading.Thread(target=_pump, args=(role, self.log_dir / f"{role.name}.log", self.echo),
                                         name=f"log-{role.name}", daemon=True)
            role.pump.start()
            log.info("started %s (pid %d)", role.name, role.process.pid)

    def role(self, name: str) -> RoleProcess:
        return next(r for r in self.roles if r.name == name)

    def wait(self, leader: str = "learner-0", poll_s: float = 0.2) -> tuple[int, RoleProcess | None]:
        """Until the leader exits or another role fails: (exit code, the failing role or None)."""
        lead = self.role(leader)
        while True:
            code = lead.process.poll()
            if code is not None:
                return code, (lead if code != 0 else None)
            for role in self.roles:
                if role is lead:
                    continue
                other = role.process.poll()
                # a service or a follower rank that stops before the controller is a failure, even with 0
                if other is not None and not role.name.startswith("learner"):
                    return (other or 1), role
                if other not in (None, 0):
                    return other, role
            time.sleep(poll_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every running role's process group, SIGKILL what is left after ``grace_s``."""
        running = [r for r in self.roles if r.process is not None and r.process.poll() is None]
        for role in running:
            _signal_group(role.process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for role in running:
            try:
                role.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(role.process, signal.SIGKILL)
                role.process.wait(5)
        for role in self.roles:
            if role.process is not None:
                # the reward workers of a finished role may still hold the pipe: kill the group
                _signal_group(role.process, signal.SIGKILL)
            if role.pump is not None:
                role.pump.join(2)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the group this launcher created for this role (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def exit_status(code: int) -> int:
    """The launcher's exit status for a role that ended with Popen return code ``code``: the
    shell's convention, 128 + N for a role killed by signal N (137 for SIGKILL: what a shell or
    Kubernetes shows for an OOM kill), the role's own status otherwise, and never 0 for a failure
    (a negative code passed straight through would come out as 256 - N, e.g. 247)."""
    if code < 0:
        return 128 - code
    return code or 1


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


def failure_report(role: RoleProcess, code: int) -> str:
    lines = "\n".join(f"    {line}" for line in role.tail)
    return f"{role.name} {describe_exit(code)}; its last log lines:\n{lines}"


def preflight(run: DAPORun) -> None:
    """Fail before starting any process when the model cannot be found (SpecError naming the
    field). Staging / building it here also means the role processes find it in the cache
    instead of fetching it N times at once."""
    from dapo.model.loading import resolve_model_dir

    # the folder every role process will use (role_environment hands them the same one)
    resolve_model_dir(run.spec.model, cache_dir(run.spec.storage, dict(os.environ)))


def run_processes(run: DAPORun, run_dir: Path, *, resume: bool, cpus: dict[str, set[int]] | None = None) -> int:
    """Run every role as a local process (see the module docstring); returns the exit code.
    ``cpus`` pins each listed role kind's processes to a CPU set (parse_cpus)."""
    from dapo.controller.metrics import remove_handlers, setup_run_logging

    from dapo.wiring import refuse_lora_in_remote_vllm

    refuse_lora_in_remote_vllm(run.spec)  # before any process starts
    preflight(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers = setup_run_logging(run_dir)
    gang = None
    try:
        (run_dir / "run.yaml").write_text(dump_run(run))
        previous = signal.signal(signal.SIGTERM, interrupt)
        gang = ProcessGang(process_env(run, run_dir, resume=resume), run_dir, cpus=cpus)
        log.info("run %s -> %s: %d learner, %d rollout, %d reward processes (logs in %s)", run.metadata.name,
                 run_dir.resolve(), run.spec.learner.replicas, run.spec.rollout.replicas, run.spec.reward.replicas,
                 gang.log_dir)
        gang.start()
        code, failed = gang.wait()
        if failed is not None:
            gang.stop()
            log.error("the run failed: %s", failure_report(failed, code))
            return exit_status(code)
        log.info("done; metrics in %s", run_dir / "metrics.jsonl")
        return 0
    except KeyboardInterrupt:
        log.error("interrupted: stopping every role process")
        return 130
    finally:
        if gang is not None:
            gang.stop()
            signal.signal(signal.SIGTERM, previous)
        remove_handlers(handlers)

