"""Which step's weights a run ends with, and when it stops: validation by the task's own metric.

At every validation (train.eval_every, and the last step) the loop calls a `Selection` (its
`on_validate` hook). With train.select_by=metric it generates greedy answers to a seeded slice of the
validation examples (train.validate_limit) and scores them with the config's eval.metric; the row gets
`val_metric` beside `val_loss`. The best step so far (by that metric, or by validation loss with
select_by=loss) is saved as a checkpoint that keep_last never prunes (TrainerState.protect_step); after
train.early_stopping_patience validations without improvement the loop is asked to stop. At the end
`adopt_best` loads the chosen checkpoint's weights, so adapter/ holds them while the last step's
checkpoint stays in checkpoints/.

Generating and scoring belong to loraforge.eval, which train may not import: the caller passes them in as
`TaskTools` (loraforge.eval.validation.task_tools builds them from a config). `observe` lets a caller
see every validation row (loraforge.tune reports it to Optuna, whose pruner may stop the trial by
raising from there).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.config import RunConfig
from loraforge.data.formats import Example
from loraforge.errors import LoraforgeError
from loraforge.train.checkpoint import TrainerState


@dataclass
class TaskTools:
    """What training borrows from loraforge.eval: batched greedy generation and the task's metric."""

    # (model, tokenizer, conversations, max_new_tokens) -> answers, each with .text and .stopped
    generate: Callable[[Any, Any, list[list[dict]], int], list]
    # (answers, references) -> the metric's value, higher is better; None: no metric (replay only)
    score: Callable[[list[str], list], float] | None = None
    metric: str = ""
    max_new_tokens: int = 32
    # called with (step, validation row) after each validation; may raise to end the run
    observe: Callable[[int, dict], None] | None = None


def prompt_and_reference(ex: Example) -> tuple[list[dict], Any]:
    """(turns before the last assistant turn, the expected answer: the label, else that turn's text)."""
    last = max((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), default=None)
    turns = ex.messages if last is None else ex.messages[:last]
    ref = ex.label if ex.label is not None else None if last is None else ex.messages[last]["content"]
    return list(turns), ref


def validation_slice(examples: list[Example], limit: int, seed: int) -> tuple[list[list[dict]], list]:
    """Prompts and references of a seeded slice of at most `limit` validation examples (those with a reference)."""
    pairs = [p for p in map(prompt_and_reference, examples) if p[1] is not None]
    if len(pairs) > limit:
        pairs = [pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), limit))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


class Selection:
    """The loop's on_validate hook: task-metric validation, the best checkpoint, early stopping."""

    def __init__(self, cfg: RunConfig, state: TrainerState, model, tokenizer, val_examples: list[Example],
                 save: Callable[[], Any], tools: TaskTools | None = None, log=print):
        tc = cfg.train
        self.by, self.patience, self.state, self.save, self.log = tc.select_by, tc.early_stopping_patience, \
            state, save, log
        self.model, self.tokenizer = model, tokenizer
        self.tools = tools if tools is not None and tools.score is not None else None
        self.observe = tools.observe if tools is not None else None
        if self.by == "metric" and self.tools is None:
            raise LoraforgeError("train.select_by=metric needs the task's metric to generate and score with",
                                 hint="train through `loraforge train` / `loraforge tune` (they pass it), or "
                                      "call run_training(..., tools=loraforge.eval.validation.task_tools(cfg))")
        self.prompts, self.refs = validation_slice(val_examples, tc.validate_limit, cfg.seed) \
            if self.by == "metric" else ([], [])
        if (self.by != "last" or self.patience) and not val_examples:
            raise LoraforgeError(f"train.select_by={self.by} / early stopping need validation examples",
                                 hint="set data.validation or data.validation_split > 0")
        if self.by == "metric" and not self.prompts:
            raise LoraforgeError("select_by=metric: no validation example has a reference answer",
                                 hint="give validation examples an assistant turn or a label")

    @property
    def active(self) -> bool:
        return self.by != "last" or self.patience is not None or self.observe is not None

    def __call__(self, step: int, val_loss: float | None) -> dict:
        row: dict = {}
        value = None
        if self.tools is not None:
            answers = self.tools.generate(self.model, self.tokenizer, self.prompts, self.tools.max_new_tokens)
            value = float(self.tools.score([a.text for a in answers], self.refs))
            row["val_metric"] = value
        # the quantity that decides, higher is better: the metric, else minus the validation loss
        quantity = value if value is not None else None if val_loss is None else -val_loss
        s = self.state
        if quantity is not None:
            if s.select_score is None or quantity > s.select_score:
                s.select_score, s.select_step, s.since_best = quantity, step, 0
                if self.by != "last":
                    s.protect_step = step
                    self.save()  # the best step's checkpoint, which keep_last leaves alone
            else:
                s.since_best += 1
        if self.patience is not None and s.since_best >= self.patience:
            self.log(f"early stopping at step {step}: {self.patience} validations without improvement "
                     f"(best step {s.select_step})")
            s.stopped_early = True
            row["stop"] = True
        if self.observe is not None:
            self.observe(step, {"val_loss": val_loss, **row})
        return row

    def describe(self) -> dict:
        """summary.json's account of the choice: which step, by what, with what value, and why."""
        s = self.state
        value = None if s.select_score is None else s.select_score if self.tools else -s.select_score
        what = f"validation {self.tools.metric}" if self.tools else "validation loss"
        if self.by == "last":
            why = "train.select_by=last: the last step's weights"
        else:
            why = f"best {what} ({value:.4g}) of {len(s.history)} validations" if value is not None else \
                "no validation ran: the last step's weights"
        if s.stopped_early:
            why += f"; stopped early after {self.patience} validations without improvement"
        return {"select_by": self.by, "selected_step": s.protect_step if self.by != "last" else s.step,
                "selected_value": value, "selected_what": what, "stopped_early": s.stopped_early,
                "selection": why}


def adopt_best(model, ckpt: Path) -> None:
    """Load a checkpoint's adapter weights (the best step's) into `model`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(ckpt / "adapter_model.safetensors", device=str(next(model.parameters()).device))
    set_peft_model_state_dict(model, weights)
