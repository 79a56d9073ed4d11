"""Analyses, replays and probes behind the project's design decisions (see README.md); scripts, not a library."""
