"""eval: held-out loss, perplexity and token accuracy, base vs adapter, with the eval's own batch and length."""
from __future__ import annotations

import json
import math

import pytest

from falcon_qlora.errors import UserError
from falcon_qlora.evaluate import cli, evaluate, score


@pytest.fixture(scope="module")
def result(tiny_adapter):
    return evaluate(tiny_adapter)


@pytest.fixture(scope="module")
def adapter_model(tiny_adapter):
    from falcon_qlora.model import load_adapter_model
    model, tok, _ = load_adapter_model(tiny_adapter)
    return model, tok


def test_adapter_scores_equal_the_trainers_eval(result, tiny_adapter):
    """Same rows, same tokens (EOS included) as TRL's evaluation at the end of training: same numbers."""
    logged = [json.loads(x) for x in (tiny_adapter.parent / "metrics.jsonl").read_text().splitlines()]
    final = [x for x in logged if "eval_loss" in x][-1]
    assert result["adapter"]["loss"] == pytest.approx(final["eval_loss"], rel=1e-4)
    assert result["adapter"]["mean_token_accuracy"] == pytest.approx(final["eval_mean_token_accuracy"], abs=1e-4)


def test_base_is_worse_than_adapter_and_perplexity_is_exp_loss(result):
    assert result["base"]["loss"] > result["adapter"]["loss"] + 0.1
    assert result["base"]["mean_token_accuracy"] < result["adapter"]["mean_token_accuracy"]
    for r in (result["base"], result["adapter"]):
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert result["adapter"]["rows"] == 16 and result["split"] == "test"


def test_scores_do_not_depend_on_eval_batch_size(adapter_model):
    model, tok = adapter_model
    texts = ["### Human: what is one plus one? ### Assistant: two.",
             "### Human: hi ### Assistant: hello there, what is the colour of the sky? blue.",
             "### Human: name a colour ### Assistant: red"]
    assert score(model, tok, texts, batch_size=1)["loss"] == pytest.approx(
        score(model, tok, texts, batch_size=3)["loss"], rel=1e-5)


def test_max_length_bounds_the_tokens_scored(adapter_model):
    model, tok = adapter_model
    texts = ["### Human: what is one plus one? ### Assistant: one plus one is two."] * 3
    assert score(model, tok, texts, batch_size=2, max_length=8)["tokens"] == 3 * 7


def test_cli_prints_table_and_writes_json(tiny_adapter, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert cli(["--adapter", str(tiny_adapter), "--max_rows", "4", "--batch_size", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "token accuracy" in text and "\nbase " in text and "\nadapter " in text
    saved = json.loads(out.read_text())
    assert saved["adapter"]["rows"] == 4 and saved["batch_size"] == 2


def test_missing_data_is_one_clear_line(tiny_adapter, tmp_path):
    with pytest.raises(UserError, match="no held-out data") as err:
        evaluate(tiny_adapter, data=str(tmp_path / "nope.jsonl"))
    assert "\n" not in str(err.value)


def test_trainer_eval_loss_is_a_mean_of_batch_means_and_eval_weighs_every_token(tiny_falcon_7b_arch, tmp_path):
    """Why `eval` and the trainer's eval_loss can differ: the trainer averages each batch's mean token loss
    (weighted by rows), eval averages over all tokens. With held-out batches of different token counts (12 rows in
    batches of 8: four long rows in the second batch) the two differ, and the trainer's number is exactly the
    row-weighted mean of eval's per-batch scores. With equal-length rows they coincide (test above)."""
    from tiny import guanaco_rows, write_jsonl
    from falcon_qlora.config import make_config
    from falcon_qlora.model import load_adapter_model
    from falcon_qlora.train import train
    from conftest import tiny_overrides
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", guanaco_rows(32, seed=0))
    rows = guanaco_rows(12, seed=99)
    for r in rows[8:]:
        r["text"] += " what is the colour of the sky? blue. name a colour: red green yellow"
    write_jsonl(data / "test.jsonl", rows)
    run = train(make_config(**tiny_overrides(tiny_falcon_7b_arch, data, tmp_path / "run", max_steps=2,
                                             save_steps=100)))
    model, tok, _ = load_adapter_model(run.final_dir)
    texts = [r["text"] for r in rows]
    batches = [score(model, tok, texts[i:i + 8]) for i in (0, 8)]
    row_weighted = sum(b["loss"] * b["rows"] for b in batches) / len(texts)
    assert run.metrics["eval_loss"] == pytest.approx(row_weighted, rel=1e-5)
    token_mean = evaluate(run.final_dir)["adapter"]["loss"]
    assert token_mean == pytest.approx(sum(b["loss"] * b["tokens"] for b in batches) / sum(b["tokens"] for b in
                                                                                         batches), rel=1e-6)
    assert abs(token_mean - run.metrics["eval_loss"]) > 1e-3
