"""The task's own metric, handed to training: what `train.select_by=metric` and `train.replay` run with.

    from loraforge.eval.validation import task_tools
    run_training(cfg, tools=task_tools(cfg))    # validation by eval.metric, replay answers by the base model

Training may not import eval (data flows one way), so the callers above it (`loraforge train`, the
quickstart, `loraforge tune`) build these tools and pass them down: batched greedy generation
(loraforge.eval.generate) and the configured metric (loraforge.eval.metrics with the options the config
names: label set, schema, pattern), checked here before any model is loaded.
"""

from __future__ import annotations

from loraforge.config import RunConfig
from loraforge.eval.generate import generate_batch
from loraforge.eval.metrics import score as score_metric
from loraforge.eval.task import metric_options
from loraforge.train.selection import TaskTools


def task_tools(cfg: RunConfig, observe=None) -> TaskTools:
    """Generation for replay and validation; the metric's scorer when train.select_by=metric (or `observe`)."""
    ec = cfg.eval

    def generate(model, tokenizer, conversations, max_new_tokens):
        return generate_batch(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                              batch_size=ec.batch_size)

    score = None
    if cfg.train.select_by == "metric":
        opts = metric_options(cfg)  # a missing label set or schema is an error now, not after training

        def score(answers: list[str], references: list) -> float:
            return score_metric(ec.metric, answers, references, **opts).value

    return TaskTools(generate=generate, score=score, metric=ec.metric, max_new_tokens=ec.max_new_tokens,
                     observe=observe)
