"""The speed of a whole `loraforge train` run as its trainer runs it: the estimate `train` prints.

plan/throughput.py models one micro-batch of one fixed shape, calibrated on training loops that repeat that
shape (bench/plan_accuracy.py). A real run is more: its micro-batches come in several padded shapes (or packed
rows whose attention spans one example at a time), LoRA dropout, CUDA graphs or not, validation passes, and a
warm-up (Triton kernels compiled, one pair of CUDA graphs captured per shape) that weighs on short runs. With
the loop model alone, the printed estimate was 0.2x-5.9x the measured tokens/s of the runs of
bench/results/train_e2e/. Here the trainer hands over what it will run (`RunShapes`) and

    seconds = warmup_s + compile_s (a machine that never compiled the kernels) + shape_s x distinct batch shapes
              + FLOPs of every micro-batch (validation forwards a third of one) / (peak FLOP/s x mfu)
              + (graph_step_s or eager_step_s x training micro-batches + val_s x validation forwards) x layers

`mfu` per (method, size class) is capped at calibration.MAX_MFU, so a long-sequence run is never priced faster
than the GPU's matmuls can go; the fixed costs are shared: the host's launches per layer (far fewer where CUDA
graphs replay the stack; validation forwards run eagerly), graph captures and kernel compiles per shape. They
are fitted on the product path into calibration.json's "runs" by `bench/plan_runs.py --write` from
bench/train_e2e.py results. Without an entry the run is priced by the loop model alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraforge.config import auto_every
from loraforge.plan.calibration import MAX_MFU, RunFit, load_runs, speed_key
from loraforge.plan.gpus import GPU
from loraforge.plan.memory import TrainSetup
from loraforge.plan.shapes import ModelShape
from loraforge.plan.throughput import PADDING_WASTE, DataSize, flops_per_token, seconds_per_micro_batch

SAME_CARD = 0.1          # a "runs" fit prices cards within 10% of its card's peak TFLOP/s (H100 SXM, H200)
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
    graphs: bool = False                        # the decoder stack replays CUDA graphs (length buckets)
    cold_kernels: bool = False                  # Triton's cache holds none of the fast path's kernels (a fresh
                                                # machine: model.fast.kernel_cache), so the first steps compile

    @property
    def micro_batches(self) -> float:
        return sum(n for _, _, n in self.batches) * self.epochs

    @property
    def distinct(self) -> int:
        return len({(r, n) for r, n, _ in self.batches})


def approx_shapes(setup: TrainSetup, data: DataSize, eval_every: int | None = None, val_fraction: float = 0.1,
                  buckets: int = 6, cold_kernels: bool = True) -> RunShapes:
    """`loraforge plan`'s guess at a run's shapes from the data's size alone (the trainer knows them exactly):
    batches padded PADDING_WASTE over the average example (a few length buckets), or packed rows of `seq`; a
    validation slice of `val_fraction` of the examples every `eval_every` optimizer steps (None: train.eval_every's
    auto spacing, config.auto_every). A plan is made before the GPU is rented: its first run compiles the kernels
    (`cold_kernels`)."""
    avg = min(data.avg_tokens, setup.seq)
    if setup.packing:
        rows = math.ceil(data.examples * avg / setup.seq)
        micro, length, context = math.ceil(rows / setup.batch), setup.seq, avg
    else:
        micro, context = math.ceil(data.examples / setup.batch), None
        length = min(setup.seq, math.ceil(avg * (1 + PADDING_WASTE) / 16) * 16)
    # packed batches come in a couple of shapes (rows of `seq`, segment offsets padded to a power of two)
    distinct = min(buckets if not setup.packing else 2, micro)
    per_shape = [micro // distinct + (i < micro % distinct) for i in range(distinct)]
    n_val = max(1, round(data.examples * val_fraction))
    # packed runs validate in rows of `seq` too (train.loop.evaluate_loss); unpacked ones fill batch x seq tokens
    # a forward (train.validation_forwards.validation_layout: `seq` is the longest example where the data is known;
    # a run multiplies that by its model's validation_scale, which a plan made without the model leaves at 1)
    val_rows = setup.batch if setup.packing else max(setup.batch, setup.batch * setup.seq // length)
    val_forwards = math.ceil((math.ceil(n_val * avg / setup.seq) if setup.packing else n_val) / val_rows)
    steps = math.ceil(micro * data.epochs / setup.grad_accum)
    # distinct shapes as lengths one token apart: the guess knows how many there are, not their lengths
    return RunShapes(batches=tuple((setup.batch, length + i, n) for i, n in enumerate(per_shape)),
                     real_tokens=round(data.examples * avg), epochs=data.epochs, context=context,
                     val_batches=((val_rows, length, val_forwards),),
                     evaluations=math.ceil(steps / (eval_every or auto_every(steps))), cold_kernels=cold_kernels)


def loop_parts(gpu: GPU, shape: ModelShape, setup: TrainSetup, shapes: RunShapes) -> dict[str, float]:
    """The run's terms of the model above, before their constants: seconds of its FLOPs at the card's peak
    (`ideal_seconds`), training micro-batches with and without graphs and validation forwards (each times the
    layers), distinct batch shapes, and the loop model's seconds (`loop_seconds`, the estimate without a fit)."""
    def over(batches, context, share):
        ideal = loop = count = 0.0
        for rows, length, n in batches:
            flops = flops_per_token(shape, setup, context or length) * rows * length * share
            ideal += n * flops / (gpu.bf16_tflops * 1e12)
            loop += n * share * seconds_per_micro_batch(gpu, shape, setup, rows, length, context or length)
            count += n
        return ideal, loop, count

    t_ideal, t_loop, t_n = over(shapes.batches, shapes.context, 1.0)
    v_ideal, v_loop, v_n = over(shapes.val_batches, None, VALIDATION_PASS)
    micro = t_n * shapes.epochs * shape.layers
    return {"ideal_seconds": t_ideal * shapes.epochs + v_ideal * shapes.evaluations,
            "loop_seconds": t_loop * shapes.epochs + v_loop * shapes.evaluations,
            "graph_layers": micro if shapes.graphs else 0.0, "eager_layers": 0.0 if shapes.graphs else micro,
            "val_layers": v_n * shapes.evaluations * shape.layers, "shapes": float(shapes.distinct),
            "cold": float(shapes.cold_kernels)}


def seconds_from_parts(parts: dict[str, float], fit: RunFit | None) -> float:
    if fit is None:
        return parts["loop_seconds"]
    return (fit.warmup_s + fit.compile_s * parts.get("cold", 0.0) + fit.shape_s * parts["shapes"]
            + parts["ideal_seconds"] / fit.mfu
            + fit.graph_step_s * parts["graph_layers"] + fit.eager_step_s * parts["eager_layers"]
            + fit.val_s * parts["val_layers"])


def run_seconds(gpu: GPU, shape: ModelShape, setup: TrainSetup, shapes: RunShapes,
                fit: RunFit | None = None) -> float:
    """Seconds of the run's training phase (warm-up, steps, validation), by the product-path model (or the
    loop model where calibration.json has no "runs" entry for the method and size class)."""
    return seconds_from_parts(loop_parts(gpu, shape, setup, shapes), fit or run_fit(gpu, shape, setup))


def run_fit(gpu: GPU, shape: ModelShape, setup: TrainSetup) -> RunFit | None:
    """calibration.json's "runs" fit for the run's (method, size class), if it was measured on this class of card."""
    fit = load_runs().get(speed_key(setup.method, shape))
    if fit is not None and abs(gpu.bf16_tflops / fit.gpu_tflops - 1) > SAME_CARD:
        return None   # its fixed costs (launches, NF4 dequantisation) were measured on another class of card
    return fit


def run_tokens_per_second(gpu: GPU, shape: ModelShape, setup: TrainSetup, shapes: RunShapes,
                          fit: RunFit | None = None) -> float:
    """Training tokens (padding left out) per second of the training phase, as summary.json counts them."""
    return shapes.real_tokens * shapes.epochs / run_seconds(gpu, shape, setup, shapes, fit)


SHARED = ("warmup_s", "compile_s", "shape_s", "graph_step_s", "eager_step_s", "val_s")   # shared by every key
DROP_FIRST = ("compile_s", "shape_s", "val_s", "graph_step_s", "eager_step_s", "warmup_s")
FEATURE = {"warmup_s": lambda p: 1.0, "compile_s": lambda p: p.get("cold", 0.0), "shape_s": lambda p: p["shapes"],
           "graph_step_s": lambda p: p["graph_layers"],
           "eager_step_s": lambda p: p["eager_layers"], "val_s": lambda p: p["val_layers"]}


def fit_runs(points: list[tuple[str, dict[str, float], float]]) -> dict[str, RunFit]:
    """Fit one mfu per key and the shared fixed costs to (key, loop_parts, measured seconds) points: least
    squares on relative errors; a fixed cost whose fit comes out negative is dropped (0), an mfu above MAX_MFU
    is held at it, and the rest refitted."""
    if not points:
        raise ValueError("no measurements to fit")
    keys = sorted({k for k, _, _ in points})
    shared = [n for n in SHARED if any(FEATURE[n](p) for _, p, _ in points)]
    capped: set[str] = set()
    while True:
        free = [k for k in keys if k not in capped]
        a = [[(p["ideal_seconds"] if k == key else 0.0) / t for key in free] + [FEATURE[n](p) / t for n in shared]
             for k, p, t in points]
        b = [1.0 - (p["ideal_seconds"] / MAX_MFU / t if k in capped else 0.0) for k, p, t in points]
        cols = len(free) + len(shared)
        sol = _least_squares(a, b) if cols and len(points) >= cols else ([] if not cols else None)
        if sol is None:   # terms the points cannot tell apart: drop the least general one first
            if not shared:
                raise ValueError("the measurements cannot separate the terms")
            shared.remove(next(n for n in DROP_FIRST if n in shared))
            continue
        inv = dict(zip(free, sol[:len(free)]))
        costs = dict(zip(shared, sol[len(free):]))
        bad = [n for n, v in costs.items() if v < 0]
        if bad:
            shared.remove(min(bad, key=costs.get))
            continue
        fast = [k for k, v in inv.items() if v < 1 / MAX_MFU]
        if fast:
            capped |= set(fast)
            continue
        mfu = {k: (MAX_MFU if k in capped else 1 / inv[k]) for k in keys}
        return {key: RunFit(mfu=mfu[key], points=sum(k == key for k, _, _ in points),
                            **{n: costs.get(n, 0.0) for n in SHARED}) for key in keys}


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
