"""Live training progress in the terminal: a bar with ETA, loss, learning rate, tokens/s and the last
validation loss. Quiet when output is not a terminal (CI logs get the per-evaluation lines instead)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, done: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not self.console.is_terminal,
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
