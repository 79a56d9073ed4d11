"""research/refine_rules.py's rule_picks: the documents each refinement rule injects, derived from one first-pass
routing and one refined routing, are exactly those a live MSAEngine with that rule's settings injects."""

import sys
from pathlib import Path

import memsparse as ms
from memsparse.engine.routing import fused_top
from tests.conftest import tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1]))
from refine_rules import MARGINS, rule_label, rule_picks  # noqa: E402

DOCS = [f"Note {i}: the {c} {a} keeps {i * 7 % 10} {b}." for i, (a, b, c) in enumerate(
    zip(["cat", "fox", "owl", "elk", "bee", "ant"] * 2, ["keys", "maps", "jars", "bells"] * 3,
        ["red", "calm", "odd"] * 4))]
QUESTIONS = ["Which animal keeps maps?", "How many jars does the owl keep?", "What is red?", "Where is the elk?"]


def test_rule_picks_are_the_engines():
    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    bank = ms.MemoryBank.build(model, tok, DOCS)
    k, shortlist = 2, 6
    base = ms.MSAEngine(model, tok, bank, refine=shortlist, refine_chunk=2)
    live = {f"{'fused' if fuse else 'refined'}, {rule_label(margin)}": ms.MSAEngine(
        model, tok, bank, refine=shortlist, refine_chunk=2, refine_margin=min(margin, 1),
        refine_fuse=fuse) for margin in MARGINS for fuse in (False, True)}  # refine_margin 1: always
    fuse_matters = gate_matters = False
    for q in QUESTIONS:
        first = base.route(q)
        picks = rule_picks(first, base.refined(*base.encode_question(q), fused_top(first, shortlist)), k)
        for rule, engine in live.items():
            rounds = engine.ask(q, max_new_tokens=1, inject_k=k).rounds
            assert rounds[0] == sorted(picks[rule]), (q, rule)
        fuse_matters |= sorted(picks["fused, always"]) != sorted(picks["refined, always"])
        gate_matters |= sorted(picks["refined, gated 0.5"]) != sorted(picks["refined, gated 0.6"])
    assert fuse_matters and gate_matters  # the rules inject different documents here: the comparison is not vacuous
