"""Data: sources, validation before any model is loaded, the length summary, completion-only masks."""

import pytest
from datasets import Dataset

from falcon_qlora.config import load_config
from falcon_qlora.data import assistant_spans, load_dataset_splits, summarize, tokenize_completion_only
from falcon_qlora.errors import UserError
from falcon_qlora.model import load_tokenizer
from tiny import write_jsonl

GOOD = "### Human: hi ### Assistant: hello"


def test_folder_gives_train_and_test_splits(tiny_data):
    train, held = load_dataset_splits(load_config(dataset_name=str(tiny_data)))
    assert (len(train), len(held)) == (64, 16)
    assert train.column_names == ["text", "completion_spans"]


def test_single_file_is_the_train_split(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": GOOD, "id": 1}] * 3)
    train, held = load_dataset_splits(load_config(dataset_name=str(f)))
    assert len(train) == 3 and held is None


def test_in_memory_dataset(tmp_path):
    train, _ = load_dataset_splits(load_config(), Dataset.from_list([{"text": GOOD}] * 2))
    assert len(train) == 2


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_parquet_and_csv(tmp_path, ext):
    f = tmp_path / f"d.{ext}"
    ds = Dataset.from_list([{"text": GOOD}] * 4)
    ds.to_parquet(str(f)) if ext == "parquet" else ds.to_csv(str(f), index=False)
    assert len(load_dataset_splits(load_config(dataset_name=str(f)))[0]) == 4


def test_missing_text_field_names_file_and_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": GOOD}])
    with pytest.raises(UserError, match=r"d.jsonl.*no 'text' column \(columns: prompt\)"):
        load_dataset_splits(load_config(dataset_name=str(f)))


def test_bad_rows_are_reported_with_row_numbers(tmp_path):
    rows = [{"text": GOOD}, {"text": 5}, {"text": "  "}, {"text": "### Human: no answer"}, {"text": GOOD}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as err:
        load_dataset_splits(load_config(dataset_name=str(f)))
    msg = str(err.value)
    assert "d.jsonl" in msg and "rows 2: 'text' is not a string" in msg and "rows 3: 'text' is empty" in msg
    assert "rows 4: 'text' has no '### Assistant:' marker" in msg and "drop_invalid_rows" in msg


def test_bad_rows_can_be_dropped_with_a_count(tmp_path, capsys):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": GOOD}, {"text": "no markers"}, {"text": GOOD}])
    train, _ = load_dataset_splits(load_config(dataset_name=str(f), drop_invalid_rows=True))
    assert len(train) == 2
    assert "dropped 1 invalid rows of 3" in capsys.readouterr().out


def test_missing_split_lists_the_splits(tiny_data):
    with pytest.raises(UserError, match=r"no split 'validation' \(it has: test, train\)"):
        load_dataset_splits(load_config(dataset_name=str(tiny_data), eval_split="validation"))


def test_summary_counts_rows_over_max_length(tiny_falcon_7b_arch):
    cfg = load_config(max_length=20)
    tok = load_tokenizer(str(tiny_falcon_7b_arch), cfg)
    short, long = "### Human: hi ### Assistant: yo", "### Human: " + "two plus two " * 20 + "### Assistant: four"
    s = summarize(Dataset.from_list([{"text": short}] * 3 + [{"text": long}]), tok, cfg)
    assert (s["rows"], s["over_max_length"], s["over_share"]) == (4, 1, 0.25)
    assert s["tokens_p50"] <= 20 < s["tokens_max"]


def test_assistant_spans_cover_every_assistant_turn():
    text = "### Human: a ### Assistant: b ### Human: c ### Assistant: d"
    assert [text[s:e] for s, e in assistant_spans(text)] == [" b", " d"]


def test_completion_only_masks_human_turns_and_keeps_eos(tiny_falcon_7b_arch):
    cfg = load_config(max_length=128)
    tok = load_tokenizer(str(tiny_falcon_7b_arch), cfg)
    text = "### Human: what is two? ### Assistant: two ### Human: and one? ### Assistant: one"
    row = tokenize_completion_only(Dataset.from_list([{"text": text}]), tok, cfg)[0]
    assert row["input_ids"][-1] == tok.eos_token_id and row["completion_mask"][-1] == 1
    trained = tok.decode([i for i, m in zip(row["input_ids"], row["completion_mask"]) if m])
    assert "two" in trained and "one" in trained and "what is" not in trained and "and" not in trained
