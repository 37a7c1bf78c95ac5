"""Whether this machine has compiled the fast path's Triton kernels before.

Triton compiles a kernel the first time a process meets it and keeps the binary in its cache folder
(TRITON_CACHE_DIR, else ~/.triton/cache), one sub-folder per specialisation holding `<kernel name>.<ext>` files.
A fresh machine (a rented GPU, a new container) has none, and its first run pays the compiles: session 20's
SNIPS run trained 18.8 s on a fresh H100 against 10.2-11.1 s warm on the same machine. The planner prices that
(plan.run_speed.RunShapes.cold_kernels) and bench/train_e2e.py records it with each row.
"""

from __future__ import annotations

import os
from pathlib import Path

# the @triton.jit kernels of model/fast (dropout.py, kernels.py, swiglu_lora.py, nf4.py)
KERNELS = ("seeded_dropout", "rope_qk", "swiglu_lora_kernel", "nf4_dequant")


def cache_dir() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def compiled_kernels(folder: Path | None = None) -> set[str]:
    """The names in KERNELS that have at least one compiled binary in Triton's cache folder."""
    folder = folder or cache_dir()
    return {n for n in KERNELS if next(folder.glob(f"*/{n}.*"), None) is not None}


def kernels_cold(folder: Path | None = None) -> bool:
    """True when none of the fast path's kernels has been compiled on this machine (its first run)."""
    return not compiled_kernels(folder)
