"""The offline demo: its own dataset, its preset, and a shortened run that must visibly learn."""
from __future__ import annotations

import json
import re

import pytest

from falcon_qlora import demo_data
from falcon_qlora.config import load_config


def test_shipped_data_is_exactly_the_generator_output(tmp_path):
    demo_data.write(tmp_path)
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (demo_data.DATA_DIR / f"{split}.jsonl").read_bytes()


def test_every_answer_is_the_card_of_the_prompt_and_heldout_people_are_unseen():
    """Each answer is valid JSON whose four facts all appear in the prompt; held-out names and cities never occur in
    training, so the held-out numbers measure extraction rather than memory."""
    from falcon_qlora.data import load_dataset_splits
    train, held = load_dataset_splits(load_config("demo"))   # also passes the loader's row validation
    assert (len(train), len(held)) == (demo_data.N_TRAIN, demo_data.N_TEST)
    seen = {}
    for split, ds in (("train", train), ("test", held)):
        cards = []
        for text in ds["text"]:
            prompt, answer = text.removeprefix("### Human: ").split(" ### Assistant: ")
            card = json.loads(answer)
            assert list(card) == ["name", "age", "city", "job"]
            assert all(re.search(rf"\b{re.escape(str(v))}\b", prompt) for v in card.values()), text
            cards.append(card)
        seen[split] = cards
    train_names = {c["name"].split()[0] for c in seen["train"]} | {c["name"].split()[1] for c in seen["train"]}
    test_names = {c["name"].split()[0] for c in seen["test"]} | {c["name"].split()[1] for c in seen["test"]}
    assert not train_names & test_names
    assert not {c["city"] for c in seen["train"]} & {c["city"] for c in seen["test"]}


def test_every_row_fits_max_length_with_its_eos(smollm2):
    """A truncated row would lose its EOS, and the model would not learn to stop."""
    from transformers import AutoTokenizer
    cfg = load_config("demo")
    tok = AutoTokenizer.from_pretrained(smollm2)
    for split in ("train", "test"):
        rows = [json.loads(x)["text"] for x in (demo_data.DATA_DIR / f"{split}.jsonl").read_text().splitlines()]
        longest = max(len(ids) for ids in tok([r + tok.eos_token for r in rows], add_special_tokens=False).input_ids)
        assert longest <= cfg.max_length, (split, longest)


@pytest.mark.slow
def test_demo_learns_on_a_short_schedule(smollm2, tmp_path):
    """SmolLM2 in 4-bit + LoRA, a shortened demo schedule: held-out loss drops and answers end at EOS."""
    from falcon_qlora.demo import run_demo
    result = run_demo(max_steps=12, output_dir=str(tmp_path / "run"), max_eval_rows=16, n_shown=2, verbose=False,
                      disable_tqdm=True)
    assert result.linear4bit == 30 * 7            # every linear layer of the 30 blocks is bnb Linear4bit
    assert result.eval_loss_after < 0.8 * result.eval_loss_before, result.summary()
    assert any(g.ended_at_eos for g in result.generations_after), result.generations_after
    assert result.loss_plot.name == "demo_loss.png" and result.loss_plot.stat().st_size > 0
    assert (result.loss_plot.parent / "loss.png").is_file()  # train's own figure, beside it
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 8


def test_the_demo_figure_leaves_the_runs_loss_plot_alone(tmp_path):
    """train's loss.png stays the one train wrote; the demo's figure (the same curve plus the held-out loss before and
    after) goes beside it."""
    from falcon_qlora import demo
    from falcon_qlora.train import plot_losses
    history = [{"step": 1, "loss": 3.2}, {"step": 2, "loss": 2.1}, {"step": 3, "loss": 1.4}]
    trains = plot_losses(tmp_path / "loss.png", history).read_bytes()
    path = demo.plot_losses(tmp_path, history, 3.4, 0.7)
    assert path == tmp_path / "demo_loss.png" and path.stat().st_size > 0
    assert (tmp_path / "loss.png").read_bytes() == trains


def _result(before, after, correct_before, correct_after, n=4):
    from pathlib import Path
    from falcon_qlora.demo import DemoResult, Generation
    gens = lambda k: [Generation("p", "e", "a", True, i < k) for i in range(n)]  # noqa: E731
    return DemoResult(before, after, gens(correct_before), gens(correct_after), Path("loss.png"), Path("final"), 1.0)


def test_a_demo_that_learned_is_not_a_failure():
    assert _result(3.44, 0.74, 0, 4).failure() is None


def test_a_diverged_demo_says_so_in_one_line():
    msg = _result(3.44, 15.79, 0, 0).failure()
    assert msg.startswith("held-out loss rose from 3.44 to 15.79: training diverged") and "doctor" in msg
    assert "\n" not in msg and "%" not in msg.split(":")[0]


def test_too_small_a_drop_or_no_better_cards_is_a_failure():
    assert "fell only 10%" in _result(3.0, 2.7, 0, 4).failure()
    assert "did not improve (2 -> 2 of 4)" in _result(3.0, 1.0, 2, 2).failure()


def test_demo_command_exits_1_with_one_line_when_the_demo_failed(monkeypatch, capsys):
    import falcon_qlora.demo as demo
    monkeypatch.setattr(demo, "run_demo", lambda cfg: _result(3.44, 15.79, 0, 0))
    assert demo.cli([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("falcon-qlora demo: failed: held-out loss rose from 3.44 to 15.79")


def test_heldout_pairs_are_the_prompts_and_cards_the_demo_scores():
    import json
    from falcon_qlora.demo import heldout_pairs
    pairs = heldout_pairs()
    assert len(pairs) == 40
    for prompt, card in pairs:
        assert prompt.startswith("### Human: ") and prompt.endswith("### Assistant:")
        assert set(json.loads(card)) == {"name", "age", "city", "job"}
