"""`loraforge runs`: the run folders under a folder as one table, and `loraforge runs compare` as one HTML page.

    loraforge runs                              # every run under ./runs
    loraforge runs experiments/
    loraforge runs compare runs/a runs/b -o compare.html
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from loraforge.cli import app
from loraforge.errors import LoraforgeError
from loraforge.files import atomic_write_text


@app.command("runs")
def runs(
    paths: Annotated[Optional[list[str]], typer.Argument(
        help="A folder of runs (default: runs), or `compare RUN RUN ...`.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="compare: the HTML page to write "
                                                   "(default: compare.html).")] = None,
) -> None:
    """Table of the runs under a folder (model, method, data, steps, best validation loss, eval score, time,
    status); `runs compare RUN RUN ...` writes one HTML page with their curves overlaid and configs diffed."""
    from loraforge.eval.runs import compare_html, find_runs, print_table, run_info

    paths = paths or []
    if paths[:1] == ["compare"]:
        runs_ = [Path(p) for p in paths[1:]]
        if not runs_:
            raise LoraforgeError("runs compare needs run folders", hint="loraforge runs compare runs/a runs/b")
        for p in runs_:
            if not find_runs(p, depth=0):
                raise LoraforgeError("not a run folder (config.yaml and metrics.jsonl are needed)", where=str(p),
                                     hint="pass the output_dir of a `loraforge train` run")
        out = output or Path("compare.html")
        atomic_write_text(out, compare_html(runs_))
        typer.echo(f"compared {len(runs_)} runs: {out}")
        return
    if len(paths) > 1:
        raise LoraforgeError(f"one folder at a time, got {len(paths)}", hint="loraforge runs DIR, or loraforge runs "
                                                                             "compare RUN RUN ...")
    root = Path(paths[0] if paths else "runs")
    found = find_runs(root)
    if not found:
        raise LoraforgeError("no run folders here", where=str(root), hint="pass the folder your runs' output_dir "
                                                                            "point into, e.g. loraforge runs runs/")
    print_table([run_info(p) for p in found])
