"""Evaluation: the rollout judge, behaviour oracles, coherence metrics, capability checks,
typed rollouts and every statistical test and interval (:mod:`neuronaudit.evaluation.stats`)."""
