"""The HTTP services of a distributed run and their clients.

- `dapo.services.rollout`: the rollout replica (POST /generate, POST /sync, GET /version,
  GET /healthz) and `RemoteRolloutEngine`, the controller's `RolloutEngine` over many replicas.
- `dapo.services.reward`: the reward replica (POST /score, GET /healthz) and `RemoteScorer`,
  the controller's `RewardScorer` over many replicas.
- `dapo.controller.status_server`: learner-0's GET /status (the operator polls it) and GET /healthz.

Every client spreads work over the replicas and retries a failed replica's share on another
(bounded), so one replica dying mid-request costs a retry, not the run.
"""
