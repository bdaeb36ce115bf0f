"""dapo.storage against a real S3 HTTP endpoint (moto's ThreadedMotoServer on 127.0.0.1).

Faults (500 InternalError, 503 SlowDown, 403 on the manifest) are injected by the HTTP proxy
of tests/_s3proxy.py in front of moto: real sockets and real HTTP, no mocks of boto3.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pip install -e .[test])")

from _s3proxy import FaultProxy  # noqa: E402  (shared with tests/faults/)
from dapo import storage  # noqa: E402
from dapo.storage.s3 import walk_files  # noqa: E402
from dapo.storage import (  # noqa: E402
    CheckpointExistsError,
    CheckpointInfo,
    CheckpointStore,
    StorageError,
    download_dir,
    is_s3,
    s3_client,
    split_s3,
    stage,
    upload_dir,
    upload_file,
)

# ----------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint():
    """One moto S3 server for the module; tests isolate themselves with fresh buckets."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield host, port
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch, tmp_path):
    """AWS chain env pointing at moto; returns the endpoint URL."""
    host, port = moto_endpoint
    url = f"http://{host}:{port}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE", "DAPO_S3_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("DAPO_CACHE_DIR", str(tmp_path / "cache"))
    return url


@pytest.fixture
def bucket(s3_env):
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _make_ckpt_dir(folder: Path, step: int) -> Path:
    """A checkpoint-like folder: a 'weights' file, a nested optimizer shard and a json."""
    _write(folder / "model.safetensors", os.urandom(3000) + bytes([step % 256]))
    _write(folder / "optim" / "rank0.pt", os.urandom(1500))
    _write(folder / "trainer_state.json", json.dumps({"step": step}).encode())
    return folder


# ----------------------------------------------------------------------------------------
# URIs and staging
# ----------------------------------------------------------------------------------------


def test_uri_helpers():
    assert is_s3("s3://b/k") and not is_s3("/data/x.parquet") and not is_s3(Path("s3:/x"))
    assert split_s3("s3://bucket/a/b.parquet") == ("bucket", "a/b.parquet")
    assert split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="not an s3"):
        split_s3("/local/path")
    with pytest.raises(ValueError, match="without a bucket"):
        split_s3("s3:///key")


def test_stage_local_path_unchanged_and_missing_named(tmp_path):
    data = _write(tmp_path / "train.jsonl", b"{}\n")
    assert stage(str(data)) == data
    missing = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        stage(str(missing))


@pytest.mark.integration
def test_stage_dataset_file_uses_cache_and_redoes_interrupted(bucket, tmp_path, caplog):
    src = _write(tmp_path / "src" / "train.parquet", os.urandom(50_000))
    uri = f"s3://{bucket}/data/train.parquet"
    upload_file(src, uri)
    cache = tmp_path / "cache-a"

    local = stage(uri, cache)
    assert local == cache / "s3" / bucket / "data" / "train.parquet"
    assert local.read_bytes() == src.read_bytes()
    first_mtime = local.stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger="dapo.storage"):
        assert stage(uri, cache) == local
    assert "cache hit" in caplog.text
    assert local.stat().st_mtime_ns == first_mtime, "a complete cached copy must not be downloaded again"

    # an interrupted download leaves no marker: the next stage downloads again
    marker = local.with_name(local.name + storage.STAGE_MARKER_SUFFIX)
    marker.unlink()
    local.write_bytes(b"partial")
    assert stage(uri, cache).read_bytes() == src.read_bytes()
    assert marker.exists()

    # a changed remote object (new ETag / size) invalidates the cache
    new = _write(tmp_path / "src" / "v2.parquet", os.urandom(20_000))
    upload_file(new, uri)
    assert stage(uri, cache).read_bytes() == new.read_bytes()


@pytest.mark.integration
def test_stage_missing_s3_object_is_named(bucket):
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/nothing/here"):
        stage(f"s3://{bucket}/nothing/here")


@pytest.mark.integration
def test_stage_model_folder_from_s3_prefix_loads_with_from_pretrained(bucket, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "tiny-qwen")
    upload_dir(tmp_path / "tiny-qwen", f"s3://{bucket}/models/tiny-qwen")

    local = stage(f"s3://{bucket}/models/tiny-qwen/", tmp_path / "cache")
    assert (local / "config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(local).eval()
    ids = torch.tensor([[1, 5, 7, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)  # the same weights and forward on one machine: exact

    # a stale file in the cached folder is removed when the prefix changes
    (local / "stale.bin").write_bytes(b"x")
    _write(tmp_path / "extra" / "generation_config.json", b"{}")
    upload_file(tmp_path / "extra" / "generation_config.json", f"s3://{bucket}/models/tiny-qwen/extra.json")
    again = stage(f"s3://{bucket}/models/tiny-qwen", tmp_path / "cache")
    assert again == local and (local / "extra.json").is_file() and not (local / "stale.bin").exists()


@pytest.mark.integration
def test_upload_dir_download_dir_round_trip(bucket, tmp_path):
    src = tmp_path / "src"
    for i in range(5):
        _write(src / f"d{i % 2}" / f"f{i}.bin", os.urandom(1000 * (i + 1)))
    upload_dir(src, f"s3://{bucket}/dir")
    out = download_dir(f"s3://{bucket}/dir", tmp_path / "out")
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == sorted(
        p.relative_to(src) for p in src.rglob("*") if p.is_file()
    )
    for p in src.rglob("*.bin"):
        assert (out / p.relative_to(src)).read_bytes() == p.read_bytes()


# ----------------------------------------------------------------------------------------
# Checkpoints, local and S3
# ----------------------------------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpts")
    name = request.getfixturevalue("bucket")
    return f"s3://{name}/runs/qwen-math"


def test_checkpoint_commit_latest_fetch_keep_last_k(store_root, tmp_path):
    store = CheckpointStore(store_root, keep=2)
    assert store.list_committed() == [] and store.latest() is None
    sources = {}
    for step in (10, 20, 30):
        sources[step] = _make_ckpt_dir(tmp_path / f"work-{step}", step)
        info = store.commit(step, sources[step], meta={"lr": 1e-6, "step": step})
        assert isinstance(info, CheckpointInfo) and info.step == step
        assert info.uri.endswith(f"step-{step:08d}")

    assert [i.step for i in store.list_committed()] == [20, 30]
    latest = store.latest()
    assert latest.step == 30 and latest.manifest["meta"] == {"lr": 1e-6, "step": 30}
    assert set(latest.manifest["files"]) == {"model.safetensors", "optim/rank0.pt", "trainer_state.json"}

    folder = store.fetch(latest, tmp_path / "fetched", verify=True)
    for rel in latest.manifest["files"]:
        assert (folder / rel).read_bytes() == (sources[30] / rel).read_bytes()
    # the pruned checkpoint is gone entirely, not only un-committed
    assert 10 not in store._step_dirs()


def test_killed_commit_is_never_listed_and_previous_stays_latest(store_root, tmp_path):
    store = CheckpointStore(store_root, keep=3)
    store.commit(1, _make_ckpt_dir(tmp_path / "w1", 1))
    # a commit killed after the data files and before the manifest
    half = _make_ckpt_dir(tmp_path / "w2", 2)
    if is_s3(store_root):
        upload_dir(half, store.step_uri(2))
    else:
        import shutil

        shutil.copytree(half, store.step_uri(2))
    assert 2 in store._step_dirs()
    assert [i.step for i in store.list_committed()] == [1]
    assert store.latest().step == 1
    store.fetch(store.latest(), tmp_path / "f1", verify=True)
    # the next good commit cleans the abandoned folder
    store.commit(3, _make_ckpt_dir(tmp_path / "w3", 3))
    assert [i.step for i in store.list_committed()] == [1, 3]
    assert 2 not in store._step_dirs()


def test_commit_that_fails_writing_manifest_raises_and_is_not_committed(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpts"))
    store.commit(1, _make_ckpt_dir(tmp_path / "w1", 1))
    # a directory where the manifest should go makes the final rename fail, after the copy
    (Path(store.step_uri(2)) / storage.MANIFEST_NAME).mkdir(parents=True)
    with pytest.raises(OSError):
        store.commit(2, _make_ckpt_dir(tmp_path / "w2", 2))
    assert list(Path(store.step_uri(2)).glob("attempt-*/model.safetensors"))
    assert [i.step for i in store.list_committed()] == [1] and store.latest().step == 1


@pytest.mark.integration
def test_s3_commit_with_manifest_put_refused_is_not_committed(bucket, moto_endpoint, tmp_path):
    def deny_manifest(method, path, index):
        return (403, "AccessDenied") if method == "PUT" and path.endswith("/manifest.json") else None

    with FaultProxy(*moto_endpoint, fault=deny_manifest) as proxy:
        store = CheckpointStore(f"s3://{bucket}/ck", endpoint_url=proxy.url)
        with pytest.raises(StorageError, match="AccessDenied"):
            store.commit(5, _make_ckpt_dir(tmp_path / "w5", 5))
        assert proxy.faults_sent == 1
    plain = CheckpointStore(f"s3://{bucket}/ck")
    assert 5 in plain._step_dirs() and plain.list_committed() == [] and plain.latest() is None


def test_commit_same_step_twice_is_refused_unless_overwrite(store_root, tmp_path):
    store = CheckpointStore(store_root)
    first = store.commit(7, _make_ckpt_dir(tmp_path / "a", 7))
    with pytest.raises(CheckpointExistsError, match="already committed"):
        store.commit(7, _make_ckpt_dir(tmp_path / "b", 7))
    info = store.commit(7, tmp_path / "b", overwrite=True)
    fetched = store.fetch(info, tmp_path / "out")
    assert (fetched / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # the replaced commit's files were not written over: each commit has its own attempt folder
    assert store.files_uri(info) != store.files_uri(first)
    assert (store.fetch(first, tmp_path / "old") / "model.safetensors").read_bytes() == \
        (tmp_path / "a" / "model.safetensors").read_bytes()


def _flip_first_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fetch_verifies_sha256_by_default_and_names_the_file_and_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpts"))
    info = store.commit(1, _make_ckpt_dir(tmp_path / "w", 1))
    target = Path(store.files_uri(info)) / "model.safetensors"
    _flip_first_byte(target)  # same size: only the sha256 can tell
    with pytest.raises(storage.CheckpointCorruptError,
                       match=r"checkpoint step 1 \(.*step-00000001\): file model.safetensors has sha256 .* the manifest"):
        store.fetch(info)
    store.fetch(info, verify=False)  # sizes still match: only an explicit opt-out skips the hash
    target.write_bytes(b"short")
    with pytest.raises(storage.CheckpointCorruptError, match=r"file model.safetensors has 5 bytes"):
        store.fetch(info, verify=False)


# ----------------------------------------------------------------------------------------
# Faults: retries and an unreachable endpoint
# ----------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("status,code,failures", [(500, "InternalError", 4), (503, "SlowDown", 2)])
def test_transient_s3_errors_are_retried(bucket, moto_endpoint, tmp_path, status, code, failures):
    def first_requests_fail(method, path, index):
        return (status, code) if index < failures else None

    src = _write(tmp_path / "data.bin", os.urandom(10_000))
    with FaultProxy(*moto_endpoint, fault=first_requests_fail) as proxy:
        client = s3_client(endpoint_url=proxy.url)
        upload_file(src, f"s3://{bucket}/data.bin", client=client)
        local = stage(f"s3://{bucket}/data.bin", tmp_path / "cache", client=client)
        assert proxy.faults_sent == failures
    assert local.read_bytes() == src.read_bytes()


@pytest.mark.integration
def test_persistent_s3_errors_fail_with_the_code(bucket, moto_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("DAPO_S3_MAX_ATTEMPTS", "3")
    with FaultProxy(*moto_endpoint, fault=lambda m, p, i: (500, "InternalError")) as proxy:
        with pytest.raises(StorageError, match=r"HTTP 500, 3 attempt"):
            stage(f"s3://{bucket}/x.bin", client=s3_client(endpoint_url=proxy.url))
        assert proxy.faults_sent == 3


@pytest.mark.integration
def test_unreachable_s3_fails_clearly_and_quickly(s3_env):
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot reach S3 at http://127.0.0.1:{port}"):
        stage("s3://bucket/data.parquet", client=s3_client(endpoint_url=f"http://127.0.0.1:{port}"))
    # production retry settings: 8 attempts, 50 ms * 2**i jittered backoff, refused at once
    assert time.monotonic() - start < 15


@pytest.mark.integration
def test_client_reads_endpoint_and_region_from_env(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    client = s3_client()
    assert client.meta.endpoint_url == s3_env
    assert client.meta.region_name == "eu-west-3"
    assert client.meta.config.retries["total_max_attempts"] == 8


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_a_losing_concurrent_writer_can_neither_commit_nor_touch_the_committed_files(kind, tmp_path, request):
    """Two writers racing on one step: the second reaches its manifest write after the first
    committed (S3: the conditional PUT gets 412; local: the hard link finds the name taken). It
    is refused, and the committed checkpoint still verifies with the first writer's bytes."""
    root = str(tmp_path / "race") if kind == "local" else f"s3://{request.getfixturevalue('bucket')}/race"
    store = CheckpointStore(root)
    first = store.commit(4, _make_ckpt_dir(tmp_path / "a", 4))
    loser = _make_ckpt_dir(tmp_path / "b", 4)
    (loser / "model.safetensors").write_bytes(os.urandom((loser / "model.safetensors").stat().st_size))
    # the second writer passed its "already committed?" check before the first finished: call
    # the upload+manifest step directly, as it would run after that check
    commit = store._commit_s3 if kind == "s3" else store._commit_local
    with pytest.raises(CheckpointExistsError, match="another writer"):
        commit(4, loser, walk_files(loser), None, storage.new_attempt())
    assert store.latest().manifest == first.manifest
    fetched = store.fetch(store.latest(), tmp_path / "out")  # sha256-verified
    assert (fetched / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()


@pytest.mark.integration
def test_concurrent_stage_of_one_prefix_downloads_once(bucket, tmp_path, caplog):
    from concurrent.futures import ThreadPoolExecutor

    src = tmp_path / "model"
    for i in range(6):
        _write(src / f"shard-{i}.bin", os.urandom(20_000))
    upload_dir(src, f"s3://{bucket}/models/m")
    with caplog.at_level(logging.INFO, logger="dapo.storage"), ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: stage(f"s3://{bucket}/models/m", tmp_path / "cache"), range(3)))
    assert len(set(paths)) == 1
    assert caplog.text.count("cache hit") == 2, "the lock lets one caller download and the others reuse it"
    for p in src.iterdir():
        assert (paths[0] / p.name).read_bytes() == p.read_bytes()
