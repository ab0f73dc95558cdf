"""chat: the Guanaco prompt with history, left-padded batches, stopping at the next "### Human:", streaming."""
from __future__ import annotations

import shutil

from falcon_qlora import chat
from falcon_qlora.chat import HUMAN, build_prompt, generate, load_chat_model


def _forced(tok, prompt_len: int, text: str):
    """prefix_allowed_tokens_fn that makes the model write `text` token by token (then EOS): a real generate() on
    the real 4-bit model whose output is known in advance."""
    script = tok(text, add_special_tokens=False)["input_ids"]

    def allowed(batch_id, ids):
        i = len(ids) - prompt_len
        return [script[i]] if i < len(script) else [tok.eos_token_id]
    return allowed, script


def test_prompt_keeps_history_in_guanaco_format():
    assert build_prompt([("hi", "hello."), ("what is one plus one?", "two.")], "and two plus two?") == (
        "### Human: hi ### Assistant: hello. ### Human: what is one plus one? ### Assistant: two. "
        "### Human: and two plus two? ### Assistant:")


def test_batch_is_left_padded_and_matches_single_prompts(chat_model):
    model, tok = chat_model
    prompts = [build_prompt([], "what is two plus three?"),
               build_prompt([("what is one plus one?", "one plus one is two.")], "what is four plus zero?")]
    batched = generate(model, tok, prompts, max_new_tokens=12)
    single = [generate(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single and all(batched)
    assert tok.padding_side == "right"  # restored for training/eval


def test_stops_at_next_human_turn_and_cuts_it(chat_model):
    model, tok = chat_model
    prompt = build_prompt([], "what is two plus two?")
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    allowed, script = _forced(tok, n, " two plus two is four. ### Human: what is one plus one? ### Assistant: two")
    lengths, real = [], model.generate

    def counting(*a, **kw):  # what generate() got back, to count the tokens it produced
        ids = real(*a, **kw)
        lengths.append(ids.shape[1] - n)
        return ids
    model.generate = counting
    try:
        out = generate(model, tok, [prompt], max_new_tokens=40, prefix_allowed_tokens_fn=allowed)
    finally:
        del model.generate
    assert out == ["two plus two is four."]
    assert lengths[0] < len(script)  # generation really stopped, not just the text cut


def test_answers_say_which_ended_at_eos(chat_model):
    """The demo scores answers by whether the model ended them: EOS written, or the token limit reached."""
    model, tok = chat_model
    prompt = build_prompt([], "what is two plus two?")
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    allowed, script = _forced(tok, n, " two plus two is four.")
    [done] = chat.answers(model, tok, [prompt], max_new_tokens=len(script) + 1, prefix_allowed_tokens_fn=allowed)
    [cut] = chat.answers(model, tok, [prompt], max_new_tokens=len(script) - 1, prefix_allowed_tokens_fn=allowed)
    assert (done.text, done.ended_at_eos) == ("two plus two is four.", True)
    assert not cut.ended_at_eos and "two plus two is four.".startswith(cut.text)


def test_a_word_level_tokenizer_stops_at_the_next_human_turn(tmp_path):
    """transformers' stop_strings raises on word-level tokenizers; chat's own stop criterion decodes instead."""
    from tiny import build_word_falcon
    model, tok = load_chat_model(None, base=str(build_word_falcon(tmp_path / "word")))
    prompt = "### Human: what is two plus two ? ### Assistant:"
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    allowed, _ = _forced(tok, n, "two plus two is four . ### Human: what is one")
    batch = [prompt, "### Human: what is one plus one ? ### Assistant:"]
    out = generate(model, tok, [prompt], max_new_tokens=20, prefix_allowed_tokens_fn=allowed)
    assert out == ["two plus two is four ."]
    assert len(generate(model, tok, batch, max_new_tokens=5)) == 2  # unforced rows end at EOS or the limit


def test_stream_prints_answer_without_stop_string(chat_model, capsys):
    model, tok = chat_model
    prompt = build_prompt([], "what is one plus one?")
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    allowed, _ = _forced(tok, n, " one plus one is two. ### Human: what")
    [answer] = generate(model, tok, [prompt], max_new_tokens=30, stream=True, prefix_allowed_tokens_fn=allowed)
    assert capsys.readouterr().out == "one plus one is two.\n"
    assert answer == "one plus one is two."


def test_repl_sends_history_and_reset_forgets_it(chat_model, monkeypatch, capsys):
    model, tok = chat_model
    seen, real = [], chat.generate
    monkeypatch.setattr(chat, "generate", lambda m, t, prompts, **kw: seen.append(prompts[0]) or real(m, t, prompts,
                                                                                                         **kw))
    lines = iter(["what is one plus one?", "what is two plus two?", "/reset", "what is three plus one?"])

    def fake_input(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    chat.repl(model, tok, dict(max_new_tokens=6), inp=fake_input)
    assert len(seen) == 3
    assert seen[1].startswith("### Human: what is one plus one? ### Assistant:") and seen[1].count(HUMAN) == 2
    assert seen[2] == build_prompt([], "what is three plus one?")


def test_cli_one_shot_reads_base_from_adapter(tiny_adapter, capsys):
    assert chat.cli(["--adapter", str(tiny_adapter), "--prompt", "what is two plus one?",
                     "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("### Assistant: ")


def test_base_from_adapter_config_and_bf16_flag(tiny_adapter, tmp_path):
    """Without run_config.yaml the base comes from adapter_config.json; --bf16 loads it unquantized."""
    import torch
    from falcon_qlora.model import count_linear4bit
    bare = tmp_path / "bare"
    shutil.copytree(tiny_adapter, bare)
    (bare / "run_config.yaml").unlink()
    model, _ = load_chat_model(str(bare))
    assert count_linear4bit(model) > 0
    model16, _ = load_chat_model(str(tiny_adapter), bf16=True)
    assert count_linear4bit(model16) == 0
    assert model16.get_base_model().transformer.h[0].mlp.dense_h_to_4h.base_layer.weight.dtype == torch.bfloat16


def test_generation_stops_where_the_runs_own_template_starts_a_user_turn(chat_model):
    """Not only Guanaco's '### Human:': the stop strings come from the tokenizer's chat template."""
    model, tok = chat_model
    saved = tok.chat_template
    tok.chat_template = ("{% for m in messages %}{{ ('USER: ' if m['role'] == 'user' else 'BOT: ') + m['content'] + ' ' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ 'BOT:' }}{% endif %}")
    try:
        prompt = build_prompt([], "what is two plus two?", tok)
        assert prompt == "USER: what is two plus two? BOT:"
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        allowed, _ = _forced(tok, n, " two plus two is four. USER: what is one plus one?")
        assert generate(model, tok, [prompt], max_new_tokens=30, prefix_allowed_tokens_fn=allowed) == [
            "two plus two is four."]
    finally:
        tok.chat_template = saved
