"""Answers files (eval/meta.py): `--answers FILE.gz` is gzip, each flush readable at once, and `answer_lines` reads
plain or gzip files, including a run cut short mid-line."""

import json

import pytest

from memsparse.eval.meta import answer_lines, answers_file


@pytest.mark.parametrize("name", ["a.jsonl", "sub/a.jsonl.gz"])
def test_answers_files_round_trip_and_survive_a_run_cut_short(tmp_path, name):
    path = tmp_path / name
    rows = [{"q": i, "text": "é" * i} for i in range(40)]
    with answers_file(str(path)) as fh:
        for r in rows[:30]:
            fh.write(json.dumps(r) + "\n")
        fh.flush()
        assert answer_lines(path) == rows[:30]  # readable while the run goes on
        for r in rows[30:]:
            fh.write(json.dumps(r) + "\n")
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    assert answer_lines(path) == rows
    cut = tmp_path / "cut"
    cut.write_bytes(raw[:-9] if name.endswith(".gz") else raw[:-7])  # gzip: no trailer; plain: last line cut
    got = answer_lines(cut)
    assert got == rows[:len(got)] and len(got) >= 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\nnot json\n{"q": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        answer_lines(bad)


def test_commit_is_read_once_so_a_long_run_names_the_code_it_started_with(monkeypatch):
    import subprocess

    from memsparse.eval import meta

    heads = iter(["aaa1111\n", "bbb2222\n"])
    monkeypatch.setattr(subprocess, "check_output", lambda *a, **k: next(heads))
    monkeypatch.delenv("MEMSPARSE_COMMIT", raising=False)
    meta._git_head.cache_clear()
    try:
        assert meta.commit() == "aaa1111"  # the CLI reads it as a command starts
        assert meta.run_meta()["commit"] == "aaa1111"  # a commit landed meanwhile: still the start's
        monkeypatch.setenv("MEMSPARSE_COMMIT", "ccc3333")
        assert meta.commit() == "ccc3333"
    finally:
        meta._git_head.cache_clear()
