"""RetrievalConfig: the one source of the retrieval defaults; CLI flags, server request fields and result labels
derived from it; the removed options refused in one line."""

import pytest
from pydantic import ValidationError

from memsparse.cli import _config, build_parser
from memsparse.engine import RefineConfig, RetrievalConfig, config
from memsparse.eval.niah import SETTING_KEYS, parse_settings, setting_label, setting_of

REMOVED_FLAGS = (["--widen", "3"], ["--widen-margin", "0.5"], ["--fusion", "max"], ["--refine-depth", "4"])


def _parse(*argv):
    return build_parser().parse_args(list(argv))


def test_shipped_defaults():
    """The defaults are the shipped engine's (what ROUTER_DEFAULTS and the command line said)."""
    c = RetrievalConfig()
    assert (c.similarity, c.interleave, c.inject_k, c.router_rounds, c.max_rounds) == ("train", "router", 4, 1, 4)
    assert c.refine == RefineConfig(top=64, chunk=4, margin=0.5, fuse=True)
    assert c.flat() == {"similarity": "train", "interleave": "router", "refine": 64, "refine_chunk": 4,
                        "refine_margin": 0.5, "refine_fuse": True, "inject_k": 4, "router_rounds": 1, "max_rounds": 4}


def test_cli_defaults_are_the_config():
    """ask, serve and eval take their retrieval flags' defaults from RetrievalConfig (eval multihop's --router-rounds
    is its list of counts)."""
    flat = config.defaults()
    for argv, skip in ((["ask", "b", "q"], ()), (["serve", "b"], ()), (["eval", "niah"], ()), (["eval", "qa"], ()),
                       (["eval", "multihop"], ("router_rounds",))):
        args = _parse(*argv)
        assert {k: getattr(args, k) for k in flat if k not in skip} == {k: v for k, v in flat.items() if k not in skip}
        assert _config(args) == RetrievalConfig()


def test_cli_flags_round_trip():
    args = _parse("ask", "b", "q", "--similarity", "official", "--interleave", "model", "--inject-k", "2",
                  "--refine", "0", "--refine-chunk", "2", "--refine-margin", "0.3", "--no-refine-fuse",
                  "--router-rounds", "2", "--max-rounds", "3")
    want = RetrievalConfig(similarity="official", interleave="model", inject_k=2, router_rounds=2, max_rounds=3,
                           refine=RefineConfig(top=0, chunk=2, margin=0.3, fuse=False))
    assert _config(args) == want and RetrievalConfig().replace(**want.flat()) == want
    help_text = build_parser()._subparsers._group_actions[0].choices["ask"].format_help()
    assert "--refine-margin" in help_text and "(default: 0.5)" in help_text and "--widen" not in help_text


@pytest.mark.parametrize("flag", REMOVED_FLAGS)
def test_removed_flags_refused(flag, capsys):
    with pytest.raises(SystemExit) as e:
        _parse("eval", "niah", *flag)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"{flag[0]} was removed: " in err


def test_removed_and_bad_settings_refused():
    for key in config.REMOVED:
        with pytest.raises(ValueError, match=f"^{key} was removed: "):
            RetrievalConfig().replace(**{key: 1})
        with pytest.raises(ValueError, match=f"{key} was removed"):
            parse_settings(f"{key}=1")
    with pytest.raises(ValueError, match="unknown retrieval settings"):
        RetrievalConfig().replace(k=2)
    for bad, match in (({"interleave": "maybe"}, "interleave="), ({"inject_k": 0}, "inject_k=0"),
                       ({"similarity": "l2"}, "similarity="), ({"refine_margin": 0}, "refine_margin=")):
        with pytest.raises(ValueError, match=match):
            RetrievalConfig().replace(**bad)


def test_server_request_fields_round_trip():
    """The request fields a client may set are RetrievalConfig's request settings, absent = the engine's; a
    removed option is refused, saying why."""
    from memsparse.serve.server import REQUEST_KEYS, CompletionRequest

    assert REQUEST_KEYS == ("interleave", "inject_k", "router_rounds")
    req = CompletionRequest.model_validate({"model": "m", "prompt": "q", "interleave": "off", "inject_k": 2})
    asked = {k: getattr(req, k) for k in REQUEST_KEYS if getattr(req, k) is not None}
    assert RetrievalConfig().replace(**asked) == RetrievalConfig(interleave="off", inject_k=2)
    for bad in ({"interleave": "maybe"}, {"inject_k": 0}, {"router_rounds": 0}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": "q", **bad})
    with pytest.raises(ValidationError, match="widen was removed"):
        CompletionRequest.model_validate({"model": "m", "prompt": "q", "widen": 8})


def test_result_labels():
    """Results record (and label files by) the settings; reading back, a key a result lacks takes the value results
    without it ran with; old results' removed options stay a setting of their own."""
    base = RetrievalConfig()
    assert SETTING_KEYS == ("refine", "refine_chunk", "refine_margin", "refine_fuse", "inject_k")
    assert base.settings() == {"refine": 64, "refine_chunk": 4, "refine_margin": 0.5, "refine_fuse": True,
                               "inject_k": 4}
    for c in (base, base.replace(refine=0), base.replace(refine_margin=1.0, inject_k=1), base.replace(refine_fuse=0)):
        assert RetrievalConfig.from_settings(c.settings()).settings() == c.settings() == setting_of(c.settings())
    assert setting_label(base.replace(refine=0).settings(), base.settings()) == "refine-0"
    assert setting_label(base.replace(inject_k=8).settings(), base.settings()) == "inject_k-8"
    old = {"fusion": "rrf", "refine": 64, "refine_chunk": 4, "refine_margin": 0.5, "refine_fuse": True, "inject_k": 4}
    assert setting_of(old) == base.settings()  # a result of the shipped engine written when fusion was recorded
    assert setting_of({"fusion": "rrf"}) == {"inject_k": 4}  # written before refinement and inject_k
    assert setting_of({**old, "fusion": "max"}) == {**base.settings(), "fusion": "max"}
    assert setting_of({"fusion": "rrf", "widen": 8, "widen_margin": 0.6667, "inject_k": 4}) == \
        {"inject_k": 4, "widen": 8, "widen_margin": 0.6667}
