"""The run's chat template: one rendering of a conversation, from the training rows to every later prompt.

    from falcon_qlora.template import ensure_template, render, stop_strings
    ensure_template(tok)                     # the tokenizer's own template, else the Guanaco one; set on tok
    render(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)   # '### Human: Hi ### Assistant:'
    stop_strings(tok)                        # ['### Human:']: where the model starts the next user turn

The Guanaco template renders a conversation as the reference recipe's text rows are written:
`### Human: question ### Assistant: answer ### Human: ...`, one space between turns; a system message (Guanaco has
none) goes first, as plain text. Training text is the rendering without trailing whitespace, EOS appended once after
the whole row, as TRL does for text rows.

The template is stored in `tokenizer.chat_template`, so `save_pretrained` writes it into every checkpoint, final/
and merged model, and whatever loads that tokenizer later prompts the model the way it was trained.
"""
from __future__ import annotations

# Per turn: a prefix, the content, one space. A conversation's training text drops the space after its last turn
# (data.py strips trailing whitespace), which gives the reference rows byte for byte; a generation prompt ends in
# '### Assistant:'. The fixed per-turn shape is what tools that translate chat templates (Ollama) can read.
GUANACO_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '### Human: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Assistant: ' + message['content'] + ' ' }}"
    "{%- else -%}"
    "{{ message['content'] + ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '### Assistant:' }}"
    "{%- endif -%}"
)
HUMAN, ASSISTANT = "### Human:", "### Assistant:"
_MARK = "\x1fFALCON-QLORA-TURN\x1f"  # a content no template changes, to find where a turn's text begins


def ensure_template(tokenizer) -> str:
    """The tokenizer's own chat template if it has one, else the Guanaco template; set on the tokenizer (so it is
    saved with it) and returned."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = GUANACO_TEMPLATE
    return tokenizer.chat_template


def use_guanaco(tokenizer) -> str:
    """Make the Guanaco template the tokenizer's: a run whose rows are Guanaco text keeps prompting in that format,
    whatever template the tokenizer came with."""
    tokenizer.chat_template = GUANACO_TEMPLATE
    return GUANACO_TEMPLATE


def is_guanaco(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) == GUANACO_TEMPLATE


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text in the run's template (see ensure_template). add_generation_prompt opens the
    assistant turn that the model is to write. tokenizer=None renders the Guanaco template."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if tokenizer is None:
        from transformers.utils.chat_template_utils import render_jinja_template
        return render_jinja_template([messages], chat_template=GUANACO_TEMPLATE,
                                     add_generation_prompt=add_generation_prompt)[0][0]
    template = ensure_template(tokenizer)
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of every assistant turn). A turn's span runs from the end of the prompt
    that opens it (render of the turns before it, with the generation prompt) to the end of the render that
    includes it, trailing whitespace left out, so it holds the answer and whatever the template closes it with
    (ChatML: <|im_end|>).

    Raises ValueError when the template does not render a conversation as the prefix of its continuation (then
    a prompt built for chatting would not match what was trained)."""
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[:i + 1])
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ValueError("the chat template does not render a conversation as the start of its continuation")
        start, end = len(prompt), len(upto.rstrip())  # whitespace closing a turn is not part of the answer
        spans.append((start, end))
    return text, spans


def stop_strings(tokenizer) -> list[str]:
    """Texts that begin the next user turn in the run's template ('### Human:' for Guanaco, '<|im_start|>user' for
    ChatML): generation stops there (and at EOS), and they are cut from the answer."""
    if tokenizer is None or is_guanaco(tokenizer) or not getattr(tokenizer, "chat_template", None):
        return [HUMAN]
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    try:
        before = render(tokenizer, turns)
        after = render(tokenizer, turns + [{"role": "user", "content": _MARK}])
    except Exception:  # a template that refuses this conversation: EOS alone stops generation
        return []
    if not after.startswith(before) or _MARK not in after:
        return []
    opening = after[len(before):after.index(_MARK)].strip()
    eos = getattr(tokenizer, "eos_token", None)
    if eos and opening.startswith(eos):  # the template closes the answer with EOS first: EOS stops it anyway
        opening = opening[len(eos):].strip()
    return [opening] if opening else []
