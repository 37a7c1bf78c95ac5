"""`loraforge eval RUN_DIR`: base vs few-shot base vs fine-tuned on the same prompts, scored and reported.

    from loraforge.eval.run import evaluate_run
    result = evaluate_run("runs/x")            # writes runs/x/eval/{results.jsonl, eval.json, report.html}

Every model gets the same test prompts and the same greedy decoding (max_new_tokens from the config,
stopping at the chat template's end-of-turn token; an answer cut by max_new_tokens is counted as
"did not stop"). The few-shot baseline is the base model with a system prompt and `fewshot` training
examples as earlier turns. Answers are appended to results.jsonl batch by batch, so an interrupted
evaluation keeps what it had, and `resume=True` (`--resume`) reuses those rows when the run and the
settings are the same (loraforge.eval.stream). A failure in one stage is recorded in eval.json["errors"]
and the report is still written. Optional extras: an LLM judge (eval.judge_url; loraforge.eval.judging),
serving variants (eval.serve_as; loraforge.eval.variants) and a published reference result shown
beside ours (eval.reference). Mistakes in the request (no test file, missing label set, invalid schema
or regex) are one LoraforgeError raised before any model is loaded.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loraforge.config import RunConfig, load_config
from loraforge.errors import LoraforgeError
from loraforge import files
from loraforge.eval.overfit import read_metrics, verdict
from loraforge.eval.stream import ResultLog, eval_fingerprint

MODELS = ("base", "fewshot", "finetuned")
CONSTRAINED = "finetuned_constrained"   # the fine-tuned model under structured decoding (eval.constrained)
NEEDS_LABELS = ("accuracy", "macro_f1")


def write_json(path: Path, obj: Any) -> None:
    files.write_json(path, obj, default=str)


def read_labels(path: str | Path) -> list[str]:
    """A label set: a JSON list, or one label a line."""
    p = Path(path)
    if not p.is_file():
        raise LoraforgeError("label file not found", where=str(p), hint="pass --labels FILE (one label a line)")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return [str(x) for x in json.loads(text)]
        except json.JSONDecodeError as e:
            raise LoraforgeError(f"label file is not a JSON list: {e.msg}", where=str(p)) from None
    labels = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not labels:
        raise LoraforgeError("label file is empty", where=str(p))
    return labels


def metric_options(cfg: RunConfig) -> dict[str, Any]:
    """The keyword options `metrics.score` needs for the configured metric."""
    ec, opts = cfg.eval, {}
    if ec.metric in NEEDS_LABELS:
        if not ec.labels:
            raise LoraforgeError(f"metric {ec.metric} needs the label set",
                                 hint="pass --labels FILE or set eval.labels (one label a line)")
        opts["labels"] = read_labels(ec.labels)
    if ec.metric == "json_schema":
        if not ec.schema_file:
            raise LoraforgeError("metric json_schema needs a schema", hint="set eval.schema_file=schema.json")
        try:
            opts["schema"] = json.loads(Path(ec.schema_file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LoraforgeError("schema file not found", where=ec.schema_file) from None
        except json.JSONDecodeError as e:
            raise LoraforgeError(f"the schema file is not JSON: {e.msg}", where=ec.schema_file) from None
    if ec.metric == "regex":
        if not ec.pattern:
            raise LoraforgeError("metric regex needs a pattern", hint="set eval.pattern='...'")
        opts["pattern"] = ec.pattern
    return opts


def _split(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(prompt turns, reference): everything before the last assistant turn, and that turn's text."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return list(messages), None
    return list(messages[:last]), messages[last]["content"]


def load_test(cfg: RunConfig, test: str | Path, limit: int | None) -> tuple[list[list[dict]], list[Any]]:
    from loraforge.data.formats import read_examples

    d = cfg.data
    exs = read_examples(test, d.format, prompt_column=d.prompt_column, response_column=d.response_column,
                        system_prompt=d.system_prompt)
    exs = exs[:limit] if limit else exs
    prompts, refs = [], []
    for ex in exs:
        turns, ref = _split(ex.messages)
        ref = ex.label if ex.label is not None else ref
        if ref is None:
            raise LoraforgeError("a test example has no reference answer (no assistant turn, no label)",
                                 where=ex.source, hint="give every test example its expected answer")
        prompts.append(turns)
        refs.append(ref)
    if not prompts:
        raise LoraforgeError("the test file has no examples", where=str(test))
    return prompts, refs


def fewshot_prompts(cfg: RunConfig, prompts: list[list[dict]], k: int) -> list[list[dict]]:
    """The same prompts with a system prompt and k (seeded) training examples as earlier turns."""
    shots: list[dict] = []
    if k and cfg.data.train and Path(cfg.data.train).is_file():
        from loraforge.data.formats import read_examples

        d = cfg.data
        pool = read_examples(d.train, d.format, prompt_column=d.prompt_column, response_column=d.response_column)
        for ex in random.Random(cfg.seed).sample(pool, min(k, len(pool))):
            turns, ref = _split(ex.messages)
            shots += [m for m in turns if m["role"] != "system"] + [{"role": "assistant", "content": ref or ""}]
    system = cfg.eval.fewshot_system or cfg.data.system_prompt
    out = []
    for p in prompts:
        body = [m for m in p if m["role"] != "system"]
        sys_turns = [{"role": "system", "content": system}] if system else [m for m in p if m["role"] == "system"]
        out.append(sys_turns + shots + body)
    return out


def _generate(model, tok, convs, name: str, log: ResultLog, ec, refs=None, ids=None, max_new_tokens=None,
              gen_fn=None):
    """Answers for every conversation, batch by batch; a batch whose rows are all in the log (--resume)
    is read back instead of generated, so the batches, and hence the answers, are the same as in one go."""
    from loraforge.eval.generate import Generation, generate_batch

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


def _constrained(model, tok, prompts, structure, rlog, ec, refs):
    from loraforge.eval.generate import generate_batch, stop_token_ids
    from loraforge.eval.structured import compile_structure

    grammar = compile_structure(tok, structure, stop_token_ids(tok, model))
    return _generate(model, tok, prompts, CONSTRAINED, rlog, ec, refs, gen_fn=lambda part, n: generate_batch(
        model, tok, part, max_new_tokens=n, batch_size=ec.batch_size, grammar=grammar))


def _last_user(turns: list[dict]) -> str:
    return next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")


def _stage(errors: list, what: str, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one stage failing must not lose the others
        errors.append({"stage": what, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=5)})
        return None


def _score_model(name: str, gens, refs, cfg: RunConfig, opts: dict, structure=None) -> dict:
    from loraforge.eval.metrics import score
    from loraforge.eval.stats import bootstrap_ci, bootstrap_micro_f1_ci

    answers = [g.text for g in gens]
    res = score(cfg.eval.metric, answers, refs, **opts)
    counts = res.details.get("counts")   # a micro F1: resample examples, recompute it from their counts
    lo, hi = bootstrap_micro_f1_ci(counts, seed=cfg.seed) if counts else bootstrap_ci(res.per_example, seed=cfg.seed)
    details = {k: v for k, v in res.details.items() if k not in ("per_class", "counts")}
    if structure is not None:            # how many answers have the task's structure (label / schema-valid JSON)
        from loraforge.eval.structured import valid

        ok = valid(answers, structure)
        details["valid_rate"], details["valid_ci"] = sum(ok) / len(ok), list(bootstrap_ci(ok, seed=cfg.seed))
    return {"value": res.value, "ci": [lo, hi], "per_example": res.per_example, "details": details,
            "answers": answers, "stopped": [g.stopped for g in gens],
            "stop_rate": sum(g.stopped for g in gens) / len(gens), "new_tokens": [g.new_tokens for g in gens]}


def evaluate_run(run_dir: str | Path, *, test: str | Path | None = None, metric: str | None = None,
                 labels: str | Path | None = None, fewshot: int | None = None, limit: int | None = None,
                 run_base: bool | None = None, regression: bool | None = None, out: str | Path | None = None,
                 resume: bool = False, reference: str | None = None, judge_url: str | None = None,
                 judge_model: str | None = None, serve_as: list[str] | str | None = None,
                 batch_size: int | None = None, constrained: str | None = None, log=print) -> dict:
    """Evaluate a finished run folder; returns the eval.json dict (also written, with report.html).
    resume=True reuses the answers (and judge verdicts) already streamed to results.jsonl by an
    interrupted evaluation of the same run with the same settings."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise LoraforgeError("not a finished run folder (config.yaml and adapter/ are needed)", where=str(run_dir),
                             hint="pass the output_dir of a `loraforge train` run")
    cfg = load_config(run_dir / "config.yaml")
    if isinstance(serve_as, str):
        serve_as = [k for k in serve_as.split(",") if k.strip()]
    given = {"test": str(test) if test else None, "metric": metric, "labels": str(labels) if labels else None,
             "fewshot": fewshot, "limit": limit, "run_base": run_base, "regression": regression,
             "reference": reference, "judge_url": judge_url, "judge_model": judge_model, "serve_as": serve_as,
             "batch_size": batch_size, "constrained": constrained}
    upd = {k: v for k, v in given.items() if v is not None}
    try:
        ec = cfg.eval.model_validate(cfg.eval.model_dump() | upd)
    except ValueError as e:  # pydantic's ValidationError
        raise LoraforgeError(f"bad evaluation setting: {e}", hint=f"metric is one of {_metric_names()}") from None
    cfg = cfg.model_copy(update={"eval": ec})
    if not ec.test:
        raise LoraforgeError("no test data", hint="pass --test FILE or set eval.test in the run config")
    if not Path(ec.test).is_file():
        raise LoraforgeError("test file not found", where=ec.test, hint="pass --test FILE")
    prompts, refs = load_test(cfg, ec.test, ec.limit)
    opts = metric_options(cfg)
    from loraforge.eval.structured import eval_structure

    structure, constrained_note = eval_structure(ec, opts)   # mistakes raise here, before any model loads
    from loraforge.eval.judging import judge_cell, judge_client, run_judge
    from loraforge.eval.metrics import score
    from loraforge.eval.variants import check_kinds, release, variant_generator

    score(ec.metric, [r if isinstance(r, str) else json.dumps(r) for r in refs], refs, **opts)  # request errors now
    judge = judge_client(ec)
    from loraforge.model.adapters import load_adapter
    from loraforge.model.load import load_base, pick_device

    device = pick_device(cfg.train.device)
    kinds = check_kinds(ec.serve_as, device)
    out_dir = Path(out) if out else run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    errors: list[dict] = []
    models: dict[str, dict] = {}
    gens: dict[str, list] = {}
    reg: dict[str, dict] = {}
    var_gens: dict[str, list] = {}
    judged = None
    rlog = ResultLog(out_dir / "results.jsonl", eval_fingerprint(cfg, run_dir, device), resume=resume)
    model, tok, _ = load_base(cfg.base_model, dtype=cfg.model.dtype, device=device,
                              attn_implementation=cfg.model.attn_implementation)
    reg_prompts = None
    if ec.regression:
        from loraforge.eval.regression import load_prompts

        reg_prompts = load_prompts()
    reg_tokens = max(ec.max_new_tokens, 128)

    def regress(name: str) -> None:
        from loraforge.eval.generate import build_messages
        from loraforge.eval.regression import score_regression

        convs = [build_messages(p.prompt, None) for p in reg_prompts]
        g = _generate(model, tok, convs, f"regression:{name}", rlog, ec, ids=[p.id for p in reg_prompts],
                      max_new_tokens=reg_tokens)
        r = score_regression({p.id: x.text for p, x in zip(reg_prompts, g)}, reg_prompts)
        reg[name] = {"rate": r.rate, "by_category": r.by_category, "per_example": r.per_example,
                     "checks": [asdict(c) for c in r.checks], "answers": [x.text for x in g]}

    def variant(kind: str) -> list:
        made: dict = {}                               # built (exported, loaded) only if a batch is not in the log

        def gen_fn(part, n):
            if not made:
                made["gen"], made["close"] = variant_generator(kind, run_dir, cfg, tok, device, out_dir, ec.batch_size)
            return made["gen"](part, n)

        try:
            return _generate(None, tok, prompts, f"serve-as:{kind}", rlog, ec, refs, gen_fn=gen_fn)
        finally:
            if made:
                made["close"]()
            release()

    try:
        plan = [("base", prompts), ("fewshot", fewshot_prompts(cfg, prompts, ec.fewshot))] if ec.run_base else []
        for name, convs in plan:
            log(f"evaluating {name} on {len(convs)} prompts")
            gens[name] = _stage(errors, f"generate {name}", lambda c=convs, n=name: _generate(model, tok, c, n, rlog,
                                                                                              ec, refs))
        if reg_prompts:  # always: the forgetting guard compares against it
            log("regression set: base")
            _stage(errors, "regression base", lambda: regress("base"))
        model = _stage(errors, "load adapter", lambda: load_adapter(model, run_dir / "adapter"))
        if model is not None:
            log(f"evaluating finetuned on {len(prompts)} prompts")
            gens["finetuned"] = _stage(errors, "generate finetuned",
                                       lambda: _generate(model, tok, prompts, "finetuned", rlog, ec, refs))
        if model is not None and structure is not None:  # structured decoding: the same model, valid answers only
            log(f"evaluating finetuned, constrained to {structure.describe()}, on {len(prompts)} prompts")
            gens[CONSTRAINED] = _stage(errors, "generate finetuned constrained",
                                       lambda: _constrained(model, tok, prompts, structure, rlog, ec, refs))
        if reg_prompts and model is not None:
            log("regression set: finetuned")
            _stage(errors, "regression finetuned", lambda: regress("finetuned"))
        if kinds and gens.get("finetuned") is not None:
            var_gens["adapter"] = gens["finetuned"]          # base + adapter in the training dtype
            for kind in kinds[1:]:
                log(f"serving variant {kind}: evaluating {len(prompts)} prompts")
                var_gens[kind] = _stage(errors, f"serve-as {kind}", lambda k=kind: variant(k))
        if judge is not None:
            answers = {n: [x.text for x in g] for n, g in gens.items() if g is not None}
            judged = _stage(errors, "judge", lambda: run_judge(judge, ec, [_last_user(p) for p in prompts], refs,
                                                               answers, rlog, seed=cfg.seed, say=log))
    finally:
        rlog.close()

    for name, g in gens.items():
        if g is not None:
            s = _stage(errors, f"score {name}", lambda n=name, g=g: _score_model(n, g, refs, cfg, opts, structure))
            if s is not None:
                models[name] = s
    result = assemble(run_dir, cfg, prompts, refs, models, reg, errors)
    if (result.get("forgetting") or {}).get("warning"):  # the forgetting guard
        log(f"warning: {result['forgetting']['warning']}")
    result["seconds"] = round(time.time() - t0, 1)
    result["resumed_rows"] = rlog.reused
    result["decoding"] = {"do_sample": False, "max_new_tokens": ec.max_new_tokens, "stop": "end-of-turn token",
                          "batch_size": ec.batch_size, "regression_max_new_tokens": reg_tokens,
                          "constrained": constrained_note}
    result["reference"] = parse_reference(ec.reference, ec.metric)
    if judged is not None:
        result["judge"] = judged
        for i, ex in enumerate(result["examples"]):
            ex["judge"] = judge_cell(judged, i)
    if var_gens:
        result["variants"] = _variant_rows(var_gens, refs, cfg, opts, errors)
    json_path, html_path = write_outputs(result, out_dir)
    if cfg.train.report_to:  # the scores and the report go to the run's trackers too (train.tracking)
        from loraforge.train.tracking import report_eval

        report_eval(run_dir, cfg, result, [html_path, json_path], warn=log)
    return result


def _variant_rows(var_gens: dict, refs, cfg: RunConfig, opts: dict, errors: list) -> dict:
    from loraforge.eval.variants import compare_variants

    scored = {}
    for kind, g in var_gens.items():
        if g is not None:
            s = _stage(errors, f"score serve-as {kind}", lambda k=kind, g=g: _score_model(k, g, refs, cfg, opts))
            if s is not None:
                scored[kind] = s
    rows = compare_variants(scored, cfg.seed)
    for kind, row in rows.items():
        row["answers"] = scored[kind]["answers"]
    return rows


def parse_reference(text: str | None, metric: str) -> dict | None:
    """A published result to show beside ours: its text and the value it names (the last percentage, else the
    last decimal number, so a year or "F1" is not taken) on our metric's 0-1 scale (BLEU stays 0-100)."""
    import re

    if not text:
        return None
    nums = re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(%?)", text)
    pick = [n for n in nums if n[1]] or [n for n in nums if "." in n[0]] or nums   # 93.0% > 0.871 > 27
    value = None
    if pick:
        num, pct = pick[-1]
        value = float(num)
        if metric != "bleu" and (pct or value > 1):
            value /= 100
    return {"text": text, "value": value}


def _metric_names() -> list[str]:
    from loraforge.eval.metrics import available_metrics

    return available_metrics()


def _paired(a: list[float], b: list[float], seed: int) -> dict:
    from loraforge.eval.stats import paired_test

    return asdict(paired_test(a, b, seed=seed))


def assemble(run_dir: Path, cfg: RunConfig, prompts, refs, models: dict, reg: dict, errors: list) -> dict:
    """The eval.json dict: metric table, paired tests, per-example outcomes, regression, overfitting, config."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    comparisons = {}
    tuned = models.get("finetuned")
    for other in ("base", "fewshot"):
        if tuned and other in models:
            comparisons[f"finetuned_vs_{other}"] = _paired(tuned["per_example"], models[other]["per_example"],
                                                           cfg.seed)
    if tuned and CONSTRAINED in models:
        comparisons[f"{CONSTRAINED}_vs_finetuned"] = _paired(models[CONSTRAINED]["per_example"],
                                                             tuned["per_example"], cfg.seed)
    if "base" in reg and "finetuned" in reg:
        comparisons["regression_finetuned_vs_base"] = _paired(reg["finetuned"]["per_example"],
                                                              reg["base"]["per_example"], cfg.seed)
    ref_model = "base" if "base" in models else "fewshot" if "fewshot" in models else None
    examples = []
    for i, (p, r) in enumerate(zip(prompts, refs)):
        ex = {"index": i, "prompt": _last_user(p), "reference": r,
              "answers": {m: v["answers"][i] for m, v in models.items()},
              "scores": {m: v["per_example"][i] for m, v in models.items()},
              "stopped": {m: v["stopped"][i] for m, v in models.items()}, "outcome": "tie"}
        if tuned and ref_model:
            d = tuned["per_example"][i] - models[ref_model]["per_example"][i]
            ex["outcome"] = "win" if d > 0 else "loss" if d < 0 else "tie"
        examples.append(ex)
    never_stopped = {m: sum(not s for s in v["stopped"]) for m, v in models.items()}
    from loraforge.eval.forgetting import forgetting

    guard = forgetting(reg["base"]["rate"], reg["finetuned"]["rate"]) if {"base", "finetuned"} <= reg.keys() else None
    return {"run_dir": str(run_dir), "test": cfg.eval.test, "metric": cfg.eval.metric, "n": len(prompts),
            "outcome_against": ref_model,
            "models": {m: {k: v[k] for k in ("value", "ci", "stop_rate", "details")} for m, v in models.items()},
            "never_stopped": never_stopped, "comparisons": comparisons, "examples": examples,
            "regression": {m: {k: v[k] for k in ("rate", "by_category", "checks", "answers")} for m, v in reg.items()},
            "overfit": verdict(rows), "forgetting": guard,
            "curves": {"train": [[r["step"], r["loss"]] for r in rows if "loss" in r],
                       "val": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r],
                      "val_metric": [[r["step"], r["val_metric"]] for r in rows if "val_metric" in r]},
            "config": json.loads(json.dumps(cfg.model_dump(mode="json"))), "errors": errors,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_outputs(result: dict, out_dir: Path) -> tuple[Path, Path]:
    from loraforge.eval.report import render_html

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "eval.json", result)
    html = out_dir / "report.html"
    files.atomic_write_text(html, render_html(result))
    return out_dir / "eval.json", html

