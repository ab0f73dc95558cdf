"""falcon-qlora's command line: `falcon-qlora COMMAND [args]`. Each command lives in its own module and owns its
arguments; this file only dispatches, so `falcon-qlora --help` starts without importing torch."""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, function, one-line description). Modules are imported only when their command runs.
COMMANDS = {
    "train": ("falcon_qlora.train", "cli", "QLoRA-train an adapter (the reference recipe by default)."),
    "demo": ("falcon_qlora.demo", "cli", "Offline demo: SmolLM2-135M learns a small task on the CPU in minutes."),
    "chat": ("falcon_qlora.chat", "cli", "Chat with a base model plus adapter (REPL or --prompt)."),
    "serve": ("falcon_qlora.serve", "cli", "Web chat (base vs adapter side by side) and an OpenAI-compatible API."),
    "eval": ("falcon_qlora.evaluate", "cli", "Eval loss, perplexity and token accuracy: base vs adapter."),
    "merge": ("falcon_qlora.merge", "cli", "Merge an adapter into a dequantized copy of the base."),
    "export": ("falcon_qlora.export", "cli", "Merge and write one GGUF file (llama.cpp, Ollama) plus a Modelfile."),
    "estimate": ("falcon_qlora.estimate", "cli", "GPU memory and disk a run will need, from the config alone."),
    "doctor": ("falcon_qlora.doctor", "cli", "Check GPU, bitsandbytes, versions, disk and hub access."),
}


class CommandParser(argparse.ArgumentParser):
    """The parser of every command that is not the run config itself (chat, eval, merge, ...): options are spelled
    with underscores as in the run config (`--max_new_tokens`), the hyphenated spelling is accepted too, and a bad
    option is one line (UserError) instead of argparse's usage dump."""

    def add_argument(self, *names, **kwargs):
        spelled = [n for n in names if n.startswith("--") and "_" in n]
        aliases = [n.replace("_", "-") for n in spelled if n.replace("_", "-") not in names]
        return super().add_argument(*names, *aliases, **kwargs)

    def error(self, message: str):
        from .errors import UserError
        raise UserError(f"{message} (see {self.prog} --help)")


def usage() -> str:
    lines = ["usage: falcon-qlora COMMAND [args]   (falcon-qlora COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<9} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"falcon-qlora: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from .errors import UserError
    try:
        code = getattr(importlib.import_module(module), func)(rest)
    except UserError as err:
        print(f"falcon-qlora {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"falcon-qlora {name}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
