"""loraforge.files: the atomic writes every stage uses leave the old file or the new one, never a temp file
or half of one, and write the bytes the callers wrote before (json.dumps, one row a line)."""

import hashlib
import json

import pytest

from loraforge.files import atomic_dir, atomic_write_text, sha256, write_json, write_jsonl, write_lines


def test_text_json_and_jsonl_are_written_whole_without_temp_files(tmp_path):
    p = atomic_write_text(tmp_path / "a.txt", "é old")
    atomic_write_text(p, "é new\n")
    assert p.read_bytes() == "é new\n".encode("utf-8")
    write_json(tmp_path / "a.json", {"x": [1, 2], "p": tmp_path}, default=str)
    assert (tmp_path / "a.json").read_text() == json.dumps({"x": [1, 2], "p": str(tmp_path)}, indent=1)
    write_json(tmp_path / "b.json", {"y": 1}, indent=None)
    assert (tmp_path / "b.json").read_text() == '{"y": 1}'
    write_jsonl(tmp_path / "r.jsonl", ({"i": i} for i in range(3)))
    assert [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]
    write_lines(tmp_path / "l.txt", ["a", "b"])
    assert (tmp_path / "l.txt").read_text() == "a\nb\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_jsonl_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "r.jsonl"
    write_jsonl(p, [{"i": 1}])

    def rows():
        yield {"i": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(p, rows())
    assert p.read_text() == '{"i": 1}\n'


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "adapter"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "w.bin").write_bytes(b"2")
            raise RuntimeError("crash while saving")
    assert (out / "w.bin").read_bytes() == b"1" and not (tmp_path / "adapter.tmp").exists()
    with atomic_dir(out) as tmp:
        (tmp / "x.bin").write_bytes(b"3")
    assert sorted(p.name for p in out.iterdir()) == ["x.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_sha256_matches_hashlib_across_chunks(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()
