"""Fault injection over the local multi-process launcher (`dapo run FILE --launcher processes`):
real role processes, real signals (SIGKILL, SIGSTOP), S3 faults through a real HTTP proxy in
front of moto's S3 server.

Each scenario ends with the run recovered and its whole training state equal to an uninterrupted
run of the same run file and topology (see tests/faults/_harness.py): the launcher fails loudly
naming the role (or, for transient S3 faults, the run never notices beyond retries), `dapo run FILE
--resume --launcher processes` continues from the last committed checkpoint (what the operator's
gang restart does with DAPO_GANG_GENERATION > 0), and the final checkpoint's weights, optimizer,
sampler, surplus groups and RNG states equal the uninterrupted run's, every step trained once on
the same prompts.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
import uuid

import pytest

from _harness import (
    STEPS, Launch, arith_sections, compare_with_reference, local_manifest, role_env, steps_done, wait_for,
)
from _run_files import write_run_file
from report import FaultResult, record

pytestmark = [pytest.mark.faults, pytest.mark.processes]

REAL_KILL = "real SIGKILL of the role's process (launcher: local processes)"


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


@pytest.fixture
def s3_credentials(monkeypatch):
    """For reading the final checkpoint from moto in this (the test's) process."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)


def s3_env(endpoint: str, **extra: str) -> dict:
    return role_env({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": endpoint, **extra})


def s3_manifest(client, bucket: str, step: int) -> bool:
    found = client.list_objects_v2(Bucket=bucket, Prefix=f"run/step-{step:08d}/manifest.json").get("Contents", [])
    return bool(found)


def resume(run_file, out, env, *, injected_at: float, interrupted: int, name: str = "resume"):
    """`--resume` the run to its end; (seconds from the injection until the interrupted step was
    done again, the checkpoint step it resumed from)."""
    stale = interrupted in steps_done(out)  # trained but not checkpointed: resume drops that line first
    resumed = Launch(run_file, out, env, "--resume", name=name)
    wait_for(lambda: "resumed from checkpoint step" in resumed.text() or resumed.proc.poll() is not None, 180,
             "the resumed run to load its checkpoint")
    if stale:
        wait_for(lambda: "metrics.jsonl: dropped" in resumed.text() or resumed.proc.poll() is not None, 60,
                 "the resumed run to drop the re-done steps from metrics.jsonl")
    recovered_at = resumed.wait_for_step(interrupted)
    code = resumed.wait(240)
    assert code == 0, resumed.text()[-4000:]
    match = re.search(r"resumed from checkpoint step (\d+)", resumed.text())
    assert match, resumed.text()[-3000:]
    return recovered_at - injected_at, int(match.group(1))


STATE = "weights, optimizer, sampler, surplus, RNG, per-step prompts vs an uninterrupted run"


def record_and_check(problems: list[str], **fields) -> None:
    record(FaultResult(state_equal=not problems, checked=STATE, **fields))
    assert not problems, "the resumed run's training state differs from the uninterrupted run's:\n" + "\n".join(
        problems[:40])


# --------------------------------------------------------------------------- killed processes


KILLS = {
    "learner-1": dict(learners=2, scenario="learner rank killed mid-step",
                      injected="SIGKILL learner-1 (of 2) after checkpoint 1"),
    "rollout-1": dict(rollouts=2, scenario="rollout replica killed mid-generation",
                      injected="SIGKILL rollout-1 (of 2) after checkpoint 1"),
    "reward-0": dict(scenario="reward service killed mid-batch",
                     injected="SIGKILL reward-0 (the only one) after checkpoint 1"),
}


@pytest.mark.parametrize("role", list(KILLS))
def test_killed_role_fails_loudly_and_resume_ends_in_the_uninterrupted_state(role, tmp_path, model_dir, train_file,
                                                                            reference_for, run_doc):
    case = KILLS[role]
    learners, rollouts = case.get("learners", 1), case.get("rollouts", 1)
    reference = reference_for(learners=learners, rollouts=rollouts)
    run_file = write_run_file(tmp_path / "run.yaml", run_doc(preset="faults", **arith_sections(model_dir, train_file),
                                                             learner={"replicas": learners},
                                                             rollout={"replicas": rollouts}))
    out, env = tmp_path / "out", role_env()

    first = Launch(run_file, out, env)
    wait_for(lambda: local_manifest(out, 1) or first.proc.poll() is not None, 180, "checkpoint step 1")
    killed_at = first.kill(role)
    code = first.wait(120)
    detected_s = time.monotonic() - killed_at
    # the launcher names the dead role and its signal, stops the others and exits 128 + 9
    assert code == 128 + signal.SIGKILL, first.text()[-3000:]
    assert re.search(rf"{role} was killed by signal 9 \(SIGKILL\)", first.text()), first.text()[-3000:]
    interrupted = max(steps_done(out)) + 1
    assert interrupted <= STEPS, "the run finished before the kill landed"

    recover_s, from_step = resume(run_file, out, env, injected_at=killed_at, interrupted=interrupted)
    problems = compare_with_reference(reference, out, str(out / "checkpoints"))
    record_and_check(problems, scenario=case["scenario"], injected=case["injected"], injection=REAL_KILL,
                     outcome=f"launcher exited {code} naming {role}, stopped the gang; `--resume` continued from "
                             f"checkpoint {from_step}",
                     detect_s=detected_s, recover_s=recover_s,
                     recovered_when="kill -> resumed run finished the interrupted step", test=f"kill {role}")


def test_killed_lora_run_resumes_to_the_uninterrupted_state(tmp_path, model_dir, train_file, reference_for, run_doc):
    """A LoRA run (spec.model.lora) with two data-parallel learner ranks: learner-1 killed after
    checkpoint 1, `--resume` ends with the adapters, their AdamW state, the sampler, surplus and RNG
    equal to the uninterrupted LoRA run's (checkpoints hold the adapters and the base's sha256)."""
    lora = {"rank": 4, "alpha": 8.0}
    reference = reference_for(learners=2, lora=lora)
    assert all("lora_" in name for name in reference.state["model"])
    sections = arith_sections(model_dir, train_file)
    sections["model"]["lora"] = lora
    run_file = write_run_file(tmp_path / "run.yaml", run_doc(preset="faults", **sections, learner={"replicas": 2}))
    out, env = tmp_path / "out", role_env()

    first = Launch(run_file, out, env)
    wait_for(lambda: local_manifest(out, 1) or first.proc.poll() is not None, 180, "checkpoint step 1")
    killed_at = first.kill("learner-1")
    code = first.wait(120)
    detected_s = time.monotonic() - killed_at
    assert code == 128 + signal.SIGKILL, first.text()[-3000:]
    interrupted = max(steps_done(out)) + 1
    assert interrupted <= STEPS, "the run finished before the kill landed"

    recover_s, from_step = resume(run_file, out, env, injected_at=killed_at, interrupted=interrupted)
    problems = compare_with_reference(reference, out, str(out / "checkpoints"))
    record_and_check(problems, scenario="LoRA run, learner rank killed mid-step",
                     injected="SIGKILL learner-1 (of 2) of a spec.model.lora run after checkpoint 1", injection=REAL_KILL,
                     outcome=f"launcher exited {code} naming learner-1, stopped the gang; `--resume` continued from "
                             f"checkpoint {from_step}",
                     detect_s=detected_s, recover_s=recover_s,
                     recovered_when="kill -> resumed run finished the interrupted step", test="kill learner-1 (LoRA)")


@pytest.mark.integration
def test_controller_killed_during_checkpoint_upload_leaves_no_torn_checkpoint(tmp_path, model_dir, train_file,
                                                                            reference_for, moto, bucket,
                                                                            s3_credentials, run_doc):
    from _s3proxy import FaultProxy

    host, port, client = moto
    reference = reference_for()
    upload_seen, release = threading.Event(), threading.Event()

    def hold_step2_upload(method, path, index):
        # the first data file of checkpoint 2 is held until learner-0 is dead, then forwarded
        if method == "PUT" and "/run/step-00000002/" in path and "manifest" not in path and not upload_seen.is_set():
            upload_seen.set()
            release.wait(60)
        return None

    run_file = write_run_file(tmp_path / "run.yaml", run_doc(preset="faults", **arith_sections(model_dir, train_file),
                                                             checkpoint={"uri": f"s3://{bucket}/run"}))
    out = tmp_path / "out"
    with FaultProxy(host, port, fault=hold_step2_upload) as proxy:
        env = s3_env(proxy.url)
        first = Launch(run_file, out, env)
        try:
            wait_for(upload_seen.is_set, 180, "the upload of checkpoint 2")
            killed_at = first.kill("learner-0")
        finally:
            release.set()
        code = first.wait(120)
        detected_s = time.monotonic() - killed_at
        assert code == 128 + signal.SIGKILL and "learner-0 was killed by signal 9" in first.text(), first.text()[-3000:]
        # checkpoint 2 was being uploaded: files may be there, the manifest is not; 1 is the latest
        assert not s3_manifest(client, bucket, 2) and s3_manifest(client, bucket, 1)
        proxy.fault = None
        recover_s, from_step = resume(run_file, out, env, injected_at=killed_at, interrupted=2)
    assert from_step == 1
    problems = compare_with_reference(reference, out, f"s3://{bucket}/run", endpoint_url=f"http://{host}:{port}")
    record_and_check(problems, scenario="controller killed during a checkpoint upload",
                     injected="SIGKILL learner-0 while a data file of checkpoint 2 is in flight to S3 (held by the proxy)",
                     injection="real SIGKILL; S3 = moto server behind a TCP proxy that holds one PUT",
                     outcome="launcher failed naming learner-0; checkpoint 2 had no manifest, so it was never listed; "
                             "`--resume` loaded checkpoint 1 and committed 2 again",
                     detect_s=detected_s, recover_s=recover_s, recovered_when="kill -> resumed run finished step 2 again",
                     test="kill learner-0 in upload")


# --------------------------------------------------------------------------- S3 faults


@pytest.mark.integration
def test_s3_errors_for_a_while_are_retried_without_a_restart(tmp_path, model_dir, train_file, reference_for, moto,
                                                             bucket, s3_credentials, run_doc):
    from _s3proxy import RESET, FaultProxy

    host, port, client = moto
    reference = reference_for()
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

    run_file = write_run_file(tmp_path / "run.yaml", run_doc(preset="faults", **arith_sections(model_dir, train_file),
                                                             checkpoint={"uri": f"s3://{bucket}/run"}))
    out = tmp_path / "out"
    with FaultProxy(host, port, fault=flaky_after_checkpoint1) as proxy:
        run = Launch(run_file, out, s3_env(proxy.url))
        code = run.wait(240)
        assert code == 0, run.text()[-4000:]
        assert proxy.faults_sent == len(kinds)
    assert "resumed" not in run.text()
    problems = compare_with_reference(reference, out, f"s3://{bucket}/run", endpoint_url=f"http://{host}:{port}")
    record_and_check(problems, scenario="S3 errors for a while",
                     injected="after checkpoint 1: 6 requests answered 500 InternalError, 503 SlowDown or a TCP reset",
                     injection="TCP proxy in front of the moto S3 server answers the errors",
                     outcome="retried by the S3 client (8 attempts, jittered backoff); no restart, every checkpoint "
                             "committed",
                     detect_s=None, recover_s=state["healed"] - state["first"],
                     recovered_when="first fault -> first request served", test="s3 transient")


@pytest.mark.integration
def test_s3_unreachable_past_the_retry_budget_fails_clearly_and_resumes_later(tmp_path, model_dir, train_file,
                                                                              reference_for, moto, bucket,
                                                                              s3_credentials, run_doc):
    from _s3proxy import RESET, FaultProxy

    host, port, client = moto
    reference = reference_for()
    state = {"down": False, "first": None}

    def down_after_checkpoint1(method, path, index):
        if state["down"]:
            state["first"] = state["first"] or time.monotonic()
            return RESET
        if method == "PUT" and path.split("?")[0].endswith("/run/step-00000001/manifest.json"):
            state["down"] = True
        return None

    run_file = write_run_file(tmp_path / "run.yaml", run_doc(preset="faults", **arith_sections(model_dir, train_file),
                                                             checkpoint={"uri": f"s3://{bucket}/run"}))
    out = tmp_path / "out"
    with FaultProxy(host, port, fault=down_after_checkpoint1) as proxy:
        env = s3_env(proxy.url, DAPO_S3_MAX_ATTEMPTS="3")
        first = Launch(run_file, out, env)
        code = first.wait(240)
        failed_s = time.monotonic() - state["first"]
        text = first.text()
        assert code == 1, text[-3000:]
        assert "learner-0 exited with code 1" in text, text[-3000:]
        # the error names the storage operation, the checkpoint URI and the attempts
        assert re.search(rf"StorageError: .* s3://{bucket}/run\S*: S3 at {re.escape(proxy.url)} did not answer .* "
                         r"after DAPO_S3_MAX_ATTEMPTS=3 attempts", text), text[-3000:]
        interrupted = min(s for s in range(1, STEPS + 1) if not s3_manifest(client, bucket, s))
        proxy.fault = None  # the store is back
        recover_s, from_step = resume(run_file, out, env, injected_at=state["first"], interrupted=interrupted)
    problems = compare_with_reference(reference, out, f"s3://{bucket}/run", endpoint_url=f"http://{host}:{port}")
    record_and_check(problems, scenario="S3 unreachable past the retry budget",
                     injected="after checkpoint 1 every S3 connection reset (DAPO_S3_MAX_ATTEMPTS=3)",
                     injection="TCP proxy in front of the moto S3 server resets every connection",
                     outcome=f"learner-0 failed with a StorageError naming the checkpoint URI; launcher exit {code}; "
                             f"`--resume` (store back) continued from checkpoint {from_step}",
                     detect_s=failed_s, recover_s=recover_s,
                     recovered_when="outage start -> resumed run (started at once) redid the failed step",
                     test="s3 unreachable")


# --------------------------------------------------------------------------- weight-sync peer


def test_weight_sync_peer_stops_answering_then_gang_restart_resumes_exactly(tmp_path, model_dir, train_file,
                                                                           reference_for, run_doc):
    """rollout-1 is frozen (SIGSTOP) right after it applied weight version 1: it neither answers
    nor heart-beats, and the launcher cannot see it (the process has not exited). Its generation
    chunks time out and are retried on rollout-0; the broadcast of version 2 then finds rank 2
    silent, the sender raises WeightSyncError naming it, learner-0 fails and the launcher stops
    the gang (the frozen process included, by SIGKILL after the grace period). `--resume` is the
    gang restart; the final state must equal the uninterrupted run's."""
    reference = reference_for(rollouts=2)
    run_file = write_run_file(tmp_path / "run.yaml", run_doc(preset="faults", **arith_sections(model_dir, train_file),
                                                             rollout={"replicas": 2}))
    out = tmp_path / "out"
    env = role_env({"DAPO_WEIGHT_SYNC_TIMEOUT_S": "10", "DAPO_ROLLOUT_REQUEST_TIMEOUT_S": "5"})
    rollout_log = out / "logs" / "rollout-1.log"

    first = Launch(run_file, out, env)
    wait_for(lambda: (rollout_log.exists() and "weight version 1 applied" in rollout_log.read_text())
             or first.proc.poll() is not None, 180, "rollout-1 to apply weight version 1")
    frozen_at = first.kill("rollout-1", signal.SIGSTOP)
    try:
        code = first.wait(180)
    finally:
        try:  # never leave a stopped process behind, whatever happened
            os.kill(first.pids()["rollout-1"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    detected_s = time.monotonic() - frozen_at
    text = first.text()
    assert code == 1 and "learner-0 exited with code 1" in text, text[-4000:]
    # the freeze lands after rollout-1 logged version 1 as applied: usually before the next
    # broadcast, which then names rank 2; on a loaded machine sometimes before its /sync answer
    # to version 1 left, which the learner then reports as that replica's /sync timing out
    assert re.search(r"WeightSyncError: .*(rank 2|/sync timed out)", text), text[-4000:]
    assert 2 not in steps_done(out), "step 2 must not have completed without rollout-1's sync"

    recover_s, from_step = resume(run_file, out, role_env(), injected_at=frozen_at, interrupted=2)
    problems = compare_with_reference(reference, out, str(out / "checkpoints"))
    record_and_check(problems, scenario="weight-sync peer stops answering (gang restart)",
                     injected="SIGSTOP rollout-1 (of 2) right after it applied weight version 1 "
                              "(DAPO_WEIGHT_SYNC_TIMEOUT_S=10, DAPO_ROLLOUT_REQUEST_TIMEOUT_S=5)",
                     injection="real SIGSTOP of the role's process: alive for the launcher, silent for its peers",
                     outcome="generate chunks retried on rollout-0; the version-2 broadcast raised WeightSyncError "
                             f"naming rank 2; learner-0 exit 1, gang stopped; `--resume` continued from checkpoint "
                             f"{from_step}",
                     detect_s=detected_s, recover_s=recover_s,
                     recovered_when="freeze -> resumed run finished step 2", test="weight sync peer in a run")


# --------------------------------------------------------------------------- a frozen reward replica


def test_frozen_reward_replica_is_taken_out_of_rotation_and_the_run_finishes_by_itself(
        tmp_path, model_dir, train_file, reference_for, run_doc):
    """reward-1 (of 2) is frozen (SIGSTOP) after step 1: alive for the launcher, silent for the
    learner. Its /score request goes unanswered; the reward pool's liveness watch (default
    DAPO_REPLICA_LIVENESS_S) takes it out of rotation and re-dispatches its share to reward-0. The
    run finishes by itself (exit 0, no --resume) in the uninterrupted run's state: scores do not
    depend on which replica computed them."""
    reference = reference_for()
    run_file = write_run_file(tmp_path / "run.yaml", run_doc(preset="faults", **arith_sections(model_dir, train_file),
                                                             reward={"replicas": 2}))
    out = tmp_path / "out"
    launch = Launch(run_file, out, role_env())
    launch.wait_for_step(1)
    frozen_at = launch.kill("reward-1", signal.SIGSTOP)
    try:
        wait_for(lambda: "taken out of rotation" in launch.text() or launch.proc.poll() is not None, 120,
                 "the learner to take reward-1 out of rotation")
        out_at = time.monotonic()
        code = launch.wait(240)
        finished_at = time.monotonic()
    finally:
        try:  # never leave a stopped process behind, whatever happened
            os.kill(launch.pids()["reward-1"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = launch.text()
    assert code == 0, text[-4000:]
    assert re.search(r"reward replica http://\S+ taken out of rotation", text), text[-4000:]
    assert steps_done(out) == set(range(1, STEPS + 1))
    detected_s = out_at - frozen_at
    assert detected_s < 10.0 + 5.0, detected_s  # the target is 10 s; margin for a loaded machine
    problems = compare_with_reference(reference, out, str(out / "checkpoints"))
    record_and_check(problems, scenario="reward replica frozen (out of rotation, no restart)",
                     injected="SIGSTOP reward-1 (of 2) after step 1 (DAPO_REPLICA_LIVENESS_S default 5)",
                     injection="real SIGSTOP of the role's process: alive for the launcher, silent for its peers",
                     outcome="its /score request unanswered; /healthz silent 5 s -> taken out of rotation, its share "
                             "re-scored on reward-0; the run finished by itself (exit 0, no resume)",
                     detect_s=detected_s, recover_s=finished_at - frozen_at,
                     recovered_when="freeze -> run finished (every step, no restart)", test="frozen reward replica")


# --------------------------------------------------------------------------- soak

SOAK_SEED = 20261130
# 2 kills over 6 steps (3 over 8 until 2026-12-08): the whole suite must stay inside CI's 30
# minutes, and each kill tests the same resume path as the single-kill scenarios above
SOAK_STEPS = 6
SOAK_KILLS = 2
SOAK_ROLES = ["learner-0", "learner-1", "rollout-0", "rollout-1", "reward-0"]


def test_seeded_soak_of_random_kills_ends_in_the_uninterrupted_state(tmp_path, model_dir, train_file, reference_for,
                                                                     run_doc):
    """A small driver: start the run; once a randomly chosen checkpoint is committed, SIGKILL a
    random role; start `--resume` as soon as the launcher has exited; repeat; the attempt after
    the last kill runs to the end. The final state must equal the uninterrupted run's."""
    rng = random.Random(SOAK_SEED)
    reference = reference_for(learners=2, rollouts=2, steps=SOAK_STEPS)
    run_file = write_run_file(tmp_path / "run.yaml", run_doc(preset="faults", **arith_sections(model_dir, train_file),
                                                             learner={"replicas": 2, "totalSteps": SOAK_STEPS},
                                                             rollout={"replicas": 2}, checkpoint={"keep": SOAK_STEPS}))
    out, env = tmp_path / "out", role_env()
    # distinct checkpoints to kill after, ascending: every attempt makes progress
    after = sorted(rng.sample(range(1, SOAK_STEPS), SOAK_KILLS))
    kills, detect, recover = [], [], []
    pending = None  # (kill time, interrupted step) of the last kill, until the next attempt redid it
    launch = None
    for attempt in range(SOAK_KILLS + 1):
        launch = Launch(run_file, out, env, *(["--resume"] if attempt else []), name=f"attempt{attempt}")
        if pending is not None:
            killed_at, interrupted = pending
            recover.append(launch.wait_for_step(interrupted, 300) - killed_at)
        if attempt == SOAK_KILLS:
            break
        step = after[attempt]
        wait_for(lambda: local_manifest(out, step) or launch.proc.poll() is not None, 300, f"checkpoint {step}")
        role = rng.choice(SOAK_ROLES)
        killed_at = launch.kill(role)
        code = launch.wait(120)
        assert code == 128 + signal.SIGKILL, launch.text()[-3000:]
        detect.append(time.monotonic() - killed_at)
        kills.append(f"{role} after checkpoint {step}")
        pending = (killed_at, max(steps_done(out)) + 1)
    code = launch.wait(300)
    assert code == 0, launch.text()[-4000:]
    problems = compare_with_reference(reference, out, str(out / "checkpoints"))
    record_and_check(problems, scenario=f"soak: {SOAK_KILLS} random kills over {SOAK_STEPS} steps",
                     injected=f"seed {SOAK_SEED}: SIGKILL " + "; ".join(kills),
                     injection=REAL_KILL + "; a driver resumes after each",
                     outcome=f"each kill: launcher exit {128 + signal.SIGKILL} naming the role; `--resume` continued; "
                             f"the attempt after the last kill finished the run",
                     detect_s=max(detect), recover_s=max(recover),
                     recovered_when="slowest: kill -> next attempt finished the interrupted step", test="soak")
