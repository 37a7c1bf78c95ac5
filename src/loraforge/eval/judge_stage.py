"""The LLM judge inside `loraforge eval`: rubric scores per model and fine-tuned vs base A/B, streamed.

    client = judge_client(cfg.eval)                       # None when eval.judge_url is unset
    summary = run_judge(client, cfg.eval, prompts, refs, {"base": [...], "finetuned": [...]}, rlog)

The pairwise comparison puts the fine-tuned answer against the base answer (the few-shot base when
the base was not run) and asks twice with positions swapped (loraforge.eval.llm_judge): win/tie/loss
rates count the judged pairs, errors (timeouts, garbage replies) are counted apart and kept per
example with their reason. Verdicts are written to results.jsonl in chunks as they come; with
--resume a verdict already there for the same judge, prompt and answers is reused (errors are asked
again). Nothing here raises for a bad reply: the evaluation never dies because of the judge.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from loraforge.errors import LoraforgeError
from loraforge.eval.llm_judge import JudgeClient, PairwiseResult, RubricScore, pairwise, rubric_scores, win_rates
from loraforge.eval.stats import bootstrap_ci
from loraforge.eval.stream import ResultLog

CHUNK = 16


def judge_client(ec) -> JudgeClient | None:
    """The configured judge (None when there is none); a missing API key env var is one clear error."""
    if not ec.judge_url:
        return None
    key = None
    if ec.judge_api_key_env:
        key = os.environ.get(ec.judge_api_key_env)
        if not key:
            raise LoraforgeError(f"the judge's API key variable {ec.judge_api_key_env} is not set",
                                 hint=f"export {ec.judge_api_key_env}=... or unset eval.judge_api_key_env")
    return JudgeClient(ec.judge_url, ec.judge_model, api_key=key, timeout=ec.judge_timeout)


def _mean_ci(values: list[float], seed: int) -> tuple[float | None, list[float | None]]:
    if not values:
        return None, [None, None]
    return sum(values) / len(values), list(bootstrap_ci(values, seed=seed))


def _cached(log: ResultLog, name: str, keys: list[str], fresh, to_row, from_row) -> list:
    """Results for every key: reused from the log where it holds a non-error row, else computed by
    `fresh(indexes)` chunk by chunk and streamed."""
    out: list = [None] * len(keys)
    todo = []
    for i, k in enumerate(keys):
        row = log.lookup(k)
        if row is not None and row.get("verdict") != "error":
            out[i] = from_row(row)
            log.reused += 1
        else:
            todo.append(i)
    for start in range(0, len(todo), CHUNK):
        idx = todo[start:start + CHUNK]
        for i, res in zip(idx, fresh(idx)):
            out[i] = res
            log.write({"model": name, "index": i, "key": keys[i], **to_row(res)})
    return out


def _rubric_row(r: RubricScore) -> dict:
    return {"verdict": r.verdict, "score": r.score, "reason": r.reason}


def _pair_row(r: PairwiseResult) -> dict:
    return {"verdict": r.verdict, "first": r.first, "second": r.second, "reason": r.reason}


def run_judge(client: JudgeClient, ec, prompts: Sequence[str], refs: Sequence, answers: dict[str, list[str]],
              log: ResultLog, seed: int = 0, say=print) -> dict:
    """Rubric scores per model and pairwise fine-tuned vs baseline, as the eval.json "judge" section."""
    refs_s = [r if isinstance(r, str) else str(r) for r in refs]
    ident = [client.base_url, client.model]
    out: dict = {"url": client.base_url, "model": client.model, "mode": ec.judge_mode, "rubric": {}, "pairwise": None}
    if ec.judge_mode in ("rubric", "both"):
        for name, ans in answers.items():
            say(f"judge: rubric scores for {name}")
            keys = [log.key("judge:rubric", [ident, p, r, a]) for p, r, a in zip(prompts, refs_s, ans)]
            res = _cached(log, f"judge:rubric:{name}", keys,
                          lambda idx, ans=ans: rubric_scores(client, [prompts[i] for i in idx],
                                                             [ans[i] for i in idx], references=[refs_s[i] for i in idx]),
                          _rubric_row, lambda row: RubricScore(row["verdict"], row["score"], row["reason"], ""))
            ok = [r.score for r in res if r.verdict == "ok"]
            mean, ci = _mean_ci(ok, seed)
            out["rubric"][name] = {"mean": mean, "ci": ci, "judged": len(ok), "errors": len(res) - len(ok),
                                   "per_example": [_rubric_row(r) for r in res]}
    baseline = "base" if "base" in answers else "fewshot" if "fewshot" in answers else None
    if ec.judge_mode in ("pairwise", "both") and "finetuned" in answers and baseline:
        say(f"judge: finetuned vs {baseline}, positions swapped")
        a, b = answers["finetuned"], answers[baseline]
        keys = [log.key("judge:pairwise", [ident, p, x, y]) for p, x, y in zip(prompts, a, b)]
        res = _cached(log, f"judge:pairwise:finetuned_vs_{baseline}", keys,
                      lambda idx: pairwise(client, [prompts[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx]),
                      _pair_row, lambda row: PairwiseResult(row["verdict"], row["first"], row["second"], row["reason"]))
        w = win_rates(res)
        out["pairwise"] = {"a": "finetuned", "b": baseline, "win": w.win, "tie": w.tie, "loss": w.loss,
                           "judged": w.judged, "errors": w.errors, "per_example": [_pair_row(r) for r in res]}
    return out


def judge_cell(judge: dict | None, i: int) -> dict | None:
    """The per-example judge verdicts for example i (for eval.json's examples and the report column)."""
    if not judge:
        return None
    cell: dict = {"rubric": {m: (v["per_example"][i]["score"] if v["per_example"][i]["verdict"] == "ok" else "error")
                             for m, v in judge["rubric"].items()}}
    if judge.get("pairwise"):
        p = judge["pairwise"]["per_example"][i]
        cell["pairwise"] = p["verdict"]
        if p["reason"]:
            cell["reason"] = p["reason"]
    for v in judge["rubric"].values():
        if v["per_example"][i]["reason"] and "reason" not in cell:
            cell["reason"] = v["per_example"][i]["reason"]
    return cell
