"""`memsparse serve`'s flags take their defaults from the server's Settings (one source)."""

from memsparse.cli import build_parser
from memsparse.serve.settings import Settings


def test_serve_flags_default_to_the_settings():
    args = build_parser().parse_args(["serve", "some.bank"])
    d = Settings()
    assert (args.host, args.model_name, args.max_queue, args.max_new_tokens, args.max_question_tokens,
            args.max_router_rounds, args.timeout, args.max_batch, args.batch_window_ms) == (
        d.host, d.model_name, d.max_queue, d.max_new_tokens, d.max_question_tokens, d.max_router_rounds, d.timeout,
        d.max_batch, d.batch_window_ms)
    assert int(args.max_body_mb * (1 << 20)) == d.max_body_bytes and int(args.max_doc_mb * (1 << 20)) == d.max_doc_bytes
