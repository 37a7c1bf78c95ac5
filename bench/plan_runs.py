"""Fit the planner's product-path speed model (plan/run_speed.py) to `loraforge train` runs measured end to end.

    python bench/plan_runs.py bench/results/train_e2e/h100_s11_*.json            # compare only
    python bench/plan_runs.py --write bench/results/train_e2e/h100_s11_*.json    # fit, write calibration.json

Reads the loraforge rows of bench/train_e2e.py results (each carries summary.json's `plan_speed`: the run's
terms of plan.run_speed's model on the card it ran on, and the (method, size class) key), fits an mfu per
key and the shared fixed costs to the measured training seconds (plan.run_speed.fit_runs), prints one
JSON object: per row the measured and planned tokens/s (before: the `planned_tokens_per_s` the run printed;
after: the new fit; loo: a fit made without that row) and their errors. With --write the fits go into
src/loraforge/plan/calibration.json's "runs" (the loop model's "entries" are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without installing

from loraforge.plan.calibration import CALIBRATION_FILE  # noqa: E402
from loraforge.plan.run_speed import SHARED, fit_runs, seconds_from_parts  # noqa: E402


# Rows measured before the trainer recorded whether Triton's cache was cold (plan_speed's "cold"): the first
# loraforge row on a fresh machine, by the session notes (their first step ended 8.2-8.5 s into training, the same
# runs' warm rows 1.6-2.9 s): session 18's call A, session 19's call 1 and session 20's call 1.
COLD_BEFORE = {"h100_callA_1_135m_flat_fresh.json", "h100_call1_1b_mix.json", "h100_call1_135m_snips_fresh.json"}


def cold(r: dict) -> float:
    if "cold" in r["plan_speed"]:
        return r["plan_speed"]["cold"]
    return float(r["file"] in COLD_BEFORE or r.get("kernels_cached_before") == [])


def rows_of(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        for r in data["rows"]:
            if r.get("tool") == "loraforge" and r.get("plan_speed") and r.get("train_seconds"):
                rows.append({**r, "file": Path(p).name})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--write", action="store_true", help="write the fits into calibration.json")
    a = ap.parse_args()
    rows = rows_of(a.files)
    point = lambda r: (r["plan_speed"]["key"], {**r["plan_speed"], "cold": cold(r)}, r["train_seconds"])  # noqa: E731
    fits = fit_runs([point(r) for r in rows])
    out = []
    for r in rows:
        key, parts, _ = point(r)
        planned = r["tokens"] / seconds_from_parts(parts, fits[key])
        others = [point(o) for o in rows if o is not r]
        try:
            loo_fit = fit_runs(others).get(key)
        except ValueError:
            loo_fit = None
        loo = r["tokens"] / seconds_from_parts(parts, loo_fit) if loo_fit else None
        out.append({"run": r["run"], "file": r["file"], "key": key, "cold": parts["cold"],
                    "measured_tokens_per_s": r["tokens_per_s"],
                    "planned_before": r.get("planned_tokens_per_s"), "planned": round(planned, 1),
                    "err": round(planned / r["tokens_per_s"] - 1, 3),
                    "err_before": round(r["planned_tokens_per_s"] / r["tokens_per_s"] - 1, 3)
                    if r.get("planned_tokens_per_s") else None,
                    "loo_planned": round(loo, 1) if loo else None,
                    "loo_err": round(loo / r["tokens_per_s"] - 1, 3) if loo else None})
    first = next(iter(fits.values()))
    runs = {"host": {n: round(getattr(first, n), 6) for n in SHARED},
            **{k: {"mfu": round(f.mfu, 4), "points": f.points} for k, f in fits.items()}}
    result = {"command": "python bench/plan_runs.py " + " ".join(sys.argv[1:]), "runs": runs, "rows": out,
              "within_25pct": all(abs(r["err"]) <= 0.25 for r in out)}
    print(json.dumps(result, indent=1))
    if a.write:
        cal = json.loads(CALIBRATION_FILE.read_text())
        cal["runs"] = {"_source": "python bench/plan_runs.py --write " + " ".join(Path(f).name for f in a.files),
                       **runs}
        CALIBRATION_FILE.write_text(json.dumps(cal, indent=1) + "\n")


if __name__ == "__main__":
    main()
