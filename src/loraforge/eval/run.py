"""`loraforge eval RUN_DIR`: base vs few-shot base vs fine-tuned on the same prompts, scored and reported.

    from loraforge.eval.run import evaluate_run
    result = evaluate_run("runs/x")            # writes runs/x/eval/{results.jsonl, eval.json, report.html}
    result.models["finetuned"].value, result.errors   # an EvalResult (loraforge.eval.results)

evaluate_run = EvalOptions (what was asked beyond the run's config) + Evaluation, whose stages read top to
bottom: setup (the run's files, config, test set and every request check), generate (each model's
answers), score (metric + interval per model, paired tests: the EvalResult) and report (eval.json,
report.html, the run's trackers).

Every model gets the same test prompts and the same greedy decoding (max_new_tokens from the config,
stopping at the chat template's end-of-turn token; an answer cut by max_new_tokens is counted as
"did not stop"). The few-shot baseline is the base model with a system prompt and `fewshot` training
examples as earlier turns. Answers are appended to results.jsonl batch by batch, so an interrupted
evaluation keeps what it had, and `resume=True` (`--resume`) reuses those rows when the run and the
settings are the same (loraforge.eval.stream). A failure in one stage is recorded in eval.json["errors"]
and the report is still written. Optional extras: an LLM judge (eval.judge_url; loraforge.eval.judge_stage),
serving variants (eval.serve_as; loraforge.eval.variants) and a published reference result shown
beside ours (eval.reference). Mistakes in the request (no test file, missing label set, invalid schema
or regex) are one LoraforgeError raised before any model is loaded.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from loraforge.config import RunConfig
from loraforge.errors import LoraforgeError
from loraforge.eval import regression  # a module: tests replace its load_prompts / score_regression
from loraforge.eval.forgetting import forgetting
from loraforge.eval.judge_stage import judge_cell, judge_client, run_judge
from loraforge.eval.metrics import score
from loraforge.eval.overfit import read_metrics, verdict
from loraforge.eval.report import render_html
from loraforge.eval.results import EvalResult, ModelScore, RegressionScore, StageError, VariantRow
from loraforge.eval.stats import bootstrap_ci, bootstrap_micro_f1_ci, paired_test
from loraforge.eval.stream import ResultLog, eval_fingerprint
from loraforge.eval.structured import compile_structure, eval_structure, valid
from loraforge.eval.task import (  # noqa: F401 (read_labels: the name eval.run has always offered)
    fewshot_prompts,
    load_test,
    metric_names,
    metric_options,
    parse_reference,
    read_labels,
)
from loraforge.model import adapters  # a module: a test replaces load_adapter to fail that stage
from loraforge.model.load import load_base, pick_device
from loraforge.train.run_files import RunFiles
from loraforge.train.tracking import report_eval

MODELS = ("base", "fewshot", "finetuned")
CONSTRAINED = "finetuned_constrained"   # the fine-tuned model under structured decoding (eval.constrained)
# eval.generate and eval.variants (torch, transformers, the exporters) are imported where answers are made, after
# the request checks: a mistake is then reported in 0.5 s, not 4 s (`loraforge eval RUN --test missing.jsonl`).


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)


def _generate(model, tok, convs, name: str, log: ResultLog, ec, refs=None, ids=None, max_new_tokens=None,
              gen_fn=None):
    """Answers for every conversation, batch by batch; a batch whose rows are all in the log (--resume)
    is read back instead of generated, so the batches, and hence the answers, are the same as in one go."""
    from loraforge.eval.generate import Generation, generate_batch  # torch: see the note at the top

    n_new = max_new_tokens or ec.max_new_tokens
    gen_fn = gen_fn or (lambda part, n: generate_batch(model, tok, part, max_new_tokens=n, batch_size=ec.batch_size))
    gens = []
    for start in range(0, len(convs), ec.batch_size):
        part = convs[start:start + ec.batch_size]
        batch = log.key(name, [part, n_new])         # the whole batch: reused only as the very same batch
        keys = [f"{batch}-{j}" for j in range(len(part))]
        old = [log.lookup(k) for k in keys]
        if all(old):
            gens += [Generation(r["answer"], r["stopped"], r["new_tokens"]) for r in old]
            log.reused += len(old)
            continue
        chunk = gen_fn(part, n_new)
        for j, g in enumerate(chunk):
            i = start + j
            log.write({"model": name, "index": i, "id": ids[i] if ids else i, "answer": g.text, "stopped": g.stopped,
                       "new_tokens": g.new_tokens, "reference": None if refs is None else refs[i], "key": keys[j]})
        gens += chunk
    return gens


def _last_user(turns: list[dict]) -> str:
    return next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")


def _stage(errors: list[StageError], what: str, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one stage failing must not lose the others
        errors.append(StageError(what, f"{type(e).__name__}: {e}", traceback.format_exc(limit=5)))
        return None


def _score_model(gens: list, refs, cfg: RunConfig, opts: dict, structure=None) -> ModelScore:
    answers = [g.text for g in gens]
    res = score(cfg.eval.metric, answers, refs, **opts)
    counts = res.details.get("counts")   # a micro F1: resample examples, recompute it from their counts
    lo, hi = bootstrap_micro_f1_ci(counts, seed=cfg.seed) if counts else bootstrap_ci(res.per_example, seed=cfg.seed)
    details = {k: v for k, v in res.details.items() if k not in ("per_class", "counts")}
    if structure is not None:            # how many answers have the task's structure (label / schema-valid JSON)
        ok = valid(answers, structure)
        details["valid_rate"], details["valid_ci"] = sum(ok) / len(ok), list(bootstrap_ci(ok, seed=cfg.seed))
    return ModelScore(value=res.value, ci=[lo, hi], per_example=res.per_example, details=details, answers=answers,
                      stopped=[g.stopped for g in gens], stop_rate=sum(g.stopped for g in gens) / len(gens),
                      new_tokens=[g.new_tokens for g in gens])


@dataclass
class EvalOptions:
    """What `loraforge eval` was asked beyond the run's config; None keeps the run's eval section's value."""
    test: str | Path | None = None
    metric: str | None = None
    labels: str | Path | None = None
    fewshot: int | None = None
    limit: int | None = None
    run_base: bool | None = None
    regression: bool | None = None
    reference: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    serve_as: list[str] | str | None = None
    batch_size: int | None = None
    constrained: str | None = None
    out: str | Path | None = None     # the output folder (default RUN/eval)
    resume: bool = False

    def overrides(self) -> dict[str, Any]:
        """The eval section keys this request sets."""
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("out", "resume")}
        for k in ("test", "labels"):
            given[k] = str(given[k]) if given[k] else None
        if isinstance(given["serve_as"], str):
            given["serve_as"] = [k for k in given["serve_as"].split(",") if k.strip()]
        return {k: v for k, v in given.items() if v is not None}


class Evaluation:
    """One evaluation of a run, in named stages: setup() checks the request and loads the test set (every
    mistake raises before a model loads), generate() answers with each model (base, few-shot, fine-tuned,
    constrained, regression set, serving variants, judge), score() scores the answers, report() writes
    eval.json and report.html. run() does the four."""

    def __init__(self, files: RunFiles, options: EvalOptions, log=print):
        self.files, self.options, self.log = files, options, log
        self.errors: list[StageError] = []
        self.gens: dict[str, list | None] = {}         # model -> its answers (None: its stage failed)
        self.var_gens: dict[str, list | None] = {}     # serving variant -> its answers
        self.reg: dict[str, RegressionScore] = {}
        self.judged: dict | None = None
        self.t0 = time.time()

    def run(self) -> EvalResult:
        self.setup()
        self.t0 = time.time()
        self.generate()
        return self.report(self.score())

    # -- setup: the request checked, the test set read, nothing loaded yet
    def setup(self) -> None:
        cfg = self.files.config()
        try:
            ec = cfg.eval.model_validate(cfg.eval.model_dump() | self.options.overrides())
        except ValueError as e:  # pydantic's ValidationError
            raise LoraforgeError(f"bad evaluation setting: {e}", hint=f"metric is one of {metric_names()}") from None
        self.cfg, self.ec = cfg.model_copy(update={"eval": ec}), ec
        if not ec.test:
            raise LoraforgeError("no test data", hint="pass --test FILE or set eval.test in the run config")
        if not Path(ec.test).is_file():
            raise LoraforgeError("test file not found", where=ec.test, hint="pass --test FILE")
        self.prompts, self.refs = load_test(self.cfg, ec.test, ec.limit)
        self.opts = metric_options(self.cfg)
        self.structure, self.constrained_note = eval_structure(ec, self.opts)   # mistakes raise here
        score(ec.metric, [r if isinstance(r, str) else json.dumps(r) for r in self.refs], self.refs,
              **self.opts)                                                        # request errors now
        self.judge = judge_client(ec)
        self.device = pick_device(self.cfg.train.device)
        from loraforge.eval.variants import check_kinds  # loads transformers; torch is in since pick_device

        self.kinds = check_kinds(ec.serve_as, self.device)
        self.out_dir = Path(self.options.out) if self.options.out else self.files.run_dir / "eval"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.reg_prompts = regression.load_prompts() if ec.regression else None
        self.reg_tokens = max(ec.max_new_tokens, 128)

    # -- generate: every model's answers, streamed to results.jsonl
    def generate(self) -> None:
        cfg, ec, prompts, refs, log, errors = self.cfg, self.ec, self.prompts, self.refs, self.log, self.errors
        self.rlog = ResultLog(self.out_dir / "results.jsonl", eval_fingerprint(cfg, self.files.run_dir, self.device),
                              resume=self.options.resume)
        self.model, self.tok, _ = load_base(cfg.base_model, dtype=cfg.model.dtype, device=self.device,
                                            attn_implementation=cfg.model.attn_implementation)
        try:
            plan = [("base", prompts), ("fewshot", fewshot_prompts(cfg, prompts, ec.fewshot))] if ec.run_base else []
            for name, convs in plan:
                log(f"evaluating {name} on {len(convs)} prompts")
                self.gens[name] = _stage(errors, f"generate {name}", lambda c=convs, n=name: self._answers(c, n))
            if self.reg_prompts:  # always: the forgetting guard compares against it
                log("regression set: base")
                _stage(errors, "regression base", lambda: self._regress("base"))
            self.model = _stage(errors, "load adapter", lambda: adapters.load_adapter(self.model, self.files.adapter_dir))
            tuned = self.model is not None
            if tuned:
                log(f"evaluating finetuned on {len(prompts)} prompts")
                self.gens["finetuned"] = _stage(errors, "generate finetuned",
                                                lambda: self._answers(prompts, "finetuned"))
            if tuned and self.structure is not None:  # structured decoding: the same model, valid answers only
                log(f"evaluating finetuned, constrained to {self.structure.describe()}, on {len(prompts)} prompts")
                self.gens[CONSTRAINED] = _stage(errors, "generate finetuned constrained", self._constrained)
            if self.reg_prompts and tuned:
                log("regression set: finetuned")
                _stage(errors, "regression finetuned", lambda: self._regress("finetuned"))
            if self.kinds and self.gens.get("finetuned") is not None:
                self.var_gens["adapter"] = self.gens["finetuned"]          # base + adapter in the training dtype
                for kind in self.kinds[1:]:
                    log(f"serving variant {kind}: evaluating {len(prompts)} prompts")
                    self.var_gens[kind] = _stage(errors, f"serve-as {kind}", lambda k=kind: self._variant(k))
            if self.judge is not None:
                answers = {n: [x.text for x in g] for n, g in self.gens.items() if g is not None}
                self.judged = _stage(errors, "judge", lambda: run_judge(
                    self.judge, ec, [_last_user(p) for p in prompts], refs, answers, self.rlog, seed=cfg.seed,
                    say=log))
        finally:
            self.rlog.close()

    def _answers(self, convs, name: str, gen_fn=None) -> list:
        return _generate(self.model, self.tok, convs, name, self.rlog, self.ec, self.refs, gen_fn=gen_fn)

    def _constrained(self) -> list:
        from loraforge.eval.generate import generate_batch, stop_token_ids

        model, tok, ec = self.model, self.tok, self.ec
        grammar = compile_structure(tok, self.structure, stop_token_ids(tok, model))
        return self._answers(self.prompts, CONSTRAINED, gen_fn=lambda part, n: generate_batch(
            model, tok, part, max_new_tokens=n, batch_size=ec.batch_size, grammar=grammar))

    def _regress(self, name: str) -> None:
        from loraforge.eval.generate import build_messages

        ps = self.reg_prompts
        convs = [build_messages(p.prompt, None) for p in ps]
        g = _generate(self.model, self.tok, convs, f"regression:{name}", self.rlog, self.ec, ids=[p.id for p in ps],
                      max_new_tokens=self.reg_tokens)
        r = regression.score_regression({p.id: x.text for p, x in zip(ps, g)}, ps)
        self.reg[name] = RegressionScore(r.rate, r.by_category, r.per_example, [asdict(c) for c in r.checks],
                                         [x.text for x in g])

    def _variant(self, kind: str) -> list:
        from loraforge.eval.variants import release, variant_generator

        made: dict = {}                               # built (exported, loaded) only if a batch is not in the log

        def gen_fn(part, n):
            if not made:
                made["gen"], made["close"] = variant_generator(kind, self.files, self.cfg, self.tok, self.device,
                                                               self.out_dir, self.ec.batch_size)
            return made["gen"](part, n)

        try:
            return _generate(None, self.tok, self.prompts, f"serve-as:{kind}", self.rlog, self.ec, self.refs,
                             gen_fn=gen_fn)
        finally:
            if made:
                made["close"]()
            release()

    # -- score: metric, interval and structure validity per model
    def score(self) -> EvalResult:
        models: dict[str, ModelScore] = {}
        for name, g in self.gens.items():
            if g is not None:
                s = _stage(self.errors, f"score {name}",
                           lambda g=g: _score_model(g, self.refs, self.cfg, self.opts, self.structure))
                if s is not None:
                    models[name] = s
        result = assemble(self.files.run_dir, self.cfg, self.prompts, self.refs, models, self.reg, self.errors)
        if (result.forgetting or {}).get("warning"):  # the forgetting guard
            self.log(f"warning: {result.forgetting['warning']}")
        result.seconds = round(time.time() - self.t0, 1)
        result.resumed_rows = self.rlog.reused
        result.decoding = {"do_sample": False, "max_new_tokens": self.ec.max_new_tokens, "stop": "end-of-turn token",
                           "batch_size": self.ec.batch_size, "regression_max_new_tokens": self.reg_tokens,
                           "constrained": self.constrained_note}
        result.reference = parse_reference(self.ec.reference, self.ec.metric)
        if self.judged is not None:
            result.judge = self.judged
            for i, ex in enumerate(result.examples):
                ex["judge"] = judge_cell(self.judged, i)
        if self.var_gens:
            result.variants = self._variant_rows()
        return result

    def _variant_rows(self) -> dict[str, VariantRow]:
        scored = {}
        for kind, g in self.var_gens.items():
            if g is not None:
                s = _stage(self.errors, f"score serve-as {kind}",
                           lambda g=g: _score_model(g, self.refs, self.cfg, self.opts))
                if s is not None:
                    scored[kind] = s
        from loraforge.eval.variants import compare_variants

        return compare_variants(scored, self.cfg.seed)

    # -- report: eval.json, report.html, the run's trackers
    def report(self, result: EvalResult) -> EvalResult:
        json_path, html_path = write_outputs(result, self.out_dir)
        if self.cfg.train.report_to:  # the scores and the report go to the run's trackers too (train.tracking)
            report_eval(self.files.run_dir, self.cfg, result.to_json(), [html_path, json_path], warn=self.log)
        return result


def evaluate_run(run_dir: str | Path | RunFiles, *, test: str | Path | None = None, metric: str | None = None,
                 labels: str | Path | None = None, fewshot: int | None = None, limit: int | None = None,
                 run_base: bool | None = None, regression: bool | None = None, out: str | Path | None = None,
                 resume: bool = False, reference: str | None = None, judge_url: str | None = None,
                 judge_model: str | None = None, serve_as: list[str] | str | None = None,
                 batch_size: int | None = None, constrained: str | None = None, log=print) -> EvalResult:
    """Evaluate a finished run folder; returns the EvalResult (also written as eval.json, with report.html).
    resume=True reuses the answers (and judge verdicts) already streamed to results.jsonl by an
    interrupted evaluation of the same run with the same settings."""
    files = run_dir if isinstance(run_dir, RunFiles) else RunFiles.of_run(run_dir)
    options = EvalOptions(test=test, metric=metric, labels=labels, fewshot=fewshot, limit=limit, run_base=run_base,
                          regression=regression, reference=reference, judge_url=judge_url, judge_model=judge_model,
                          serve_as=serve_as, batch_size=batch_size, constrained=constrained, out=out, resume=resume)
    return Evaluation(files, options, log).run()


def _paired(a: list[float], b: list[float], seed: int) -> dict:
    return asdict(paired_test(a, b, seed=seed))


def assemble(run_dir: Path, cfg: RunConfig, prompts, refs, models: dict[str, ModelScore],
             reg: dict[str, RegressionScore], errors: list[StageError]) -> EvalResult:
    """The EvalResult: metric table, paired tests, per-example outcomes, regression, overfitting, config."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    comparisons = {}
    tuned = models.get("finetuned")
    for other in ("base", "fewshot"):
        if tuned and other in models:
            comparisons[f"finetuned_vs_{other}"] = _paired(tuned.per_example, models[other].per_example, cfg.seed)
    if tuned and CONSTRAINED in models:
        comparisons[f"{CONSTRAINED}_vs_finetuned"] = _paired(models[CONSTRAINED].per_example, tuned.per_example,
                                                             cfg.seed)
    if "base" in reg and "finetuned" in reg:
        comparisons["regression_finetuned_vs_base"] = _paired(reg["finetuned"].per_example, reg["base"].per_example,
                                                              cfg.seed)
    ref_model = "base" if "base" in models else "fewshot" if "fewshot" in models else None
    examples = []
    for i, (p, r) in enumerate(zip(prompts, refs)):
        ex = {"index": i, "prompt": _last_user(p), "reference": r,
              "answers": {m: v.answers[i] for m, v in models.items()},
              "scores": {m: v.per_example[i] for m, v in models.items()},
              "stopped": {m: v.stopped[i] for m, v in models.items()}, "outcome": "tie"}
        if tuned and ref_model:
            d = tuned.per_example[i] - models[ref_model].per_example[i]
            ex["outcome"] = "win" if d > 0 else "loss" if d < 0 else "tie"
        examples.append(ex)
    guard = forgetting(reg["base"].rate, reg["finetuned"].rate) if {"base", "finetuned"} <= reg.keys() else None
    return EvalResult(
        run_dir=str(run_dir), test=cfg.eval.test, metric=cfg.eval.metric, n=len(prompts), outcome_against=ref_model,
        models={m: v.summary() for m, v in models.items()},
        never_stopped={m: sum(not s for s in v.stopped) for m, v in models.items()},
        comparisons=comparisons, examples=examples, regression={m: v.to_json() for m, v in reg.items()},
        overfit=verdict(rows), forgetting=guard,
        curves={"train": [[r["step"], r["loss"]] for r in rows if "loss" in r],
                "val": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r],
                "val_metric": [[r["step"], r["val_metric"]] for r in rows if "val_metric" in r]},
        config=json.loads(json.dumps(cfg.model_dump(mode="json"))), errors=errors,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"))


def write_outputs(result: EvalResult, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tree = result.to_json()
    write_json(out_dir / "eval.json", tree)
    html = out_dir / "report.html"
    tmp = html.with_name(html.name + ".tmp")
    tmp.write_text(render_html(tree), encoding="utf-8")
    tmp.replace(html)
    return out_dir / "eval.json", html
