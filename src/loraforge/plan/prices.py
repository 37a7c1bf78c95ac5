"""Hourly GPU prices (USD, one card, on demand) used for cost estimates; override with `--prices FILE`.

The file is YAML or JSON mapping GPU names (any unambiguous part, as for `--gpu`) to USD/hour, e.g.

    RTX 4090: 0.34
    H100: 2.99

Cards not in the file keep the defaults below.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from loraforge.errors import LoraforgeError
from loraforge.plan.gpus import find_gpu

PRICES_SOURCE = "typical on-demand cloud prices, late 2026 (approximate; edit for your provider)"
# Rounded from public on-demand list prices for a single card: consumer cards at GPU-marketplace/community-cloud
# rates (Vast.ai, RunPod), L4 and A10G at hyperscaler rates (GCP g2-standard-4, AWS g5.xlarge), A100/H100/H200
# at GPU-cloud rates (Lambda, RunPod, CoreWeave). These are estimates, not quotes; prices move monthly.
DEFAULT_PRICES: dict[str, float] = {
    "RTX 3060 12GB": 0.10,
    "RTX 4070 Ti 12GB": 0.15,
    "RTX 3090 24GB": 0.22,
    "RTX 4090 24GB": 0.40,
    "L4 24GB": 0.70,
    "A10G 24GB": 1.01,
    "A100 40GB": 1.30,
    "A100 80GB": 1.80,
    "H100 80GB": 2.50,
    "H200 141GB": 3.50,
}


def load_prices(path: str | Path | None = None) -> dict[str, float]:
    """DEFAULT_PRICES, with the entries of the YAML/JSON file at `path` replacing theirs."""
    prices = dict(DEFAULT_PRICES)
    if path is None:
        return prices
    p = Path(path)
    try:
        table = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LoraforgeError(f"cannot read the price table: {e}", where=str(p)) from None
    if not isinstance(table, dict):
        raise LoraforgeError("the price table must map GPU names to USD per hour", where=str(p),
                             hint="write lines like `H100: 2.99`")
    for name, price in table.items():
        if isinstance(price, bool) or not isinstance(price, (int, float)) or price < 0:
            raise LoraforgeError(f"price of '{name}' must be a number of USD per hour >= 0 (got {price!r})",
                                 where=str(p))
        prices[find_gpu(str(name)).name] = float(price)
    return prices
