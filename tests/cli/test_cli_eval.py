"""`memsparse eval TASK`: one subcommand per task, each taking only its own flags, with its own defaults."""

import pytest

from memsparse.cli import build_parser, main
from memsparse.cli.eval import _multihop_run, _niah_run, _qa_run, _scale_run


@pytest.mark.parametrize("task, flag", [
    ("niah", ["--systems", "rag1"]), ("niah", ["--questions", "5"]), ("niah", ["--bank-cache", "d"]),
    ("qa", ["--tokens", "32768"]), ("qa", ["--jobs", "2"]), ("qa", ["--heldout"]), ("qa", ["--fp8-at", "9"]),
    ("scale", ["--inject-k", "2"]), ("scale", ["--priors", "4"]), ("scale", ["--answers", "a.jsonl"]),
    ("multihop", ["--split", "dev"]), ("multihop", ["--seed", "3"]), ("multihop", ["--key-dtypes", "bf16"]),
])
def test_a_flag_of_another_task_is_refused(task, flag, capsys):
    """A flag another task takes (or none does) is refused by argparse: exit code 2, one error line naming the task,
    under the task's usage."""
    with pytest.raises(SystemExit) as e:
        main(["eval", task, *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[0].startswith(f"usage: memsparse eval {task} ")
    assert [x for x in err if "error" in x] == [err[-1]] == [f"memsparse eval {task}: error: unrecognized arguments: "
                                                              f"{' '.join(flag)}"]


def test_each_task_has_its_own_defaults(capsys):
    """--samples, --split and --out default per task; a task of one count refuses a list; eval needs a task."""
    parse = build_parser().parse_args
    niah = _niah_run(parse(["eval", "niah"]))
    assert (niah.samples, niah.split, niah.out, niah.seed) == ([100], None, "memsparse-results/niah.json", 42)
    qa = _qa_run(parse(["eval", "qa"]))
    assert (qa.samples, qa.split, qa.out) == (None, "test", "memsparse-results/qa_test.json")
    assert _qa_run(parse(["eval", "qa", "--split", "dev", "--samples", "7"])).out == "memsparse-results/qa_dev.json"
    scale = _scale_run(parse(["eval", "scale"]))
    assert (scale.samples, scale.split, scale.out) == (100, "test", "memsparse-results/scale_quality.json")
    hop = _multihop_run(parse(["eval", "multihop", "--router-rounds", "1,3", "--out", "h.json"]))
    assert (hop.samples, hop.router_rounds, hop.out) == (100, (1, 3), "h.json")
    for argv in (["eval", "scale", "--samples", "3,2"], ["eval"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "memsparse eval scale: error: argument --samples: expected one count, got '3,2'" in err
    assert "memsparse eval: error: the following arguments are required: TASK" in err
