"""`loraforge data synth SPEC.yaml -o out.jsonl`: generate training data with a stronger model, then verify it.

Registered on the `data` group when `loraforge.cli` is imported; the synth stage is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraforge.cli.data_cmds import JsonOpt, data_app


@data_app.command("synth")
def data_synth(
    spec: Annotated[Path, typer.Argument(help="Synth spec (YAML): endpoint, task, seeds, format, count, plan.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Kept examples as `messages` JSONL (rejects, report "
                                      "and journal are written beside it).")],
    embeddings: Annotated[bool, typer.Option(help="Measure the embedding spread when the semantic extra is "
                                             "installed.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Generate examples through an OpenAI-compatible endpoint and verify them; rerun to resume."""
    import json

    from loraforge.synth.run import synth
    from loraforge.synth.spec import load_spec

    report = synth(load_spec(spec), out, spec_path=str(spec), log=lambda m: typer.echo(m, err=True),
                   embeddings=embeddings)
    if json_out:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    u = report["usage"]
    typer.echo(f"{report['kept']} kept of {report['items']} items -> {report['out']}")
    for reason, n in report["reasons"].items():
        typer.echo(f"  rejected {n:>6}  {reason}")
    typer.echo(f"requests: {u['requests']} answered now, {report['from_journal']} from the journal, "
               f"{u['retries']} retries; tokens {u['prompt_tokens']:,} in / {u['completion_tokens']:,} out"
               + (f", ${u['cost_usd']:.4f}" if u.get("cost_usd") else ""))
    typer.echo(f"rejects: {report['rejects']}  report: {report['report_html']}")
