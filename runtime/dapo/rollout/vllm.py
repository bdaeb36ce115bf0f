"""vLLM rollout engine (GPU): `VLLMEngine` implements `dapo.rollout.base.RolloutEngine` on an
in-process ``vllm.LLM``.

vLLM is imported lazily (inside the constructor and the worker methods), so this module imports
on machines without vLLM; the request/response conversion below is pure and tested there.

Weights: ``WeightSyncWorkerExtension`` is mixed into vLLM's GPU worker
(``LLM(worker_extension_cls="dapo.rollout.vllm.WeightSyncWorkerExtension")``); ``collective_rpc``
calls its methods inside the worker, which may live in another process (vLLM V1's engine core).
The worker joins the `dapo.weightsync` group as a `WeightReceiver` and loads every received
bucket with the model's own ``load_weights`` (which knows vLLM's fused / sharded layouts). After
every update the prefix cache is reset: cached KV blocks computed with the old weights must not be
served under the new version.

Log-probs: ``SamplingParams(logprobs=0)`` returns the sampled token's log-prob only; the engine is
built with ``logprobs_mode="processed_logprobs"`` so it is taken after temperature scaling, the
quantity the learner recomputes (log_softmax(logits / T)). With top_p < 1 vLLM's processed
log-probs are those of the nucleus-renormalised distribution; the trainer only uses top_p < 1 for
evaluation, where log-probs are not used. These log-probs are the BEHAVIOUR policy of the
learner's rollout correction (spec.algorithm.rolloutCorrection): a training run with top_p < 1
would weigh the learner's full-vocabulary probabilities against nucleus-renormalised ones (the HF
engine reports full-vocabulary ones), so keep rollout.topP at 1 for training, as DAPO does.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import torch

from dapo.errors import DapoError
from dapo.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutEngine, Sample

log = logging.getLogger("dapo.rollout.vllm")

WORKER_EXTENSION = "dapo.rollout.vllm.WeightSyncWorkerExtension"
_FINISH_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH}


class VLLMEngineError(DapoError, RuntimeError):
    """vLLM is missing, misconfigured or returned something the trainer cannot use."""


# --------------------------------------------------------------------------- pure conversion


def request_seed(seed: int, prompt_index: int) -> int:
    """Per-request sampling seed: distinct per prompt, reproducible for (seed, prompt)."""
    return (int(seed) * 1_000_003 + prompt_index) % (2**31 - 1)


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
    """``LLM.generate`` results (one RequestOutput per prompt, in prompt order, each with n
    CompletionOutputs) -> ``len(prompts) * n`` Samples, prompt by prompt, stamped with the
    ``weight_version`` that generated them."""
    samples: list[Sample] = []
    for prompt_index, request in enumerate(request_outputs):
        request_id = str(getattr(request, "request_id", prompt_index))
        outputs = list(request.outputs)
        if len(outputs) != n:
            raise VLLMEngineError(f"vLLM request {request_id} returned {len(outputs)} samples, asked for {n}")
        for completion in sorted(outputs, key=lambda c: getattr(c, "index", 0)):
            ids = [int(t) for t in completion.token_ids]
            samples.append(Sample(
                prompt_index=prompt_index,
                response_ids=ids,
                log_probs=sampled_log_probs(ids, completion.logprobs, request_id=request_id),
                finish_reason=finish_reason(completion.finish_reason, request_id=request_id),
                weight_version=weight_version,
            ))
    return samples


# --------------------------------------------------------------------------- worker side


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class; methods run inside the worker via ``collective_rpc``.

    ``self.model_runner.model`` is the vLLM model; ``self.device`` its device (vLLM attributes)."""

    def dapo_join_weight_sync(self, host: str, port: int, world_size: int, rank: int, backend: str = "auto",
                              timeout_s: float = 120.0, bucket_bytes: int = 256 << 20) -> int:
        """Join the learner -> rollout weight-sync group as receiver ``rank``."""
        from dapo.weightsync import WeightReceiver, WeightSyncConfig

        if backend == "nccl" or (backend == "auto" and torch.cuda.is_available()):
            torch.cuda.set_device(self.device)
        self.dapo_receiver = WeightReceiver(WeightSyncConfig(host=host, port=port, world_size=world_size, rank=rank,
                                                             backend=backend, timeout_s=timeout_s,
                                                             bucket_bytes=bucket_bytes))
        return rank

    def dapo_receive_weights(self) -> int:
        """Receive one sync (blocks until the learner sends) and load it; returns its version."""
        model = self.model_runner.model

        def load(batch):
            # the received views are valid only during this call; load_weights copies them
            model.load_weights(weights=batch)

        version = self.dapo_receiver.receive(load)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return version

    def dapo_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Load tensors handed over by the driver (in-process update_weights)."""
        self.model_runner.model.load_weights(weights=[(n, t.to(self.device)) for n, t in named_tensors])
        return len(named_tensors)

    def dapo_leave_weight_sync(self) -> None:
        receiver = getattr(self, "dapo_receiver", None)
        if receiver is not None:
            receiver.close()
            self.dapo_receiver = None


# --------------------------------------------------------------------------- the engine


class VLLMEngine(RolloutEngine):
    """`RolloutEngine` on ``vllm.LLM`` (one GPU per engine by default).

    ``model_path``: a local HF model folder (the staged base model or a checkpoint's model/).
    ``eos_ids``: token ids that end a response (see `dapo.rollout.base.eos_token_ids`). Extra keyword
    arguments go to ``vllm.LLM`` (e.g. gpu_memory_utilization, max_model_len, dtype)."""

    def __init__(self, model_path: str, *, eos_ids: Iterable[int], seed: int = 0, enable_prefix_caching: bool = True,
                 **llm_kwargs):
        try:
            import vllm
        except ImportError as exc:
            raise VLLMEngineError("spec.rollout.engine=vllm needs the vllm package on the rollout image (pip "
                                  "install vllm, GPU only); use engine hf on CPU") from exc
        self._vllm = vllm
        self.eos_ids = sorted(int(i) for i in eos_ids)
        if not self.eos_ids:
            raise VLLMEngineError("VLLMEngine needs at least one EOS token id")
        kwargs = dict(model=str(model_path), worker_extension_cls=WORKER_EXTENSION, seed=seed,
                      enable_prefix_caching=enable_prefix_caching, logprobs_mode="processed_logprobs",
                      skip_tokenizer_init=False)
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self._version = 0
        self._joined = False

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt cannot be continued: every prompt needs at least one token")
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        params = [SamplingParams(**sampling_kwargs(n=n, temperature=temperature, top_p=top_p,
                                                   max_new_tokens=max_new_tokens, seed=request_seed(seed, i),
                                                   stop_token_ids=self.eos_ids))
                  for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        return samples_from_outputs(outputs, n, self._version)

    # -- weights

    def join_weight_sync(self, host: str, port: int, world_size: int, rank: int, backend: str = "auto",
                         timeout_s: float = 120.0, bucket_bytes: int = 256 << 20) -> None:
        """Join the learner's weight-sync group (receiver ``rank``; one vLLM worker per engine)."""
        self.llm.collective_rpc("dapo_join_weight_sync",
                                args=(host, port, world_size, rank, backend, timeout_s, bucket_bytes))
        self._joined = True

    def receive_weights(self) -> int:
        """Block until the learner sends the next version, load it, reset the prefix cache."""
        if not self._joined:
            raise VLLMEngineError("receive_weights() before join_weight_sync()")
        versions = set(self.llm.collective_rpc("dapo_receive_weights"))
        if len(versions) != 1:
            raise VLLMEngineError(f"vLLM workers applied different weight versions {sorted(versions)}")
        self._after_update(versions.pop())
        return self._version

    def update_weights(self, named_tensors, version: int) -> None:
        """In-process update (tests, single-node runs): tensors go to the worker by RPC."""
        batch = [(name, tensor.detach().cpu()) for name, tensor in named_tensors]
        self.llm.collective_rpc("dapo_load_weights", args=(batch,))
        self._after_update(int(version))

    def _after_update(self, version: int) -> None:
        # KV blocks cached under the old weights would otherwise be reused for new requests
        if self.llm.reset_prefix_cache() is False:
            raise VLLMEngineError(f"vLLM refused to reset its prefix cache after loading weight version {version}; "
                                  "requests still running would mix two policies")
        self._version = version
        log.info("vLLM engine serves weight version %d", version)

    def close(self) -> None:
        if self._joined:
            self.llm.collective_rpc("dapo_leave_weight_sync")
            self._joined = False
