"""The DAPO controller loop (trainer), its metrics and learner-0's /status server."""
