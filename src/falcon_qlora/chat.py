"""Chat with a trained adapter, prompting through the chat template it was trained with (saved with its tokenizer).

    falcon-qlora chat --adapter results/final                     # multi-turn REPL (/reset, /exit)
    falcon-qlora chat --adapter results/final --prompt "Hi!"      # one shot
    falcon-qlora chat --adapter results/final --system "Answer in one sentence."
    falcon-qlora chat --adapter results/final --sample --temperature 0.7 --top_p 0.9
    from falcon_qlora.chat import build_prompt, generate; generate(model, tok, [build_prompt([], "Hi", tok)])

The base model is the one named in the adapter's run_config.yaml (or adapter_config.json) unless --base is given;
it loads in 4-bit like in training (--bf16: unquantized bf16). Greedy decoding unless --sample. Generation stops
at EOS or where the model starts the next "### Human:" turn, which is cut from the answer.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from . import template
from .errors import UserError
from .template import ASSISTANT, HUMAN  # the Guanaco markers


def build_prompt(history: list[tuple[str, str]], message: str, tokenizer=None, system: str | None = None) -> str:
    """An optional system prompt, earlier (question, answer) turns, then the new question and an open assistant
    turn, rendered in the run's chat template (the one saved with the adapter's tokenizer; None: Guanaco), so the
    prompt is the training rendering of the same conversation up to the answer."""
    from .template import render
    messages = [{"role": "system", "content": system.strip()}] if system else []
    for q, a in history:
        messages += [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}]
    messages.append({"role": "user", "content": message.strip()})  # contents stripped, as in training rows
    return render(tokenizer, messages, add_generation_prompt=True)


def cut_at_stop(text: str, stops: list[str] = (HUMAN,)) -> str:
    """The answer up to the first stop string (where the model began the next user turn)."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text.strip()


def settled(text: str, stops: list[str]) -> tuple[str, bool]:
    """(the part of a growing answer that is final, whether a stop string ended it): the text up to the first stop
    string; without one, short of a tail that may still grow into one (a partial "### Hu") and of a character split
    across tokens. Whitespace at either end waits. Streaming in chat and serve shows exactly this."""
    if any(stop in text for stop in stops):
        return cut_at_stop(text, stops), True
    end = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-k:]):
                end = min(end, len(text) - k)
                break
    safe = text[:end].strip()
    return (safe[:-1] if safe.endswith("\ufffd") else safe), False


class SettledStreamer:
    """A streamer for model.generate that passes on only the settled part of the growing answer (`settled`) to
    `show`: chat prints it, serve sends it as events."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, list(stops)
        self.ids, self.skip_prompt, self.stopped = [], True, False

    def put(self, value):
        if self.skip_prompt:  # generate() first hands over the prompt
            self.skip_prompt = False
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text, self.stopped = settled(self.tok.decode(self.ids, skip_special_tokens=True), self.stops)
        self.show(text)

    def end(self):
        if not self.stopped:  # no stop string came: the whole answer, the held-back tail included
            self.show(cut_at_stop(self.tok.decode(self.ids, skip_special_tokens=True), self.stops))

    def show(self, text: str) -> None:
        raise NotImplementedError


class _StopAwareStreamer(SettledStreamer):
    """Prints tokens as they come, holding back any tail that could be the start of a stop string."""

    def __init__(self, tokenizer, stops: list[str], out=None):
        super().__init__(tokenizer, stops)
        self.out, self.shown = out or sys.stdout, 0

    def show(self, text: str) -> None:
        if len(text) > self.shown:
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)

    def end(self):
        super().end()
        self.out.write("\n")
        self.out.flush()


def stop_on_text(tokenizer, stops: list[str], prompt_length: int):
    """A stopping criterion that ends each row once its new text contains one of `stops`. transformers' own
    `stop_strings` maps stop strings onto token pieces and raises on some tokenizers (word-level ones); decoding
    the new tokens works for any tokenizer, and an answer is short enough that decoding it each step is cheap."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_length:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts], dtype=torch.bool,
                                device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, repetition_penalty: float = 1.0,
             stream: bool = False, **generate_kwargs) -> list[str]:
    """Answers for a batch of prompts (padded on the left, so every row's next token follows its own prompt).
    Stops at EOS or where the run's chat template begins the next user turn ("### Human:"); returns only the new
    text. stream=True prints one prompt's answer as it is generated. generate_kwargs go to model.generate as they
    are."""
    return [a.text for a in answers(model, tokenizer, prompts, max_new_tokens, do_sample, temperature, top_p, top_k,
                                    repetition_penalty, stream, **generate_kwargs)]


@dataclass
class Answer:
    text: str           # the new text, cut at the first stop string
    ended_at_eos: bool  # EOS is among the new tokens (the token generate() pads a finished row with, too)


def answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, do_sample: bool = False,
            temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, repetition_penalty: float = 1.0,
            stream: bool = False, **generate_kwargs) -> list[Answer]:
    """generate(), also saying of each answer whether the model ended it with EOS."""
    import torch
    if stream and len(prompts) != 1:
        raise ValueError("stream=True works with one prompt at a time")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(p.device for p in model.parameters())
    enc = {k: v.to(device) for k, v in enc.items()}
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    stops = template.stop_strings(tokenizer)  # the run's next user turn: "### Human:" for Guanaco
    streamer = _StopAwareStreamer(tokenizer, stops) if stream else None
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             repetition_penalty=repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, streamer=streamer, use_cache=True,
                             stopping_criteria=stop_on_text(tokenizer, stops, enc["input_ids"].shape[1]),
                             **sampling, **generate_kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return [Answer(cut_at_stop(text, stops), tokenizer.eos_token_id in row)
            for text, row in zip(tokenizer.batch_decode(new, skip_special_tokens=True), new.tolist())]


def load_chat_model(adapter: str | None, base: str | None = None, bf16: bool = False):
    """(model, tokenizer) for chatting: base + adapter, or the base alone when no adapter is given."""
    from .config import load_config
    from .model import load_adapter_model, load_base_model, load_tokenizer
    from .rundir import load_run_config
    if adapter is None:
        if base is None:
            raise UserError("give --adapter DIR (a folder written by `falcon-qlora train`) or --base MODEL")
        cfg = load_config(None, model_name_or_path=base, **({"compute_dtype": "bf16"} if bf16 else {}))
        model = load_base_model(cfg, load_in_4bit=not bf16)
        tok = load_tokenizer(base, cfg)
    else:
        cfg = load_run_config(adapter, **({"compute_dtype": "bf16"} if bf16 else {}))
        model, tok, _ = load_adapter_model(adapter, base=base, load_in_4bit=not bf16, cfg=cfg)
    model.eval()
    model.config.use_cache = True
    return model, tok


def repl(model, tok, gen_kwargs: dict, inp=input, max_context: int | None = None, system: str | None = None) -> None:
    """Multi-turn chat on the terminal. /reset forgets the conversation, /exit (or Ctrl-D) leaves."""
    history: list[tuple[str, str]] = []
    limit = max_context or getattr(model.config, "max_position_embeddings", None) or 2048
    print("falcon-qlora chat: type a message; /reset forgets the conversation, /exit leaves.")
    while True:
        try:
            msg = inp(f"{HUMAN} ").strip()
        except EOFError:
            print()
            return
        if msg in ("/exit", "/quit"):
            return
        if msg == "/reset":
            history.clear()
            continue
        if not msg:
            continue
        while history and len(tok(build_prompt(history, msg, tok, system))["input_ids"]) + \
                gen_kwargs["max_new_tokens"] > limit:
            history.pop(0)  # forget the oldest turn rather than overflow the model's context
        print(f"{ASSISTANT} ", end="", flush=True)
        [answer] = generate(model, tok, [build_prompt(history, msg, tok, system)], stream=True, **gen_kwargs)
        history.append((msg, answer))


def cli(argv: list[str]) -> int:
    from .cli import CommandParser
    p = CommandParser(prog="falcon-qlora chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", help="adapter folder written by `falcon-qlora train` (e.g. results/final)")
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--prompt", help="answer this one message and exit (no REPL)")
    p.add_argument("--system", help="system prompt put before the conversation (as the chat template renders one)")
    p.add_argument("--bf16", action="store_true", help="load the base unquantized in bf16 instead of 4-bit")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    a = p.parse_args(argv)
    if a.sample and a.temperature <= 0:
        raise UserError(f"--temperature {a.temperature} must be > 0 with --sample (or drop --sample for greedy)")
    import torch
    torch.manual_seed(a.seed)
    model, tok = load_chat_model(a.adapter, a.base, a.bf16)
    kw = dict(max_new_tokens=a.max_new_tokens, do_sample=a.sample, temperature=a.temperature, top_p=a.top_p,
              top_k=a.top_k, repetition_penalty=a.repetition_penalty)
    if a.prompt is not None:
        print(f"{ASSISTANT} ", end="", flush=True)
        generate(model, tok, [build_prompt([], a.prompt, tok, a.system)], stream=True, **kw)
        return 0
    repl(model, tok, kw, system=a.system)
    return 0
