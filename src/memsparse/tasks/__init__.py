"""Tasks shared by training and evaluation: RULER NIAH, needles, reading, the training mix, and the corpora and
FAQs they draw from. `heldout.py` names what training never sees."""
