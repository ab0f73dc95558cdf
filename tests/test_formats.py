"""Row formats and the run's chat template: detection, rendering, label masks, training on every format, the
template saved with the adapter and used by chat."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_overrides
from falcon_qlora import template
from falcon_qlora.config import load_config, make_config
from falcon_qlora.data import load_dataset_splits, tokenize_completion_only

EXAMPLES = Path(__file__).parent.parent / "examples" / "data"
FORMATS = ["text", "messages", "sharegpt", "alpaca", "prompt_completion"]
SYSTEM = "You answer in one short sentence."
CONVERSATION = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What is two plus three?"},
                {"role": "assistant", "content": "Two plus three is five."},
                {"role": "user", "content": "And what is that plus one?"},
                {"role": "assistant", "content": "Five plus one is six."}]


def _rows(name):
    return [json.loads(x) for x in (EXAMPLES / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture()
def falcon_tok(tiny_falcon_7b_arch):
    from falcon_qlora.model import load_tokenizer
    return load_tokenizer(str(tiny_falcon_7b_arch), load_config())


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_example_file_is_detected_and_rendered(fmt, falcon_tok, capsys):
    train, held = load_dataset_splits(load_config(dataset_name=str(EXAMPLES / f"{fmt}.jsonl")), tokenizer=falcon_tok)
    assert held is None and len(train) == 6
    assert f"format {fmt}" in capsys.readouterr().out
    assert all(t.startswith(("### Human: ", SYSTEM + " ### Human: ")) for t in train["text"])
    assert falcon_tok.chat_template == template.GUANACO_TEMPLATE


def test_a_messages_row_renders_to_the_reference_guanaco_text(falcon_tok):
    """The Guanaco template writes a conversation exactly as the reference recipe's text rows are written."""
    text = _rows("text")[5]["text"]
    train, _ = load_dataset_splits(load_config(), _dataset([{"messages": CONVERSATION[1:]}, {"messages": CONVERSATION}]),
                                   tokenizer=falcon_tok)
    assert train["text"] == [text, SYSTEM + " " + text]
    assert template.render(None, CONVERSATION[1:4], add_generation_prompt=True) == \
        text[:text.rindex("### Assistant:") + len("### Assistant:")]


def test_every_format_renders_the_same_conversation_the_same_way(falcon_tok):
    first = {}
    for fmt in FORMATS[1:]:
        train, _ = load_dataset_splits(load_config(dataset_name=str(EXAMPLES / f"{fmt}.jsonl")), tokenizer=falcon_tok)
        first[fmt] = train["text"][1]
    assert len(set(first.values())) == 1, first
    assert first["messages"] == "### Human: Name a colour of the sky. ### Assistant: The sky is often blue."


def test_reference_text_rows_are_trained_byte_for_byte(tiny_falcon_7b_arch, tiny_data, tmp_path, falcon_tok):
    """Text rows reach the trainer unchanged: tokens are the tokenizer's tokens of the row plus EOS, and labels
    are those same tokens (the reference trains on the whole text)."""
    from falcon_qlora.model import attach_lora, load_base_model
    from falcon_qlora.train import build_trainer
    raw = [json.loads(x)["text"] for x in (tiny_data / "train.jsonl").read_text().splitlines()]
    # the reference path's padded batches (on a GPU, profile auto would take padding-free rows instead)
    cfg = make_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path, profile="reference"))
    train, _ = load_dataset_splits(cfg, tokenizer=falcon_tok)
    assert train["text"] == raw
    trainer = build_trainer(cfg, attach_lora(load_base_model(cfg), cfg), falcon_tok, train, None)
    want = [falcon_tok(t, add_special_tokens=False)["input_ids"] + [falcon_tok.eos_token_id] for t in raw]
    assert trainer.train_dataset["input_ids"] == want
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for row, ids in enumerate(want[:4]):
        assert batch["labels"][row, :len(ids)].tolist() == ids
        assert (batch["labels"][row, len(ids):] == -100).all()


def _expected(tok, pieces):
    """Token ids and mask built piece by piece: (text, trained?)."""
    ids, mask = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids, mask = ids + piece, mask + [int(trained)] * len(piece)
    return ids, mask


def _masked_row(tok, fmt_rows, fmt):
    from datasets import Dataset
    cfg = load_config(max_length=512, completion_only_loss=True, dataset_format=fmt)
    train, _ = load_dataset_splits(cfg, Dataset.from_list(fmt_rows), tokenizer=tok)
    return tokenize_completion_only(train, tok, cfg)[0]


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_completion_only_trains_every_assistant_turn_and_nothing_else(fmt, falcon_tok):
    """Token by token on a multi-turn row with a system prompt: system, user turns and turn openings are 0; both
    answers and the final EOS are 1."""
    rows = {"messages": [{"messages": CONVERSATION}],
            "sharegpt": [_rows("sharegpt")[0]], "prompt_completion": [
                {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}],
            "alpaca": [{"instruction": "Add the two numbers.", "input": "two and three", "system": SYSTEM,
                        "output": "Two plus three is five."}]}[fmt]
    row = _masked_row(falcon_tok, rows, fmt)
    if fmt == "alpaca":
        pieces = [(f"{SYSTEM} ### Human: Add the two numbers.\n\ntwo and three ### Assistant:", 0),
                  (" Two plus three is five.", 1)]
    else:
        pieces = [(f"{SYSTEM} ### Human: What is two plus three? ### Assistant:", 0),
                  (" Two plus three is five.", 1), (" ### Human: And what is that plus one? ### Assistant:", 0),
                  (" Five plus one is six.", 1)]
    ids, mask = _expected(falcon_tok, pieces)
    assert row["input_ids"] == ids + [falcon_tok.eos_token_id]
    assert row["completion_mask"] == mask + [1]


def test_text_rows_get_the_same_mask_as_their_conversation(falcon_tok):
    text = _rows("text")[5]
    conv = {"messages": CONVERSATION[1:]}
    a, b = _masked_row(falcon_tok, [text], "text"), _masked_row(falcon_tok, [conv], "messages")
    assert (a["input_ids"], a["completion_mask"]) == (b["input_ids"], b["completion_mask"])


def test_chat_prompt_is_the_training_rendering_up_to_the_answer(falcon_tok):
    from falcon_qlora.chat import build_prompt
    train, _ = load_dataset_splits(load_config(dataset_format="messages"),
                                   _dataset([{"messages": CONVERSATION}]), tokenizer=falcon_tok)
    text, spans = train["text"][0], train["completion_spans"][0]
    prompt = build_prompt([(CONVERSATION[1]["content"], CONVERSATION[2]["content"])], CONVERSATION[3]["content"],
                          falcon_tok, system=SYSTEM)
    assert prompt == text[:spans[-1][0]]


def _dataset(rows):
    from datasets import Dataset
    return Dataset.from_list(rows)


def test_stop_strings_begin_the_next_user_turn(falcon_tok):
    assert template.stop_strings(falcon_tok) == ["### Human:"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_and_saves_its_template(fmt, tiny_falcon_7b_arch, tmp_path):
    """A few steps on the tiny Falcon; checkpoints and final/ carry the chat template; chat prompts through it."""
    from falcon_qlora.chat import build_prompt, load_chat_model
    from falcon_qlora.train import train
    from transformers import AutoTokenizer
    result = train(make_config(**tiny_overrides(tiny_falcon_7b_arch, EXAMPLES / f"{fmt}.jsonl", tmp_path,
                                                max_steps=2, save_steps=1, eval_split=None,
                                                completion_only_loss=fmt != "text")))
    assert result.metrics["train_steps"] == 2
    for folder in (result.final_dir, tmp_path / "checkpoint-2"):
        assert AutoTokenizer.from_pretrained(folder).chat_template == template.GUANACO_TEMPLATE
    _, tok = load_chat_model(str(result.final_dir))
    assert build_prompt([], "hi", tok) == "### Human: hi ### Assistant:"


def test_sources_are_mixed_with_the_seed_and_counted(falcon_tok, capsys):
    sources = [str(EXAMPLES / "messages.jsonl"), f"{{name: {EXAMPLES / 'alpaca.jsonl'}, max_rows: 2}}",
               f"{{name: {EXAMPLES / 'text.jsonl'}, format: text}}"]
    cfg = load_config(dataset_name=sources, eval_split=None, seed=3)
    train, _ = load_dataset_splits(cfg, tokenizer=falcon_tok)
    out = capsys.readouterr().out
    assert len(train) == 6 + 2 + 6
    assert "14 rows from 3 sources mixed with seed 3" in out
    assert "messages.jsonl [train] 6 (messages)" in out and "alpaca.jsonl [train] 2 (alpaca)" in out
    again, _ = load_dataset_splits(cfg, tokenizer=falcon_tok)
    other, _ = load_dataset_splits(load_config(dataset_name=sources, eval_split=None, seed=4), tokenizer=falcon_tok)
    assert again["text"] == train["text"] != other["text"]
    assert sorted(other["text"]) == sorted(train["text"])


def test_eos_only_tokenizer_trains_and_eos_keeps_its_label(tmp_path):
    """A GPT-2-style tokenizer (EOS its only special token) pads with EOS; padding is masked by position, so the
    EOS that ends each row is still a label."""
    from tiny import build_falcon
    from falcon_qlora.model import attach_lora, load_base_model, load_tokenizer
    from falcon_qlora.train import build_trainer, train
    model_dir = build_falcon(tmp_path / "gpt2-style", new_decoder_architecture=False, eos_only=True)
    cfg = make_config(**tiny_overrides(model_dir, EXAMPLES / "text.jsonl", tmp_path / "run", max_steps=2,
                                       eval_split=None, profile="reference"))  # padded batches, on any device
    tok = load_tokenizer(str(model_dir), cfg)
    assert tok.pad_token_id == tok.eos_token_id
    ds, _ = load_dataset_splits(cfg, tokenizer=tok)
    trainer = build_trainer(cfg, attach_lora(load_base_model(cfg), cfg), tok, ds, None)
    rows = [trainer.train_dataset[i] for i in range(6)]
    batch = trainer.data_collator(rows)
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["labels"][r, n - 1] == tok.eos_token_id
        assert (batch["labels"][r, n:] == -100).all()
    assert any(len(r["input_ids"]) < batch["labels"].shape[1] for r in rows)  # some row was padded
    assert train(cfg).metrics["train_steps"] == 2


@pytest.mark.slow
def test_smollm2_trains_in_its_own_chatml_template(smollm2, tmp_path):
    """A tokenizer with its own template keeps it: ChatML rows, the mask token by token (answers and their
    <|im_end|> trained, nothing else), chat's prompt equal to the training rendering, the template saved."""
    from transformers import AutoTokenizer
    from falcon_qlora.chat import build_prompt
    from falcon_qlora.model import load_tokenizer
    from falcon_qlora.train import train
    tok = load_tokenizer("smollm2-135m", load_config())
    own = tok.chat_template
    assert "<|im_start|>" in own
    row = _masked_row(tok, [{"messages": CONVERSATION}], "messages")
    head = "<|im_start|>user\n"
    ids, mask = _expected(tok, [(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n{head}What is two plus three?<|im_end|>\n"
                                 "<|im_start|>assistant\n", 0), ("Two plus three is five.<|im_end|>", 1),
                                (f"\n{head}And what is that plus one?<|im_end|>\n<|im_start|>assistant\n", 0),
                                ("Five plus one is six.<|im_end|>", 1)])
    assert (row["input_ids"], row["completion_mask"]) == (ids, mask)  # ends with EOS (<|im_end|>) once
    assert tok.chat_template == own and template.stop_strings(tok) == ["<|im_start|>user"]
    train_ds, _ = load_dataset_splits(load_config(), _dataset([{"messages": CONVERSATION}]), tokenizer=tok)
    prompt = build_prompt([(CONVERSATION[1]["content"], CONVERSATION[2]["content"])], CONVERSATION[3]["content"],
                          tok, system=SYSTEM)
    assert prompt == train_ds["text"][0][:train_ds["completion_spans"][0][-1][0]]
    result = train(make_config(**tiny_overrides("smollm2-135m", EXAMPLES / "messages.jsonl", tmp_path, max_steps=2,
                                                save_steps=100, per_device_train_batch_size=2, eval_split=None,
                                                completion_only_loss=True,
                                                lora_target_modules=["q_proj", "v_proj"])))
    assert result.metrics["train_steps"] == 2
    assert AutoTokenizer.from_pretrained(result.final_dir).chat_template == own


def test_chat_cli_system_prompt_goes_through_the_template(tiny_adapter, monkeypatch, capsys):
    from falcon_qlora import chat
    sent = []
    monkeypatch.setattr(chat, "generate", lambda model, tok, prompts, **kw: sent.extend(prompts) or ["x"])
    assert chat.cli(["--adapter", str(tiny_adapter), "--prompt", "what is one plus one?",
                     "--system", "Answer with one word."]) == 0
    assert sent == ["Answer with one word. ### Human: what is one plus one? ### Assistant:"]
