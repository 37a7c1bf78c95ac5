"""Typed results of `loraforge eval`: what evaluate_run returns and what eval.json holds, field for field.

    result = evaluate_run("runs/x")                    # an EvalResult
    result.models["finetuned"].value, result.models["finetuned"].ci, result.errors[0].stage
    result.to_json()                                   # the eval.json tree (write_outputs writes it)

ModelScore is one model's answers scored (with the per-example lists the paired tests and the examples
table need); eval.json keeps its ModelSummary. The per-example rows, the paired tests, the judge summary,
the curves and the config stay JSON trees: they are written as they are and read by the HTML report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class ModelSummary:
    """One model's row of the metric table."""
    value: float
    ci: list[float]
    stop_rate: float
    details: dict[str, Any]


@dataclass
class ModelScore:
    """One model's answers scored against the references."""
    value: float
    ci: list[float]
    per_example: list[float]
    details: dict[str, Any]
    answers: list[str]
    stopped: list[bool]
    stop_rate: float
    new_tokens: list[int]

    def summary(self) -> ModelSummary:
        return ModelSummary(self.value, self.ci, self.stop_rate, self.details)


@dataclass
class RegressionScore:
    """The general-prompt regression set answered by one model."""
    rate: float
    by_category: dict[str, float]
    per_example: list[float]
    checks: list[dict]
    answers: list[str]

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("rate", "by_category", "checks", "answers")}


@dataclass
class VariantRow:
    """One serving variant (--serve-as) against the adapter row."""
    value: float
    ci: list[float]
    stop_rate: float
    agreement: float | None = None      # share of answers identical to the adapter's
    vs_adapter: dict | None = None      # paired test against the adapter (stats.PairedTest as a dict)
    answers: list[str] = field(default_factory=list)


@dataclass
class StageError:
    """A stage that failed; the evaluation went on without it."""
    stage: str
    error: str
    traceback: str


@dataclass
class EvalResult:
    """eval.json, typed; the field order is the file's key order."""
    run_dir: str
    test: str | None
    metric: str
    n: int
    outcome_against: str | None
    models: dict[str, ModelSummary]
    never_stopped: dict[str, int]
    comparisons: dict[str, dict]
    examples: list[dict]
    regression: dict[str, dict]
    overfit: dict
    forgetting: dict | None
    curves: dict[str, list]
    config: dict
    errors: list[StageError]
    created: str
    seconds: float = 0.0
    resumed_rows: int = 0
    decoding: dict = field(default_factory=dict)
    reference: dict | None = None
    judge: dict | None = None            # only when eval.judge_url is set
    variants: dict[str, VariantRow] | None = None   # only with --serve-as

    def to_json(self) -> dict:
        """The eval.json tree; judge and variants appear only when they were asked for."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("judge", "variants") and v is None:
                continue
            if f.name in ("models", "variants"):
                v = {k: asdict(x) for k, x in v.items()}
            elif f.name == "errors":
                v = [asdict(e) for e in v]
            out[f.name] = v
        return out
