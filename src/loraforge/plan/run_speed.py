"""The speed of a whole `loraforge train` run as its trainer runs it: the estimate `train` prints.

plan/throughput.py models one micro-batch of one fixed shape, calibrated on training loops that repeat that
shape (bench/plan_accuracy.py). A real run is more: its micro-batches come in several padded shapes (or packed
rows whose attention spans one example at a time), LoRA dropout, CUDA graphs or not, validation passes, and a
warm-up (Triton kernels compiled, one pair of CUDA graphs captured per shape) that weighs on short runs. With
the loop model alone, the printed estimate was 0.4x-4.6x the measured tokens/s of the runs of
bench/results/train_e2e/ (session 10). Here the trainer hands over what it will run (`RunShapes`) and

    seconds = warmup_s + shape_s x distinct batch shapes
              + scale x loop_seconds(every training micro-batch, and each validation forward as a third of one)
              + step_s x training micro-batches + val_s x validation forwards

where loop_seconds is plan/throughput's micro-batch time; `scale` (per method and size class: how far the run's
steady state is from the loop model) and the host's fixed costs (shared) are fitted on the product path:
calibration.json's "runs", written by `bench/plan_runs.py --write` from bench/train_e2e.py results. Without
an entry the loop model stands alone (scale 1, no fixed costs).
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


def loop_parts(gpu: GPU, shape: ModelShape, setup: TrainSetup, shapes: RunShapes) -> dict[str, float]:
    """The run's terms of the model above, before their constants: loop-model seconds (training, and each
    validation forward as VALIDATION_PASS of a micro-batch), training micro-batches, validation forwards and
    distinct batch shapes."""
    def over(batches, context):
        secs = count = 0.0
        for rows, length, n in batches:
            secs += n * seconds_per_micro_batch(gpu, shape, setup, rows, length, context or length)
            count += n
        return secs, count

    train_s, train_n = over(shapes.batches, shapes.context)
    val_s, val_n = over(shapes.val_batches, None)
    return {"loop_seconds": train_s * shapes.epochs + val_s * shapes.evaluations * VALIDATION_PASS,
            "micro_batches": train_n * shapes.epochs, "val_forwards": val_n * shapes.evaluations,
            "shapes": float(shapes.distinct)}


def seconds_from_parts(parts: dict[str, float], fit: RunFit) -> float:
    return (fit.warmup_s + fit.shape_s * parts["shapes"] + fit.scale * parts["loop_seconds"]
            + fit.step_s * parts["micro_batches"] + fit.val_s * parts["val_forwards"])


def run_seconds(gpu: GPU, shape: ModelShape, setup: TrainSetup, shapes: RunShapes,
                fit: RunFit | None = None) -> float:
    """Seconds of the run's training phase (warm-up, steps, validation), by the product-path model."""
    if fit is None:
        fit = load_runs().get(speed_key(setup.method, shape), RunFit())
    return seconds_from_parts(loop_parts(gpu, shape, setup, shapes), fit)


def run_tokens_per_second(gpu: GPU, shape: ModelShape, setup: TrainSetup, shapes: RunShapes,
                          fit: RunFit | None = None) -> float:
    """Training tokens (padding left out) per second of the training phase, as summary.json counts them."""
    return shapes.real_tokens * shapes.epochs / run_seconds(gpu, shape, setup, shapes, fit)


SHARED = ("warmup_s", "shape_s", "step_s", "val_s")   # the host's costs, one value for every key


def fit_runs(points: list[tuple[str, dict[str, float], float]]) -> dict[str, RunFit]:
    """Fit one `scale` per key and the shared fixed costs to (key, loop_parts, measured seconds) points: least
    squares on relative errors; a fixed cost whose fit comes out negative is dropped (0) and the rest refitted."""
    if not points:
        raise ValueError("no measurements to fit")
    keys = sorted({k for k, _, _ in points})
    feature = {"warmup_s": lambda p: 1.0, "shape_s": lambda p: p["shapes"], "step_s": lambda p: p["micro_batches"],
               "val_s": lambda p: p["val_forwards"]}
    shared = [n for n in SHARED if any(feature[n](p) for _, p, _ in points)]
    while True:
        cols = len(keys) + len(shared)
        a = [[(p["loop_seconds"] if k == key else 0.0) / t for key in keys] + [feature[n](p) / t for n in shared]
             for k, p, t in points]
        sol = _least_squares(a, [1.0] * len(points)) if len(points) >= cols else None
        if sol is None:
            if not shared:
                raise ValueError("the measurements cannot separate the terms")
            shared = shared[:-1]
            continue
        bad = [n for n, v in zip(shared, sol[len(keys):]) if v < 0]
        if bad:
            shared.remove(min(bad, key=lambda n: sol[len(keys) + shared.index(n)]))
            continue
        if any(v <= 0 for v in sol[:len(keys)]):
            raise ValueError("the measurements give a non-positive scale")
        costs = dict(zip(shared, sol[len(keys):]))
        return {key: RunFit(scale=sol[i], points=sum(k == key for k, _, _ in points),
                            **{n: costs.get(n, 0.0) for n in SHARED}) for i, key in enumerate(keys)}


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
