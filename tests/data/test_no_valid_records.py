"""A data file without one valid record: every data command fails (exit 2) with a message naming the main
problem and writes no output (no empty train/validation/dedup files); the report never says "None (given)";
a folder is called a folder; the hint for table columns names flags and keys that exist."""

import pytest

from loraforge.cli import main

BAD = '{"foo": 1}\n{"bar": 2}\nnot json\n'


@pytest.fixture()
def bad(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "bad.jsonl"
    p.write_text(BAD)
    return p


def _run(capsys, *args):
    code = main(["data", *args])
    out, err = capsys.readouterr()
    return code, out + err


def _outputs(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "bad.jsonl")


def test_validate_reports_then_fails_without_output(bad, tmp_path, capsys):
    code, text = _run(capsys, "validate", str(bad), "--out", str(tmp_path / "clean.jsonl"))
    assert code == 2 and "none of the 3 records is valid" in text and "no output written" in text
    assert "unknown_format" in text or "no known format" in text  # the report was shown first
    assert "None (given)" not in text and "none detected" in text
    assert _outputs(tmp_path) == ["bad.rejects.jsonl"]  # the reasons, but no empty clean.jsonl


def test_convert_fails_without_output(bad, tmp_path, capsys):
    code, _ = _run(capsys, "convert", str(bad), str(tmp_path / "out.jsonl"))
    assert code == 2 and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("args", [
    ["dedup", "bad.jsonl", "dedup.jsonl"],
    ["split", "bad.jsonl", "--train", "t.jsonl", "--validation", "v.jsonl"],
])
def test_dedup_and_split_fail_and_write_nothing(bad, tmp_path, capsys, args):
    code, text = _run(capsys, *args)
    assert code == 2 and "none of the 3 records is valid: 2 with records of no known format" in text
    assert "bad.jsonl:1" in text and "Traceback" not in text
    assert _outputs(tmp_path) == []


def test_inspect_and_sample_fail(bad, tiny_model, capsys):
    for cmd in ("inspect", "sample"):
        code, text = _run(capsys, cmd, "bad.jsonl", "--model", str(tiny_model))
        assert code == 2 and "none of the 3 records is valid" in text, cmd


def test_column_hint_names_real_flags(bad, capsys):
    from loraforge.data.formats import read_examples
    from loraforge.errors import LoraforgeError

    with pytest.raises(LoraforgeError) as e:  # what `loraforge train` says
        read_examples(bad)
    _, text = _run(capsys, "dedup", "bad.jsonl", "out.jsonl")
    for msg in (str(e.value), text):
        assert "--prompt-column" not in msg and "--columns PROMPT,RESPONSE" in msg
        assert "data.prompt_column=... data.response_column=..." in msg


def test_a_folder_is_not_not_found(tmp_path, capsys):
    code, text = _run(capsys, "validate", str(tmp_path))
    assert code == 2 and "is a folder, not a data file" in text and "not found" not in text
