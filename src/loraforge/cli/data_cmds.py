"""`loraforge data ...`: curate training data (convert, validate, dedup, split, inspect, sample).

Registered on the main `app` when `loraforge.cli` is imported; each command imports its stage lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from loraforge.cli import app
from loraforge.errors import LoraforgeError

# ---- `loraforge data ...`: data curation ---------------------------------------------------------------------
data_app = typer.Typer(help="Curate training data: convert, validate, dedup, split, inspect, sample.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

DataFile = Annotated[Path, typer.Argument(help="JSONL, JSON (array), CSV/TSV or Parquet file (only read).")]
FormatOpt = Annotated[str, typer.Option("--format", help="auto | messages | sharegpt | alpaca | text | columns.")]
ColumnsOpt = Annotated[Optional[str], typer.Option(help="Table columns PROMPT,RESPONSE, e.g. text,category.")]
TemplateOpt = Annotated[Optional[str], typer.Option(help="User turn from columns, e.g. 'Classify: {text}'.")]
SystemOpt = Annotated[Optional[str], typer.Option(help="System prompt added where a conversation has none.")]
ModelOpt = Annotated[str, typer.Option(help="Base model whose tokenizer and chat template are used.")]
SeqOpt = Annotated[int, typer.Option(help="Longest example in tokens, after the chat template.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]


def _read_options(fmt: str, columns: Optional[str], template: Optional[str], system: Optional[str]):
    from loraforge.data.formats import ReadOptions

    prompt, _, response = (columns or "").partition(",")
    if columns and not response:
        raise LoraforgeError(f"--columns must be PROMPT,RESPONSE, got {columns!r}")
    return ReadOptions(fmt, prompt or None, response or None, template, system)


def _data_tokenizer(model: str):
    from loraforge.model.load import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base(model))


def _fail_without_valid(report) -> None:
    """After the report: no valid record is a failure (exit 2), and no output file was written."""
    if report.records and not report.valid:
        raise LoraforgeError(f"none of the {report.records:,} records is valid (see the problems above); "
                             f"no output written", where=report.path)


def _print_json(report) -> None:
    import json

    typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, default=str))


@data_app.command("convert")
def data_convert(path: DataFile, out: Annotated[Path, typer.Argument(help="Output `messages` JSONL.")],
                 fmt: FormatOpt = "auto", columns: ColumnsOpt = None, template: TemplateOpt = None,
                 system: SystemOpt = None, json_out: JsonOpt = False) -> None:
    """Write any supported format as `messages` JSONL; invalid records go to OUT's .rejects.jsonl."""
    from loraforge.data.render import show_validation
    from loraforge.data.sinks import sibling
    from loraforge.data.validate import validate_file

    report = validate_file(path, _read_options(fmt, columns, template, system), out=out,
                           rejects=sibling(out, "rejects"))
    _print_json(report) if json_out else show_validation(report)
    _fail_without_valid(report)


@data_app.command("validate")
def data_validate(
    path: DataFile, fmt: FormatOpt = "auto", columns: ColumnsOpt = None, template: TemplateOpt = None,
    system: SystemOpt = None,
    model: Annotated[Optional[str], typer.Option(help="Also check token lengths and loss masks with this "
                                                      "model.")] = None,
    max_seq_length: SeqOpt = 2048,
    out: Annotated[Optional[Path], typer.Option(help="Write the valid records here as `messages` JSONL.")] = None,
    rejects: Annotated[Optional[Path], typer.Option(help="Invalid records with reasons [STEM.rejects.jsonl].")] = None,
    strict: Annotated[bool, typer.Option(help="Fail (exit 2) on any problem, warnings included.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check every record and report the problems by kind, with counts and first examples (file:line)."""
    from loraforge.data.render import show_validation
    from loraforge.data.validate import validate_file

    from loraforge.data.preference import looks_like_preferences, validate_preferences

    if looks_like_preferences(path):  # {prompt, chosen, rejected} pairs or KTO {prompt, completion, label}
        report = validate_preferences(path, _data_tokenizer(model) if model else None, max_seq_length,
                                      system=system)
    else:
        report = validate_file(path, _read_options(fmt, columns, template, system), out=out,
                               rejects=rejects or Path(f"{path.name.split('.')[0]}.rejects.jsonl"),
                               tokenizer=_data_tokenizer(model) if model else None, max_seq_length=max_seq_length)
    _print_json(report) if json_out else show_validation(report)
    _fail_without_valid(report)
    if strict and not report.clean:
        raise LoraforgeError(f"{report.invalid:,} invalid records and {report.with_warnings:,} with warnings "
                             f"(--strict)", where=str(path), hint="fix them, or drop --strict to only report")


@data_app.command("dedup")
def data_dedup(
    path: DataFile, out: Annotated[Path, typer.Argument(help="Output JSONL without the duplicates.")],
    method: Annotated[Optional[list[str]], typer.Option(help="exact | near | semantic; repeat for several "
                                                             "[exact, near].")] = None,
    threshold: Annotated[float, typer.Option(help="Near duplicates: MinHash Jaccard similarity.")] = 0.8,
    semantic_threshold: Annotated[float, typer.Option(help="Semantic duplicates: cosine similarity.")] = 0.9,
    removed: Annotated[Optional[Path], typer.Option(help="Removed records and why [OUT's .removed.jsonl].")] = None,
    fmt: FormatOpt = "auto", columns: ColumnsOpt = None, template: TemplateOpt = None, system: SystemOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove exact, near (MinHash LSH) and semantic (embedding) duplicates, keeping the first of each."""
    from loraforge.data.dedup import dedup_file
    from loraforge.data.render import show_dedup

    report = dedup_file(path, out, removed=removed, opts=_read_options(fmt, columns, template, system),
                        methods=tuple(method or ("exact", "near")), threshold=threshold,
                        semantic_threshold=semantic_threshold)
    _print_json(report) if json_out else show_dedup(report)


@data_app.command("split")
def data_split(
    path: DataFile,
    train: Annotated[Optional[Path], typer.Option(help="Training output [STEM.train.jsonl].")] = None,
    validation: Annotated[Optional[Path], typer.Option(help="Validation output [STEM.validation.jsonl].")] = None,
    fraction: Annotated[float, typer.Option(help="Share of the records held out for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 3407,
    stratify: Annotated[str, typer.Option(help="auto (when the data has labels) | yes | no.")] = "auto",
    near_threshold: Annotated[float, typer.Option(help="Keep near duplicates (MinHash Jaccard) on one side; "
                                                       "0 = exact duplicates only.")] = 0.8,
    dedup: Annotated[bool, typer.Option(help="Also drop exact duplicates (to TRAIN's .removed.jsonl), in the "
                                             "same pass.")] = False,
    fmt: FormatOpt = "auto", columns: ColumnsOpt = None, template: TemplateOpt = None, system: SystemOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Seeded train/validation split, stratified by label, no (near-)duplicate on both sides."""
    from loraforge.data.render import show_split
    from loraforge.data.split import split_file

    stem = path.name.split(".")[0]
    report = split_file(path, train or Path(f"{stem}.train.jsonl"), validation or Path(f"{stem}.validation.jsonl"),
                        fraction=fraction, seed=seed, stratify=stratify, near_threshold=near_threshold or None,
                        opts=_read_options(fmt, columns, template, system), dedup=dedup)
    _print_json(report) if json_out else show_split(report)


@data_app.command("inspect")
def data_inspect(
    path: DataFile, model: ModelOpt = "smollm2-135m-instruct", max_seq_length: SeqOpt = 2048,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch, for the padding estimate.")] = 8,
    html: Annotated[Optional[Path], typer.Option(help="Also write a self-contained HTML report with a plot.")] = None,
    fmt: FormatOpt = "auto", columns: ColumnsOpt = None, template: TemplateOpt = None, system: SystemOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Counts, formats, turns, roles, labels and token lengths after the model's chat template."""
    from loraforge.data.render import show_stats
    from loraforge.data.report import write_html
    from loraforge.data.stats import inspect_file

    stats = inspect_file(path, _data_tokenizer(model), max_seq_length=max_seq_length, batch_size=batch_size,
                         opts=_read_options(fmt, columns, template, system))
    _print_json(stats) if json_out else show_stats(stats)
    if html:
        typer.echo(f"HTML report: {write_html(stats, html)}", err=True)


@data_app.command("sample")
def data_sample(
    path: DataFile, n: Annotated[int, typer.Option("-n", help="How many examples.")] = 5,
    model: ModelOpt = "smollm2-135m-instruct",
    seed: Annotated[int, typer.Option(help="Seed of the draw.")] = 0,
    train_on: Annotated[str, typer.Option(help="assistant | all: which tokens carry loss.")] = "assistant",
    fmt: FormatOpt = "auto", columns: ColumnsOpt = None, template: TemplateOpt = None, system: SystemOpt = None,
) -> None:
    """Random examples rendered exactly as the model sees them, the loss-carrying text marked."""
    from loraforge.data.render import show_samples
    from loraforge.data.sample import sample_file

    tally, samples = sample_file(path, _data_tokenizer(model), n=n, seed=seed, train_on=train_on,
                                 opts=_read_options(fmt, columns, template, system))
    show_samples(tally, samples)
