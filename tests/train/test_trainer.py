"""`memsparse train` end to end on a tiny base: phases, curriculum, logging, resumable checkpoints, the delta."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from memsparse.cli import main
from memsparse.model.delta import delta_sha256, load_delta
from memsparse.tasks import mix
from memsparse.tasks.mix import Mixer, Question
from memsparse.train import trainer

from ..conftest import tiny_model, tiny_tokenizer

RECIPE = """
base = "{base}"
lora_rank = 2
checkpoint_every = 2
log_every = 1
[msa]
router_layer_idx = "2,3"
top_k_docs = 2
pooling_kernel_size = 4
[tasks]
toy = 1.0
[[phase]]
name = "warmup"
steps = 3
lr = 1e-2
w_lm = 0.1
w_aux = 1.0
memory_tokens = [40]
batch_size = 2
[[phase]]
name = "sft"
steps = 3
lr = 1e-3
w_lm = 1.0
w_aux = 0.1
memory_tokens = [40, 80]
"""


def _toy(self, memory_tokens):
    rng = self.rng
    docs = [f"item {i} has value {rng.randint(100, 999)}." for i in range(max(2, memory_tokens // 10))]
    g = rng.randrange(len(docs))
    return Question(docs, f"What value has item {g}?", [[g]], docs[g].split()[-1].rstrip("."), "toy")


def _add_toy(monkeypatch) -> None:
    monkeypatch.setattr(Mixer, "toy", _toy, raising=False)
    monkeypatch.setattr(mix, "TASKS", (*mix.TASKS, "toy"))


@pytest.mark.slow
def test_train_resume_and_ship(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    tiny_model("llama", vocab_size=300, tie_word_embeddings=True).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    recipe = tmp_path / "toy.toml"
    recipe.write_text(RECIPE.format(base=base))
    _add_toy(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--device", "cpu", "--max-steps", "4"]) == 0
    heads, log = _train_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["phase"] for r in log] == ["warmup"] * 3 + ["sft"]
    assert [h["start_step"] for h in heads] == [0] and all(heads[0][k] for k in ("gpu", "date", "commit"))
    assert all(0 <= r["recall_at_k"] <= 1 and r["loss"] == r["loss"] for r in log)
    assert main(["train", str(recipe), "--out", str(run), "--device", "cpu"]) == 0  # resumes at step 4
    heads, log = _train_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and log[-1]["memory_tokens"] == 80
    assert [h["start_step"] for h in heads] == [0, 4]  # a header for each start, the resume's too
    printed = capsys.readouterr().out
    assert "resuming from step 4" in printed
    model, tok = load_delta(run / "delta", base)
    assert model.router_layers == [2, 3] and (run / "delta" / "delta.safetensors").stat().st_size < 100_000
    again = tmp_path / "again.toml"  # a new run starting from the delta
    again.write_text(f'init = "{run / "delta"}"\n' + RECIPE.format(base=base))
    started, _, _ = trainer.build_model(trainer.Recipe.load(again), "cpu", None)
    shipped = dict(model.named_parameters())
    name = "model.layers.3.self_attn.router_q_proj.0.weight"
    assert torch.equal(dict(started.named_parameters())[name], shipped[name])
    sha = delta_sha256(run / "delta")
    assert f"sha256 {sha})" in printed  # printed, for the next recipe to pin
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(f'init = "{run / "delta"}"\ninit_sha256 = "{sha}"\n' + RECIPE.format(base=base))
    trainer.build_model(trainer.Recipe.load(pinned), "cpu", None)
    pinned.write_text(f'init = "{run / "delta"}"\ninit_sha256 = "{"0" * 64}"\n' + RECIPE.format(base=base))
    with pytest.raises(ValueError, match="not the delta this recipe starts from"):
        trainer.build_model(trainer.Recipe.load(pinned), "cpu", None)
    child = tmp_path / "child"
    assert main(["train", str(again), "--out", str(child), "--device", "cpu", "--max-steps", "1"]) == 0
    parent = json.loads((child / "delta" / "delta.json").read_text())["parent"]
    assert parent == {"path": str(run / "delta"), "sha256": sha}


def test_time_limit_stops_with_a_checkpoint_and_a_delta(tmp_path, monkeypatch):
    """--max-minutes: the run stops after the step that passes the time, writes its checkpoint and delta, and a
    later call resumes from that step."""
    base = tmp_path / "base"
    tiny_model("llama", vocab_size=300, tie_word_embeddings=True).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    recipe = tmp_path / "toy.toml"
    recipe.write_text(RECIPE.format(base=base).replace("checkpoint_every = 2", "checkpoint_every = 50"))
    _add_toy(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--device", "cpu", "--max-minutes", "0"]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 1 and (run / "delta").is_dir()
    assert main(["train", str(recipe), "--out", str(run), "--device", "cpu"]) == 0
    assert [r["step"] for r in _train_log(run)[1]] == [1, 2, 3, 4, 5, 6]


def _train_log(run: Path) -> tuple[list[dict], list[dict]]:
    """The run's train_log.jsonl: its start headers and its logged steps."""
    lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in lines if "start_step" in r], [r for r in lines if "step" in r]


def test_phase_schedule():
    phase = trainer.Phase("p", steps=8, lr=1.0, w_lm=1, w_aux=1, memory_tokens=[8, 16, 32, 64])
    assert [phase.memory_at(s) for s in range(8)] == [8, 8, 16, 16, 32, 32, 64, 64]
    phases = [trainer.Phase("a", 2, 1, 1, 1, [1]), phase]
    assert trainer._phase_at(phases, 1)[0].name == "a" and trainer._phase_at(phases, 3) == (phase, 1)
    assert random.Random(0).random() == random.Random(0).random()


def _ddp_rank(rank: int, world: int, port: int, recipe: str, run: str, out: str):
    """One torchrun-like rank (gloo on CPU): trains, then saves its final weights for comparison."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    Mixer.toy, mix.TASKS = _toy, (*mix.TASKS, "toy")
    seen = {}

    class Recording(torch.optim.AdamW):
        def __init__(self, groups, **kw):
            seen["params"] = [p for g in groups for p in g["params"]]
            super().__init__(groups, **kw)

    trainer.torch.optim.AdamW = Recording
    drawn = []
    draw = Mixer.draw
    Mixer.draw = lambda self, mem: drawn.append(draw(self, mem)) or drawn[-1]
    starts = []
    nulled_start = trainer._nulled_start
    trainer._nulled_start = lambda *a: starts.append(1) or nulled_start(*a)
    trainer.train(trainer.Recipe.load(recipe), Path(run), device="cpu", max_steps=3, max_seconds=3600.0)  # ranks agree
    torch.save({"params": [p.detach() for p in seen["params"]], "questions": [q.question for q in drawn],
                "starts": len(starts)}, f"{out}/rank{rank}.pt")
    assert not torch.distributed.is_initialized()  # train() closes the process group it opened
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, where a gloo thread now and then aborts (SIGABRT) a finished rank


def test_ddp_ranks_stay_in_step(tmp_path):
    import socket

    import torch.multiprocessing as mp

    base = tmp_path / "base"
    tiny_model("llama", vocab_size=300, tie_word_embeddings=True).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    recipe = tmp_path / "toy.toml"
    nulled = 'router_init = "nulled"\nrouter_null_rank = 4\nrouter_init_batches = 2\n'
    recipe.write_text(nulled + RECIPE.format(base=base))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, str(recipe), str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))  # identical updates on both ranks
    assert (a["starts"], b["starts"]) == (1, 0)  # rank 0 measures the router start, rank 1 receives it
    assert a["questions"] != b["questions"]  # from different samples
    assert [r["step"] for r in _train_log(tmp_path / "run")[1]] == [1, 2, 3]
    assert (tmp_path / "run" / "delta" / "delta.safetensors").exists()


def _with_line(recipe: Path, line: str, tmp_path: Path) -> Path:
    out = tmp_path / recipe.name
    out.write_text(line + "\n" + recipe.read_text())
    return out


def test_shipped_recipes_load_and_the_no_text_ablation_injects_nothing(monkeypatch, tmp_path):
    """Every recipe under recipes/ parses; each ablation differs from its baseline in one setting only; with
    `interleave = false` the samples hold no injected document text; `noise_docs` sets how many documents
    beside the gold ones a router-injection sample reads, and a bad range is refused."""
    from dataclasses import asdict

    from memsparse.engine.protocol import Protocol

    root = Path(__file__).parents[2] / "recipes"
    recipes = {str(p.relative_to(root).with_suffix("")): trainer.Recipe.load(p) for p in root.rglob("*.toml")}
    assert {"smollm2-msa", "ablations/base", "ablations/no-warmup", "ablations/no-original-text",
            "ablations/global-rope"} <= set(recipes)
    base = asdict(recipes["ablations/base"])
    diff = {name: {k for k, v in asdict(recipes[f"ablations/{name}"]).items() if v != base[k]}
            for name in ("no-warmup", "no-original-text", "global-rope")}
    assert diff == {"no-warmup": {"phases"}, "no-original-text": {"interleave"}, "global-rope": {"msa"}}
    assert recipes["ablations/global-rope"].msa == {**base["msa"], "doc_positions": "global"}
    assert all(ph.w_aux == 0 for ph in recipes["ablations/no-warmup"].phases)
    assert [(ph.steps, ph.lr, ph.memory_tokens) for ph in recipes["ablations/no-warmup"].phases] == [
        (ph["steps"], ph["lr"], ph["memory_tokens"]) for ph in base["phases"]]
    assert not recipes["ablations/no-original-text"].interleave and recipes["smollm2-msa"].interleave
    tok = tiny_tokenizer()
    _add_toy(monkeypatch)
    proto = Protocol(tok)
    for interleave in (True, False):
        recipe = trainer.Recipe(base="x", tasks={"toy": 1.0}, interleave=interleave, phases=[trainer.Phase(
            "p", steps=6, lr=1.0, w_lm=1, w_aux=1, memory_tokens=[60])])
        recipe.doc_tokens = 16
        mixer = trainer.make_mixer(recipe, tok)
        batches = [trainer.step_batch(recipe, mixer, proto, tok, 0, step) for step in range(6)]
        texts = [tok.decode([t for t, d in zip(ids, docs) if d <= 0])
                 for *_, b in batches for ids, docs in zip(b["input_ids"].tolist(), b["doc_ids"].tolist())]
        assert any("has value" in t for t in texts) == interleave  # injected document text, or none
    injected = {}
    for lo_hi in ([1, 3], [6, 6]):  # noise documents per hop: the router-injection samples read gold + noise
        recipe = trainer.Recipe(base="x", tasks={"toy": 1.0}, noise_docs=lo_hi, doc_tokens=16, phases=[
            trainer.Phase("p", steps=8, lr=1.0, w_lm=1, w_aux=1, memory_tokens=[200])])
        mixer = trainer.make_mixer(recipe, tok)
        texts = [tok.decode([t for t, d in zip(ids, docs) if d <= 0])
                 for step in range(8) for ids, docs in zip(*(v.tolist() for v in (
                     trainer.step_batch(recipe, mixer, proto, tok, 0, step)[-1][k] for k in ("input_ids", "doc_ids"))))]
        injected[lo_hi[1]] = max(t.count("has value") for t in texts)
    assert injected[3] <= 4 and injected[6] == 7
    bad = Path(__file__).parents[2] / "recipes" / "smollm2-msa.toml"
    with pytest.raises(ValueError, match="noise_docs"):
        trainer.Recipe.load(_with_line(bad, "noise_docs = [3, 1]", tmp_path))


def test_step_batches_do_not_depend_on_workers_or_resuming(monkeypatch):
    """Worker processes give the in-process stream batch for batch, and a stream started at a later step (a
    resumed run) continues it exactly; NIAH subtask weights pick only the weighted subtasks."""
    from memsparse.tasks.niah import SUBTASKS

    _add_toy(monkeypatch)
    tok = tiny_tokenizer()
    recipe = trainer.Recipe(base="x", tasks={"toy": 1.0}, doc_tokens=16, phases=[trainer.Phase(
        "p", steps=7, lr=1.0, w_lm=1, w_aux=1, memory_tokens=[60, 90], batch_size=2)])

    def stream(start, workers):
        loader = torch.utils.data.DataLoader(trainer.StepBatches(recipe, tok, 0, start, 7), batch_size=None,
                                             collate_fn=trainer._same, num_workers=workers)
        return [(step, mem, {k: v.tolist() for k, v in b.items()}) for step, _, _, mem, b in loader]

    alone = stream(0, 0)
    assert [s for s, *_ in alone] == list(range(7)) and alone[-1][1] == 90
    assert stream(0, 2) == alone and stream(4, 0) == alone[4:]
    assert len({str(b) for *_, b in alone}) == 7  # every step draws its own questions
    mixer = Mixer({"niah": 1.0}, lambda texts: [len(t.split()) for t in texts],
                  niah_subtasks={"niah_multikey_2": 3.0, "niah_single_1": 1.0, "niah_multivalue": 0.0})
    tasks = [mixer.niah(400).task for _ in range(40)]
    assert set(tasks) == {"niah:niah_multikey_2", "niah:niah_single_1"} and tasks.count("niah:niah_multikey_2") > 20
    import pytest

    with pytest.raises(ValueError, match="unknown NIAH subtasks"):
        Mixer({"niah": 1.0}, len, niah_subtasks={"niah_multikey_9": 1.0})
    assert set(SUBTASKS) == set(Mixer({"niah": 1.0}, len).subtasks)


def test_nulled_router_start_and_router_learning_rate(tmp_path, monkeypatch):
    """router_init = "nulled" starts the routers on the directions measured over the run's first batches;
    router_lr_scale = 0 keeps them there while the adapters train; a bad router_init is refused."""
    from safetensors.torch import load_file

    from memsparse.engine.protocol import Protocol
    from memsparse.train.router_init import nulled_router_init

    base = tmp_path / "base"
    tiny_model("llama", vocab_size=300, tie_word_embeddings=True).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    recipe = tmp_path / "toy.toml"
    recipe.write_text('router_init = "nulled"\nrouter_null_rank = 4\nrouter_init_batches = 3\n'
                      'router_lr_scale = 0.0\n' + RECIPE.format(base=base))
    _add_toy(monkeypatch)
    r = trainer.Recipe.load(recipe)
    trainer.train(r, tmp_path / "run", device="cpu", max_steps=2)
    trained = {n: t.float() for n, t in load_file(tmp_path / "run" / "delta" / "delta.safetensors").items()}
    expected, tok, _ = trainer.build_model(r, "cpu", None)  # the same start, by hand
    mixer, proto = trainer.make_mixer(r, tok), Protocol(tok)
    nulled_router_init(expected, [trainer.step_batch(r, mixer, proto, tok, 0, s)[-1] for s in range(3)], 4)
    for name, p in expected.named_parameters():
        if ".router_" in name:  # the delta holds bfloat16
            torch.testing.assert_close(trained[name], p.to(torch.bfloat16).float(), rtol=0, atol=0)
    fresh = dict(trainer.build_model(r, "cpu", None)[0].named_parameters())
    name = "model.layers.3.self_attn.router_k_proj.0.weight"
    assert not torch.allclose(fresh[name], trained[name], atol=1e-2)  # the start moved the routers
    lora = [n for n in trained if n.startswith("lora.") and n.endswith(".B")]
    assert any(trained[n].abs().max() > 0 for n in lora)  # the adapters (B starts at zero) trained
    recipe.write_text('router_init = "svd"\n' + RECIPE.format(base=base))
    with pytest.raises(ValueError, match="router_init must be"):
        trainer.Recipe.load(recipe)
