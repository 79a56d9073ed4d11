"""Document priors (`MSAEngine.calibrate_priors`) with the shipped MSA-SmolLM2, without and with:
- SQuAD-open (evaluation only; `memsparse eval qa`'s memsparse system): questions about the first `--paragraphs`
  dev paragraphs (0: all 2,067 and the first `--questions` of eval qa's 1,000) over a bank of those paragraphs:
  EM, F1, and the share of questions whose gold paragraph is among some router layer's top 16 (`gold_routed`) and
  among the 4 injected (`gold_injected`);
- RULER NIAH at `--niah-tokens` (as `memsparse eval niah`, router interleave) for `--subtasks`.

    python research/doc_priors.py [--paragraphs 300] [--questions 200] [--priors 256] [--niah-samples 6]

Writes research/results/doc_priors.json under "<device>-p<paragraphs>" (CPU or GPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memsparse.eval.faqs import QASet, load_qa
from memsparse.eval.meta import run_header, save_run
from memsparse.eval.niah import evaluate
from memsparse.eval.qa import evaluate_qa
from memsparse.model.load import load_model

RESULTS = Path(__file__).parent / "results"


def squad_points(model, tok, paragraphs: int, questions: int, priors: int) -> list[dict]:
    """`memsparse eval qa`'s memsparse system over the first `paragraphs` dev paragraphs (0: all), without and
    with priors."""
    sq = load_qa("dev")  # SQuAD dev until bigbench 1.0.0 was no longer served; the FAQ dev split since
    n = paragraphs or len(sq.paragraphs)
    data = QASet(sq.paragraphs[:n], sq.article[:n], [q for q in sq.questions if q[2] < n][:questions])
    points = []
    for p in (0, priors):
        (res,) = evaluate_qa(data, ["memsparse"], msa=(model, tok), priors=p)
        points.append({"task": "squad", "paragraphs": n, "questions": len(data.questions), "priors": p, **res})
        print(json.dumps(points[-1]), flush=True)
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paragraphs", type=int, default=300, help="SQuAD dev paragraphs in the bank (0: all)")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--priors", type=int, default=256, help="pseudo-queries for the priors")
    ap.add_argument("--niah-tokens", type=int, default=8192)
    ap.add_argument("--niah-samples", type=int, default=6, help="per subtask (0: no NIAH)")
    ap.add_argument("--subtasks", default="niah_single_2,niah_multikey_1,niah_multikey_2,niah_multivalue,"
                                          "niah_multiquery")
    ap.add_argument("--out", default=str(RESULTS / "doc_priors.json"))
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(None, str(device))
    points = squad_points(model, tok, args.paragraphs, args.questions, args.priors)
    if args.niah_samples:
        for p in (0, args.priors):
            for pt in evaluate(model, tok, [args.niah_tokens], args.subtasks.split(","), args.niah_samples, priors=p):
                points.append({"task": "niah", "priors": p, **pt})
    run = {**run_header(device), "model": "MSA-SmolLM2 (shipped)", "dtype": str(model.dtype), "points": points}
    save_run(Path(args.out), f"{device.type}-p{args.paragraphs}", run)


if __name__ == "__main__":
    main()
