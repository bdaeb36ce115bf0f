"""Learners: one-process torch, and the distributed learner (torch all-reduce or DeepSpeed ZeRO)."""
