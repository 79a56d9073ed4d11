"""research/paired_answers.py: samples matched by what they asked, the gain and its standard error."""

import gzip
import json

import pytest

from research.paired_answers import compare, main


def _niah(sample, score, subtask="niah_single_1", refine=64):
    return {"tokens": 131072, "subtask": subtask, "seed": 100, "sample": sample, "score": score, "fusion": "rrf",
            "refine": refine, "inject_k": 4}


def test_niah_pairs_by_sample_and_setting():
    a = [_niah(0, 1.0), _niah(1, 0.0), _niah(2, 1.0), _niah(0, 0.0, refine=0), _niah(5, 1.0, "niah_multikey_2")]
    b = [_niah(0, 1.0), _niah(1, 1.0), _niah(2, 0.0), _niah(3, 1.0), _niah(0, 1.0, refine=0)]
    r = compare(a, b, "score")
    assert r["128K niah_single_1"]["n"] == 4  # sample 3 is B's only; multikey_2 sample 5 is A's only
    assert r["all"] == {"n": 4, "a": 50.0, "b": 75.0, "gain": 25.0, "gain_se": pytest.approx(47.87, abs=0.01)}


def test_qa_pairs_by_question_and_reads_gzip(tmp_path, capsys, monkeypatch):
    rows = [{"system": "memsparse", "question": f"q{i}", "f1": f} for i, f in enumerate([0.5, 0.0, 1.0])]
    better = [dict(r, f1=min(r["f1"] + 0.5, 1.0)) for r in rows]
    for name, lines in (("a.jsonl.gz", rows), ("b.jsonl.gz", better)):
        with gzip.open(tmp_path / name, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.setattr("sys.argv", ["paired_answers.py", str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.jsonl.gz")])
    main()
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["metric"] == "f1" and out["groups"]["all"]["gain"] == pytest.approx(33.33, abs=0.01)


def test_nothing_in_common_is_an_error():
    with pytest.raises(ValueError, match="no sample"):
        compare([_niah(0, 1.0)], [_niah(1, 1.0)], "score")


def test_qa_across_systems_pairs_by_question_alone():
    a = [{"system": "memsparse", "question": f"q{i}", "f1": f} for i, f in enumerate([0.5, 0.0, 1.0])]
    b = [{"system": "memsparse-priors-256", "question": f"q{i}", "f1": f} for i, f in enumerate([1.0, 0.0])]
    with pytest.raises(ValueError, match="no sample"):
        compare(a, b, "f1")  # by default the system is part of the key
    r = compare(a, b, "f1", across_systems=True)
    assert r["all"]["n"] == 2 and r["all"]["gain"] == pytest.approx(25.0)
    with pytest.raises(ValueError, match="one system"):
        compare(a + [dict(a[0], system="rag1-msa")], b, "f1", across_systems=True)
