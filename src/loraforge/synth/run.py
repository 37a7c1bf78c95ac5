"""`loraforge data synth`: spec -> requests (journaled) -> verification -> output, rejects and report.

    report = synth(load_spec("synth.yaml"), "out.jsonl")

Writes (each atomically): OUT (kept `messages` records, each with its `provenance`),
OUT's `.rejects.jsonl` (every reject: reason, detail, record or failure), `.report.json` and
`.report.html`. The journal (`OUT.journal.jsonl` unless the spec names one) is kept: a rerun of
the same spec, after a kill or with a larger `count`, asks only what it lacks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from loraforge.data.formats import ReadOptions
from loraforge.data.readers import read_raw
from loraforge.data.sinks import JsonlSink, sibling
from loraforge.data.validate import Tally, iter_valid
from loraforge.errors import LoraforgeError
from loraforge.synth import diversity
from loraforge.synth import prompts as P
from loraforge.synth.generate import Generator, Item
from loraforge.synth.journal import Journal
from loraforge.synth.report import render_html
from loraforge.synth.spec import Spec
from loraforge.synth.verify import Verdicts, verify

DEFAULT_COUNT = 100  # generate mode without `count`
PROMPT_KEYS = ("prompt", "question", "query", "instruction", "input", "text")


def seed_pairs(spec: Spec) -> list[tuple[str, str]]:
    pairs = [(s.user, P.answer_text(s.assistant)) for s in spec.seed_examples]
    if spec.seed_file:
        for ex in iter_valid(spec.seed_file, ReadOptions(), Tally(spec.seed_file), None):
            users = [t["content"] for t in ex.messages if t["role"] == "user"]
            if users:
                pairs.append((users[-1], ex.messages[-1]["content"]))
    return pairs


def given_prompts(spec: Spec) -> list[tuple[str, str]]:
    """(prompt, where) for distill mode: the spec's list, then the file (lines of .txt, or records)."""
    out = [(p, f"prompts[{k}]") for k, p in enumerate(spec.prompts)]
    if spec.prompts_file:
        path = Path(spec.prompts_file)
        if path.suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return out + [(s.strip(), f"{path}:{k}") for k, s in enumerate(lines, 1) if s.strip()]
        for raw in read_raw(path):
            if raw.problem is not None:
                raise raw.problem.to_error()
            text = _prompt_of(raw.value)
            if text is None:
                raise LoraforgeError("no prompt in this record: give a string, a `prompt` (or question/query/"
                                     "instruction/text) field, or `messages` with a user turn", where=raw.where)
            out.append((text, raw.where))
    return out


def _prompt_of(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("messages"), list):
        users = [t.get("content") for t in value["messages"] if isinstance(t, dict) and t.get("role") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else None
    return next((value[k] for k in PROMPT_KEYS if isinstance(value.get(k), str)), None)


def make_items(spec: Spec, lists: dict[str, list[str]]) -> list[Item]:
    div = spec.diversity
    topics = lists.get("topics", div.topic_list())
    personas = lists.get("personas", div.personas if isinstance(div.personas, list) else [])
    diff = div.difficulty or []

    def slot(i: int) -> P.Slot:
        return P.slot_for(i, spec.seed, topics, personas, diff)

    if spec.mode == "generate":
        return [Item(i, slot(i)) for i in range(spec.count or DEFAULT_COUNT)]
    if spec.mode == "distill":
        return [Item(i, P.Slot(), p, source=w) for i, (p, w) in enumerate(given_prompts(spec)[:spec.count])]
    items = []
    examples = list(iter_valid(spec.rewrite_file, ReadOptions(), Tally(spec.rewrite_file), None))
    for ex in examples:
        users = [t["content"] for t in ex.messages if t["role"] == "user"]
        for _ in range(spec.rewrites_per_example):
            i = len(items)
            if (spec.count and i >= spec.count) or not users:
                break
            items.append(Item(i, slot(i), users[-1], ex.messages[-1]["content"], ex.meta.get("label"), ex.source))
    return items


def judge_step(spec: Spec, journal: Journal, log: Callable) -> Callable:
    """The judge pass over the kept candidates (eval's JudgeClient), its scores journaled too."""
    from loraforge.eval.llm_judge import DEFAULT_RUBRIC, JudgeClient, rubric_scores

    j = spec.verify.judge
    key = None
    if j.api_key_env:
        key = spec.endpoint.model_copy(update={"api_key_env": j.api_key_env}).api_key()
    client = JudgeClient(j.base_url, j.model, key, timeout=j.timeout_s)
    jh = hashlib.sha256(json.dumps([j.base_url, j.model, j.rubric], sort_keys=True).encode()).hexdigest()[:8]

    def step(cands: list, v: Verdicts) -> None:
        todo = [c for c in cands if journal.get(f"{spec.generation_hash()}:judge-{jh}:{c.index}") is None]
        chunk = max(16, 4 * j.concurrency)
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            msgs = [c.record["messages"] for c in part]
            scores = rubric_scores(client, [m[-2]["content"] for m in msgs], [m[-1]["content"] for m in msgs],
                                   j.rubric or DEFAULT_RUBRIC, max_workers=j.concurrency)
            for c, s in zip(part, scores):
                if s.verdict == "ok":
                    journal.append({"key": f"{spec.generation_hash()}:judge-{jh}:{c.index}", "kind": "judge",
                                    "index": c.index, "score": s.score})
                else:
                    v.reject(c, "judge_error", s.reason)
            log(f"synth: judged {min(start + chunk, len(todo))}/{len(todo)}")
        for c in cands:
            e = journal.get(f"{spec.generation_hash()}:judge-{jh}:{c.index}")
            if c.reason is None and e is not None:
                c.judge_score = e["score"]
                v.judge_scores.append(e["score"])
                if e["score"] < j.threshold:
                    v.reject(c, "judge_low", f"judge score {e['score']:g} under verify.judge.threshold={j.threshold:g}")

    return step


def _embedder(spec: Spec, embed: Callable | None, embeddings: bool) -> Callable | None:
    """The sentence embedder: always for semantic dedup; for the spread only when the extra is installed."""
    if embed is not None or not (spec.verify.semantic or embeddings):
        return embed
    from loraforge.data.semantic import load_embedder, model_path

    if not spec.verify.semantic:
        try:
            model_path()
        except LoraforgeError:
            return None
    return load_embedder()


def synth(spec: Spec, out: str | Path, *, spec_path: str = "spec", log: Callable[[str], None] = lambda m: None,
          embed: Callable | None = None, embeddings: bool = True) -> dict:
    """Run the spec end to end; returns the report (also written beside `out`)."""
    out = Path(out)
    t0 = time.perf_counter()
    journal = Journal(spec.journal or sibling(out, "journal"), spec.generation_hash())
    if journal.resumed:
        log(f"synth: resuming, {journal.resumed} answers already in {journal.path}")
    gen = Generator(spec, journal, seed_pairs(spec), log)
    need = {w: getattr(spec.diversity, w).generate for w in ("topics", "personas")
            if getattr(getattr(spec.diversity, w), "generate", None)}
    try:
        items, outcomes = gen.run(need, lambda lists: make_items(spec, lists))
        usage = gen.client.usage
        if outcomes and usage.requests == 0 and not journal.entries and usage.failures:
            raise LoraforgeError(f"no request to {gen.client.url} succeeded ({dict(usage.failures)})",
                                 hint="is the server running? check endpoint.base_url")
        t_req = time.perf_counter() - t0
        judge = judge_step(spec, journal, log) if spec.verify.enabled and spec.verify.judge else None
        emb = _embedder(spec, embed, embeddings)
        verdicts = verify(spec, outcomes, embed=emb, judge_step=judge)
    finally:
        journal.close()
    rejects_path = sibling(out, "rejects")
    with JsonlSink(out) as sink:
        for c in verdicts.kept:
            sink.write(c.record)
    reject_rows = [{"index": c.index, "reason": c.reason, "detail": c.detail, "record": c.record,
                    "provenance": c.provenance} for c in verdicts.rejected]
    with JsonlSink(rejects_path) as sink:
        for row in reject_rows:
            sink.write(row)
    prompts = [c.record["messages"][-2]["content"] for c in verdicts.kept]
    report = {"spec_path": spec_path, "out": str(out), "rejects": str(rejects_path), "journal": str(journal.path),
              "model": spec.endpoint.model, "mode": spec.mode, "spec_hash": spec.generation_hash(),
              "template": P.TEMPLATE_HASH, "items": len(items), "kept": len(verdicts.kept),
              "rejected": len(verdicts.rejected), "reasons": dict(verdicts.reasons.most_common()),
              "warnings": dict(verdicts.warnings), "references": verdicts.references,
              "from_journal": journal.resumed, "asked_now": gen.asked,
              "usage": usage.to_dict(spec.endpoint), "request_seconds": round(t_req, 3),
              "seconds": round(time.perf_counter() - t0, 3),
              "judge": ({"judged": len(verdicts.judge_scores), "mean_score": round(sum(verdicts.judge_scores)
                        / len(verdicts.judge_scores), 3) if verdicts.judge_scores else None}),
              "diversity": diversity.summary(prompts, [c.provenance for c in verdicts.kept + verdicts.rejected],
                                             [c.provenance for c in verdicts.kept], emb if embeddings else None)}
    report["report_html"] = str(sibling(out, "report").with_suffix(".html"))
    _write_text(sibling(out, "report").with_suffix(".json"), json.dumps(report, indent=2, ensure_ascii=False))
    _write_text(Path(report["report_html"]), render_html(report, reject_rows))
    return report


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
