"""The bank command line end to end on a tiny model: encode, info, ask, docs add/delete/list, and bad input."""

import json

import pytest
import torch

import memsparse as ms
from memsparse.cli import main
from memsparse.memory.store import MANIFEST

from .conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


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
    code, out, _ = _run(capsys, "ask", bank, "Where is Ottawa?", "--interleave", "off", "--max-new-tokens", "3")
    assert code == 0 and "routing (layer 3)" in out
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
    for a, b in ((one, two), (tmp_path / "one.inject_k-1.json", tmp_path / "two.inject_k-1.json")):
        pa, pb = (json.loads(f.read_text())["points"] for f in (a, b))
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
    code, _, err = _run(capsys, "eval", "multihop", "--jobs", "2")
    assert code == 2 and "--jobs 2" in err


def test_jobs_worker_command_line_reproduces_the_options():
    """A --jobs worker's command line parses back to the parent's options (switches and their --no- forms too)."""
    from memsparse.cli import _child_argv, build_parser

    argv = ["eval", "niah", "--tokens", "400,500", "--samples", "3,2", "--no-refine-fuse", "--refine-margin", "0.3",
            "--compare", "fusion=max;inject_k=8", "--seed", "5", "--jobs", "4", "--out", "x.json"]
    args = build_parser().parse_args(argv)
    back = build_parser().parse_args(_child_argv(args, drop={"jobs", "out"}))
    assert {k: v for k, v in vars(back).items() if k not in ("jobs", "out", "func")} == \
        {k: v for k, v in vars(args).items() if k not in ("jobs", "out", "func")}
    assert back.jobs == 1 and back.out is None and back.refine_fuse is False
