"""The chat template a GGUF carries, and the Ollama Modelfile written beside it.

    template, stops = chat_format(tok)
    text = modelfile("model.gguf", tok, template, stops)

llama.cpp reads the Jinja chat template stored in the GGUF; Ollama wants a Go template instead. The Go template is
derived by rendering the Jinja one on marker messages and cutting the result into per-role prefixes and suffixes,
so any template of the usual "prefix, content, suffix per turn" shape (Guanaco, ChatML, Llama 3, Zephyr...)
converts, and the result is checked by rendering both on a longer conversation.
"""
from __future__ import annotations

from .errors import UserError

_S, _U1, _A1, _U2 = "\x01SYS\x01", "\x01U1\x01", "\x01A1\x01", "\x01U2\x01"


def chat_format(tok) -> tuple[str, list[str]]:
    """(Jinja chat template, stop strings) of the model being exported: the run's template (template.py), which a
    trained adapter's tokenizer carries, else the model's own, else Guanaco."""
    from .template import ensure_template, stop_strings
    return ensure_template(tok), list(stop_strings(tok))


def _render(tok, template: str, messages: list[dict], generation: bool) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=generation)


def _strip_bos(tok, text: str) -> str:
    """A template's leading BOS, when the tokenizer adds BOS itself: llama.cpp and Ollama add it then too."""
    from .gguf_file import adds_bos
    return text[len(tok.bos_token):] if adds_bos(tok) and text.startswith(tok.bos_token) else text


def go_template(tok, template: str) -> tuple[str, str | None]:
    """(Ollama Go template, default system prompt or None), derived from the Jinja template by rendering."""
    u1, a1, u2 = ({"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                  {"role": "user", "content": _U2})
    try:
        full = _render(tok, template, [u1, a1, u2], True)
        one = _render(tok, template, [u1], False)
        two = _render(tok, template, [u1, a1], False)
        with_sys = _render(tok, template, [{"role": "system", "content": _S}, u1], False)
    except Exception as err:   # a template error is the template's, not ours: say which
        raise UserError(f"the chat template does not render ({str(err).splitlines()[0][:120]})") from None
    head, user_suffix = one.split(_U1)
    assistant_prefix = full.split(_U1)[1].split(_A1)[0].removeprefix(user_suffix)
    assistant_suffix = two.split(_A1)[1]
    user_prefix = full.split(_A1)[1].split(_U2)[0].removeprefix(assistant_suffix)
    generation = full.split(_U2)[1].removeprefix(user_suffix)
    head = _strip_bos(tok, head.removesuffix(user_prefix))
    sys_prefix = sys_suffix = default_system = None
    if _S in with_sys:
        sys_prefix, rest = with_sys.split(_S)
        sys_prefix = _strip_bos(tok, sys_prefix)
        sys_suffix = rest.split(_U1)[0].removesuffix(user_prefix)
        if head and head.startswith(sys_prefix) and head.endswith(sys_suffix):
            default_system, head = head[len(sys_prefix):len(head) - len(sys_suffix)], ""
    if head:
        raise UserError("the chat template adds text before the first turn that could not be placed in an Ollama "
                        "template; write the Modelfile's TEMPLATE by hand")
    system = f"{{{{ if .System }}}}{sys_prefix}{{{{ .System }}}}{sys_suffix}{{{{ end }}}}" if sys_prefix is not None else ""
    go = (f"{system}{{{{ range .Messages }}}}{{{{ if eq .Role \"user\" }}}}{user_prefix}{{{{ .Content }}}}{user_suffix}"
          f"{{{{ else if eq .Role \"assistant\" }}}}{assistant_prefix}{{{{ .Content }}}}{assistant_suffix}"
          f"{{{{ end }}}}{{{{ end }}}}{generation}")
    if "{{" in "".join((user_prefix, user_suffix, assistant_prefix, assistant_suffix, generation)) or '"""' in go:
        raise UserError("the chat template's text contains '{{' or '\"\"\"', which an Ollama TEMPLATE cannot hold")
    _check(tok, template, go, default_system)
    return go, default_system


def render_go(go: str, messages: list[dict], system: str | None) -> str:
    """The Go template filled in for these messages: only the constructs go_template writes (the check's reader)."""
    import re
    sys_block = re.match(r"\{\{ if \.System \}\}(.*?)\{\{ \.System \}\}(.*?)\{\{ end \}\}", go, re.S)
    out, rest = "", go
    if sys_block:
        rest = go[sys_block.end():]
        if system:
            out += sys_block.group(1) + system + sys_block.group(2)
    m = re.match(r"\{\{ range \.Messages \}\}\{\{ if eq \.Role \"user\" \}\}(.*?)\{\{ \.Content \}\}(.*?)"
                 r"\{\{ else if eq \.Role \"assistant\" \}\}(.*?)\{\{ \.Content \}\}(.*?)\{\{ end \}\}\{\{ end \}\}(.*)",
                 rest, re.S)
    up, us, ap, asuf, gen = m.groups()
    for msg in messages:
        if msg["role"] == "user":
            out += up + msg["content"] + us
        elif msg["role"] == "assistant":
            out += ap + msg["content"] + asuf
    return out + gen


def _check(tok, template: str, go: str, default_system: str | None) -> None:
    convo = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "Thanks"}]
    want = _strip_bos(tok, _render(tok, template, convo, True))
    if render_go(go, convo, default_system) != want:
        raise UserError("the chat template is not a plain per-turn template, so no Ollama TEMPLATE could be derived "
                        "from it; write the Modelfile's TEMPLATE by hand")


def sampling_defaults() -> dict:
    """`falcon-qlora chat --sample`'s temperature, top_p and top_k (chat.generate owns them)."""
    import inspect
    from .chat import generate
    params = inspect.signature(generate).parameters
    return {k: params[k].default for k in ("temperature", "top_p", "top_k")}


def modelfile(gguf_name: str, tok, template: str, stops: list[str]) -> str:
    """Text of an Ollama Modelfile for the GGUF file `gguf_name` (relative to the Modelfile's folder)."""
    go, system = go_template(tok, template)
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{go}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines.append("")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in sampling_defaults().items()]
    return "\n".join(lines) + "\n"
