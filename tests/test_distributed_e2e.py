"""A distributed run as local processes: exactly what the pods run (`dapo role ...`), on loopback.

1. `dapo run FILE --launcher processes` with 2 learner ranks (DistributedLearner over gloo),
   2 rollout replicas (HF engine, weight-sync receivers) and 1 reward replica (real RewardScorer):
   after every weight sync each replica's state checksum equals the learner's (learner-0 logs
   both per version to weight_sync.jsonl with DAPO_VERIFY_WEIGHT_SYNC=1), the replicas serve the
   final version whose weights equal the last checkpoint (checked here, independently, from the
   checkpoint's safetensors), metrics.jsonl holds the contract keys, and at the end every
   replica reports leaving the weight-sync group (POST /leave) and logs no c10d store error.
2. S3 end to end against moto's ThreadedMotoServer: data and checkpoints on s3://, the run is
   killed after its first checkpoint, resumed with DAPO_GANG_GENERATION=1 (--resume), and the
   prompts of every step equal those of an uninterrupted run.

The policy is a tiny random Qwen2 saved as a Hugging Face folder; it cannot do math, so every
response is wrong: the scores vary only through the overlong shaping (see `model_dir`) and
dynamic sampling is off (the data position advances the same way).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import _run_files
from _dapo_runs import final_checkpoint_weights, make_model, write_data
from _dapo_runs import role_env as shared_role_env

pytestmark = pytest.mark.processes  # `dapo run --launcher processes` and its role processes

CONTRACT_KEYS = ["step", "actor/pg_loss", "actor/pg_clipfrac", "actor/entropy", "critic/score/mean",
                 "train/acc/mean", "response_length/mean", "train/num_gen_batches", "timing_s/step"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-model"))


def role_env(extra: dict | None = None) -> dict:
    return shared_role_env({"DAPO_VERIFY_WEIGHT_SYNC": "1", **(extra or {})})


def dapo_run(run_file: Path, out: Path, *args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dapo.cli", "run", str(run_file), "--output-dir", str(out),
               "--launcher", "processes", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def steps_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "actor/pg_loss" in line]


def run_small(tmp_path: Path, model_dir: Path, *, learners: int, rollouts: int, steps: int, rollout: dict | None = None):
    """`dapo run --launcher processes` on 12 sum prompts, no checkpoints before the end; must exit 0.
    Returns (run file, output folder, the completed process)."""
    doc = _run_files.run_doc(preset="processes", model={"path": str(model_dir)},
                             data={"train": str(write_data(tmp_path / "train.jsonl", 12))},
                             learner={"replicas": learners, "totalSteps": steps}, rollout={"replicas": rollouts},
                             checkpoint={"everySteps": 0, "keep": 1})
    doc["spec"]["rollout"].update(rollout or {})
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    result = dapo_run(run_file, out, env=role_env())
    assert result.returncode == 0, result.stderr[-4000:]
    return run_file, out, result


def test_processes_launcher_two_learners_two_rollouts(tmp_path, model_dir):
    from dapo.weightsync import state_checksum

    _, out, result = run_small(tmp_path, model_dir, learners=2, rollouts=2, steps=3)

    steps = steps_of(out)
    assert [s["step"] for s in steps] == [1, 2, 3]
    for record in steps:
        assert not [k for k in CONTRACT_KEYS if k not in record], record
        assert record["train/weight_version"] == record["step"]

    syncs = [json.loads(line) for line in (out / "weight_sync.jsonl").read_text().splitlines()]
    assert [s["version"] for s in syncs] == [1, 2, 3]
    for sync in syncs:
        assert len(sync["replicas"]) == 2
        assert set(sync["replicas"].values()) == {sync["learner"]}, sync
    assert len({s["learner"] for s in syncs}) == 3  # the weights really changed every step

    # independent check: the final checkpoint's weights are what the replicas served last
    weights = final_checkpoint_weights(out, 3)
    assert state_checksum(weights) == syncs[-1]["learner"]

    for name in ("learner-0", "learner-1", "rollout-0", "rollout-1", "reward-0"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0
    assert "[rollout-1]" in result.stderr and "[learner-0]" in result.stderr
    assert "learner rank 1/2 following the controller" in (out / "logs" / "learner-1.log").read_text()
    for replica in ("rollout-0", "rollout-1"):  # they leave the group while its store is up: no c10d errors
        replica_log = (out / "logs" / f"{replica}.log").read_text()
        assert "left the weight-sync group" in replica_log and "recvValue failed" not in replica_log, replica_log[-3000:]


def test_processes_launcher_reports_the_failing_role(tmp_path, model_dir, run_doc):
    # a failure only the learner meets (its checkpoint store on an S3 endpoint nothing listens
    # on): what `dapo run`'s check sees (missing data, a bad model path) stops before any process
    doc = run_doc(preset="processes", model={"path": str(model_dir)},
                  data={"train": str(write_data(tmp_path / "train.jsonl", 8))},
                  learner={"totalSteps": 1}, checkpoint={"everySteps": 0, "uri": "s3://no-store/ckpt"})
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(doc))
    env = role_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                    "DAPO_S3_MAX_ATTEMPTS": "1"})
    result = dapo_run(run_file, tmp_path / "out", env=env, timeout=180)
    assert result.returncode != 0
    assert "learner-0 exited with code" in result.stderr and "s3://no-store/ckpt" in result.stderr


def test_process_gang_pins_the_listed_roles_to_their_cpus(tmp_path):
    """ProcessGang(cpus=...) pins a listed role kind's process to its CPU set, leaves the others
    on every CPU and gives the launching thread its CPUs back: each role process logs
    os.sched_getaffinity at start (before it reads its run file, missing here, so both then exit)."""
    from dapo.entry.processes import ProcessGang

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"this process may use only CPU {cpus[0]}: a pinned and an unpinned role would both "
                    "report it, so pinning cannot be told apart on this machine")
    envs = {name: {**role_env(), "DAPO_RUN_FILE": str(tmp_path / "missing.yaml")} for name in ("reward-0", "rollout-0")}
    gang = ProcessGang(envs, tmp_path, echo=lambda line: None, cpus={"reward": {cpus[-1]}})
    gang.start()
    assert os.sched_getaffinity(0) == set(cpus)  # the launching thread gets its own CPUs back
    try:
        for role in gang.roles:
            role.process.wait(60)
    finally:
        gang.stop()
    assert f"reward-0 runs on CPUs {cpus[-1]}\n" in (tmp_path / "logs" / "reward-0.log").read_text()
    assert f"rollout-0 runs on CPUs {','.join(map(str, cpus))}\n" in (tmp_path / "logs" / "rollout-0.log").read_text()


# --------------------------------------------------------------------------- S3: kill, resume


STEPS = 6  # a few steps of slack to kill the first attempt after a checkpoint, before the end
ALL_STEPS = range(1, STEPS + 1)


@pytest.fixture
def s3(tmp_path):
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pip install -e .[test])")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="bucket")
    yield client, env
    server.stop()


@pytest.mark.integration  # moto's S3 server and an uninterrupted in-process training as the reference
def test_s3_run_killed_after_a_checkpoint_resumes_at_the_same_data_position(tmp_path, model_dir, s3, monkeypatch,
                                                                            run_doc):
    client, s3_env = s3
    client.upload_file(str(write_data(tmp_path / "train.jsonl", 10)), "bucket", "data/train.jsonl")
    doc = run_doc(preset="processes", model={"path": str(model_dir)}, data={"train": "s3://bucket/data/train.jsonl"},
                  learner={"totalSteps": STEPS}, checkpoint={"uri": "s3://bucket/run", "everySteps": 1, "keep": STEPS})
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(doc))
    env = role_env({**s3_env, "DAPO_CACHE_DIR": str(tmp_path / "cache")})

    # the uninterrupted reference, in this process (same seeds, same data order)
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DAPO_CACHE_DIR", str(tmp_path / "cache-ref"))
    reference = reference_states(run_file, tmp_path / "ref")

    out = tmp_path / "out"
    killed = run_until_checkpoint(run_file, out, env, client)
    assert killed, "the run finished before it could be killed after a checkpoint"
    done = {int(line["step"]) for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    resumed = dapo_run(run_file, out, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from checkpoint step" in resumed.stderr

    steps = steps_of(out)
    assert [s["step"] for s in steps] == list(ALL_STEPS), done
    # the data position after every step (sampler epoch / position / order seed) equals the
    # uninterrupted run's, including the steps the resumed run re-did or did for the first time
    resumed_states = [s3_trainer_state(client, step) for step in ALL_STEPS]
    assert [s["sampler"] for s in resumed_states] == [s["sampler"] for s in reference]
    assert len({json.dumps(s["sampler"], sort_keys=True) for s in reference}) == STEPS  # it really moves
    assert [s["weight_version"] for s in resumed_states] == list(ALL_STEPS)


def s3_trainer_state(client, step: int) -> dict:
    """trainer_state.json of committed checkpoint ``step``: in the attempt folder its manifest names."""
    def read(key: str) -> dict:
        return json.loads(client.get_object(Bucket="bucket", Key=key)["Body"].read())

    manifest = read(f"run/step-{step:08d}/manifest.json")
    return read(f"run/step-{step:08d}/{manifest['attempt']}/trainer_state.json")


def run_until_checkpoint(run_file: Path, out: Path, env: dict, client) -> bool:
    """Start the processes launcher, SIGTERM it once a checkpoint is committed in S3 (before the
    last step): True when it was killed mid-run."""
    command = [sys.executable, "-m", "dapo.cli", "run", str(run_file), "--output-dir", str(out),
               "--launcher", "processes"]
    with open(out.parent / "first.log", "w") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                found = client.list_objects_v2(Bucket="bucket", Prefix="run/").get("Contents", [])
                if any(o["Key"].endswith("manifest.json") for o in found):
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
                    return proc.returncode != 0
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return False


def reference_states(run_file: Path, out: Path) -> list[dict]:
    """The controller state after each step of an uninterrupted in-process run."""
    from dapo.entry.inprocess import build_embedded_run
    from dapo.spec import load_run_file

    from _tiny_trainer import OverlapScorer

    run = load_run_file(run_file, ["spec.checkpoint.uri=" + str(out / "ck")])
    embedded = build_embedded_run(run, out, resume=False, scorer=OverlapScorer("wrong"))
    try:
        embedded.trainer.train()
    finally:
        embedded.close()
    from dapo.storage import CheckpointStore

    store = CheckpointStore(str(out / "ck"), keep=STEPS)
    return [json.loads((store.fetch(info) / "trainer_state.json").read_text()) for info in store.list_committed()]


# --------------------------------------------------------------------------- async rollout


@pytest.mark.integration  # and an uninterrupted in-process training as the reference
def test_processes_launcher_async_rollout_one_step_stale(tmp_path, model_dir):
    """maxStaleness 1 through the rollout service: learner-0's generator thread drives the
    replica; versions 1 and 2 reach it between collections (checksums equal the learner's), the
    batch of step s is trained one version stale from step 2 on, and the trained prompts equal an
    in-process run's with the same run file."""
    run_file, out, _ = run_small(tmp_path, model_dir, learners=1, rollouts=1, steps=4, rollout={"maxStaleness": 1})
    steps = steps_of(out)
    # means and fractions of equal integer lags: exact
    assert [s["async/version_lag_mean"] for s in steps] == [0, 1, 1, 1]
    assert [s["async/lag_1_frac"] for s in steps] == [0, 1, 1, 1]
    syncs = [json.loads(line) for line in (out / "weight_sync.jsonl").read_text().splitlines()]
    assert [s["version"] for s in syncs] == [1, 2]  # versions 3 and 4 generate nothing within 4 steps
    for sync in syncs:
        assert set(sync["replicas"].values()) == {sync["learner"]}, sync

    from dapo.entry.inprocess import build_embedded_run
    from dapo.spec import load_run_file

    from _tiny_trainer import OverlapScorer

    embedded = build_embedded_run(load_run_file(run_file, []), tmp_path / "ref", resume=False,
                                  scorer=OverlapScorer("wrong"))
    try:
        embedded.trainer.train()
    finally:
        embedded.close()
    reference = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
                 if "actor/pg_loss" in line]
    # dynamic sampling is off: the prompts follow the sampler alone, whatever floats the runs computed
    assert [s["train/prompt_uids_digest"] for s in steps] == [s["train/prompt_uids_digest"] for s in reference]
    assert [s["async/version_lag_mean"] for s in reference] == [0, 1, 1, 1]


def test_processes_launcher_exits_with_the_suspend_guardrails_code(tmp_path, model_dir):
    """A suspend guardrail tripping at step 1 (actor/lr above 0: always) stops learner-0 with
    GUARDRAIL_SUSPEND_EXIT_CODE, which the launcher passes on; learner-0's log ends with the bare
    guardrail line and no checkpoint of the tripped step was committed."""
    from dapo.contracts import GUARDRAIL_SUSPEND_EXIT_CODE

    doc = _run_files.run_doc(preset="processes", model={"path": str(model_dir)},
                             data={"train": str(write_data(tmp_path / "train.jsonl", 8))},
                             learner={"totalSteps": 3}, checkpoint={"everySteps": 1, "keep": 3},
                             guardrails=[{"metric": "actor/lr", "above": 0.0, "action": "suspend"}])
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    result = dapo_run(run_file, out, env=role_env())
    assert result.returncode == GUARDRAIL_SUSPEND_EXIT_CODE, result.stderr[-4000:]
    learner_log = (out / "logs" / "learner-0.log").read_text()
    # the last line is the bare one the operator reads from a stopped pod's log tail
    assert learner_log.strip().splitlines()[-1].startswith("guardrail: guardrail actor/lr above 0 tripped at step 1"), \
        learner_log[-3000:]
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*/manifest.json"))
