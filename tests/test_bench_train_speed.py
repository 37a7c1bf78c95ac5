"""bench/train_speed.py's ratios: median rates over interleaved rounds, each ours-* row against its method's peers."""

from __future__ import annotations


import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def ratios():
    return load_bench("train_speed").ratios


def row(name, rate, reserved, shape="8b", rnd=None):
    r = {"row": name, "shape": shape, "tokens_per_s": rate, "peak_reserved_gib": reserved}
    return r if rnd is None else {**r, "round": rnd}


def test_one_round_compares_each_ours_row_with_its_methods_peers(ratios):
    out = ratios([row("ours-qlora", 11000, 7.0), row("unsloth-qlora", 10000, 7.2),
                  row("ours-qlora-nographs", 9000, 6.5), row("plain-qlora", 2500, 16.0),
                  row("ours-lora", 12000, 16.0), {"row": "unsloth-lora", "shape": "8b", "error": "timeout"}])
    assert out["8b/ours-qlora vs unsloth-qlora"] == {"speed": 1.1, "reserved": pytest.approx(0.972, abs=1e-3)}
    assert out["8b/ours-qlora-nographs vs unsloth-qlora"]["speed"] == 0.9
    assert out["8b/ours-qlora vs plain-qlora"]["speed"] == 4.4
    assert not any("lora vs unsloth-lora" in k and k.startswith("8b/ours-lora") for k in out)  # the peer failed
    assert all("speed_per_round" not in v for v in out.values())


def test_rounds_use_median_rates_largest_memory_and_list_each_rounds_ratio(ratios):
    rows = [row("ours-qlora", 11000, 7.0, rnd=0), row("unsloth-qlora", 8000, 7.2, rnd=0),
            row("ours-qlora", 10000, 7.1, rnd=1), row("unsloth-qlora", 10000, 7.2, rnd=1),
            row("ours-qlora", 10500, 7.0, rnd=2), row("unsloth-qlora", 9500, 7.3, rnd=2),
            row("ours-qlora", 9000, 2.0, shape="1b")]
    got = ratios(rows)["8b/ours-qlora vs unsloth-qlora"]
    assert got["speed"] == pytest.approx(10500 / 9500, abs=1e-3)     # medians, not means (10,167 / 9,167)
    assert got["reserved"] == pytest.approx(7.1 / 7.3, abs=1e-3)
    assert got["speed_per_round"] == [1.375, 1.0, 1.105]
    assert not any(k.startswith("1b/") for k in ratios(rows))        # no peer of that shape


def test_each_rounds_ratio_pairs_rows_of_the_same_round(ratios):
    rows = [row("ours-lora", 12000, 16.0, rnd=0), {"row": "unsloth-lora", "shape": "8b", "error": "oom", "round": 0},
            row("ours-lora", 11000, 16.1, rnd=1), row("unsloth-lora", 10000, 16.8, rnd=1),
            {"row": "ours-lora", "shape": "8b", "error": "timeout", "round": 2}, row("unsloth-lora", 9000, 16.8, rnd=2),
            row("ours-lora", 13200, 16.0, rnd=3), row("unsloth-lora", 11000, 16.8, rnd=3)]
    got = ratios(rows)["8b/ours-lora vs unsloth-lora"]
    assert got["speed_per_round"] == [1.1, 1.2]          # rounds 1 and 3: the only ones where both rows ran
    assert got["speed"] == pytest.approx(12000 / 10000, abs=1e-3)
