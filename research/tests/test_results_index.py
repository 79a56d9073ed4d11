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
