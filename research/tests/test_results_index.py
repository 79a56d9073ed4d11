"""research/results_index.py: the results index, README's results tables and docs/results.md match the result files
(run `python research/results_index.py` after adding or renaming one)."""

import json
import sys
from pathlib import Path

RESEARCH = Path(__file__).parents[1]
sys.path.insert(0, str(RESEARCH))
import results_index  # noqa: E402


def test_index_and_tables_are_current(capsys):
    assert results_index.main(["--check"]) == 0, capsys.readouterr().out


def test_every_run_names_its_file_and_fields():
    rows = json.loads(results_index.INDEX.read_text())["runs"]
    for row in rows:
        assert (results_index.ROOT / row["file"]).exists()
        assert all(row[k] for k in ("run", "task", "model", "setting", "card", "date", "commit"))
    assert len({r["run"] for r in rows}) == len(rows)
    names = [Path(r["file"]).name for r in rows]
    assert max(map(len, names)) <= 30  # short names: history is in the index, not in file names


def test_the_index_says_where_it_was_built_and_which_cards_its_runs_used():
    index = json.loads(results_index.INDEX.read_text())
    assert index["gpu"] == "none (CPU)" and index["machine"].startswith("CPU")
    assert set(index["cards"]) == {r["card"] for r in index["runs"]} - {results_index.UNRECORDED}
    assert index["newest_run_date"] == max(r["date"] for r in index["runs"] if r["date"] != results_index.UNRECORDED)


def test_compared_settings_are_rows_of_their_own(tmp_path, monkeypatch):
    """`eval niah --compare` writes one file, the other settings under "compared": each is a row of the index."""
    folder = tmp_path / "benchmarks/results"
    folder.mkdir(parents=True)
    (tmp_path / "research/results").mkdir(parents=True)
    meta = {"gpu": "H100", "date": "2026-12-07", "commit": "abc1234"}

    def point(refine):
        return {"tokens": 32768, "subtask": "niah_single_1", "refine": refine, "accuracy": 50.0, "samples": 2}

    (folder / "niah.json").write_text(json.dumps({"model": "m", **meta, "points": [point(64)],
                                                  "compared": [{"label": "refine-0", **meta, "points": [point(0)]}]}))
    monkeypatch.setattr(results_index, "ROOT", tmp_path)
    monkeypatch.setattr(results_index, "INDEX", folder / "index.json")
    rows = results_index.index_rows()
    assert [(r["run"], r["model"], r["card"]) for r in rows] == [("niah", "m", "H100"), ("niah:refine-0", "m", "H100")]
    assert "refine=64" in rows[0]["setting"] and "refine=0" in rows[1]["setting"]
