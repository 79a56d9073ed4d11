"""`memsparse serve`'s settings: the one place of its defaults (the command line's flags take theirs from here).
Kept free of the web stack, so that the command line builds its parser without importing it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass
class Settings:
    """What `memsparse serve` was told (its flags)."""

    host: str = "127.0.0.1"
    api_key: str | None = None
    allow_hosts: list[str] = field(default_factory=list)  # Host names accepted besides the bound one and localhost
    model_name: str = "memsparse"
    max_queue: int = 16  # requests waiting for the engine (past them: 429)
    max_body_bytes: int = 16 << 20
    max_doc_bytes: int = 1 << 20
    max_new_tokens: int = 1024
    max_question_tokens: int = 4096
    max_router_rounds: int = 4
    max_inject_k: int = 32
    max_prompts: int = 32  # questions in one /v1/completions request
    timeout: float = 300.0  # seconds from arrival to answer (retrieval defaults: the engine's RetrievalConfig)
    max_batch: int = 8  # questions answered together in one engine batch
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for others to join it

    def check(self) -> None:
        """Refuse settings that would expose the bank (a non-loopback address needs a key) and bad values, in one
        line each."""
        if not self.api_key and not is_loopback(self.host):
            raise ValueError(f"binding {self.host} (not this machine only) needs an API key: pass --api-key or set "
                             "MEMSPARSE_API_KEY")
        if self.max_queue < 0 or self.max_body_bytes < 1 or self.max_new_tokens < 1 or self.timeout <= 0:
            raise ValueError("--max-queue must be >= 0; --max-body-mb, --max-new-tokens and --timeout > 0")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch {self.max_batch}: expected at least 1 (1: no batching)")
        if not 0 <= self.batch_window_ms <= 1000:
            raise ValueError(f"--batch-window-ms {self.batch_window_ms:g}: expected 0 to 1000 milliseconds")


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
