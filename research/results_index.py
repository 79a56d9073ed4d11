"""The results index and the tables generated from it.

Reads every result JSON under benchmarks/results/ and research/results/ (not the answer lines) and writes
benchmarks/results/index.json: one row per run (a file, or each entry of a file's "runs") with its task, model,
setting, card, date, commit and file (and the name it had before the renaming, if any), as the file's own header
records them ("unrecorded" where it does not).
From the result files it then writes README.md's results tables (between `<!-- results:NAME -->` and
`<!-- /results:NAME -->`) and docs/results.md.

    python research/results_index.py           # rewrite the index, README's tables and docs/results.md
    python research/results_index.py --check   # exit 1 if any of them is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_DIRS = ("benchmarks/results", "research/results")
INDEX = ROOT / "benchmarks/results/index.json"
README = ROOT / "README.md"
RESULTS_MD = ROOT / "docs/results.md"
UNRECORDED = "unrecorded"
META = {"gpu", "machine", "device", "date", "commit", "torch", "model", "config", "note", "notes", "former_name",
        "code"}
NIAH_KEYS = ("interleave", "fusion", "inject_k", "refine", "refine_chunk", "refine_margin", "refine_fuse", "widen",
             "widen_margin")
SUBTASKS = ("single_1", "single_2", "single_3", "multikey_1", "multikey_2", "multikey_3", "multivalue", "multiquery")
SIZES = {32768: "32K", 131072: "128K", 1048576: "1M"}


def _short(value) -> str:
    return SIZES.get(value, str(value)) if isinstance(value, int) else str(value)


def _joined(values) -> str:
    values = sorted({str(v) for v in values if v not in (None, "")})
    return ",".join(values) if values else UNRECORDED


def _setting(d: dict) -> str:
    """What was measured: the header's "setting", else the points' shared engine keys (NIAH-like results), else
    the header's "settings" / short scalar fields."""
    if isinstance(d.get("setting"), str):
        return d["setting"]
    points = d.get("points") if isinstance(d.get("points"), list) else []
    if points and all(isinstance(p, dict) and "subtask" in p for p in points):
        parts = ["tokens " + "/".join(_short(t) for t in sorted({p["tokens"] for p in points if "tokens" in p}))]
        for k in NIAH_KEYS:
            values = {json.dumps(p[k]) for p in points if k in p}
            if len(values) == 1:
                parts.append(f"{k}={values.pop().strip(chr(34))}")
        seeds = {p["seed"] for p in points if "seed" in p}
        if seeds:
            parts.append("seed " + (str(min(seeds)) if len(seeds) == 1 else f"{min(seeds)}-{max(seeds)}"))
        return " ".join(parts)
    source = d["settings"] if isinstance(d.get("settings"), dict) else d
    parts = [f"{k}={v}" for k, v in source.items() if k not in META and isinstance(v, (int, float, str))
             and len(str(v)) <= 40]
    return " ".join(parts[:6]) or UNRECORDED


def _header(d: dict, fallback: dict) -> dict:
    """Card, date and commit of a run: its own fields, else a replay's "replayed" / "computed", else its points'."""
    meta = d.get("replayed") or d.get("computed") or {}
    points = [p for p in d.get("points", []) if isinstance(p, dict)] if isinstance(d.get("points"), list) else []

    def field(*keys):
        for source in (d, meta, fallback):
            for k in keys:
                if source.get(k):
                    return str(source[k])
        return _joined(p.get(keys[0]) for p in points)

    return {"card": field("gpu", "machine"), "date": field("date"), "commit": field("commit")}


def _model(d: dict, fallback: dict) -> str:
    return str(d.get("model") or d.get("config") or fallback.get("model") or UNRECORDED)


def index_rows() -> list[dict]:
    rows = []
    for folder in RESULT_DIRS:
        for path in sorted((ROOT / folder).rglob("*.json")):
            if path == INDEX or "answers" in path.parts:
                continue
            d = json.loads(path.read_text())
            rel = path.relative_to(ROOT).as_posix()
            stem = path.relative_to(ROOT / folder).with_suffix("").as_posix()
            task = re.sub(r"-\d+$", "", path.stem)
            runs = d["runs"].items() if isinstance(d.get("runs"), dict) else [(None, d)]
            runs = [*runs, *((c["label"], {"model": d.get("model"), **c}) for c in d.get("compared", []))]
            for key, run in runs:
                rows.append({"run": stem if key is None else f"{stem}:{key}", "task": task,
                             "model": _model(run, d), "setting": _setting(run), **_header(run, d), "file": rel,
                             **({"former_name": d["former_name"]} if "former_name" in d else {})})
    return rows


def index_text() -> str:
    """The index: its own header (built on any CPU from the result files, it measures nothing; the cards and the
    newest date of the runs it lists) and one row per run."""
    rows = index_rows()
    cards = sorted({r["card"] for r in rows} - {UNRECORDED})
    dates = sorted({r["date"] for r in rows} - {UNRECORDED})
    header = {"generated_by": "research/results_index.py", "gpu": "none (CPU)",
              "machine": "CPU (an index of the result files: no measurement of its own; each run names its card)",
              "cards": cards, "newest_run_date": dates[-1] if dates else UNRECORDED}
    return json.dumps({**header, "runs": rows}, indent=1) + "\n"


# ---- tables ---------------------------------------------------------------------------------------------------


def _load(rel: str) -> dict:
    return json.loads((ROOT / rel).read_text())


def _num(x, digits: int | None = None) -> str:
    if digits is not None:
        x = round(x, digits)
        if digits == 0:
            return str(int(x))
    return f"{x:g}"


def _dec(x) -> str:
    """As recorded, with at least one decimal (13.0, 18.4, 21.64)."""
    return f"{x:.1f}" if round(x, 1) == x else f"{x:g}"


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def niah_table() -> str:
    """The default engine (niah.json) against the same samples without refinement (history/niah-32.json); the
    default's weakest subtask in bold."""
    runs = [("default", "benchmarks/results/niah.json"),
            ("without refinement", "benchmarks/results/history/niah-32.json")]
    data = {label: _load(f) for label, f in runs}
    rows = []
    for tokens in sorted({p["tokens"] for p in data["default"]["points"]}):
        for label, _ in runs:
            acc = {p["subtask"].removeprefix("niah_"): p["accuracy"] for p in data[label]["points"]
                   if p["tokens"] == tokens}
            avg = data[label]["averages"][str(tokens)]
            name = f"{SIZES[tokens]}, {label}"
            shown = {s: _num(a) for s, a in acc.items()}
            if label == "default":  # the weakest subtask in bold
                weakest = min(acc, key=acc.get)
                shown[weakest] = f"**{shown[weakest]}**"
            cells = [" / ".join(shown[s] for s in SUBTASKS[:3]), " / ".join(shown[s] for s in SUBTASKS[3:6]),
                     shown["multivalue"], shown["multiquery"], _num(avg)]
            if label == "default":
                name, cells[-1] = f"**{name}**", f"**{cells[-1]}**"
            rows.append([name] + cells)
    header = ["memory tokens", "single 1 / 2 / 3", "multikey 1 / 2 / 3", "multivalue", "multiquery", "average"]
    note = "From `benchmarks/results/niah.json` and `history/niah-32.json`, accuracy in %."
    return _table(header, ["---:", "---", "---", "---:", "---:", "---:"], rows) + "\n\n" + note


SQUAD_ROWS = (
    ("memsparse (v8, top 4 injected, the default engine)", ["memsparse"]),
    ("memsparse without refinement (`--refine 0`)", ["memsparse-refine-0"]),
    ("memsparse without refinement, top 2 (`--inject-k 2`)", ["memsparse-inject_k-2_refine-0"]),
    ("memsparse with document priors (`--priors 256`), top 4 / top 1",
     ["memsparse-priors-256", "memsparse-inject_k-1-priors-256"]),
    ("RAG: MiniLM top 1 / 5 / 10 (exact inner product, FAISS's IndexFlatIP ranking) -> plain SmolLM2-Instruct",
     ["rag1", "rag5", "rag10"]),
    ("plain SmolLM2-Instruct, 8K context of the memory", ["full"]),
    ("MiniLM top 1 / top 4 -> the v8 reader (`rag1-msa`, `rag4-msa`)", ["rag1-msa", "rag4-msa"]),
)


def squad_table() -> str:
    systems = {s["name"]: s for s in _load("benchmarks/results/squad_open.json")["systems"]}
    rows = []
    for label, names in SQUAD_ROWS:
        picked = [systems[n] for n in names]
        gold = [s.get("gold_injected") for s in picked]
        rows.append([label, " / ".join(_dec(s["em"]) for s in picked), " / ".join(_dec(s["f1"]) for s in picked),
                     " / ".join(f"{_dec(g)}%" for g in gold) if all(g is not None for g in gold) else ""])
    note = "From `benchmarks/results/squad_open.json` (systems by name)."
    return _table(["system", "EM", "F1", "gold paragraph injected"], ["---", "---:", "---:", "---:"], rows) \
        + "\n\n" + note


QA_SYSTEMS = {"memsparse": "memsparse (the router picks; the default engine)",
              "rag1-msa": "MiniLM top 1 -> the same reader (`rag1-msa`)",
              "rag1": "MiniLM top 1 -> plain SmolLM2-Instruct (`rag1`)"}


def qa_table() -> str:
    """The FAQ QA of the shipped model: test figures (and dev) with standard errors and sample counts."""
    rows = []
    for split in ("test", "dev"):
        d = _load(f"benchmarks/results/qa_{split}.json")
        for s in d["systems"]:
            rows.append([split, QA_SYSTEMS.get(s["name"], s["name"]), str(s["n"]),
                         f"{_dec(s['f1'])} ± {_dec(s['f1_se'])}", f"{_dec(s['em'])} ± {_dec(s['em_se'])}",
                         f"{_dec(s.get('gold_top1'))}%",
                         f"{_dec(s.get('gold_top4'))}%"])
    d = _load("benchmarks/results/qa_test.json")
    note = (f"From `benchmarks/results/qa_test.json` and `qa_dev.json` ({d['model']}; {d['gpu']}, {d['date']}, "
            f"commit {d['commit']}). top-1 / top-4: the gold passage ranked first / in the top 4 by the router "
            "(memsparse) or by MiniLM (rag).")
    return _table(["split", "system", "n", "F1 ± se", "EM ± se", "top-1", "top-4"],
                  ["---", "---", "---:", "---:", "---:", "---:", "---:"], rows) + "\n\n" + note


def encode_query_table() -> str:
    encode = _load("benchmarks/results/encode.json")["runs"]["cuda"]
    query = _load("benchmarks/results/query.json")["runs"]["cuda"]
    rows = []
    for e in encode["points"]:
        q = sorted((p for p in query["points"] if p["tokens"] == e["tokens"]), key=lambda p: p["batch"])

        def per_batch(key, digits, q=q):
            return " / ".join(_num(p[key], digits) for p in q)

        rows.append([f"{e['tokens'] // 2**20}M", f"{round(e['encode_tokens_per_s'] / 1000)}K",
                     _num(e["bank_bytes_per_token"], 0), _num(e["save_s"], 2), _num(e["load_s"], 2),
                     " / ".join(str(p["batch"]) for p in q), per_batch("route_ms", 1), per_batch("prefill_ms", 0),
                     per_batch("decode_ms_per_token", 1)])
    header = ["bank tokens", "encode tok/s", "bank bytes / token", "save s", "open s", "batch", "route ms",
              "prefill ms (TTFT)", "decode ms / token"]
    note = (f"From `benchmarks/results/encode.json` and `query.json` (run \"cuda\": {encode['machine']}, "
            f"{encode['date']}, commit {encode['commit']}).")
    return _table(header, ["---:"] * len(header), rows) + "\n\n" + note


TABLES = {"niah": niah_table, "qa": qa_table, "squad": squad_table, "encode-query": encode_query_table}


def with_tables(text: str) -> str:
    """`text` with every `<!-- results:NAME -->` ... `<!-- /results:NAME -->` block regenerated."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def results_md(rows: list[dict]) -> str:
    blocks = "\n\n".join(f"## {title}\n\n<!-- results:{name} -->\n<!-- /results:{name} -->" for name, title in
                         (("niah", "RULER NIAH, the shipped model"), ("qa", "QA over Debian FAQs"),
                          ("squad", "SQuAD-open"),
                          ("encode-query", "Encoding and questions over a bank")))
    current = [r for r in rows if "/history/" not in r["file"]]
    history = [r for r in rows if "/history/" in r["file"]]

    def listing(rs, former=False):
        return _table(["run", "task", "model", "setting", "card", "date", "commit"] + ["former name"] * former,
                      ["---"] * (7 + former),
                      [[f"[{r['run']}](../{r['file']})", r["task"], r["model"], r["setting"].replace("|", "/"),
                        r["card"], r["date"], r["commit"]] + [f"`{r.get('former_name', '')}`"] * former for r in rs])

    text = ("# Results\n\nGenerated by `python research/results_index.py` from the result files and their index, "
            "`benchmarks/results/index.json`; do not edit by hand. Current figures have stable short names "
            "(`benchmarks/results/niah.json`, `speed.json`, ...); superseded runs are under `history/` "
            "(`niah-01.json`, ... in date order; each records its `former_name`); analyses' results are under "
            "`research/results/`. Training logs: `benchmarks/results/train/`.\n\n"
            f"{blocks}\n\n## Current runs\n\n{listing(current)}\n\n## History\n\n{listing(history, former=True)}\n")
    return with_tables(text)


def outputs() -> dict[Path, str]:
    rows = index_rows()
    return {INDEX: index_text(), README: with_tables(README.read_text()), RESULTS_MD: results_md(rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the index or a generated table is stale")
    args = ap.parse_args(argv)
    stale = [p for p, text in outputs().items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"stale: {p.relative_to(ROOT)} (run python research/results_index.py)")
        return 1 if stale else 0
    for p, text in outputs().items():
        if p in stale:
            p.write_text(text)
            print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
