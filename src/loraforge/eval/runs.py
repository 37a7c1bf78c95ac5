"""The runs under a folder, side by side: what `loraforge runs` and `loraforge runs compare` show.

    rows = [run_info(p) for p in find_runs("runs")]       # model, method, data, steps, best loss, eval, status
    html = compare_html([Path("runs/a"), Path("runs/b")])  # one self-contained page: curves overlaid, configs diffed

Everything is read from the run folders alone (config.yaml, metrics.jsonl, summary.json, checkpoints/,
eval/eval.json). A run's status: finished (summary.json written), running (no summary, metrics written in
the last two minutes), interrupted (stopped cleanly: its newest checkpoint is its last logged step, so
`train --resume` continues it) or failed (stopped after the last checkpoint, e.g. an error or a kill).
"""

from __future__ import annotations

import json
import sys
import time
from html import escape
from pathlib import Path

import yaml

from loraforge.eval.charts import Series, fmt, line_chart
from loraforge.eval.overfit import read_metrics
from loraforge.eval.report import CSS
from loraforge.train.tracking import flat_config

PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442"]
SKIP = {"checkpoints", "adapter", "eval", "tensorboard", "wandb", "mlartifacts", "merged", "gguf", ".git"}
RUNNING_S = 120


def find_runs(root: str | Path, depth: int = 3) -> list[Path]:
    """Run folders (config.yaml plus metrics.jsonl, summary.json or checkpoints/) at or under `root`."""
    root = Path(root)
    if _is_run(root):
        return [root]
    found: list[Path] = []
    if depth > 0 and root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and p.name not in SKIP:
                found += find_runs(p, depth - 1)
    return found


def _is_run(p: Path) -> bool:
    return (p / "config.yaml").is_file() and any((p / n).exists() for n in ("metrics.jsonl", "summary.json",
                                                                          "checkpoints"))


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _last_checkpoint_step(run_dir: Path) -> int | None:
    steps = [_read_json(c / "trainer_state.json").get("step") for c in (run_dir / "checkpoints").glob("step-*")]
    steps = [s for s in steps if isinstance(s, int)]
    return max(steps) if steps else None


def run_status(run_dir: Path, rows: list[dict]) -> str:
    if (run_dir / "summary.json").is_file():
        return "finished"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and time.time() - metrics.stat().st_mtime < RUNNING_S:
        return "running"
    last = rows[-1]["step"] if rows else 0
    ckpt = _last_checkpoint_step(run_dir)
    return "interrupted" if ckpt is not None and ckpt >= last else "failed"


def load_config_tree(run_dir: Path) -> dict:
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def run_info(run_dir: str | Path) -> dict:
    """One row of `loraforge runs`: what a person compares runs by."""
    run_dir = Path(run_dir)
    cfg = load_config_tree(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    summary = _read_json(run_dir / "summary.json")
    ev = _read_json(run_dir / "eval" / "eval.json")
    lora, model, data = cfg.get("lora") or {}, cfg.get("model") or {}, cfg.get("data") or {}
    method = lora.get("adapter", "lora")
    if model.get("quantization") == "nf4":
        method = "q" + method   # QLoRA / QDoRA: the adapter over an NF4 base
    vals = [(r["val_loss"], r["step"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
    best = min(vals) if vals else (None, None)
    extra = sorted({k for r in rows for k in r if k.startswith("val_") and k != "val_loss"})
    metric = None
    if extra:  # a task metric logged during training (higher is better)
        k = extra[0]
        got = [(r[k], r["step"]) for r in rows if isinstance(r.get(k), (int, float))]
        metric = {"name": k[4:], "value": max(got)[0], "step": max(got)[1]} if got else None
    tuned = (ev.get("models") or {}).get("finetuned")
    base_model = str(cfg.get("base_model", "?"))
    return {"run": run_dir.name, "path": str(run_dir), "model": Path(base_model).name or base_model,
            "method": f"{method} r={lora.get('r', '?')}", "data": Path(str(data.get("train") or "?")).name,
            "steps": summary.get("steps") or (rows[-1]["step"] if rows else 0),
            "best_val_loss": summary.get("best_val_loss", best[0]), "best_step": summary.get("best_step", best[1]),
            "val_metric": metric,
            "eval": {"metric": ev.get("metric"), "value": tuned["value"]} if tuned else None,
            "seconds": summary.get("train_seconds") or (rows[-1].get("elapsed_s") if rows else None),
            "status": run_status(run_dir, rows), "config": cfg, "rows": rows}


def duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def table_cells(info: dict) -> dict[str, str]:
    """The table's text cells for one run (shared by the terminal table and the compare page)."""
    best = "–" if info["best_val_loss"] is None else f"{info['best_val_loss']:.4f} @{info['best_step']}"
    m = info["val_metric"]
    e = info["eval"]
    return {"run": info["run"], "model": info["model"], "method": info["method"], "data": info["data"],
            "steps": str(info["steps"]), "best val loss": best,
            "val metric": "–" if not m else f"{m['name']} {fmt(m['value'])} @{m['step']}",
            "eval": "–" if not e else f"{e['metric']} {e['value']:.4f}", "time": duration(info["seconds"]),
            "status": info["status"]}


STATUS_STYLE = {"finished": "green", "running": "cyan", "interrupted": "yellow", "failed": "red"}


def print_table(infos: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=None, header_style="bold")
    heads = list(table_cells(infos[0])) if infos else []
    empty = [h for h in ("val metric", "eval") if all(table_cells(i)[h] == "–" for i in infos)]
    heads = [h for h in heads if h not in empty]   # columns no run has a value for
    for h in heads:
        table.add_column(h, justify="right" if h in ("steps", "time") else "left", no_wrap=h in ("run", "status"))
    for info in infos:
        cells = table_cells(info)
        cells["status"] = f"[{STATUS_STYLE.get(info['status'], 'white')}]{cells['status']}[/]"
        table.add_row(*(cells[h] for h in heads))
    console.print(table)


def config_diff(configs: list[dict]) -> tuple[list[tuple[str, list]], list[str]]:
    """(keys whose values differ, with each run's value; keys all runs share)."""
    flat = [flat_config(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    differ = [(k, [f.get(k, "–") for f in flat]) for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    same = [k for k in keys if k not in dict(differ)]
    return differ, same


def _names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) < len(names):  # two folders of the same name: their paths tell them apart
        names = [str(p) for p in paths]
    return names


CHARTS = [("loss", "train loss", True, False), ("val_loss", "validation loss", False, True),
          ("lr", "learning rate", False, False), ("grad_norm", "gradient norm", True, False),
          ("tokens_per_s", "tokens per second", True, False)]


def curve_charts(infos: list[dict], names: list[str]) -> list[str]:
    """One chart per logged field, every run overlaid in its colour (class run-<i> on its main line)."""
    keys = [c for c in CHARTS if any(c[0] in r for i in infos for r in i["rows"])]
    extra = sorted({k for i in infos for r in i["rows"] for k in r if k.startswith("val_") and k != "val_loss"})
    keys += [(k, f"validation {k[4:]}", False, True) for k in extra]
    out = []
    for key, title, smooth, markers in keys:
        series = [Series(name, [(r["step"], float(r[key])) for r in info["rows"]
                                if isinstance(r.get(key), (int, float))], PALETTE[i % len(PALETTE)],
                         smooth=smooth, markers=markers, css=f"run-{i}")
                  for i, (name, info) in enumerate(zip(names, infos))]
        out.append(f"<div class='chart' id='chart-{escape(key)}'>{line_chart(series, title=title, width=580)}</div>")
    return out


def _cell(v) -> str:
    return escape(v if isinstance(v, str) else json.dumps(v))


def compare_html(paths: list[Path]) -> str:
    """The compare page: the runs' table, their curves overlaid (EMA-smoothed, raw faint behind), the config
    keys on which they differ (and those they share)."""
    infos = [run_info(p) for p in paths]
    names = _names(paths)
    heads = list(table_cells(infos[0]))
    rows = []
    for i, info in enumerate(infos):
        cells = table_cells(info)
        cells["run"] = (f"<span class='swatch' style='background:{PALETTE[i % len(PALETTE)]}'></span>"
                        f"{escape(names[i])}")
        rows.append("<tr>" + "".join(f"<td>{v if k == 'run' else escape(v)}</td>" for k, v in cells.items())
                    + "</tr>")
    differ, same = config_diff([i["config"] for i in infos])
    diff_rows = "".join(f"<tr><td><code>{escape(k)}</code></td>" + "".join(f"<td>{_cell(v)}</td>" for v in vals)
                        + "</tr>" for k, vals in differ)
    run_heads = "".join(f"<th>{escape(n)}</th>" for n in names)
    shared = ", ".join(f"<code>{escape(k)}</code>" for k in same)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>loraforge runs compare — {escape(', '.join(names))}</title>
<style>{CSS}.swatch{{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle}}
.charts{{display:flex;flex-wrap:wrap;gap:12px}}</style></head><body>
<h1>{len(infos)} runs compared</h1>
<table id='runs-table'><tr>{''.join(f'<th>{escape(h)}</th>' for h in heads)}</tr>{''.join(rows)}</table>
<h2>Curves</h2>
<p>Train loss, gradient norm and throughput: EMA-smoothed line, the raw values faint behind it. Validation: one
dot per evaluation. A log axis is used where the values span more than a factor of 20.</p>
<div class='charts'>{''.join(curve_charts(infos, names))}</div>
<h2>Config differences</h2>
{f"<table id='config-diff'><tr><th>key</th>{run_heads}</tr>{diff_rows}</table>" if differ
 else "<p>The configs are identical.</p>"}
<details><summary>{len(same)} keys the runs share</summary><p>{shared}</p></details>
</body></html>
"""
