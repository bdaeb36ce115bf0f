"""A `dapo.storage.checkpointer.Checkpointable` over a bare learner, standing in for the trainer
in tests that checkpoint a learner without a training loop."""

from __future__ import annotations

import torch

from dapo.storage.checkpointer import CheckpointContents


class SyncRecorder:
    """Stands in for the rollout engine: keeps what the learner synced."""

    def __init__(self):
        self.synced: dict[str, torch.Tensor] = {}

    def update_weights(self, named, version):
        self.synced = {n: t.detach().to("cpu", copy=True) for n, t in named}


class LearnerCheckpointable:
    """The trainer's part of a checkpoint as `dapo.controller.trainer.Trainer` provides it, for a
    learner alone: the trainer state is the step and the weight version, and the restored
    weights go to a `SyncRecorder`."""

    def __init__(self, learner, step: int, total_steps: int = 10):
        self.learner, self.step, self.weight_version, self.total_steps = learner, step, step, total_steps
        self.engine = SyncRecorder()

    def checkpoint_contents(self) -> CheckpointContents:
        model_state = self.learner.full_state_dict_for_save()  # first: ZeRO-3 gathers
        return CheckpointContents(model=self.learner.model, model_state=model_state,
                                  learner_state=self.learner.state_dict(),
                                  trainer_state={"step": self.step, "weight_version": self.weight_version},
                                  meta={"weight_version": self.weight_version, "total_steps": self.total_steps})

    def load_model_weights(self, state) -> None:
        self.learner.load_model_weights(state)

    def load_checkpoint_state(self, learner_state: dict, trainer_state: dict, trainer_tensors=None) -> None:
        self.learner.load_state_dict(learner_state)
        self.step, self.weight_version = trainer_state["step"], trainer_state["weight_version"]

    def after_restore(self, step: int, uri: str) -> str:
        self.engine.update_weights(self.learner.named_parameters_for_sync(), self.weight_version)
        return f"weight version {self.weight_version}"
