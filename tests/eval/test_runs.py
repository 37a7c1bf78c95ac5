"""`loraforge runs`: run folders found under a folder with their status told apart (finished, interrupted,
failed), the table's numbers, and `runs compare`'s self-contained page: one curve per run in every chart,
the config keys that differ, and (headless Chromium) a screenshot showing each run's colour."""

import json
import math
import os
import random
import re
import time

import pytest
import yaml

from loraforge.cli import main
from loraforge.config import RunConfig
from loraforge.eval.charts import ema, fmt, fmt_ticks, log_ticks, nice_ticks
from loraforge.eval.runs import PALETTE, compare_html, config_diff, find_runs, run_info
from test_eval_report import _has_colour, chromium_screenshot


def make_run(folder, *, steps=60, lr=2e-4, status="finished", seed=0, metric=False):
    """A run folder as `loraforge train` leaves it (noisy decaying loss, validation every 10 steps)."""
    folder.mkdir(parents=True)
    cfg = RunConfig().model_dump(mode="json")
    cfg["output_dir"], cfg["train"]["learning_rate"], cfg["data"]["train"] = str(folder), lr, "data/train.jsonl"
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    rnd, rows = random.Random(seed), []
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 3 * math.exp(-s / (20 + 10 * seed)) + 0.3 + rnd.uniform(-0.2, 0.2),
               "lr": lr, "grad_norm": 1 + rnd.random(), "tokens_per_s": 1000 + 50 * seed, "elapsed_s": s * 0.5}
        if s % 10 == 0:
            row["val_loss"] = 3 * math.exp(-s / (25 + 10 * seed)) + 0.5
            if metric:
                row["val_accuracy"] = min(0.9, s / 80)
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = folder / "checkpoints" / "step-00000050"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 50 if status == "failed" else steps}))
    if status == "finished":
        best = min((r["val_loss"], r["step"]) for r in rows if "val_loss" in r)
        (folder / "summary.json").write_text(json.dumps({"steps": steps, "best_val_loss": best[0],
                                                         "best_step": best[1], "train_seconds": 754.2}))
        (folder / "eval").mkdir()
        (folder / "eval" / "eval.json").write_text(json.dumps(
            {"metric": "accuracy", "models": {"finetuned": {"value": 0.8125, "ci": [0.7, 0.9]}}}))
    old = time.time() - 3600   # not "running": written an hour ago
    os.utime(folder / "metrics.jsonl", (old, old))
    return folder


@pytest.fixture()
def runs(tmp_path):
    root = tmp_path / "runs"
    return [make_run(root / "a-lr2e-4", seed=0), make_run(root / "b-lr1e-3", lr=1e-3, seed=1, metric=True),
            make_run(root / "c-killed", steps=57, status="failed", seed=2),
            make_run(root / "group" / "d-stopped", steps=40, status="interrupted", seed=3)]


def test_find_runs_and_their_status(runs, tmp_path):
    (tmp_path / "runs" / "notes").mkdir()
    assert find_runs(tmp_path / "runs") == sorted(runs)
    infos = {i["run"]: i for i in map(run_info, runs)}
    assert {k: v["status"] for k, v in infos.items()} == {"a-lr2e-4": "finished", "b-lr1e-3": "finished",
                                                         "c-killed": "failed", "d-stopped": "interrupted"}
    a = infos["a-lr2e-4"]
    assert a["steps"] == 60 and a["eval"] == {"metric": "accuracy", "value": 0.8125} and a["seconds"] == 754.2
    assert a["best_step"] == 60 and a["method"] == "lora r=16"
    assert infos["b-lr1e-3"]["val_metric"] == {"name": "accuracy", "value": 0.75, "step": 60}
    c = infos["c-killed"]
    assert c["steps"] == 57 and c["best_val_loss"] == pytest.approx(3 * math.exp(-50 / 45) + 0.5)


def test_runs_command_prints_the_table(runs, tmp_path, capsys):
    assert main(["runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    for text in ("a-lr2e-4", "d-stopped", "interrupted", "failed", "accuracy 0.8125", "12m34s", "train.jsonl"):
        assert text in out
    assert main(["runs", str(tmp_path / "nothing")]) == 2


def test_compare_page_overlays_every_run_and_diffs_configs(runs, tmp_path):
    html = compare_html(runs)
    assert not re.search(r"<script|<link|src=|@import|url\(", html)   # self-contained
    charts = re.findall(r"<div class='chart' id='chart-([a-z_]+)'>", html)
    assert charts == ["loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "val_accuracy"]
    loss = html.split("id='chart-loss'")[1].split("</svg>")[0]
    for i in range(4):   # each run: its smoothed line, its raw points faint behind it
        assert loss.count(f'class="run-{i}"') == 1
    assert loss.count('class="raw"') == 4
    val = html.split("id='chart-val_loss'")[1].split("</svg>")[0]
    assert val.count("<circle") == 6 + 6 + 5 + 4
    differ, same = config_diff([run_info(r)["config"] for r in runs])
    assert [k for k, _ in differ] == ["output_dir", "train.learning_rate"] and "lora.r" in same
    assert "<td>0.001</td>" in html and "id='config-diff'" in html
    assert main(["runs", "compare", str(runs[0]), str(tmp_path)]) == 2   # not a run folder


def test_compare_command_writes_the_page(runs, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["runs", "compare", *map(str, runs[:2]), "-o", str(out)]) == 0
    assert out.read_text() == compare_html(runs[:2])


def test_chart_ticks_are_round_and_compact():
    ticks = nice_ticks(0.000127, 0.000981)
    assert ticks == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert fmt_ticks(ticks) == ["0", "2.5e-4", "5e-4", "7.5e-4", "1e-3"]
    assert fmt_ticks(nice_ticks(1.62, 2.71)) == ["1.5", "2", "2.5", "3"]
    assert [fmt(v) for v in (0.5, 2.25, 1234.0, 56000, 3.2e6, 0.000127)] == ["0.5", "2.25", "1234", "56k", "3.2M",
                                                                            "1.27e-4"]
    assert log_ticks(0.03, 8) == pytest.approx([0.01, 0.1, 1, 10])
    assert ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1, 1, 1])         # debiased: no pull toward zero
    assert ema([0.0, 10.0], 0.5) == pytest.approx([0, 10 * 0.5 / 0.75])


@pytest.mark.slow
def test_chromium_screenshot_shows_each_run(runs, tmp_path):
    w, h, bpp, rows = chromium_screenshot(compare_html(runs), tmp_path, 1400, 1400)
    assert (w, h) == (1400, 1400)
    for color in PALETTE[:4]:   # each run's curves
        assert _has_colour(rows, bpp, tuple(int(color[i:i + 2], 16) for i in (1, 3, 5)), tol=10), color
