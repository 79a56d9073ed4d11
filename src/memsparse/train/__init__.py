"""Training: samples in the official protocol and the trainer (tasks and corpora: `memsparse.tasks`)."""
