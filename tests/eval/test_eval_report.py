"""The evaluation report: one self-contained HTML file (inline SVG, nothing fetched), with loss curves,
the metric table and intervals, paired tests, side-by-side answers with wins and losses marked, the
overfitting verdict and the config; and, in headless Chromium, a screenshot that shows them."""

import json
import re
import shutil
import struct
import subprocess
import zlib

import pytest

from loraforge.config import RunConfig
from loraforge.eval.report import render_html
from loraforge.eval.results import ModelScore, RegressionScore
from loraforge.eval.run import assemble, write_outputs


def _model(per, answers, stopped=None):
    return ModelScore(value=sum(per) / len(per), ci=[min(per), max(per)], per_example=per, answers=answers,
                      stopped=stopped or [True] * len(per), stop_rate=1.0, details={"failures": []},
                      new_tokens=[3] * len(per))


@pytest.fixture()
def result(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 2.0 / s, **({"val_loss": 1.0 + abs(s - 6) / 5} if s % 2 == 0 else {})}
            for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "lo')
    prompts = [[{"role": "user", "content": f"question {i} <script>alert(1)</script>"}] for i in range(6)]
    refs = ["yes", "no", "yes", "no", "yes", "no"]
    models = {"base": _model([0, 1, 0, 0, 1, 0], ["no", "no", "no", "yes", "yes", "maybe"]),
              "fewshot": _model([1, 1, 0, 0, 1, 0], ["yes", "no", "no", "yes", "yes", "maybe"]),
              "finetuned": _model([1, 1, 1, 1, 0, 0], ["yes", "no", "yes", "no", "no", "yes"],
                                  [True] * 5 + [False])}
    reg = {m: RegressionScore(rate=0.5, by_category={"math": 0.5}, per_example=[1.0, 0.0], checks=[], answers=[])
           for m in ("base", "finetuned")}
    r = assemble(run, RunConfig(), prompts, refs, models, reg, [])
    r.decoding = {"max_new_tokens": 8}
    return r


def test_report_is_self_contained_with_every_section(result, tmp_path):
    html = render_html(result)
    assert "<script>alert" not in html and "&lt;script&gt;" in html      # answers and prompts are escaped
    assert not re.search(r"<script|<link|src=|@import|url\(", html)       # nothing loaded from anywhere
    assert html.count("<svg") == 2 and 'class="series-train"' in html and 'class="series-val"' in html
    for table in ("metric-table", "paired-tests", "regression-table", "examples"):
        assert f"id='{table}'" in html
    assert html.count("<tr class='win'>") == 3 and html.count("<tr class='loss'>") == 1
    assert "did not stop" in html and "few-shot base" in html
    assert result.overfit["best_step"] == 6 and "overfit-verdict" in html
    assert '"learning_rate"' in html                                         # the run config
    json_path, html_path = write_outputs(result, tmp_path / "out")
    assert json.loads(json_path.read_text())["comparisons"]["finetuned_vs_base"]["n"] == 6
    assert html_path.read_text() == html


def _png_pixels(data: bytes):
    """(width, height, rows of RGB(A) bytes) of an 8-bit non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride, rows, prev = zlib.decompress(idat), w * bpp, [], bytearray(w * bpp)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


def _has_colour(rows, bpp, rgb, tol=12):
    for line in rows:
        for i in range(0, len(line), bpp):
            if all(abs(line[i + k] - rgb[k]) <= tol for k in range(3)):
                return True
    return False


def chromium_screenshot(html: str, tmp_path, width: int, height: int):
    """The page rendered by headless Chromium: (width, height, bytes per pixel, rows); skips without Chromium."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    page = tmp_path / "page.html"
    page.write_text(html)
    shot = tmp_path / "shot.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()],
                   check=True, timeout=90, capture_output=True)
    return _png_pixels(shot.read_bytes())


@pytest.mark.slow
def test_chromium_screenshot_shows_plots_and_tables(result, tmp_path):
    w, h, bpp, rows = chromium_screenshot(render_html(result), tmp_path, 1280, 2400)
    assert (w, h) == (1280, 2400)
    assert _has_colour(rows, bpp, (0x00, 0x72, 0xb2))   # train loss curve and the fine-tuned bar
    assert _has_colour(rows, bpp, (0xd5, 0x5e, 0x00))   # validation loss curve
    assert _has_colour(rows, bpp, (0xe6, 0x9f, 0x00))   # few-shot bar
    assert _has_colour(rows, bpp, (0xe6, 0xf4, 0xea), tol=3)   # a win row
    assert _has_colour(rows, bpp, (0xf3, 0xf3, 0xf3), tol=2)   # table headers


def test_forgetting_warning_at_the_top_of_the_report(result):
    from loraforge.eval.forgetting import forgetting

    assert result.forgetting["warning"] is None and "forgetting-warning" not in render_html(result)  # 50% -> 50%
    result.forgetting = forgetting(0.33, 0.05)
    html = render_html(result)
    assert result.forgetting["drop"] == pytest.approx(0.28) and "28 points lost" in result.forgetting["warning"]
    assert "train.replay" in result.forgetting["warning"]
    top = html.index("id='forgetting-warning'")
    assert top < html.index("<h2>")       # above every section
    assert forgetting(0.33, 0.29)["warning"] is None and forgetting(0.33, 0.27)["warning"] is not None  # > 5 points


def test_validation_metric_curve_when_the_run_selected_by_it(result):
    assert "selected-step" not in render_html(result)
    result.curves["val_metric"] = [[2, 0.4], [4, 0.7], [6, 0.6]]
    html = render_html(result)
    assert html.count("<svg") == 3 and "adapter/ holds step 4" in html


def test_eval_json_is_the_typed_result_field_for_field(result, tmp_path):
    from loraforge.eval.results import StageError, VariantRow

    saved = json.loads(write_outputs(result, tmp_path / "a")[0].read_text())
    assert list(saved) == ["run_dir", "test", "metric", "n", "outcome_against", "models", "never_stopped",
                           "comparisons", "examples", "regression", "overfit", "forgetting", "curves", "config",
                           "errors", "created", "seconds", "resumed_rows", "decoding", "reference"]
    assert saved["models"]["finetuned"] == {"value": pytest.approx(4 / 6), "ci": [0, 1], "stop_rate": 1.0,
                                            "details": {"failures": []}}
    assert saved["never_stopped"] == {"base": 0, "fewshot": 0, "finetuned": 1}
    assert list(saved["regression"]["base"]) == ["rate", "by_category", "checks", "answers"]
    result.errors = [StageError("judge", "TimeoutError: slow", "Traceback ...")]
    result.variants = {"adapter": VariantRow(0.5, [0.2, 0.8], 1.0, agreement=1.0, answers=["yes"])}
    saved = json.loads(write_outputs(result, tmp_path / "b")[0].read_text())
    assert saved["errors"] == [{"stage": "judge", "error": "TimeoutError: slow", "traceback": "Traceback ..."}]
    assert saved["variants"] == {"adapter": {"value": 0.5, "ci": [0.2, 0.8], "stop_rate": 1.0, "agreement": 1.0,
                                             "vs_adapter": None, "answers": ["yes"]}}
    assert list(saved)[-1] == "variants" and "judge" not in saved and saved == json.loads(json.dumps(result.to_json(), default=str))
