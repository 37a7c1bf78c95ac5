"""Config: defaults follow current practice; overrides; one clear error per bad key/type/value."""

import pytest

from loraforge.config import ALL_LINEAR, load_config, parse_overrides
from loraforge.errors import LoraforgeError


def test_defaults_follow_the_issue():
    c = load_config()
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (16, 16, 0.05)
    assert c.lora.target_modules == ALL_LINEAR == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]
    t = c.train
    assert (t.learning_rate, t.warmup_ratio, t.weight_decay, t.batch_size, t.grad_accum, t.epochs) == \
        (2e-4, 0.05, 0.01, 2, 8, 3)
    assert (c.data.max_seq_length, c.seed, c.data.validation_split) == (2048, 3407, 0.1)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  learning_rate: 1.0e-3\n  epochs: 1\nlora:\n  r: 8\n")
    c = load_config(f, ["lora.r=32", "lora.target_modules=[q_proj,v_proj]", "data.system_prompt=Be brief."])
    assert c.train.learning_rate == pytest.approx(1e-3) and c.train.epochs == 1
    assert c.lora.r == 32 and c.lora.target_modules == ["q_proj", "v_proj"]
    assert c.data.system_prompt == "Be brief."


def test_overrides_parse_scalars():
    assert parse_overrides(["a.b=1e-3", "a.c=true", "d=null"]) == {"a": {"b": "1e-3", "c": True}, "d": None}
    assert load_config(overrides=["train.learning_rate=1e-3"]).train.learning_rate == pytest.approx(1e-3)


def test_bare_on_off_mean_the_words(tmp_path):
    """YAML reads a bare on/off as a boolean; the auto/on/off settings take it as the word."""
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  fast_path: off\n  cuda_graphs: on\n")
    c = load_config(f, ["eval.constrained=off"])
    assert (c.model.fast_path, c.model.cuda_graphs, c.eval.constrained) == ("off", "on", "off")
    assert load_config(overrides=["model.fast_path=on"]).model.fast_path == "on"
    with pytest.raises(LoraforgeError, match="model.fast_path"):
        load_config(overrides=["model.fast_path=sometimes"])


@pytest.mark.parametrize("override, expected", [
    (["train.lr=1e-3"], ["unknown key 'train.lr'", "learning_rate"]),
    (["lora.adapter=qlora"], ["'lora.adapter'", "'lora' or 'dora'", "'qlora'"]),
    (["train.batch_size=0"], ["'train.batch_size'", "greater than or equal to 1"]),
    (["train.epochs=many"], ["'train.epochs'", "valid number"]),
    (["data.validation_split=1.5"], ["'data.validation_split'", "less than 1"]),
    (["bogus=1"], ["unknown key 'bogus'", "Allowed here: base_model"]),
    (["lora.rank=8"], ["Did you mean 'lora.r'"]),
    (["novalue"], ["is not key=value"]),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(LoraforgeError) as e:
        load_config(overrides=override)
    for piece in expected:
        assert piece in str(e.value)


def test_yaml_syntax_error_has_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochs: 1\n  lr: [1,\n")
    with pytest.raises(LoraforgeError, match=r"bad.yaml:\d+:\d+: not valid YAML"):
        load_config(f)


def test_missing_config_file(tmp_path):
    with pytest.raises(LoraforgeError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_yaml(tmp_path):
    c = load_config(overrides=["lora.r=8", "train.max_steps=5"])
    f = tmp_path / "c.yaml"
    f.write_text(c.to_yaml())
    assert load_config(f) == c


def test_validation_and_checkpoint_spacing_auto_is_a_tenth_of_the_run_within_limits():
    t = load_config().train
    assert (t.eval_every, t.save_every) == ("auto", "auto")
    # a tenth of the run, rounded up, at least 50 and at most 500 steps apart
    assert t.intervals(120) == (50, 50) and t.intervals(1863) == (187, 187) and t.intervals(20_000) == (500, 500)
    c = load_config(None, ["train.eval_every=30", "train.save_every=auto"])
    assert c.train.intervals(1863) == (30, 187)
    c = load_config(None, ["train.save_every=7"])
    assert c.train.intervals(1863) == (187, 7)


@pytest.mark.parametrize("value", ["0", "soon"])
def test_bad_spacing_names_the_key(value):
    with pytest.raises(LoraforgeError, match="train.eval_every"):
        load_config(None, [f"train.eval_every={value}"])
