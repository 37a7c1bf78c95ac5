"""The forgetting guard: the general-prompt regression set scored for base and fine-tuned, and a warning
when the fine-tune loses more than 5 points there.

    from loraforge.eval.forgetting import regression_rate, forgetting
    base = regression_rate(model, tokenizer)            # before the adapter
    f = forgetting(base.rate, tuned.rate)               # f["warning"] is None or the sentence to show

`loraforge eval` puts the result in eval.json["forgetting"], prints the warning and shows it at the top
of report.html; the quickstart prints it under its table. The remedy it names is train.replay
(loraforge.train.replay): the base model's own answers to general instructions mixed into training.
"""

from __future__ import annotations

from loraforge.eval.regression import RegressionResult, load_prompts, score_regression

THRESHOLD = 0.05   # 5 points of the regression rate
REGRESSION_TOKENS = 128


def regression_rate(model, tokenizer, *, batch_size: int = 32, max_new_tokens: int = REGRESSION_TOKENS,
                    progress=None) -> tuple[RegressionResult, list[str]]:
    """The regression set answered greedily (no system prompt) and scored; with the answers."""
    from loraforge.eval.generate import build_messages, generate_batch  # torch; eval.run imports forgetting() early

    prompts = load_prompts()
    gens = generate_batch(model, tokenizer, [build_messages(p.prompt, None) for p in prompts],
                          max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    answers = [g.text for g in gens]
    return score_regression({p.id: a for p, a in zip(prompts, answers)}, prompts), answers


def forgetting(base_rate: float, tuned_rate: float, threshold: float = THRESHOLD) -> dict:
    """{"base", "finetuned", "drop" (points lost, 0-1), "ratio" (fine-tuned / base), "warning" (None or text)}."""
    drop = base_rate - tuned_rate
    warning = None
    if drop > threshold:
        warning = (f"forgetting: the fine-tuned model passes {tuned_rate:.0%} of the general-prompt regression set, "
                   f"the base model {base_rate:.0%} ({drop * 100:.0f} points lost, more than {threshold * 100:.0f}). "
                   f"Mix general chat into training with train.replay=0.25 (the base model's own answers), "
                   f"or train for fewer steps / with a lower learning rate.")
    return {"base": base_rate, "finetuned": tuned_rate, "drop": drop,
            "ratio": tuned_rate / base_rate if base_rate else None, "threshold": threshold, "warning": warning}
