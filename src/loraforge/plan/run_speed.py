"""The speed of a whole `loraforge train` run as its trainer runs it: the estimate `train` prints.

plan/throughput.py models one micro-batch of one fixed shape, calibrated on training loops that repeat that
shape (bench/plan_accuracy.py). A real run is more: its micro-batches come in several padded shapes (or packed
rows whose attention spans one example at a time), LoRA dropout, the host's work around each step, validation
passes, and a warm-up (Triton kernels compiled, one pair of CUDA graphs captured per shape) that weighs on
short runs. With the loop model alone, the printed estimate was 0.4x-4.6x the measured tokens/s of the runs of
bench/results/train_e2e/ (session 10). Here the trainer hands over what it will run (`RunShapes`) and

    seconds = warmup_s + scale x loop_seconds(every training micro-batch) + step_s x micro-batches
              + the same for the validation forwards (a third of a training pass each)

where loop_seconds is plan/throughput's calibrated micro-batch time and (scale, step_s, warmup_s) are fitted
per (method, size class) on the product path: calibration.json's "runs" entries, written by
`bench/plan_accuracy.py --from-e2e` from bench/train_e2e.py results. Without an entry the loop model stands
alone (scale 1, no fixed costs).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.plan.calibration import RunFit, load_runs, speed_key
from loraforge.plan.gpus import GPU
from loraforge.plan.memory import TrainSetup
from loraforge.plan.shapes import ModelShape
from loraforge.plan.throughput import seconds_per_micro_batch

VALIDATION_PASS = 1 / 3   # a validation forward against a training step's forward + backward (LoRA: ~1/3)


@dataclass(frozen=True)
class RunShapes:
    """What one run will compute, as the trainer batches it."""

    batches: tuple[tuple[int, int, int], ...]   # (rows, padded length, how many) of one epoch's micro-batches
    real_tokens: int                            # one epoch's training tokens (padding left out)
    epochs: float = 1.0
    context: int | None = None                  # packed rows: their examples' mean length (attention spans one)
    val_batches: tuple[tuple[int, int, int], ...] = ()   # one validation's forwards, as `batches`
    evaluations: int = 0

    @property
    def micro_batches(self) -> float:
        return sum(n for _, _, n in self.batches) * self.epochs

    @property
    def distinct(self) -> int:
        return len({(r, n) for r, n, _ in self.batches})


def loop_parts(gpu: GPU, shape: ModelShape, setup: TrainSetup, shapes: RunShapes) -> tuple[float, float]:
    """(seconds by the loop model, micro-batch equivalents) of the whole run, validation included."""
    def over(batches, context):
        secs = count = 0.0
        for rows, length, n in batches:
            secs += n * seconds_per_micro_batch(gpu, shape, setup, rows, length, context or length)
            count += n
        return secs, count

    train_s, train_n = over(shapes.batches, shapes.context)
    val_s, val_n = over(shapes.val_batches, None)
    evals = shapes.evaluations * VALIDATION_PASS
    return train_s * shapes.epochs + val_s * evals, train_n * shapes.epochs + val_n * evals


def run_seconds(gpu: GPU, shape: ModelShape, setup: TrainSetup, shapes: RunShapes,
                fit: RunFit | None = None) -> float:
    """Seconds of the run's training phase (warm-up, steps, validation), by the product-path model."""
    if fit is None:
        fit = load_runs().get(speed_key(setup.method, shape), RunFit())
    loop_s, micro = loop_parts(gpu, shape, setup, shapes)
    return fit.warmup_s + fit.scale * loop_s + fit.step_s * micro


def run_tokens_per_second(gpu: GPU, shape: ModelShape, setup: TrainSetup, shapes: RunShapes,
                          fit: RunFit | None = None) -> float:
    """Training tokens (padding left out) per second of the training phase, as summary.json counts them."""
    return shapes.real_tokens * shapes.epochs / run_seconds(gpu, shape, setup, shapes, fit)


def fit_run(points: list[tuple[float, float, float]]) -> RunFit:
    """Fit (warmup_s, scale, step_s) to (loop seconds, micro-batches, measured seconds) points: least squares
    on relative errors; a term whose fit comes out negative is dropped and the rest refitted."""
    if not points:
        raise ValueError("no measurements to fit")
    names = ["warmup_s", "scale", "step_s"]
    rows = [((1.0, loop, micro), secs) for loop, micro, secs in points]
    for keep in ([0, 1, 2], [1, 2], [0, 1], [1]):
        if len(points) < len(keep):
            continue
        sol = _least_squares([[x[k] / t for k in keep] for x, t in rows], [1.0] * len(rows))
        if sol is not None and all(v >= 0 for v in sol) and sol[keep.index(1)] > 0:
            values = dict(zip([names[k] for k in keep], sol))
            return RunFit(values.get("scale", 1.0), values.get("step_s", 0.0), values.get("warmup_s", 0.0),
                          len(points))
    raise ValueError("the measurements give no positive fit")


def _least_squares(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Solve min |a x - b| by the normal equations (a few unknowns); None when singular."""
    n = len(a[0])
    m = [[sum(r[i] * r[j] for r in a) for j in range(n)] + [sum(r[i] * y for r, y in zip(a, b))] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-12 * max(1.0, max(abs(v) for v in m[p][:n])):
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] for i in range(n)]
