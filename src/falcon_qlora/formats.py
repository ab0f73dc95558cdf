"""Row formats: which one a dataset is in (from its columns), what makes a row valid, and its conversation.

    text               {"text": "### Human: ... ### Assistant: ..."}         (Guanaco text, trained as it is)
    messages           {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    sharegpt           {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}
    alpaca             {"instruction": "...", "input": "...", "output": "..."}  (input optional)
    prompt_completion  {"prompt": "...", "completion": "..."}  (strings, or message lists as in TRL)

Every format except text becomes a list of {role, content} turns (system / user / assistant), which the run's chat
template renders (template.py). Only the fields a format reads are ever looked at, so other columns, whatever their
types, cannot break loading.
"""
from __future__ import annotations

from .template import ASSISTANT, HUMAN  # the Guanaco markers

FORMATS = ("text", "messages", "sharegpt", "alpaca", "prompt_completion")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class RowError(ValueError):
    """What is wrong with one row, naming the field (the caller adds the file and row number)."""


def detect(columns, text_field: str = "text") -> str | None:
    """The format a set of column names is in, or None. The text field wins, so Guanaco text loads as always."""
    cols = set(columns)
    if text_field in cols:
        return "text"
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    return None


def fields(fmt: str, text_field: str = "text") -> list[str]:
    """The columns a format reads; nothing else is kept."""
    return {"text": [text_field], "messages": ["messages"], "sharegpt": ["conversations"],
            "alpaca": ["instruction", "input", "output", "system"],
            "prompt_completion": ["prompt", "completion"]}[fmt]


def required(fmt: str, text_field: str = "text") -> list[str]:
    return {"alpaca": ["instruction", "output"], "prompt_completion": ["prompt", "completion"]}.get(
        fmt, fields(fmt, text_field))


def check_text(text, field: str = "text") -> str:
    """A Guanaco text row: a non-empty string with both markers."""
    if not isinstance(text, str):
        raise RowError(f"'{field}' is not a string")
    if not text.strip():
        raise RowError(f"'{field}' is empty")
    if HUMAN not in text:
        raise RowError(f"'{field}' has no '{HUMAN}' marker")
    if ASSISTANT not in text:
        raise RowError(f"'{field}' has no '{ASSISTANT}' marker")
    return text


def to_messages(row: dict, fmt: str) -> list[dict]:
    """The row's conversation as [{role, content}], checked; raises RowError naming the field and turn."""
    if fmt == "messages":
        turns = _turns(row.get("messages"), "messages", ("role", "content"), {r: r for r in ROLES})
    elif fmt == "sharegpt":
        turns = _turns(row.get("conversations"), "conversations", ("from", "value"), SHAREGPT_ROLES)
    elif fmt == "alpaca":
        turns = _alpaca(row)
    elif fmt == "prompt_completion":
        turns = _prompt_completion(row)
    else:
        raise ValueError(f"not a conversational format: {fmt}")
    return check_order(turns, "messages" if fmt == "prompt_completion" else _FIELD[fmt])


_FIELD = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction"}


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} is not a string (got {type(value).__name__})")
    if not value.strip():
        raise RowError(f"{what} is empty")
    return value.strip()  # every template then separates turns the same way


def _turns(value, field: str, keys: tuple[str, str], roles: dict, first: int = 1) -> list[dict]:
    role_key, content_key = keys
    if not isinstance(value, list):
        raise RowError(f"'{field}' is not a list of turns (got {type(value).__name__})")
    if not value:
        raise RowError(f"'{field}' is empty")
    out = []
    for n, turn in enumerate(value, first):
        where = f"'{field}' turn {n}"
        if not isinstance(turn, dict):
            raise RowError(f"{where} is not an object with '{role_key}' and '{content_key}'")
        if role_key not in turn:
            raise RowError(f"{where} has no '{role_key}'")
        role = turn[role_key]
        if not isinstance(role, str) or role not in roles:
            raise RowError(f"{where} has an unknown {role_key} {role!r} (use {', '.join(sorted(set(roles)))})")
        if content_key not in turn:
            raise RowError(f"{where} has no '{content_key}'")
        out.append({"role": roles[role], "content": _string(turn[content_key], f"{where} '{content_key}'")})
    return out


def check_order(turns: list[dict], field: str) -> list[dict]:
    """A system turn may come first only; then user and assistant alternate, starting with the user and ending
    with an answer: every template renders that, and the model learns to answer, not to ask."""
    offset = 1 if turns and turns[0]["role"] == "system" else 0
    for i in range(offset, len(turns)):
        want, role = ("user" if (i - offset) % 2 == 0 else "assistant"), turns[i]["role"]
        if role == "system":
            raise RowError(f"'{field}' turn {i + 1} is a system turn: only the first turn may be one")
        if role != want:
            raise RowError(f"'{field}' turn {i + 1} is '{role}' where '{want}' was expected (user and assistant "
                           "turns alternate, starting with the user)")
    body = turns[offset:]
    if not any(t["role"] == "assistant" for t in body):
        raise RowError(f"'{field}' has no assistant turn: nothing to learn from it")
    if body[-1]["role"] != "assistant":
        raise RowError(f"'{field}' ends with a user turn that nothing answers")
    return turns


def _alpaca(row: dict) -> list[dict]:
    instruction = _string(row.get("instruction"), "'instruction'")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError(f"'input' is not a string (got {type(extra).__name__})")
    user = instruction.strip() + ("\n\n" + extra.strip() if extra and extra.strip() else "")
    turns = [{"role": "user", "content": user},
             {"role": "assistant", "content": _string(row.get("output"), "'output'")}]
    system = row.get("system")
    if system is not None and not (isinstance(system, str) and not system.strip()):
        turns.insert(0, {"role": "system", "content": _string(system, "'system'")})
    return turns


def _prompt_completion(row: dict) -> list[dict]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list):
        turns = _turns(prompt, "prompt", ("role", "content"), {r: r for r in ROLES})
    else:
        turns = [{"role": "user", "content": _string(prompt, "'prompt'")}]
    if isinstance(completion, list):
        answer = _turns(completion, "completion", ("role", "content"), {r: r for r in ROLES})
        if any(t["role"] != "assistant" for t in answer):
            raise RowError("'completion' holds a turn that is not the assistant's")
        return turns + answer
    return turns + [{"role": "assistant", "content": _string(completion, "'completion'")}]


def guanaco_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns of a Guanaco text row: from the end of each '### Assistant:' to the
    end of the answer (the spaces before the next '### Human:' are not part of it, as in the Guanaco template)."""
    spans, pos = [], 0
    while (start := text.find(ASSISTANT, pos)) != -1:
        start += len(ASSISTANT)
        end = text.find(HUMAN, start)
        end = len(text) if end == -1 else end
        spans.append((start, len(text[:end].rstrip()) if text[start:end].strip() else start))
        pos = end
    return spans
