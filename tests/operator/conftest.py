"""Fixtures of the operator tests; helpers live in operator_testkit (a unique module name, so
`import` cannot pick up another directory's conftest)."""

from operator_testkit import fake_learner  # noqa: F401  (pytest fixture)
