"""Terminal rendering of the data commands' reports with rich: tables of counts and problems,
the token-length histogram as bars, and sampled examples with their loss-carrying text marked."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from loraforge.data.dedup import DedupReport
from loraforge.data.sample import Sampled
from loraforge.data.split import SplitReport
from loraforge.data.stats import DataStats
from loraforge.data.validate import Tally, ValidationReport

LOSS_OPEN, LOSS_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around loss text where colour cannot show


def console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _kv(title: str, rows: list[tuple[str, object]]) -> Table:
    t = Table(title=title, box=box.SIMPLE, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    return t


def _input_rows(t: Tally) -> list[tuple[str, object]]:
    fmt = (f"{t.format} (detected at {t.detected_at})" if t.detected_at else f"{t.format} (given)" if t.format
           else "none detected (no record of a known format)")
    rows = [("file", t.path), ("format", fmt), ("records", t.records), ("valid", t.valid), ("invalid", t.invalid)]
    if len([k for k in t.formats if k != "unknown"]) > 1:
        rows.append(("formats seen", ", ".join(f"{k} {v:,}" for k, v in t.formats.items())))
    if t.with_warnings:
        rows.append(("valid, with warnings", t.with_warnings))
    if t.rejects_path:
        rows.append(("rejects written to", f"{t.rejects_path} ({t.rejected:,})"))
    return rows


def problems_table(t: Tally) -> Table | None:
    if not t.groups:
        return None
    table = Table(title="Problems by kind", box=box.SIMPLE_HEAD, title_justify="left")
    for col, kw in (("kind", {}), ("count", {"justify": "right"}), ("first examples (file:line)", {})):
        table.add_column(col, **kw)
    for g in sorted(t.groups.values(), key=lambda g: -g.count):
        kind = Text(g.kind, style="yellow" if g.severity == "warning" else "red")
        kind.append(f"\n{g.title}", style="dim")
        short = Path(t.path).name  # the file is named above; examples show name:line
        table.add_row(kind, f"{g.count:,}", "\n".join(e.replace(t.path, short, 1) for e in g.examples))
    return table


def show_validation(r: ValidationReport, out: Console | None = None) -> None:
    out = out or console()
    rows = _input_rows(r)
    if r.lengths_checked:
        rows += [("max_seq_length", r.max_seq_length), ("model template", r.model_family or "unknown"),
                 ("loss masks checked", r.masks_checked)]
    else:
        rows.append(("token lengths", "not checked (pass --model)"))
    if r.out_path:
        rows.append(("valid records written to", f"{r.out_path} ({r.written:,})"))
    out.print(_kv("Validation", rows))
    table = problems_table(r)
    out.print(table if table else Text("No problems found.", style="green"))


def show_dedup(r: DedupReport, out: Console | None = None) -> None:
    out = out or console()
    rows = _input_rows(r.input) + [("methods", ", ".join(r.methods)), ("kept", r.kept)]
    rows += [(f"removed ({m})", n) for m, n in r.removed.items()] or [("removed", 0)]
    rows += [("clusters", len(r.clusters)), ("written to", r.out_path)]
    if r.removed_path:
        rows.append(("removed written to", r.removed_path))
    out.print(_kv("Dedup", rows))
    if r.clusters:
        table = Table(title="Largest clusters (first record kept)", box=box.SIMPLE_HEAD, title_justify="left")
        table.add_column("kept")
        table.add_column("removed (method, similarity)")
        for c in r.clusters[:10]:
            table.add_row(c.kept, "\n".join(f"{w} ({m}, {s:g})" for w, m, s in c.removed[:5])
                          + (f"\n... {len(c.removed) - 5} more" if len(c.removed) > 5 else ""))
        out.print(table)
    table = problems_table(r.input)
    if table:
        out.print(table)


def show_split(r: SplitReport, out: Console | None = None) -> None:
    out = out or console()
    leaks = f"{r.leaks_exact} exact" + (f", {r.leaks_near} near" if r.leaks_near is not None else ", near not checked")
    rows = _input_rows(r.input) + [
        ("train", f"{r.train:,} -> {r.train_path}"), ("validation", f"{r.validation:,} -> {r.validation_path}"),
        ("seed", r.seed), ("stratified by label", "yes" if r.stratified else "no"),
        ("kept with a duplicate", r.grouped), ("on both sides", leaks)]
    if r.removed_path:
        rows.append(("exact duplicates removed", f"{r.removed:,} -> {r.removed_path}"))
    out.print(_kv("Split", rows))
    if r.labels:
        table = Table(title=f"Labels ({len(r.labels)})", box=box.SIMPLE_HEAD, title_justify="left")
        for col in ("label", "train", "validation"):
            table.add_column(col, justify="left" if col == "label" else "right")
        for label, (a, b) in list(r.labels.items())[:30]:
            table.add_row(label, f"{a:,}", f"{b:,}")
        out.print(table)


def show_stats(s: DataStats, out: Console | None = None) -> None:
    out = out or console()
    rows = _input_rows(s.input) + [
        ("model template", s.model_family or "unknown"), ("turns", _counts(s.turns)), ("roles", _counts(s.roles)),
        ("labels", f"{s.n_labels} distinct" if s.labels else "none (answers are free text)"),
        ("tokens p50/p90/p99/max", "/".join(str(s.percentiles.get(k, 0)) for k in ("p50", "p90", "p99", "max"))),
        (f"longer than max_seq_length={s.max_seq_length}", s.truncated),
        (f"padding waste (batches of {s.batch_size} grouped by length)", f"{s.padding_waste:.1%}"),
        ("packing waste", f"{s.packing_waste:.1%} in {s.packed_rows:,} rows"),
        ("suggested max_seq_length", f"{s.suggested_max_seq_length} (cuts {s.suggested_truncated:,})")]
    if s.template_errors:
        rows.append(("rejected by the chat template", s.template_errors))
    out.print(_kv("Inspect", rows))
    peak = max((c for _, _, c in s.histogram), default=0) or 1
    table = Table(title="Token lengths after the chat template", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("tokens", "count", ""):
        table.add_column(col, justify="right" if col == "count" else "left")
    for lo, hi, count in s.histogram:
        cut = " <- max_seq_length" if lo <= s.max_seq_length < hi else ""
        table.add_row(f"{lo}-{hi - 1}", f"{count:,}", "#" * round(40 * count / peak) + cut)
    out.print(table)
    if s.labels:
        out.print(_kv(f"Labels ({s.n_labels}, most common)", list(s.labels.items())[:15]))
    problems = problems_table(s.input)
    if problems:
        out.print(problems)


def _counts(d: dict) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in d.items())


def show_samples(tally: Tally, samples: list[Sampled], out: Console | None = None) -> None:
    """Each example in full; loss text in green, and between ⟦ ⟧ when the output is not a terminal."""
    out = out or console()
    marks = not out.is_terminal
    for s in samples:
        out.rule(f"{s.source}  ({s.tokens} tokens, {s.loss_tokens} carry loss)")
        text = Text()
        for piece, loss in s.segments:
            if loss:
                text.append(LOSS_OPEN + piece + LOSS_CLOSE if marks else piece, style="bold green")
            else:
                text.append(piece)
        out.print(text)
    out.rule(f"{len(samples)} of {tally.valid:,} valid records; loss-carrying text "
             + ("between \u27e6 \u27e7" if marks else "in green"))
