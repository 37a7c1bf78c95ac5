"""`loraforge tune CONFIG --budget 30m`: search learning rate, rank, dropout and (through early stopping)
epochs by the task's own metric; prints the trials and writes the winner's config (loraforge.tune)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from loraforge.cli import Overrides, app


@app.command()
def tune(
    config: Annotated[Optional[Path], typer.Argument(help="YAML run config: data, eval.metric (and its label set "
                                                          "or schema), the most epochs a trial may run.")] = None,
    overrides: Overrides = None,
    budget: Annotated[Optional[str], typer.Option(help="Wall time for the search, e.g. 30m or 2h (no new trial "
                                                       "starts after it).")] = None,
    trials: Annotated[Optional[int], typer.Option(help="Number of trials (with --budget: whichever ends first; "
                                                       "with --resume: this many more).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Tune folder (default: OUTPUT_DIR-tune).")] = None,
    pruner: Annotated[str, typer.Option(help="halving (successive halving, ASHA-style) | hyperband | none.")] = "halving",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing tune folder.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the study in the tune folder with this --budget / --trials "
                                               "(same config; a trial cut off by the end of the last run is "
                                               "recorded as interrupted).")] = False,
) -> None:
    """Find the best learning rate, rank, dropout and epochs for the task; every trial is a run folder."""
    from rich.console import Console

    from loraforge.config import load_config
    from loraforge.tune.report import trials_table
    from loraforge.tune.search import parse_budget
    from loraforge.tune.search import tune as run_tune

    cfg = load_config(config, overrides or [])
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    summary = run_tune(cfg, budget_s=parse_budget(budget) if budget else None, trials=trials, out=out,
                       pruner=pruner, overwrite=overwrite, resume=resume, log=err.print)
    Console(highlight=False).print(trials_table(summary))
    folder = Path(summary["best_yaml"]).parent
    typer.echo(f"best: trial {summary['best']['number']}, validation {summary['metric']} "
               f"{summary['best']['value']:.4f}\nreport: {folder / 'tune.html'}\n"
               f"train it: loraforge train {summary['best_yaml']}")
