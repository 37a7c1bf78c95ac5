"""The GGUF writer's float32 -> float16 cast (torch, all cores) rounds exactly as numpy's astype does:
round to nearest even, subnormals, overflow to inf, signed zeros, for contiguous and strided input."""

import numpy as np

from loraforge.export.gguf import encode_tensor, to_f16


def edge_values() -> np.ndarray:
    f16_max, tiny = 65504.0, 2.0 ** -24                    # largest half, smallest half subnormal
    v = [0.0, -0.0, 1.0, -1.0, f16_max, 65519.99, 65520.0, -65520.0, 1e9, np.inf, -np.inf, tiny, tiny / 2,
         tiny * 0.5000001, tiny * 1.5, tiny * 2.5, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -11), 1e-30]
    halves = np.arange(-2048, 2048, dtype=np.float32) + 0.5     # ties at 2048..4096 where spacing is 2
    ties = (np.arange(2048, 4096, 2, dtype=np.float32) + 1.0)   # exactly between two halves
    return np.concatenate([np.asarray(v, dtype=np.float32), halves, ties, -ties])


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint16)


def test_cast_matches_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    exps = rng.uniform(-30, 17, size=300_000).astype(np.float32)   # spans subnormal .. overflow
    rand = (rng.standard_normal(300_000).astype(np.float32) * np.float32(2.0) ** exps).astype(np.float32)
    x = np.concatenate([edge_values(), rand]).astype(np.float32)
    got = to_f16(x)
    assert got.dtype == np.float16 and got.shape == x.shape
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    np.testing.assert_array_equal(bits(got), bits(want))
    assert np.isinf(got[np.abs(x) >= 65520]).all() and (got[np.abs(x) < 65504] != np.inf).all()


def test_cast_of_strided_input_and_nan():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((256, 384)).astype(np.float32)
    view = m.T[::2]                                              # not contiguous
    np.testing.assert_array_equal(bits(to_f16(view)), bits(view.astype(np.float16)))
    out = to_f16(np.array([np.nan, 1.5], dtype=np.float32))
    assert np.isnan(out[0]) and out[1] == 1.5


def test_encode_tensor_uses_it_for_matrices_and_keeps_vectors_f32():
    w = np.random.default_rng(2).standard_normal((64, 96)).astype(np.float32)
    data, raw = encode_tensor("blk.0.attn_q.weight", w, "f16")
    assert raw is None and data.dtype == np.float16
    np.testing.assert_array_equal(bits(data), bits(w.astype(np.float16)))
    vec, _ = encode_tensor("blk.0.attn_norm.weight", w[0], "f16")
    assert vec.dtype == np.float32
