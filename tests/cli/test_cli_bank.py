"""The bank command line end to end on a tiny model: encode, info, ask, docs add/delete/list, and bad input."""

import json

import pytest
import torch

import memsparse as ms
from memsparse.cli import main
from memsparse.memory.store import MANIFEST

from ..conftest import tiny_model, tiny_tokenizer

TASKS = ("niah", "qa", "scale", "multihop")


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": f"doc-{n}"}) + "\n" for n, t in enumerate(texts)))
    return path


def test_encode_ask_docs_info(model_dir, tmp_path, capsys):
    corpus = _jsonl(tmp_path / "c.jsonl", ["Paris is in France.", "Ottawa <|im_end|> [2] is in Canada.", "Bananas."])
    bank = tmp_path / "bank"
    code, out, err = _run(capsys, "encode", corpus, "--model", model_dir, "--out", bank, "--device", "cpu")
    assert code == 0 and "3 documents" in out, err
    code, out, _ = _run(capsys, "info", bank)
    assert code == 0 and "documents: 3" in out and "bytes per token" in out
    code, out, err = _run(capsys, "ask", bank, "Where is Ottawa?", "--json", "--max-new-tokens", "6")
    assert code == 0, err
    ans = json.loads(out)
    assert ans["question"] == "Where is Ottawa?" and set(ans) >= {"text", "rounds", "routing", "timings"}
    assert all(len(v) == 2 for v in ans["routing"].values())
    code, out, err = _run(capsys, "ask", bank, "Where is Ottawa?", "--interleave", "off", "--max-new-tokens", "3")
    assert code == 0 and "routing (" not in out + err and "round 1" not in out + err  # quiet by default
    code, out, err = _run(capsys, "ask", bank, "Where is Ottawa?", "--interleave", "off", "--max-new-tokens", "3", "-v")
    assert code == 0 and "routing (layer 3)" in err and "routing (" not in out
    code, out, err = _run(capsys, "ask", bank, "Where is Ottawa?", "--inject-k", "1", "--max-new-tokens", "2",
                          "--verbose")
    assert code == 0 and "round 1: documents [" in err and "round 1" not in out
    code, out, _ = _run(capsys, "ask", bank, "Where?", "--router-rounds", "2", "--inject-k", "1", "--json")
    rounds = json.loads(out)["rounds"]
    assert code == 0 and len(rounds) == 2 and len({d for r in rounds for d in r}) == 2  # a new document each round
    more = tmp_path / "more.txt"
    more.write_text("Rome is old.\n\nLisbon is by the sea.\n")
    code, out, _ = _run(capsys, "docs", "add", bank, more)
    assert code == 0 and "added documents 3..4" in out
    code, out, _ = _run(capsys, "docs", "delete", bank, "1")
    assert code == 0
    code, out, _ = _run(capsys, "docs", "list", bank)
    rows = out.strip().splitlines()
    assert [r.split("\t")[0] for r in rows] == ["[0]", "[2]", "[3]", "[4]"]
    assert rows[0].split("\t")[1] == "doc-0" and rows[2].split("\t")[1] == "more.txt:1"
    code, out, _ = _run(capsys, "ask", bank, "Where is Rome?", "--max-new-tokens", "4", "--json")
    assert code == 0 and all(1 not in [d for d, _ in v] for v in json.loads(out)["routing"].values())
    small = tmp_path / "small"
    code, out, err = _run(capsys, "encode", corpus, "--model", model_dir, "--out", small, "--device", "cpu",
                          "--key-dtype", "fp8", "--content-dtype", "int8", "--priors", "8")
    assert code == 0, err
    code, out, _ = _run(capsys, "info", small)
    assert code == 0 and "fp8" in out and "int8" in out and "document priors: yes" in out
    plain = tmp_path / "plain"
    code, out, err = _run(capsys, "encode", corpus, "--model", model_dir, "--out", plain, "--device", "cpu",
                          "--key-dtype", "fp8", "--calibrate-keys", "0")
    assert code == 0, err
    model, tok = ms.MSAForCausalLM.from_pretrained(model_dir), ms.load_tokenizer(model_dir)
    keys = [ms.MemoryBank.load(p, model, tok).segments[0].route_keys for p in (small, plain)]
    assert all(a.data.dtype == torch.float8_e4m3fn for a in keys[0].values())
    priors = [ms.MemoryBank.load(p, model, tok).doc_priors for p in (small, plain)]
    assert priors[1] is None and set(priors[0]["scores"]) == set(model.router_layers)
    assert any(not torch.equal(a.data.float(), b.data.float()) for a, b in zip(keys[0].values(), keys[1].values()))
    code, out, err = _run(capsys, "ask", small, "Where is Ottawa?", "--max-new-tokens", "3")
    assert code == 0, err


def _one_error_line(err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and "error:" in lines[0]


@pytest.mark.parametrize("case", ["missing", "empty", "non-utf8", "empty-doc", "huge-doc", "dir-without-docs"])
def test_encode_bad_corpus(model_dir, tmp_path, capsys, case):
    corpus = tmp_path / "corpus.txt"
    if case == "empty":
        corpus.write_text("\n\n")
    elif case == "non-utf8":
        corpus.write_bytes(b"fine line\nbad \xff byte\n")
    elif case == "empty-doc":
        corpus = _jsonl(tmp_path / "c.jsonl", ["ok", "  "])
    elif case == "huge-doc":
        corpus.write_text("word " * (2 << 20) + "\n")
    elif case == "dir-without-docs":
        corpus = tmp_path / "d"
        corpus.mkdir()
    bank = tmp_path / "bank"
    code, _, err = _run(capsys, "encode", corpus, "--model", model_dir, "--out", bank)
    assert code == 2 and _one_error_line(err), err
    assert not bank.exists()


def test_bad_commands_leave_the_bank_intact(model_dir, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert _run(capsys, "encode", _jsonl(tmp_path / "c.jsonl", ["a b c", "d e f"]), "--model", model_dir,
                "--out", bank)[0] == 0
    manifest = (bank / MANIFEST).read_bytes()
    files = sorted(p.name for p in bank.iterdir())
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xfe\xff")
    for argv in [("docs", "delete", bank, "7"), ("docs", "delete", bank, "x"), ("docs", "add", bank, bad),
                 ("docs", "add", bank), ("encode", tmp_path / "c.jsonl", "--model", model_dir, "--out", bank),
                 ("ask", tmp_path, "q"), ("ask", bank, " "), ("info", tmp_path / "nope")]:
        code, _, err = _run(capsys, *argv)
        assert code == 2 and _one_error_line(err), (argv, err)
    assert (bank / MANIFEST).read_bytes() == manifest and sorted(p.name for p in bank.iterdir()) == files


def test_model_without_routers_is_refused(tmp_path, capsys):
    plain = tmp_path / "plain"
    model = tiny_model("llama", vocab_size=300)
    model.save_pretrained(plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg.pop("msa_config")
    cfg["model_type"] = "llama"
    (plain / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    shard = next(plain.glob("*.safetensors"))
    save_file({k: v for k, v in load_file(shard).items() if "router" not in k}, shard)
    tiny_tokenizer().save_pretrained(plain)
    corpus = _jsonl(tmp_path / "c.jsonl", ["a"])
    code, _, err = _run(capsys, "encode", corpus, "--model", plain, "--out", tmp_path / "b")
    assert code == 2 and "no MSA router weights" in err


def test_bank_opens_in_the_dtype_it_was_encoded_in(model_dir, tmp_path, capsys, monkeypatch):
    """A bank encoded in float32 opens with the model in float32 when the default dtype of the machine is another
    (merged adapters round differently per dtype, which would change the model's fingerprint); --dtype wins."""
    from memsparse import cli
    from memsparse.model import checkpoint

    corpus = _jsonl(tmp_path / "c.jsonl", ["Paris is in France.", "Bananas."])
    bank = tmp_path / "bank"
    assert _run(capsys, "encode", corpus, "--model", model_dir, "--out", bank, "--device", "cpu",
                "--dtype", "float32")[0] == 0
    assert json.loads((bank / MANIFEST).read_text())["model_dtype"] == "float32"
    monkeypatch.setattr(checkpoint, "default_dtype", lambda device: "bfloat16")
    seen, load = [], cli._load_model
    monkeypatch.setattr(cli, "_load_model", lambda path, device, dtype: seen.append(dtype) or load(path, device, dtype))
    assert _run(capsys, "ask", bank, "Where is Paris?", "--max-new-tokens", "2")[0] == 0
    assert _run(capsys, "ask", bank, "Where is Paris?", "--max-new-tokens", "2", "--dtype", "bfloat16")[0] == 0
    assert seen == ["float32", "bfloat16"]


@pytest.mark.slow
def test_eval_niah_jobs(model_dir, tmp_path, capsys):
    """`eval niah --jobs 2`: the (size, subtask) pairs answered by two worker processes give the points and answer
    lines of one process; a worker that fails names itself and keeps the answers for --from-answers."""
    argv = ["eval", "niah", "--model", model_dir, "--device", "cpu", "--tokens", "400,500", "--samples", "2",
            "--subtasks", "niah_multikey_3", "--seed", "3", "--compare", "inject_k=1"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    code, _, err = _run(capsys, *argv, "--out", one, "--answers", tmp_path / "one.jsonl")
    assert code == 0, err
    code, out, err = _run(capsys, *argv, "--jobs", "2", "--out", two, "--answers", tmp_path / "two.jsonl")
    assert code == 0, err
    assert "2 (size, subtask) units over 2 workers (CPU)" in out
    runs = [json.loads(f.read_text()) for f in (one, two)]
    assert [[c["label"] for c in r["compared"]] for r in runs] == [["inject_k-1"], ["inject_k-1"]]
    for pa, pb in ((runs[0]["points"], runs[1]["points"]), (runs[0]["compared"][0]["points"],
                                                            runs[1]["compared"][0]["points"])):
        assert [(p["tokens"], p["samples"]) for p in pb] == [(400, 2), (500, 2)]
        keys = ("tokens", "subtask", "accuracy", "routing_recall", "named_recall", "samples", "inject_k", "refine")
        assert [{k: p.get(k) for k in keys} for p in pa] == [{k: p.get(k) for k in keys} for p in pb]
    lines = [[{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in f.read_text().splitlines()]
             for f in (tmp_path / "one.jsonl", tmp_path / "two.jsonl")]
    key = lambda x: (x["tokens"], x["sample"], x["inject_k"])  # noqa: E731
    assert len(lines[0]) == 8 and sorted(lines[0], key=key) == sorted(lines[1], key=key)
    assert not list(tmp_path.glob("two-jobs-*"))  # the work folder goes once merged
    code, _, err = _run(capsys, *argv[:3], tmp_path / "no-model", *argv[4:], "--jobs", "2", "--out", two)
    assert code == 2 and "2 of 2 workers failed" in err and "no such model" in err
    assert "--from-answers" in err and list(tmp_path.glob("two-jobs-*"))


def test_jobs_worker_settings_file_reproduces_the_options(tmp_path):
    """A --jobs worker gets the parent's settings as a JSON file (NiahRun), not a rebuilt command line: the file reads
    back to the same run (as the worker's `eval niah --worker FILE` does), its RetrievalConfig the flags' (switches
    off by their --no- forms too)."""
    import dataclasses

    from memsparse.cli import _config, build_parser
    from memsparse.cli.eval import _niah_run
    from memsparse.engine import RetrievalConfig
    from memsparse.eval.niah import NiahRun

    argv = ["eval", "niah", "--tokens", "400,500", "--samples", "3,2", "--no-refine-fuse", "--refine-margin", "0.3",
            "--compare", "refine=0;inject_k=8", "--seed", "5", "--sample-ids", "1,0", "--heldout", "--jobs", "4",
            "--out", "x.json"]
    args = build_parser().parse_args(argv)
    run = dataclasses.replace(_niah_run(args), units=[(500, "niah_single_1"), (400, "niah_single_1")])
    run.save(tmp_path / "worker0.json")
    back = NiahRun.load(tmp_path / "worker0.json")
    assert back == run and back.units == [(500, "niah_single_1"), (400, "niah_single_1")]
    assert _niah_run(build_parser().parse_args(["eval", "niah", "--worker", str(tmp_path / "worker0.json")])) == run
    assert RetrievalConfig().replace(**back.config) == _config(args) and back.config["refine_fuse"] is False
    assert (back.tokens, back.samples, back.seed, back.sample_ids, back.heldout, back.out) == \
        ([400, 500], [3, 2], 5, [0, 1], True, "x.json")
    assert back.compare == [{"refine": 0}, {"inject_k": 8}]
    (tmp_path / "bad.json").write_text('{"tokens": [1], "units": "x", "shell": "rm"}')
    with pytest.raises(ValueError, match="not an eval niah worker file"):
        NiahRun.load(tmp_path / "bad.json")


def test_version_and_examples(capsys):
    """--version prints the package's version; the full examples are the top-level help's, each command's its own."""
    from memsparse.cli import EXAMPLES, version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"memsparse {version()}"
    assert version()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert EXAMPLES in capsys.readouterr().out
    for command in ("encode", "ask", "docs", "info", "fsck", "eval", "convert", *(f"eval {t}" for t in TASKS)):
        with pytest.raises(SystemExit):
            main([*command.split(), "--help"])
        out = capsys.readouterr().out
        assert "examples:" not in out or "examples:\n" + out.split("examples:\n", 1)[1] != EXAMPLES, command
        examples = [x for x in out.split("examples:\n", 1)[-1].splitlines() if x.startswith("  memsparse ")] \
            if "examples:" in out else []
        assert all(x.split()[1:1 + len(command.split())] == command.split() for x in examples), (command, examples)
        if command.startswith("eval"):  # eval: every task's; each task: its own, at least one
            assert examples and sorted(examples) == sorted(x for x in EXAMPLES.splitlines()
                                                           if x.startswith(f"  memsparse {command} ")), command
    assert "memsparse docs compact" in EXAMPLES


def test_timing_line_parts_within_their_whole():
    """Routing is printed as part of the prefill, re-ranking (refined routing, outside the prefill) apart."""
    from memsparse.cli.bank import timing_line

    line = timing_line({"prefill": 0.44, "route": 0.10, "refine": 2.2, "decode": 1.0})
    assert line == "0.44 s prefill incl. 0.10 s routing, 2.20 s re-ranking, 1.00 s decode"
    assert "re-ranking" not in timing_line({"prefill": 0.4, "route": 0.1, "refine": 0.0, "decode": 1.0})


def test_refined_routing_time_is_not_counted_as_prefill_routing(model_dir, tmp_path):
    """The engine's "route" seconds are measured inside "prefill" (so never exceed it); the refinement's re-encoding,
    outside the prefill, is "refine"."""
    model, tok = ms.MSAForCausalLM.from_pretrained(model_dir), ms.load_tokenizer(model_dir)
    texts = [f"Document {i} says the code word is w{i}." for i in range(6)]
    bank = ms.MemoryBank.build(model, tok, texts)
    engine = ms.MSAEngine(model, tok, bank, refine=4, refine_chunk=2, refine_margin=1.0)
    t = engine.ask("What is the code word?", max_new_tokens=2, inject_k=1).timings
    assert t["refine"] > 0 and 0 <= t["route"] <= t["prefill"]


def test_docs_list_info_without_model_compact_and_token_counts(model_dir, tmp_path, capsys, monkeypatch):
    """`docs list` and `info` read the bank's table without loading a model; after a delete `info` counts the live
    documents' tokens (as the server's /info does), before and after `docs compact`, which drops the data."""
    from memsparse import cli

    texts = ["Hi.", "Ottawa is in Canada, and Toronto is too.", "Bananas are yellow fruit from warm lands.",
             "Rome is an old city in Italy by the river."]  # deleting the short one leaves compaction to `compact`
    corpus = _jsonl(tmp_path / "c.jsonl", texts)
    bank = tmp_path / "bank"
    assert _run(capsys, "encode", corpus, "--model", model_dir, "--out", bank, "--device", "cpu")[0] == 0
    assert _run(capsys, "docs", "delete", bank, "0")[0] == 0

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    model, tok = ms.MSAForCausalLM.from_pretrained(model_dir), ms.load_tokenizer(model_dir)
    live = ms.MemoryBank.load(bank, model, tok)
    want = sum(live.token_count(d) for d in live.doc_ids())  # what the server's /info reports
    assert live.num_tokens == want and json.loads((bank / MANIFEST).read_text())["tokens"] == want
    with monkeypatch.context() as m:
        m.setattr(cli, "_load_model", no_model)
        code, out, err = _run(capsys, "docs", "list", bank)
        assert code == 0, err
        assert [r.split("\t")[0] for r in out.strip().splitlines()] == ["[1]", "[2]", "[3]"]
        assert out.strip().splitlines()[0].split("\t")[1:3] == ["doc-1", f"{live.token_count(1)} tokens"]
        code, out, err = _run(capsys, "info", bank)
        assert code == 0 and f"tokens: {want}\n" in out and "documents: 3\n" in out, err
        assert "deleted (not yet compacted): 1" in out
    chunks = live.num_chunks
    code, out, err = _run(capsys, "docs", "compact", bank)
    assert code == 0 and f"{live.segments[0].chunk_count[0]} chunks of deleted documents dropped" in out, err
    after = ms.MemoryBank.load(bank, model, tok)
    assert after.doc_ids() == [1, 2, 3] and after.num_chunks < chunks and after.num_tokens == want
    code, out, _ = _run(capsys, "info", bank)
    assert f"tokens: {want}\n" in out and "deleted (not yet compacted): 0" in out
    assert _run(capsys, "docs", "compact", bank, "3")[0] == 2


def test_status_lines_at_a_terminal_only(model_dir, tmp_path, capsys, monkeypatch):
    from memsparse import cli

    corpus = _jsonl(tmp_path / "c.jsonl", ["Paris is in France.", "Bananas."])
    monkeypatch.setattr(cli, "_tty", lambda: True)
    code, _, err = _run(capsys, "encode", corpus, "--model", model_dir, "--out", tmp_path / "b", "--priors", "4")
    assert code == 0 and "loading the model" in err and "document priors from 4 sentences" in err
    monkeypatch.setattr(cli, "_tty", lambda: False)
    code, _, err = _run(capsys, "encode", corpus, "--model", model_dir, "--out", tmp_path / "c", "--priors", "4")
    assert code == 0 and "loading the model" not in err and "document priors" not in err


def test_results_default_to_a_folder_of_the_working_directory(tmp_path, capsys, monkeypatch):
    """eval / bench without --out write under ./memsparse-results/, not into the package's benchmarks/results."""
    from memsparse.cli import RESULTS, build_parser, results_path
    from memsparse.cli.eval import _niah_run

    monkeypatch.chdir(tmp_path)
    assert results_path(None, "niah.json") == RESULTS / "niah.json"
    assert RESULTS.as_posix() == "memsparse-results" and not RESULTS.is_absolute()
    assert results_path("benchmarks/results/niah.json", "niah.json").as_posix() == "benchmarks/results/niah.json"
    assert _niah_run(build_parser().parse_args(["eval", "niah", "--samples", "2"])).out == "memsparse-results/niah.json"
    point = {"tokens": 400, "subtask": "niah_single_1", "accuracy": 50.0, "stderr": 35.4, "samples": 2,
             "routing_recall": 1.0, "named_recall": 1.0, "inject_k": 4}
    run = {"model": "m", "gpu": "cpu", "date": "2026-12-06", "commit": "abc", "points": [point]}
    (tmp_path / "a.json").write_text(json.dumps(run))
    code, out, err = _run(capsys, "eval", "niah", "--pool", tmp_path / "a.json")
    assert code == 0, err
    assert "wrote memsparse-results/niah.json" in out and (tmp_path / "memsparse-results" / "niah.json").exists()
