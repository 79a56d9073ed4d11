"""Training: samples in the official protocol, task generators, corpora and the trainer."""
