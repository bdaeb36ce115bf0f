"""Fault injection over the local multi-process launcher (`dapo run FILE --launcher processes`):
real role processes, real SIGKILLs, S3 faults through a real HTTP proxy in front of moto.

Each scenario ends with the run recovered and nothing lost: the launcher fails loudly naming the
role (or, for transient S3 faults, the run never notices beyond retries), `dapo run FILE --resume
--launcher processes` continues from the last committed checkpoint (what the operator's gang
restart does with DAPO_GANG_GENERATION > 0), and every training step's prompts (uid digest) and
data position (sampler state) equal an uninterrupted run's, each step exactly once.
"""

from __future__ import annotations

import re
import threading
import time
import uuid

import pytest

from _harness import (
    PROMPTS, STEPS, Launch, data_lost, local_manifest, local_state_reader, make_model, reference_records, role_env,
    run_doc, run_records, s3_state_reader, steps_done, wait_for, write_data, write_run_file,
)
from report import FaultResult, record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, train_file):
    """Per-step uid digests and sampler states of an uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    run_file = write_run_file(folder / "run.yaml", run_doc(model_dir, str(train_file)))
    records = reference_records(run_file, folder / "out")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert len({r["uids"] for r in records}) == STEPS, "every step must train other prompts"
    return records


@pytest.fixture(scope="module")
def moto():
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pip install -e .[test])")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    yield host, port, client
    server.stop()


@pytest.fixture
def bucket(moto):
    name = f"faults-{uuid.uuid4().hex[:10]}"
    moto[2].create_bucket(Bucket=name)
    return name


def s3_env(endpoint: str, **extra: str) -> dict:
    return role_env({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": endpoint, **extra})


def s3_manifest(client, bucket: str, step: int) -> bool:
    found = client.list_objects_v2(Bucket=bucket, Prefix=f"run/step-{step:08d}/manifest.json").get("Contents", [])
    return bool(found)


def resume_and_check(run_file, out, env, reference, read_state, *, injected_at: float, interrupted: int):
    """`--resume` the run; the time the interrupted step is done again; the data lost."""
    stale = interrupted in steps_done(out)  # trained but not checkpointed: resume drops that line first
    resumed = Launch(run_file, out, env, "--resume", name="resume")
    wait_for(lambda: "resumed from checkpoint step" in resumed.text() or resumed.proc.poll() is not None, 180,
             "the resumed run to load its checkpoint")
    if stale:
        wait_for(lambda: "metrics.jsonl: dropped" in resumed.text() or resumed.proc.poll() is not None, 60,
                 "the resumed run to drop the re-done steps from metrics.jsonl")
    recovered_at = resumed.wait_for_step(interrupted)
    code = resumed.wait(180)
    assert code == 0, resumed.text()[-4000:]
    match = re.search(r"resumed from checkpoint step (\d+)", resumed.text())
    assert match, resumed.text()[-3000:]
    lost = data_lost(reference, run_records(out, read_state))
    return recovered_at - injected_at, int(match.group(1)), lost


# --------------------------------------------------------------------------- killed processes


KILLS = {
    "learner-1": dict(learners=2, scenario="learner rank killed mid-step",
                      injected="SIGKILL learner-1 (of 2) while step 2 runs"),
    "rollout-1": dict(rollouts=2, scenario="rollout replica killed mid-generation",
                      injected="SIGKILL rollout-1 (of 2) while step 2 runs"),
    "reward-0": dict(scenario="reward service killed mid-batch", injected="SIGKILL reward-0 (the only one) while "
                                                                          "step 2 runs"),
}


@pytest.mark.parametrize("role", list(KILLS))
def test_killed_role_fails_loudly_and_resume_loses_nothing(role, tmp_path, model_dir, train_file, reference):
    case = KILLS[role]
    doc = run_doc(model_dir, str(train_file), learners=case.get("learners", 1), rollouts=case.get("rollouts", 1))
    run_file = write_run_file(tmp_path / "run.yaml", doc)
    out, env = tmp_path / "out", role_env()

    first = Launch(run_file, out, env)
    first.wait_for_step(1)
    wait_for(lambda: local_manifest(out, 1), 30, "checkpoint step 1")
    killed_at = first.kill(role)
    code = first.wait(120)
    detected_s = time.monotonic() - killed_at
    assert code != 0
    # the launcher names the dead role and its exit (SIGKILL: -9), and stops the others
    assert re.search(rf"{role} exited with code -9", first.text()), first.text()[-3000:]
    interrupted = max(steps_done(out)) + 1
    assert interrupted <= STEPS, "the run finished before the kill landed"

    recover_s, from_step, lost = resume_and_check(run_file, out, env, reference, local_state_reader(out / "checkpoints"),
                                                  injected_at=killed_at, interrupted=interrupted)
    record(FaultResult(case["scenario"], case["injected"],
                       f"launcher failed in {detected_s:.1f} s naming {role} (code -9), stopped the gang; "
                       f"`--resume` continued from checkpoint {from_step}", lost, recover_s,
                       "kill -> resumed run finished the interrupted step", f"kill {role}"))
    assert lost == 0


def test_controller_killed_during_checkpoint_upload_leaves_no_torn_checkpoint(tmp_path, model_dir, train_file,
                                                                            reference, moto, bucket):
    from _s3proxy import FaultProxy

    host, port, client = moto
    upload_seen, release = threading.Event(), threading.Event()

    def hold_step2_upload(method, path, index):
        # the first data file of checkpoint 2 is held until learner-0 is dead, then forwarded
        if method == "PUT" and "/run/step-00000002/" in path and "manifest" not in path and not upload_seen.is_set():
            upload_seen.set()
            release.wait(60)
        return None

    doc = run_doc(model_dir, str(train_file), checkpoint_uri=f"s3://{bucket}/run")
    run_file = write_run_file(tmp_path / "run.yaml", doc)
    out = tmp_path / "out"
    with FaultProxy(host, port, fault=hold_step2_upload) as proxy:
        env = s3_env(proxy.url)
        first = Launch(run_file, out, env)
        try:
            wait_for(upload_seen.is_set, 120, "the upload of checkpoint 2")
            killed_at = first.kill("learner-0")
        finally:
            release.set()
        code = first.wait(120)
        assert code != 0 and "learner-0 exited with code -9" in first.text(), first.text()[-3000:]
        # checkpoint 2 was being uploaded: files may be there, the manifest is not; 1 is the latest
        assert not s3_manifest(client, bucket, 2) and s3_manifest(client, bucket, 1)
        proxy.fault = None
        recover_s, from_step, lost = resume_and_check(run_file, out, env, reference,
                                                      s3_state_reader(client, bucket, "run"),
                                                      injected_at=killed_at, interrupted=2)
    assert from_step == 1
    record(FaultResult("controller killed during a checkpoint upload",
                       "SIGKILL learner-0 while a data file of checkpoint 2 is in flight to S3 (held by the proxy)",
                       "launcher failed naming learner-0; checkpoint 2 had files but no manifest, so it was never "
                       "listed; `--resume` loaded checkpoint 1 and re-committed 2", lost, recover_s,
                       "kill -> resumed run finished step 2 again", "kill learner-0 in upload"))
    assert lost == 0


# --------------------------------------------------------------------------- S3 faults


def test_s3_errors_for_a_while_are_retried_without_a_restart(tmp_path, model_dir, train_file, reference, moto, bucket):
    from _s3proxy import RESET, FaultProxy

    host, port, client = moto
    kinds = [(500, "InternalError"), (503, "SlowDown"), RESET] * 2  # 6 faults < 8 attempts per request
    state = {"armed": False, "sent": 0, "first": None, "healed": None}
    lock = threading.Lock()

    def flaky_after_checkpoint1(method, path, index):
        with lock:
            if method == "PUT" and path.split("?")[0].endswith("/run/step-00000001/manifest.json"):
                state["armed"] = True  # from the next request on, the store misbehaves
                return None
            if state["armed"] and state["sent"] < len(kinds):
                state["first"] = state["first"] or time.monotonic()
                state["sent"] += 1
                return kinds[state["sent"] - 1]
            if state["sent"] == len(kinds) and state["healed"] is None:
                state["healed"] = time.monotonic()
            return None

    doc = run_doc(model_dir, str(train_file), checkpoint_uri=f"s3://{bucket}/run")
    run_file = write_run_file(tmp_path / "run.yaml", doc)
    out = tmp_path / "out"
    with FaultProxy(host, port, fault=flaky_after_checkpoint1) as proxy:
        run = Launch(run_file, out, s3_env(proxy.url))
        code = run.wait(180)
        assert code == 0, run.text()[-4000:]
        assert proxy.faults_sent == len(kinds)
    assert "resumed" not in run.text()
    lost = data_lost(reference, run_records(out, s3_state_reader(client, bucket, "run")))
    record(FaultResult("S3 errors for a while",
                       "after checkpoint 1: 6 requests answered 500 InternalError, 503 SlowDown or a TCP reset",
                       "retried by the S3 client (8 attempts, jittered backoff); no restart, every checkpoint "
                       "committed", lost, state["healed"] - state["first"], "first fault -> first request served",
                       "s3 transient"))
    assert lost == 0


def test_s3_unreachable_past_the_retry_budget_fails_clearly_and_resumes_later(tmp_path, model_dir, train_file,
                                                                              reference, moto, bucket):
    from _s3proxy import RESET, FaultProxy

    host, port, client = moto
    state = {"down": False, "first": None}

    def down_after_checkpoint1(method, path, index):
        if state["down"]:
            state["first"] = state["first"] or time.monotonic()
            return RESET
        if method == "PUT" and path.split("?")[0].endswith("/run/step-00000001/manifest.json"):
            state["down"] = True
        return None

    doc = run_doc(model_dir, str(train_file), checkpoint_uri=f"s3://{bucket}/run")
    run_file = write_run_file(tmp_path / "run.yaml", doc)
    out = tmp_path / "out"
    with FaultProxy(host, port, fault=down_after_checkpoint1) as proxy:
        env = s3_env(proxy.url, DAPO_S3_MAX_ATTEMPTS="3")
        first = Launch(run_file, out, env)
        code = first.wait(180)
        failed_s = time.monotonic() - state["first"]
        text = first.text()
        assert code != 0, text[-3000:]
        assert "learner-0 exited with code 1" in text, text[-3000:]
        # the error names the storage operation, the checkpoint URI and the attempts
        assert re.search(rf"StorageError: .* s3://{bucket}/run\S*: S3 at {re.escape(proxy.url)} did not answer .* "
                         r"after DAPO_S3_MAX_ATTEMPTS=3 attempts", text), text[-3000:]
        interrupted = min(s for s in range(1, STEPS + 1) if not s3_manifest(client, bucket, s))
        proxy.fault = None  # the store is back
        recover_s, from_step, lost = resume_and_check(run_file, out, env, reference,
                                                      s3_state_reader(client, bucket, "run"),
                                                      injected_at=state["first"], interrupted=interrupted)
    record(FaultResult("S3 unreachable past the retry budget",
                       "after checkpoint 1 every S3 connection reset (DAPO_S3_MAX_ATTEMPTS=3)",
                       f"learner-0 failed in {failed_s:.1f} s with a StorageError naming the checkpoint URI; "
                       f"launcher exit 1; later `--resume` continued from checkpoint {from_step}", lost, recover_s,
                       "outage start -> resumed run (started at once) redid the failed step", "s3 unreachable"))
    assert lost == 0
