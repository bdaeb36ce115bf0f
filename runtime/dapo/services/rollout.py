"""Rollout replica service and the controller's client for many replicas.

Service (aiohttp), one per rollout pod / process, wrapping one `RolloutEngine`:

The bodies are the models of `dapo.contracts` (validated on both sides):

    POST /generate  GenerateRequest {"prompts": [[token ids]], "n", "temperature", "top_p",
                    "max_new_tokens", "seed"} -> GenerateAnswer {"weight_version", "prompt_index":
                    [...], "response_ids": [[...]], "log_probs": [[...]], "finish_reason": [...]}
                    (columns: compact JSON)
    POST /sync      SyncRequest {"version": V} -> SyncAnswer {"version": V, "checksum": str | null,
                    "replica": i}
                    The controller announces weight version V: the replica joins the weight-sync
                    group on its first sync (rank = replica index + 1), receives V in a worker
                    thread, applies it to the engine and answers. Generation waits only while
                    the received tensors are copied into the engine (the receive itself overlaps).
    POST /leave     {} -> LeaveAnswer {"left": bool, "replica": i}: leave the weight-sync group (the controller's close()
                    asks every replica before it closes the group's store); a later /sync joins a
                    group again (a restarted controller's).
    GET  /version   SyncAnswer {"version", "checksum", "replica"}: the weights generate() uses now.
    GET  /healthz   {"ok": true, ...}

Weight sync as the controller runs it (`RemoteRolloutEngine.update_weights`, called by the
Trainer after every update and by the checkpoint restore):

    1. POST /sync {"version": V} to every replica at once (each answers when it has applied V);
    2. `WeightSender.send(learner.named_parameters_for_sync(), V)` (the first call also creates
       the sender, i.e. serves the group's TCP store and waits for every replica to join);
    3. collect the /sync answers: every replica must report V (and, when verification is on, a
       state checksum equal to the learner's), else the sync fails naming the replica.

`RemoteRolloutEngine.generate` cuts the prompts into one contiguous chunk per replica (chunk k
sampled with seed `chunk_seed(seed, start_k)`, so a retry on another replica with the same
weights gives the same samples) and retries a failed chunk on another replica.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import torch

from pydantic import ValidationError

from dapo.contracts import (GenerateAnswer, GenerateRequest, LeaveAnswer, SyncAnswer, SyncRequest,
                            contract_violation)
from dapo.controller.threads import thread_budget
from dapo.rollout.base import RolloutEngine, Sample
from dapo.model.lora import adapter_parameters, is_lora
from dapo.services.http import (REPLICA_LIVENESS_S, ReplicaPool, RequestThreads, RetryableError, ServiceError, get_json,
                               post_json, split_evenly)
from dapo.weightsync import WeightReceiver, WeightSender, WeightSyncConfig, WeightSyncError, state_checksum

log = logging.getLogger("dapo.services.rollout")

_SEED_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads chunk starts over the seed space
_SEED_MOD = 2**63 - 1


def chunk_seed(seed: int, start: int) -> int:
    """Seed of the chunk whose first prompt is ``start``: ``seed`` itself for the first chunk (one
    replica samples exactly what an in-process engine samples), ``(seed XOR start * phi64) mod
    (2^63 - 1)`` otherwise."""
    return int(seed) if start == 0 else (int(seed) ^ (start * _SEED_MIX)) % _SEED_MOD


def engine_checksum(engine) -> str | None:
    """SHA-256 of the engine's named parameters (`dapo.weightsync.state_checksum`), comparable
    with the learner's `named_parameters_for_sync()`; None for engines that hold no torch module
    (an engine may offer its own ``state_checksum()``)."""
    own = getattr(engine, "state_checksum", None)
    if callable(own):
        return own()
    model = getattr(engine, "model", None)
    if isinstance(model, torch.nn.Module):
        # a LoRA policy receives its adapters only (the learner's named_parameters_for_sync): hash those
        return state_checksum(dict(adapter_parameters(model) if is_lora(model) else model.named_parameters()))
    return None


# --------------------------------------------------------------------------- wire format


def samples_to_wire(samples: Sequence[Sample], version: int) -> dict:
    """A /generate answer (`dapo.contracts.GenerateAnswer`, validated here before it is sent)."""
    return GenerateAnswer(weight_version=int(version), prompt_index=[s.prompt_index for s in samples],
                          response_ids=[s.response_ids for s in samples], log_probs=[s.log_probs for s in samples],
                          finish_reason=[s.finish_reason for s in samples]).wire()


def samples_from_wire(doc, index_offset: int = 0) -> list[Sample]:
    """The samples of a /generate answer (`dapo.contracts.GenerateAnswer`), each stamped with the
    answer's ``weight_version``. The behaviour log-probs are the learner's rollout-correction
    input: one per response token, finite and <= 0, or the answer is refused (RetryableError:
    retried on another replica)."""
    try:
        answer = GenerateAnswer.model_validate(doc)
    except ValidationError as exc:
        raise RetryableError(f"generate answer does not follow the contract: {contract_violation(exc)}") from None
    return [Sample(prompt_index=i + index_offset, response_ids=ids, log_probs=probs, finish_reason=reason,
                   weight_version=answer.weight_version)
            for i, ids, probs, reason in zip(answer.prompt_index, answer.response_ids, answer.log_probs,
                                             answer.finish_reason)]


def parse_generate_request(doc) -> GenerateRequest:
    """Validate a /generate body (`dapo.contracts.GenerateRequest`); ValueError names the bad field."""
    try:
        return GenerateRequest.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(contract_violation(exc)) from None


# --------------------------------------------------------------------------- the service


class RolloutService:
    """One replica: an engine, its lock, and (lazily) its place in the weight-sync group."""

    def __init__(self, engine: RolloutEngine, *, sync_config: WeightSyncConfig | None, replica: int = 0):
        self.engine = engine
        self.sync_config = sync_config
        self.replica = replica
        self.receiver: WeightReceiver | None = None
        self.engine_lock = threading.Lock()  # generate and weight loading never overlap
        self.syncing = threading.Lock()  # one sync at a time
        self.checksum = engine_checksum(engine)
        self._engine_joined = False
        # one thread for generation (an engine is not reentrant), one for the weight receive
        self._gen_pool = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._sync_pool = ThreadPoolExecutor(1, thread_name_prefix="weight-sync")

    # -- work done in the worker threads
    def generate(self, request: GenerateRequest) -> dict:
        thread_budget().apply()  # this thread's torch threads (dapo.controller.threads)
        with self.engine_lock:
            samples = self.engine.generate(request.prompts, n=request.n, temperature=request.temperature,
                                           top_p=request.top_p, max_new_tokens=request.max_new_tokens,
                                           seed=request.seed)
            return samples_to_wire(samples, self.engine.weight_version)

    def sync(self, version: int) -> dict:
        """Join the group (first time), receive weight ``version`` and load it into the engine."""
        if self.sync_config is None:
            raise WeightSyncError("this rollout replica has no weight-sync group: set DAPO_WEIGHT_SYNC_ADDR "
                                  "(host:port of learner-0's weight-sync store)")
        if hasattr(self.engine, "receive_weights"):
            return self._sync_inside_engine(version)
        if self.receiver is None:
            log.info("joining the weight-sync group at %s:%d as rank %d of %d", self.sync_config.host,
                     self.sync_config.port, self.sync_config.rank, self.sync_config.world_size)
            self.receiver = WeightReceiver(self.sync_config)
        received: list[tuple[str, torch.Tensor]] = []
        # bucket views are valid only inside the callback: keep copies, load them all at once so
        # the engine never serves a half-updated model
        t0 = time.perf_counter()
        got = self.receiver.receive(lambda batch: received.extend((n, t.clone()) for n, t in batch))
        if got != version:
            raise WeightSyncError(f"the controller announced weight version {version} but the sender sent {got}")
        t1 = time.perf_counter()
        with self.engine_lock:
            self.engine.update_weights(received, got)
        self.checksum = engine_checksum(self.engine)
        log.info("weight version %d applied (%d tensors; receive %.2fs, load %.2fs)", got, len(received), t1 - t0,
                 time.perf_counter() - t1)
        return SyncAnswer(version=got, checksum=self.checksum, replica=self.replica).wire()

    def _sync_inside_engine(self, version: int) -> dict:
        """Engines whose weights live in another process (vLLM's GPU worker) join the group and
        receive there (`VLLMEngine.join_weight_sync` / `receive_weights`): the receive loads
        straight into the model, so generation waits for the whole sync. The checksum is the one
        the worker computed over the state it received and loaded (vLLM's own parameters are
        fused / repacked and cannot be hashed against the learner's)."""
        cfg = self.sync_config
        t0 = time.perf_counter()
        with self.engine_lock:
            if not self._engine_joined:
                self.engine.join_weight_sync(cfg.host, cfg.port, cfg.world_size, cfg.rank, cfg.backend, cfg.timeout_s,
                                             cfg.bucket_bytes, verify_checksums=cfg.verify_checksums)
                self._engine_joined = True
            got = self.engine.receive_weights()
        if got != version:
            raise WeightSyncError(f"the controller announced weight version {version} but the sender sent {got}")
        self.checksum = engine_checksum(self.engine)
        phases = getattr(self.engine, "sync_timings", {})
        log.info("weight version %d applied inside the engine in %.2fs (%s)", got, time.perf_counter() - t0,
                 ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) or "no phase timings")
        return SyncAnswer(version=got, checksum=self.checksum, replica=self.replica).wire()

    def leave_weight_sync(self) -> dict:
        """Leave the weight-sync group (POST /leave); a later /sync joins a new one. The learner
        asks before it closes the group's store at the end of a run: a receiver that stays in the
        group keeps beating against that store, and its first beat after the store is gone makes
        torch print a c10d stack trace into a run that succeeded."""
        was_in = self.receiver is not None or self._engine_joined
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        if self._engine_joined:
            with self.engine_lock:  # the worker's group is reached through the engine, as in a sync
                self.engine.leave_weight_sync()
            self._engine_joined = False
        if was_in:
            log.info("left the weight-sync group")
        return LeaveAnswer(left=was_in, replica=self.replica).wire()

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
        self._gen_pool.shutdown(wait=False, cancel_futures=True)
        self._sync_pool.shutdown(wait=False, cancel_futures=True)

    # -- aiohttp
    def make_app(self):
        from aiohttp import web

        async def one_at_a_time(what: str, fn, *args):
            """Run a group operation (sync, leave) in the weight-sync thread; 409 while another runs."""
            if not self.syncing.acquire(blocking=False):
                return web.json_response({"error": "a weight sync is already running on this replica"}, status=409)
            try:
                answer = await _in_thread(self._sync_pool, fn, *args)
            except Exception as exc:  # noqa: BLE001 - the controller reports it
                log.exception("%s failed", what)
                return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=500)
            finally:
                self.syncing.release()
            return web.json_response(answer)

        async def generate(request):
            try:
                parsed = parse_generate_request(await request.json())
            except (ValueError, json.JSONDecodeError) as exc:
                return web.json_response({"error": f"bad /generate request: {exc}"}, status=400)
            try:
                answer = await _in_thread(self._gen_pool, self.generate, parsed)
            except Exception as exc:  # noqa: BLE001 - the client retries elsewhere or reports it
                log.exception("generate failed")
                return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=500)
            return web.json_response(answer, dumps=_dumps)

        async def sync(request):
            try:
                version = SyncRequest.model_validate(await request.json()).version
            except (ValidationError, json.JSONDecodeError) as exc:
                detail = contract_violation(exc) if isinstance(exc, ValidationError) else str(exc)
                return web.json_response({"error": f"bad /sync request: {detail}"}, status=400)
            return await one_at_a_time(f"weight sync {version}", self.sync, version)

        async def leave(_request):
            return await one_at_a_time("leaving the weight-sync group", self.leave_weight_sync)

        async def version(_request):
            return web.json_response(SyncAnswer(version=self.engine.weight_version, checksum=self.checksum,
                                                replica=self.replica).wire())

        async def healthz(_request):
            return web.json_response({"ok": True, "role": "rollout", "replica": self.replica,
                                      "version": self.engine.weight_version})

        app = web.Application(client_max_size=256 << 20)
        app.add_routes([web.post("/generate", generate), web.post("/sync", sync), web.post("/leave", leave),
                        web.get("/version", version), web.get("/healthz", healthz)])
        return app


async def _in_thread(pool, fn, *args):
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


# --------------------------------------------------------------------------- the client


class RemoteRolloutEngine(RolloutEngine):
    """`RolloutEngine` over rollout replicas (see the module docstring for generate and sync).

    ``sync_config``: the sender side of the weight-sync group (rank 0, world 1 + replicas).
    ``verify``: compare every replica's state checksum with the learner's after each sync (and
    send CRC-32 per tensor); ``sync_log``: a JSONL file that gets one line per sync with the
    learner's and every replica's checksum (tests and audits read it)."""

    def __init__(self, urls: Sequence[str], *, sync_config: WeightSyncConfig | None = None, max_retries: int = 2,
                 request_timeout_s: float = 3600.0, verify: bool = False, sync_log: str | os.PathLike | None = None,
                 initial_version: int = 0, liveness_s: float | None = REPLICA_LIVENESS_S):
        if not urls:
            raise ServiceError("RemoteRolloutEngine needs at least one rollout replica URL (DAPO_ROLLOUT_URLS)")
        self.pool = ReplicaPool(urls, "rollout", liveness_s=liveness_s)
        self.sync_config = sync_config
        self.max_retries = max_retries
        self.request_timeout_s = request_timeout_s
        self.verify = verify
        self.sync_log = sync_log
        self._version = int(initial_version)
        self._sender: WeightSender | None = None
        self._threads = RequestThreads("rollout-client")
        self.last_sync: dict | None = None

    @property
    def urls(self) -> list[str]:
        return self.pool.urls

    @property
    def weight_version(self) -> int:
        return self._version

    def wait_ready(self, timeout_s: float) -> None:
        self.pool.wait_ready(timeout_s)

    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed) -> list[Sample]:
        chunks = split_evenly(len(prompts), len(self.urls))
        futures = [self._threads.submit(self._generate_chunk, k, start, stop, prompts, n, temperature, top_p,
                                        max_new_tokens, seed) for k, (start, stop) in enumerate(chunks)]
        samples: list[Sample] = []
        for future in futures:  # chunk order = prompt order: the n samples of a prompt stay together
            samples.extend(future.result())
        return samples

    def _generate_chunk(self, k, start, stop, prompts, n, temperature, top_p, max_new_tokens, seed) -> list[Sample]:
        payload = GenerateRequest(prompts=[list(map(int, p)) for p in prompts[start:stop]], n=int(n),
                                  temperature=float(temperature), top_p=float(top_p),
                                  max_new_tokens=int(max_new_tokens), seed=chunk_seed(seed, start)).wire()

        def attempt(url: str) -> list[Sample]:
            doc = post_json(url + "/generate", payload, self.request_timeout_s)
            if doc.get("weight_version") != self._version:
                raise RetryableError(f"{url} serves weight version {doc.get('weight_version')}, the controller "
                                     f"expects {self._version} (a restarted replica that missed a sync?)")
            samples = samples_from_wire(doc, index_offset=start)
            if len(samples) != (stop - start) * n:
                raise RetryableError(f"{url} returned {len(samples)} samples for {stop - start} prompts x n={n}")
            return samples

        return self.pool.call(f"generate (prompts {start}..{stop - 1})", k, attempt, self.max_retries)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Announce version V to every replica, broadcast the tensors, check every replica applied V."""
        if self.sync_config is None:
            raise WeightSyncError("RemoteRolloutEngine has no weight-sync group: set DAPO_WEIGHT_SYNC_ADDR on learner-0")
        version = int(version)
        items = named_tensors
        learner_checksum = None
        if self.verify:
            # copies: a ZeRO-3 learner's gathered tensors are valid only until the iterator advances
            items = [(name, tensor.detach().clone()) for name, tensor in named_tensors]
            learner_checksum = state_checksum(items)
        t0 = time.perf_counter()
        timeout = self.sync_config.timeout_s + 60.0
        announces = {url: self._threads.submit(post_json, url + "/sync", SyncRequest(version=version).wire(), timeout)
                     for url in self.urls}
        try:
            if self._sender is None:
                log.info("serving the weight-sync group on port %d for %d rollout replicas", self.sync_config.port,
                         len(self.urls))
                self._sender = WeightSender(self.sync_config)
            stats = self._sender.send(items, version)
        except Exception as exc:
            raise WeightSyncError(f"{exc}{self._announce_errors(announces, wait_s=5.0)}") from exc
        replicas = {}
        problems = []
        for url, future in announces.items():
            try:
                answer = SyncAnswer.model_validate(future.result(timeout=timeout))
            except ServiceError as exc:
                problems.append(f"{url}: {exc}")
                continue
            except ValidationError as exc:
                problems.append(f"{url}: its /sync answer does not follow the contract: {contract_violation(exc)}")
                continue
            replicas[url] = answer.checksum
            if answer.version != version:
                problems.append(f"{url} reports version {answer.version} after the sync of {version}")
            elif self.verify and answer.checksum is None:
                log.warning("%s cannot report a state checksum (engine without a torch module): not verified", url)
            elif self.verify and answer.checksum != learner_checksum:
                problems.append(f"{url} holds weights with checksum {answer.checksum}, the learner's are "
                                f"{learner_checksum} (the replica's model differs from the learner's)")
        if problems:
            raise WeightSyncError(f"weight version {version} was not applied by every rollout replica: "
                                  + "; ".join(problems))
        self._version = version
        self.last_sync = {"version": version, "learner": learner_checksum, "replicas": replicas,
                          "bytes": stats.bytes, "seconds": time.perf_counter() - t0}
        if self.sync_log is not None:
            with open(self.sync_log, "a") as fh:
                fh.write(json.dumps(self.last_sync) + "\n")
        log.info("weight version %d on %d rollout replicas: %.1f MB in %.2fs%s", version, len(self.urls),
                 stats.bytes / 1e6, self.last_sync["seconds"], ", checksums equal" if self.verify else "")

    @staticmethod
    def _announce_errors(announces: dict, wait_s: float) -> str:
        """The /sync answers that already failed (names the replica when the send timed out)."""
        notes = []
        deadline = time.monotonic() + wait_s
        for url, future in announces.items():
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except ServiceError as exc:
                notes.append(f"{url}: {exc}")
            except concurrent.futures.TimeoutError:  # still running: nothing to add yet
                pass
            except Exception as exc:  # noqa: BLE001 - any other failure of the announce is worth naming
                notes.append(f"{url}: {type(exc).__name__}: {exc}")
        return (" Replica answers: " + "; ".join(notes)) if notes else ""

    def replica_versions(self) -> dict[str, dict]:
        """GET /version of every replica."""
        return {url: get_json(url + "/version", 30.0) for url in self.urls}

    def close(self) -> None:
        if self._sender is not None:
            # the replicas leave the group before its store (hosted by this sender) closes
            leaves = [self._threads.submit(post_json, url + "/leave", {}, 10.0) for url in self.urls]
            for url, future in zip(self.urls, leaves):
                try:
                    future.result(timeout=15.0)
                except Exception as exc:  # noqa: BLE001 - the run is over; a replica that is gone is fine
                    log.info("%s did not leave the weight-sync group (%s); closing it anyway", url, exc)
            self._sender.close()
            self._sender = None

