"""Nothing lost: the run folder is touched only once everything is checked; --overwrite keeps the old run
until the new one has started; a failed start leaves no folder; --resume on a finished run changes nothing;
--resume refuses a config that changes training unless --resume-with-changes, which records it."""

import json

import pytest
import yaml

from conftest import tiny_config
from loraforge.cli import main
from loraforge.config import build_config
from loraforge.errors import LoraforgeError
from loraforge.train.run import run_training


def _cli(tmp_path, tree, capsys, *extra):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    code = main(["train", str(cfg), *extra])
    return code, capsys.readouterr().err


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def finished(tiny_model, chat_file, tmp_path):
    """A finished run (2 steps, a checkpoint at step 2) and its config tree."""
    tree = tiny_config(tiny_model, chat_file, tmp_path / "A", max_steps=2, save_every=2, num_threads=1)
    run_training(build_config(tree))
    return tree, tmp_path / "A"


def test_overwrite_with_missing_data_keeps_the_old_run(finished, tmp_path, capsys):
    tree, run = finished
    before = _snapshot(run)
    bad = json.loads(json.dumps(tree))
    bad["data"]["train"] = str(tmp_path / "missing.jsonl")
    code, err = _cli(tmp_path, bad, capsys, "--overwrite")
    assert code == 2 and "missing.jsonl: data file not found" in err
    assert _snapshot(run) == before  # adapter, checkpoints, metrics all still there


def test_overwrite_failing_after_the_model_loaded_keeps_the_old_run(finished, tmp_path, capsys):
    tree, run = finished
    before = _snapshot(run)
    bad = json.loads(json.dumps(tree))
    bad["lora"]["target_modules"] = ["q_proj", "c_attn"]  # found wrong only once the model is loaded
    code, err = _cli(tmp_path, bad, capsys, "--overwrite")
    assert code == 2 and "c_attn" in err
    assert _snapshot(run) == before
    assert sorted(p.name for p in run.parent.iterdir() if p.name.startswith(".")) == []  # nothing left aside


def test_overwrite_replaces_the_run_once_it_started(finished, tmp_path, capsys):
    tree, run = finished
    (run / "old-marker.txt").write_text("old")
    code, _ = _cli(tmp_path, tree, capsys, "--overwrite")
    assert code == 0 and not (run / "old-marker.txt").exists() and (run / "summary.json").is_file()
    assert not any(p.name.startswith(".A") for p in run.parent.iterdir())


def test_failed_start_leaves_no_empty_folder(tiny_model, chat_file, tmp_path, capsys):
    tree = tiny_config(tiny_model, chat_file, tmp_path / "new" / "B", max_steps=2)
    tree["lora"]["target_modules"] = ["nope"]
    code, err = _cli(tmp_path, tree, capsys)
    assert code == 2 and "nope" in err
    assert not (tmp_path / "new" / "B").exists()


def test_output_dir_that_is_a_file(tiny_model, chat_file, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        code, err = _cli(tmp_path, tiny_config(tiny_model, chat_file, out, max_steps=1), capsys)
        assert code == 2 and "output_dir must be a folder" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x"


def test_resume_on_a_finished_run_changes_nothing(finished, tmp_path, capsys):
    tree, run = finished
    before = _snapshot(run)
    code, err = _cli(tmp_path, tree, capsys, "--resume")
    assert code == 0 and "nothing to do" in err and "finished (2 steps)" in err
    assert "error" not in err.lower() and "Traceback" not in err
    assert _snapshot(run) == before


def test_resume_at_the_last_checkpoint_without_summary(finished, tmp_path, capsys):
    tree, run = finished
    (run / "summary.json").unlink()  # killed after the last checkpoint, before the summary
    code, err = _cli(tmp_path, tree, capsys, "--resume")
    assert code == 0 and "nothing to do" in err and "(2/2)" in err
    assert not (run / "summary.json").exists()


def test_resume_refuses_a_changed_config(tiny_model, chat_file, tmp_path, capsys):
    tree = tiny_config(tiny_model, chat_file, tmp_path / "A", max_steps=6, save_every=3, num_threads=1,
                       lr_scheduler="constant", warmup_ratio=0.0)
    run_training(build_config(tree))
    run = tmp_path / "A"
    (run / "summary.json").unlink()
    (run / "checkpoints" / "step-00000006").rename(run / "checkpoints" / "gone")  # resume from step 3
    changed = json.loads(json.dumps(tree))
    changed["train"]["learning_rate"] = 5e-2
    config_before = (run / "config.yaml").read_text()
    code, err = _cli(tmp_path, changed, capsys, "--resume")
    assert code == 2 and "train.learning_rate: 0.005 -> 0.05" in err and "--resume-with-changes" in err
    assert (run / "config.yaml").read_text() == config_before

    # bookkeeping keys may change freely
    neutral = json.loads(json.dumps(tree))
    neutral["train"].update(eval_every=1, keep_last=5)
    from loraforge.train.folder import check_resume

    assert check_resume(run, build_config(neutral), with_changes=False) == {}

    code, err = _cli(tmp_path, changed, capsys, "--resume", "--resume-with-changes")
    assert code == 0, err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([5e-3] * 3 + [5e-2] * 3)  # the new rate really applies
    (record,) = [json.loads(x) for x in (run / "resume_changes.jsonl").read_text().splitlines()]
    assert record["resumed_at_step"] == 3
    assert record["changes"] == {"train.learning_rate": {"was": 5e-3, "now": 5e-2}}
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["learning_rate"] == 5e-2


def test_resume_with_changes_needs_resume(tiny_model, chat_file, tmp_path, capsys):
    code, err = _cli(tmp_path, tiny_config(tiny_model, chat_file, tmp_path / "A"), capsys, "--resume-with-changes")
    assert code == 2 and "goes with --resume" in err


def test_data_folder_is_not_called_missing(tiny_model, tmp_path):
    with pytest.raises(LoraforgeError, match="is a folder, not a data file"):
        run_training(build_config(tiny_config(tiny_model, tmp_path, tmp_path / "run")))
    assert not (tmp_path / "run").exists()
