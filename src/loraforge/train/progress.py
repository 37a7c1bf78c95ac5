"""Live training progress. On a terminal: a bar with ETA, loss, learning rate, tokens/s and the last
validation loss. Elsewhere (nohup, a scheduler, CI logs): one plain line per interval, every `every_steps`
steps or `every_s` seconds, whichever comes first, plus the first and last step and every validation:

    step 120/1000  loss 1.2345  lr 1.98e-04  5,321 tok/s  elapsed 2m05s  ETA 15m17s
    step 150/1000  validation loss 1.3012

Only the main process prints (under torchrun the others are quiet). `announce_stop` is what a stop signal
prints at once, before the step in progress ends and the checkpoint is written.
"""

from __future__ import annotations

import os
import signal
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

STOP_MESSAGE = "stopping after this step, saving a checkpoint (Ctrl-C again to quit without saving)"


def announce_stop(signum: int) -> None:
    """Called from the signal handler: os.write, since the interrupted code may be inside a print."""
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else "signal"
    os.write(2, f"\n{name} received: {STOP_MESSAGE}\n".encode())


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class TrainProgress:
    def __init__(self, total_steps: int, done: int, console: Console | None = None, every_steps: int | None = None,
                 every_s: float = 30.0):
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.main = int(os.environ.get("RANK", "0")) == 0
        self.lines = not self.console.is_terminal and self.main
        self.total, self.start_step, self.start = total_steps, done, time.monotonic()
        self.every_steps = every_steps or max(1, total_steps // 20)
        self.every_s = every_s
        self.last_line_step, self.last_line_at, self.last_val = done, self.start, None
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not self.console.is_terminal or not self.main,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=done, info="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, val_loss: float | None) -> None:
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        if val_loss is not None:
            info += f"  val {val_loss:.4f}"
        self.progress.update(self.task, completed=step, info=info)
        if self.lines:
            self._line(step, info.replace(f"  val {val_loss:.4f}", "") if val_loss is not None else info, val_loss)

    def _line(self, step: int, info: str, val_loss: float | None) -> None:
        now = time.monotonic()
        if (step - self.last_line_step >= self.every_steps or now - self.last_line_at >= self.every_s
                or step == self.start_step + 1 or step == self.total):
            elapsed = now - self.start
            eta = elapsed / (step - self.start_step) * (self.total - step) if step > self.start_step else 0.0
            self.console.print(f"step {step}/{self.total}  {info}  elapsed {duration(elapsed)}  ETA {duration(eta)}")
            self.last_line_step, self.last_line_at = step, now
        if val_loss is not None and val_loss is not self.last_val:  # a new evaluation (a new float object)
            self.console.print(f"step {step}/{self.total}  validation loss {val_loss:.4f}")
        self.last_val = val_loss
