"""research/gate_replay.py: a gated option replayed on answer lines takes the option line's score exactly for the
samples below the margin, and never an option line whose own run did not apply the option there."""

import json
import subprocess
import sys
from pathlib import Path

from memsparse.engine.routing import cut_drop, fused_top

SCRIPT = Path(__file__).parents[1] / "gate_replay.py"
CLEAR = {layer: [[d, 1 - d / 10] for d in range(5)] for layer in range(16)}  # every layer: 0, 1, 2, 3, then 4
SPREAD = {layer: [[(layer + j) % 8, 1 - j / 10] for j in range(4)] for layer in range(16)}  # votes over 8 docs
SPLIT = {layer: [[d, 1 - d / 10] for d in ([0, 1, 2, 3] if layer < 12 else [0, 1, 2, 4])] for layer in range(16)}


def drop(routing) -> float:
    r = {int(k): [tuple(x) for x in v] for k, v in routing.items()}
    return cut_drop(r, fused_top(r, 5), 4)


def line(sample: int, routing, score: float, subtask: str = "niah_multikey_2", **setting) -> dict:
    return {"tokens": 1024, "subtask": subtask, "seed": 1, "sample": sample, "fusion": "rrf",
            "inject_k": 4, "score": score, "routing": {str(k): v for k, v in routing.items()}, "gpu": "g",
            "date": "d", "commit": "c", **setting}


def replay(tmp_path, margins: str) -> dict:
    base, option, out = tmp_path / "base.jsonl", tmp_path / "option.jsonl", tmp_path / "out.json"
    base.write_text("".join(json.dumps(x) + "\n" for x in [
        line(0, CLEAR, 1.0), line(1, SPREAD, 0.0), line(2, SPLIT, 0.0), line(0, CLEAR, 1.0, "niah_single_1"),
        line(0, CLEAR, 0.0, fusion="max")]))  # another setting's line: not a base line
    refined = {"refine": 64, "refine_chunk": 4, "refine_margin": 0.4}
    option.write_text("".join(json.dumps(x) + "\n" for x in [
        line(0, CLEAR, 0.0, **refined), line(1, SPREAD, 1.0, **refined), line(2, SPLIT, 1.0, **refined),
        line(1, SPREAD, 0.0, refine=32, refine_chunk=4)]))  # not selected
    subprocess.run([sys.executable, str(SCRIPT), "--base", str(base), "--option", str(option), "--select",
                    "refine=64", "--margins", margins, "--out", str(out)], check=True, capture_output=True)
    return json.loads(out.read_text())


def test_gate_replay(tmp_path):
    assert drop(CLEAR) == 1.0 and drop(SPREAD) == 0.0 and 0.4 < drop(SPLIT) < 0.6
    res = replay(tmp_path, "0,0.3,0.6,2")
    never, gated, wider, always = res["margins"]
    assert never["accuracy"] == {"niah_multikey_2": 33.33, "niah_single_1": 100.0} and never["average"] == 66.66
    assert never["gated"]["niah_multikey_2"] == 0.0
    assert gated["accuracy"]["niah_multikey_2"] == 66.67 and gated["gated"]["niah_multikey_2"] == 0.333
    # the split sample is below 0.6 (and the clear ones below 2), but the option lines' run (margin 0.4) left them
    # alone: no option line for them; a subtask with all its gated samples measured is still replayed
    assert wider == {"margin": 0.6, "incomplete": 1, "missing": {"niah_multikey_2": 1},
                     "to_measure": {"1024:niah_multikey_2:1": [2]}, "accuracy": {"niah_single_1": 100.0},
                     "gated": {"niah_single_1": 0.0}}
    assert always == {"margin": 2.0, "incomplete": 3, "missing": {"niah_multikey_2": 2, "niah_single_1": 1},
                      "to_measure": {"1024:niah_multikey_2:1": [0, 2], "1024:niah_single_1:1": [0]}}
    assert res["samples"] == {"niah_multikey_2": 3, "niah_single_1": 1} and res["select"] == {"refine": 64}
