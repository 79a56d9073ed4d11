"""research/refined_routing.py: the refined routing it recomputes from answer lines (the samples regenerated, no
bank) predicts exactly the documents a live refined run injects, and it refuses lines its samples do not match."""

import gzip
import json
import sys
from pathlib import Path

import pytest

from memsparse import cli
from memsparse.cli import main
from memsparse.engine.routing import fused_top
from memsparse.tasks import niah
from tests.conftest import tiny_model, tiny_tokenizer

RESEARCH = Path(__file__).parents[1]


def test_refined_routing_predicts_the_engine(tmp_path, monkeypatch):
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    tok = tiny_tokenizer()
    monkeypatch.setattr(cli, "_load_model", lambda *a: (model, tok))
    monkeypatch.setattr(niah, "_words", lambda: niah._Words(["calm", "red", "odd"], ["cat", "sky", "sea", "fox"]))
    plain, refined, dump = tmp_path / "plain.jsonl", tmp_path / "refined.jsonl", tmp_path / "dump.jsonl.gz"
    argv = ["eval", "niah", "--tokens", "3000", "--samples", "3", "--subtasks", "niah_multikey_2", "--inject-k", "2",
            "--out", str(tmp_path / "niah.json")]
    assert main(argv + ["--answers", str(plain), "--refine", "0"]) == 0
    assert main(argv + ["--answers", str(refined), "--refine", "3", "--refine-chunk", "2", "--refine-margin", "1",
                        "--no-refine-fuse"]) == 0  # refined always, the refined routing alone: what the script replays
    monkeypatch.syspath_prepend(str(RESEARCH))
    import refined_routing

    monkeypatch.setattr(refined_routing, "load_model", lambda spec=None, device=None, dtype=None: (model, tok))
    monkeypatch.setattr(sys, "argv", ["refined_routing.py", "--answers", str(plain), "--inject-k", "2", "--refine",
                                      "3", "--refine-chunk", "2", "--device", "cpu", "--out", str(dump)])
    refined_routing.main()
    with gzip.open(dump, "rt") as f:
        dumped = [json.loads(x) for x in f]
    live = [json.loads(x) for x in refined.read_text().splitlines()]
    assert [d["sample"] for d in dumped] == [x["sample"] for x in live] == [0, 1, 2]
    for d, x in zip(dumped, live):
        assert d["gold"] == x["gold"] and all(len(v) == len(d["shortlist"]) for v in d["refined"].values())
        top_k = {int(layer): [tuple(y) for y in picked[:2]] for layer, picked in d["refined"].items()}  # the engine's k
        assert sorted(fused_top(top_k, 2)) == x["rounds"][0]
    lines = plain.read_text().splitlines()
    assert any(json.loads(a)["rounds"] != b["rounds"] for a, b in zip(lines, live))  # refinement changed something
    other = json.loads(lines[1]) | {"question": "What is the special magic number for odd-fox?"}
    plain.write_text("\n".join([lines[0], json.dumps(other), lines[2]]) + "\n")
    with pytest.raises(ValueError, match="sample 1: regenerated sample differs"):
        refined_routing.main()
