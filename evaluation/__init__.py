"""evaluation/: scores checkpoints on tasks defined as data (never trains).

    from hibari.evaluation import loglikelihood_tokens, pass_at_k
    from hibari.evaluation import load_lm, load_task, evaluate_task

See docs/evaluation.md. Scaling-law fitting lives in evaluation/scaling (separate room).
"""
from hibari.evaluation.loglikelihood import (
    loglikelihood_tokens,
    rolling_loglikelihood,
    rolling_windows,
    token_scores,
)
from hibari.evaluation.passk import mean_pass_at_k, pass_at_k

__all__ = ["evaluate_task", "load_lm", "load_task", "loglikelihood_tokens", "mean_pass_at_k",
           "pass_at_k", "rolling_loglikelihood", "rolling_windows", "token_scores"]


def __getattr__(name):  # heavier entry points import lazily
    if name == "evaluate_task":
        from hibari.evaluation.runner import evaluate_task
        return evaluate_task
    if name == "load_lm":
        from hibari.evaluation.lm import load_lm
        return load_lm
    if name == "load_task":
        from hibari.evaluation.tasks import load_task
        return load_task
    raise AttributeError(name)
