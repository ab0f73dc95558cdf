"""The offline demo: SmolLM2-135M in 4-bit NF4 + LoRA learns the embedded contact-card task on a CPU in minutes.

    falcon-qlora demo                          # the whole story: loss before/after, generations, plot, adapter
    falcon-qlora demo --max_steps 20           # any config key can be overridden, as with `train`
    python -c "from falcon_qlora.demo import run_demo; print(run_demo().summary())"

Nothing here trains differently from `falcon-qlora train --config demo`: the demo only measures the same model
before and after, on the held-out split, with the stages' own code: held-out loss from evaluate.score (the text +
EOS the trainer sees), answers from chat.answers (chat's stop rules), the figure from train.plot_losses, written
beside the run's loss.png as demo_loss.png.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .data import SPANS
from .errors import UserError

N_SHOWN = 3            # held-out answers printed before and after (all held-out prompts are generated and scored)
MAX_NEW_TOKENS = 48    # an answer card is ~30 tokens; the limit only matters if the model does not stop
MIN_DROP = 0.20        # the held-out loss must fall at least this much (it falls ~79% with the demo preset)


@dataclass
class Generation:
    prompt: str
    expected: str
    text: str
    ended_at_eos: bool
    correct: bool


@dataclass
class DemoResult:
    eval_loss_before: float
    eval_loss_after: float
    generations_before: list[Generation]
    generations_after: list[Generation]
    loss_plot: Path
    adapter_dir: Path
    seconds: float
    train_metrics: dict = field(default_factory=dict)
    linear4bit: int = 0

    @property
    def relative_drop(self) -> float:
        return 1 - self.eval_loss_after / self.eval_loss_before

    def failure(self) -> str | None:
        """None when the demo learned what the README promises (held-out loss at least MIN_DROP lower, more cards
        right than before); otherwise one honest line saying what did not happen and where to look."""
        b, a = self.eval_loss_before, self.eval_loss_after
        before, after = (sum(g.correct for g in gs) for gs in (self.generations_before, self.generations_after))
        if a >= b:
            what = f"held-out loss rose from {b:.2f} to {a:.2f}: training diverged"
        elif self.relative_drop < MIN_DROP:
            what = f"held-out loss fell only {100 * self.relative_drop:.0f}% ({b:.2f} -> {a:.2f}; at least " \
                   f"{100 * MIN_DROP:.0f}% expected)"
        elif after <= before:
            what = f"cards exactly right did not improve ({before} -> {after} of {len(self.generations_after)})"
        else:
            return None
        return (f"{what}. Likely causes: wrong 4-bit kernels on this machine, a changed preset (learning_rate, "
                "max_steps) or library versions; run falcon-qlora doctor")

    def summary(self) -> dict:
        return {"eval_loss_before": round(self.eval_loss_before, 4), "eval_loss_after": round(self.eval_loss_after, 4),
                "relative_drop": round(self.relative_drop, 4),
                "correct_before": sum(g.correct for g in self.generations_before),
                "correct_after": sum(g.correct for g in self.generations_after),
                "ended_at_eos_before": sum(g.ended_at_eos for g in self.generations_before),
                "ended_at_eos_after": sum(g.ended_at_eos for g in self.generations_after),
                "heldout_rows": len(self.generations_after), "loss_plot": str(self.loss_plot),
                "adapter_dir": str(self.adapter_dir), "linear4bit_layers": self.linear4bit,
                "seconds": round(self.seconds, 1)}


def split_row(text: str, span: tuple[int, int]) -> tuple[str, str]:
    """A held-out row as trained -> (prompt, expected answer). The prompt is the row up to where its answer starts
    (span: the answer's characters, from the data stage), the prompt chat builds through the run's template."""
    start, end = span
    return text[:start], text[start:end].strip()


def heldout_pairs(cfg=None, tok=None) -> list[tuple[str, str]]:
    """The demo's held-out rows as (prompt, expected answer), split as the demo asks and scores them (the
    benchmarks that replay the demo's questions elsewhere use this too)."""
    from .config import load_config
    from .data import load_dataset_splits
    cfg = cfg or load_config("demo")
    _, held = load_dataset_splits(cfg, tokenizer=tok)
    return [split_row(t, spans[-1]) for t, spans in zip(held[cfg.dataset_text_field], held[SPANS])]


def heldout_loss(model, tok, texts: list[str], batch_size: int, max_length: int) -> float:
    """Mean token cross-entropy over text + EOS, the sequence the trainer learns: `falcon-qlora eval`'s loss."""
    from .evaluate import score
    return score(model, tok, texts, batch_size, max_length)["loss"]


def generate(model, tok, texts: list[str], spans: list[tuple[int, int]]) -> list[Generation]:
    """Greedy answers to held-out prompts through chat's generation, in one left-padded batch (on a CPU each
    step's cost is mostly dequantizing the 4-bit weights, shared by the whole batch)."""
    from .chat import answers
    prompts, expected = zip(*(split_row(t, s) for t, s in zip(texts, spans)))
    model.eval()
    return [Generation(prompt, want, a.text, a.ended_at_eos, _same_card(a.text, want))
            for prompt, want, a in zip(prompts, expected, answers(model, tok, list(prompts), MAX_NEW_TOKENS))]


def _same_card(answer: str, expected: str) -> bool:
    try:
        return json.loads(answer) == json.loads(expected)
    except ValueError:
        return False


def run_demo(cfg=None, n_shown: int = N_SHOWN, verbose: bool = True, **overrides) -> DemoResult:
    """Load SmolLM2 (4-bit) + LoRA, measure held-out loss and generations, train with the demo preset, measure
    again. cfg defaults to the demo preset plus overrides. Returns the numbers; prints them as it goes."""
    from .config import load_config
    from .data import load_dataset_splits
    from .model import attach_lora, count_linear4bit, load_base_model, load_tokenizer
    from .train import train
    start = time.time()

    def say(msg: str) -> None:
        if verbose:
            print(f"[demo {time.time() - start:4.0f}s] {msg}", flush=True)

    cfg = cfg or load_config("demo", **overrides)
    tok = load_tokenizer(cfg.model_name_or_path, cfg)
    train_ds, eval_ds = load_dataset_splits(cfg, tokenizer=tok)   # sets the run's chat template on tok
    texts = list(eval_ds[cfg.dataset_text_field])
    answers = [spans[-1] for spans in eval_ds[SPANS]]   # each row's last answer: what generation must produce
    model = attach_lora(load_base_model(cfg), cfg)   # LoRA starts as a no-op (B = 0): this is still the base
    n4 = count_linear4bit(model)
    say(f"{cfg.model_name_or_path} loaded: {n4} linear layers in 4-bit NF4, LoRA r={cfg.lora_r} on them")
    before = heldout_loss(model, tok, texts, cfg.per_device_eval_batch_size, cfg.max_length)
    say(f"held-out loss before training: {before:.3f} ({len(texts)} rows)")
    gens_before = generate(model, tok, texts, answers)   # all held-out prompts: a batch costs about what a row does
    say(f"held-out cards exactly right before training: {_score(gens_before)}")
    _show("before", gens_before[:n_shown], say)
    # The held-out split is measured here, before and after; not again by the trainer (once is enough on a CPU).
    result = train(cfg, model=model, tokenizer=tok, train_dataset=train_ds, eval_dataset=None)
    after = heldout_loss(model, tok, texts, cfg.per_device_eval_batch_size, cfg.max_length)
    gens_after = generate(model, tok, texts, answers)
    _show("after", gens_after[:n_shown], say)
    plot = plot_losses(result.output_dir, result.log_history, before, after)
    demo = DemoResult(before, after, gens_before, gens_after, plot.resolve(), result.final_dir.resolve(),
                      time.time() - start, result.metrics, n4)
    change = f"{100 * demo.relative_drop:.0f}% lower" if after < before else f"{100 * (after / before - 1):.0f}% HIGHER"
    say(f"held-out loss: {before:.3f} before -> {after:.3f} after training ({change})")
    say(f"held-out cards exactly right: {_score(gens_before)} before -> {_score(gens_after)} after; answers that "
        f"stopped at EOS: {sum(g.ended_at_eos for g in gens_before)} -> {sum(g.ended_at_eos for g in gens_after)}")
    say(f"loss curve: {demo.loss_plot}")
    say(f"adapter: {demo.adapter_dir}   (try it: falcon-qlora chat --adapter {demo.adapter_dir}; run it in llama.cpp "
        f"or Ollama: falcon-qlora export --adapter {demo.adapter_dir} --out demo.gguf --quant q8_0)")
    return demo


def plot_losses(out: Path, log_history: list, before: float, after: float) -> Path:
    """train's loss figure plus the held-out loss measured before and after (two points, not a curve), into the
    run's demo_loss.png: the run's own loss.png stays the one train wrote."""
    from .rundir import RunDir
    from .train import plot_losses as plot
    return plot(RunDir(out).demo_plot, log_history, (before, after), "demo: 4-bit NF4 base + LoRA")


def _score(gens: list[Generation]) -> str:
    return f"{sum(g.correct for g in gens)}/{len(gens)}"


def _show(when: str, gens: list[Generation], say) -> None:
    for g in gens:
        stop = "stopped at EOS" if g.ended_at_eos else f"hit the {MAX_NEW_TOKENS}-token limit"
        mark = "correct card" if g.correct else "not the expected card"
        say(f"{when}: {g.prompt}\n  -> {g.text}\n     ({stop}; {mark})")


def cli(argv: list[str]) -> int:
    """`falcon-qlora demo [--key value ...]`: the demo preset, overridable like `train`; prints a JSON summary last."""
    import warnings
    from .config import parse_args
    if {"-h", "--help"} & set(argv):
        print("falcon-qlora demo: train the demo preset (SmolLM2-135M, 4-bit, contact-card task) and show held-out "
              "loss, answers before/after, the loss plot and the adapter. --export_gguf PATH also writes the adapter "
              "merged as a q8_0 GGUF (llama.cpp, Ollama). It takes every option of train:\n")
    gguf_out = None
    if "--export_gguf" in argv:
        i = argv.index("--export_gguf")
        if i + 1 >= len(argv):
            raise UserError("--export_gguf needs a path, e.g. --export_gguf demo.gguf")
        gguf_out, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    cfg = parse_args(["--config", "demo", *argv], prog="falcon-qlora demo")
    # Deprecation notices from the libraries mean nothing to someone trying the tool for the first time.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    demo = run_demo(cfg)
    print(json.dumps(demo.summary()))
    failed = demo.failure()
    if failed:
        print(f"falcon-qlora demo: failed: {failed}", file=sys.stderr)
        return 1
    if gguf_out:
        from .export import export
        export(demo.adapter_dir, gguf_out, quant="q8_0", force=cfg.overwrite)
    return 0
