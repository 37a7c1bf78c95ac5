"""model.fast.kernel_cache: a machine's first run is told apart from a warm one by Triton's cache folder."""

from __future__ import annotations

from loraforge.model.fast import kernel_cache
from loraforge.model.fast.kernel_cache import compiled_kernels, kernels_cold


def test_an_empty_or_missing_cache_is_cold(tmp_path):
    assert kernels_cold(tmp_path / "absent") and kernels_cold(tmp_path)
    (tmp_path / "abc123").mkdir()
    (tmp_path / "abc123" / "some_other_kernel.cubin").write_bytes(b"\0")
    assert compiled_kernels(tmp_path) == set() and kernels_cold(tmp_path)


def test_compiled_fast_path_kernels_make_it_warm(tmp_path, monkeypatch):
    for key, name in [("k1", "seeded_dropout"), ("k2", "rope_qk"), ("k3", "rope_qk")]:
        (tmp_path / key).mkdir()
        (tmp_path / key / f"{name}.json").write_text("{}")
    assert compiled_kernels(tmp_path) == {"seeded_dropout", "rope_qk"}
    assert not kernels_cold(tmp_path)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))   # the folder Triton itself uses
    assert kernel_cache.cache_dir() == tmp_path and not kernels_cold()
