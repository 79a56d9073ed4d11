"""docs/python-api.md, "Evaluations from Python": its example builds valid run settings and calls each task's `run`
(here recorded instead of measured), so the documented API cannot drift from the code."""

import re
from pathlib import Path

from memsparse.eval import niah, qa

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def test_documented_run_example_builds_valid_settings(monkeypatch):
    section = DOC.read_text().split("## Evaluations from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    calls = []
    monkeypatch.setattr(niah, "run", lambda config: calls.append(config))
    monkeypatch.setattr(qa, "run", lambda config: calls.append(config))
    exec(compile(code, str(DOC), "exec"), {})
    assert [type(c) for c in calls] == [niah.NiahRun, qa.QaRun]
    assert calls[0].heldout and calls[0].split == "dev" and calls[0].subtasks == list(niah.SUBTASKS)
    assert calls[1].retrieval.refine.top == 0 and calls[1].systems == ("memsparse", "rag1-msa")
