"""The learner's checkpoint seam (single process): full weights out, full weights back in place,
tied names, and the errors a mismatched checkpoint gives. The distributed strategies (ZeRO-3
gathering and scattering) are covered in test_dist_learner.py."""

from __future__ import annotations

import pytest
import torch

from _dapo_tiny import tiny_policy
from dapo.storage.checkpointer import read_model_state, restore_model_weights
from dapo.learner.torch_learner import TorchLearner
from dapo.learner.weights import check_weight_names, parameter_aliases

torch.set_num_threads(2)


def _learner(seed: int) -> TorchLearner:
    model, _ = tiny_policy(hidden=32, layers=1, seed=seed)
    return TorchLearner(model, lr=1e-3, mini_batch_rows=4, micro_batch_rows=2)


def test_tied_embedding_is_one_parameter_under_two_names():
    model, _ = tiny_policy(hidden=32, layers=1)
    assert parameter_aliases(model) == {"lm_head.weight": "model.embed_tokens.weight"}


def test_saved_folder_loads_in_place_into_a_learner_with_other_weights(tmp_path):
    source, target = _learner(seed=0), _learner(seed=1)
    held_by_optimizer = [id(p) for group in target.optimizer.param_groups for p in group["params"]]
    source.model.save_pretrained(tmp_path, state_dict=source.full_state_dict_for_save())
    state = read_model_state(tmp_path)
    assert "lm_head.weight" not in state  # save_pretrained drops the tied alias
    restore_model_weights(target, tmp_path)
    for (name, want), got in zip(source.model.state_dict().items(), target.model.state_dict().values()):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)  # saved and loaded bytes: exact
    assert [id(p) for group in target.optimizer.param_groups for p in group["params"]] == held_by_optimizer


def test_a_tied_weight_saved_under_its_alias_name_still_loads():
    source, target = _learner(seed=0), _learner(seed=1)
    state = dict(source.full_state_dict_for_save())
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    target.load_model_weights(state)
    # a copy of the saved tensor, no arithmetic: exact
    torch.testing.assert_close(target.model.model.embed_tokens.weight, source.model.model.embed_tokens.weight,
                               atol=0, rtol=0)


def test_mismatched_names_are_listed():
    model, _ = tiny_policy(hidden=32, layers=1)
    names = set(model.state_dict()) - {"model.norm.weight"} | {"model.layers.7.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\].*unexpected \['model.layers.7"):
        check_weight_names(model, names)


def test_a_checkpoint_of_another_model_names_the_spec_field(tmp_path):
    other, _ = tiny_policy(hidden=32, layers=2)  # one layer more than the learner's model
    other.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"does not match the model: missing \[\], unexpected.*spec.model"):
        restore_model_weights(_learner(seed=0), tmp_path)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        restore_model_weights(_learner(seed=0), tmp_path / "absent")
