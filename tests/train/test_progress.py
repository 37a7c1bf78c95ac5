"""Off a terminal (nohup, a scheduler, CI) training prints a plain line per interval (step, loss, lr,
tokens/s, ETA) and one per validation, not just its first and last line."""

import io
import re

from rich.console import Console

from conftest import tiny_config
from loraforge.config import build_config
from loraforge.train.progress import TrainProgress, duration
from loraforge.train.run import run_training


def test_lines_every_n_steps_and_each_validation():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    val = None
    with TrainProgress(100, 0, console=console, every_steps=10, every_s=1e9) as p:
        for step in range(1, 101):
            if step % 40 == 0:  # the loop evaluates: a new result (later steps pass the same one on)
                val = 2.0 - step / 80
            p.update(step, 2.0 - step / 100, 1e-4, 1234.0, val)
    lines = out.getvalue().splitlines()
    steps = [int(m.group(1)) for m in (re.match(r"step (\d+)/100  loss", x) for x in lines) if m]
    assert steps == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]
    assert "lr 1.00e-04  1,234 tok/s" in lines[0] and "ETA" in lines[0]
    assert [x for x in lines if "validation" in x] == ["step 40/100  validation loss 1.5000",
                                                         "step 80/100  validation loss 1.0000"]


def test_resumed_progress_counts_from_where_it_started():
    out = io.StringIO()
    with TrainProgress(10, 6, console=Console(file=out, force_terminal=False, width=200)) as p:
        p.update(7, 1.0, 1e-4, 10.0, None)
    assert out.getvalue().startswith("step 7/10")


def test_duration():
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_training_off_a_terminal_prints_progress_lines(tiny_model, chat_file, tmp_path, capsys):
    run_training(build_config(tiny_config(tiny_model, chat_file, tmp_path / "run", max_steps=6, eval_every=3,
                                          num_threads=1)))
    err = capsys.readouterr().err
    assert re.search(r"step 1/6  loss \d+\.\d+  lr \S+  [\d,]+ tok/s  elapsed \S+  ETA \S+", err)
    assert "step 6/6  loss" in err
    assert "step 3/6  validation loss" in err and "step 6/6  validation loss" in err
