"""Measured training speed, per method and model size class, that replaces the guessed MFU when present.

`bench/plan_accuracy.py --calibrate` trains real configurations on a GPU, fits each (method, size class) and
writes calibration.json next to this file:

    {"gpu": "H100 80GB", "gpu_tflops": 989.4, "command": "...", "measured": "2026-11-23",
     "entries": {"lora/small": {"mfu": 0.41, "overhead_s_per_gparam": 0.004, "points": 3}, ...}}

The model of one micro-batch on one GPU is

    seconds = FLOPs / (peak bf16 FLOP/s x mfu)
              + overhead_s_per_gparam x params / 1e9 x passes / 2 x (gpu_tflops / peak TFLOP/s)

the first term is the matmul work at the measured utilisation, the second a fixed cost per step that grows with
the model and with the passes over it (forward + backward = 2; gradient checkpointing runs the forward again:
3): kernel launches per layer, and for QLoRA dequantising every NF4 weight in each pass. It is measured on the
calibration GPU and scaled by peak TFLOP/s to other cards (a rough proxy: a faster card launches and
dequantises faster too). Without a file or an entry, throughput.py falls back to its constant MFU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from loraforge.plan.shapes import ModelShape

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
# A fit may not claim more than this share of peak bf16 FLOP/s: an 8192^3 bf16 GEMM on an H100 runs at ~800 of
# its 989 TFLOP/s peak (measured on the calibration machine); a training step's matmuls cannot beat that.
MAX_MFU = 0.8
SMALL_MODEL_PARAMS = 3e9  # under this: "small" (Llama-3.2-1B measured), else "large" (Llama-3.1-8B measured)


@dataclass(frozen=True)
class SpeedFit:
    """Fitted speed of one (method, size class): utilisation of the matmul FLOPs and a fixed cost per step."""

    mfu: float
    overhead_s_per_gparam: float
    gpu_tflops: float  # peak bf16 TFLOP/s of the card it was measured on
    points: int = 0


@dataclass(frozen=True)
class RunFit:
    """A whole run (plan/run_speed.py): the utilisation of its FLOPs and the fixed costs: per run, per distinct
    batch shape, per layer of a training micro-batch (with CUDA graphs, or eager) and of a validation forward."""

    mfu: float = MAX_MFU
    warmup_s: float = 0.0
    compile_s: float = 0.0    # once, on a machine whose Triton cache is cold (its first run)
    shape_s: float = 0.0
    graph_step_s: float = 0.0
    eager_step_s: float = 0.0
    val_s: float = 0.0
    points: int = 0
    gpu_tflops: float = 0.0   # peak bf16 TFLOP/s of the card the runs were measured on (0: any card)


def size_class(shape: ModelShape) -> str:
    return "small" if shape.params < SMALL_MODEL_PARAMS else "large"


def speed_key(method: str, shape: ModelShape) -> str:
    return f"{method}/{size_class(shape)}"


def parse_calibration(data: dict[str, Any]) -> dict[str, SpeedFit]:
    tflops = float(data["gpu_tflops"])
    return {key: SpeedFit(float(e["mfu"]), float(e["overhead_s_per_gparam"]), tflops, int(e.get("points", 0)))
            for key, e in data.get("entries", {}).items()}


@lru_cache(maxsize=4)
def load_calibration(path: str | None = None) -> dict[str, SpeedFit]:
    """Entries of the calibration file ($LORAFORGE_PLAN_CALIBRATION, else calibration.json); {} when absent."""
    p = Path(path or os.environ.get("LORAFORGE_PLAN_CALIBRATION") or CALIBRATION_FILE)
    if not p.is_file():
        return {}
    return parse_calibration(json.loads(p.read_text(encoding="utf-8")))


@lru_cache(maxsize=4)
def load_runs(path: str | None = None) -> dict[str, RunFit]:
    """The file's "runs" entries (product-path fits, see plan/run_speed.py); {} when absent."""
    p = Path(path or os.environ.get("LORAFORGE_PLAN_CALIBRATION") or CALIBRATION_FILE)
    if not p.is_file():
        return {}
    data = json.loads(p.read_text(encoding="utf-8"))
    runs = data.get("runs", {})
    host = {k: float(v) for k, v in runs.get("host", {}).items()}
    return {key: RunFit(mfu=float(e["mfu"]), points=int(e.get("points", 0)), gpu_tflops=float(data["gpu_tflops"]),
                        **host)
            for key, e in runs.items() if key not in ("host", "_source")}


def calibration_source(path: str | None = None) -> str | None:
    """'measured on GPU, date' of the calibration file in use, or None."""
    p = Path(path or os.environ.get("LORAFORGE_PLAN_CALIBRATION") or CALIBRATION_FILE)
    if not p.is_file():
        return None
    data = json.loads(p.read_text(encoding="utf-8"))
    return f"calibrated on {data.get('gpu', '?')} ({data.get('measured', '?')})"


def passes(checkpointing: bool) -> int:
    """Passes over the weights per step: forward and backward, and the recomputed forward with checkpointing."""
    return 3 if checkpointing else 2


def fit_speed(points: list[tuple[float, float, float]], gpu_tflops: float) -> SpeedFit:
    """Fit `seconds = ideal / mfu + overhead x work` to (ideal seconds at 100% MFU, work, seconds) points, where
    work = billions of params x passes / 2 (see step_seconds).

    Least squares on relative errors (each point weighs the same whatever its size); the overhead is dropped
    (set to 0) when the fit makes it negative or the points cannot separate it from the FLOPs term.
    """
    if not points:
        raise ValueError("no measurements to fit")
    rows = [(x / t, p / t) for x, p, t in points]  # divide each equation by its measured time: target is 1
    sxx = sum(a * a for a, _ in rows)
    sxp = sum(a * b for a, b in rows)
    spp = sum(b * b for _, b in rows)
    sx1 = sum(a for a, _ in rows)
    sp1 = sum(b for _, b in rows)
    det = sxx * spp - sxp * sxp
    if len(points) >= 2 and det > 1e-12 * sxx * spp:
        inv_mfu = (sx1 * spp - sp1 * sxp) / det
        overhead = (sxx * sp1 - sxp * sx1) / det
        if inv_mfu >= 1 / MAX_MFU and overhead >= 0:
            return SpeedFit(1 / inv_mfu, overhead, gpu_tflops, len(points))
        if overhead > 0:  # faster matmuls than a GPU can run: cap the utilisation, fit the fixed cost alone
            overhead = (sp1 - sxp / MAX_MFU) / spp
            if overhead >= 0:
                return SpeedFit(MAX_MFU, overhead, gpu_tflops, len(points))
    inv_mfu = sx1 / sxx
    if inv_mfu <= 0:
        raise ValueError("measurements give a non-positive utilisation")
    return SpeedFit(1 / inv_mfu, 0.0, gpu_tflops, len(points))


def step_seconds(fit: SpeedFit, flops: float, gpu_tflops: float, params: int, checkpointing: bool = False) -> float:
    """Seconds of one micro-batch of `flops` on a card of `gpu_tflops`, by the fitted model."""
    scale = fit.gpu_tflops / gpu_tflops
    work = params / 1e9 * passes(checkpointing) / 2
    return flops / (gpu_tflops * 1e12 * fit.mfu) + fit.overhead_s_per_gparam * work * scale
