"""Held-out loss, perplexity and mean token accuracy of the base model and of base + adapter, side by side.

    falcon-qlora eval --adapter results/final                       # the run's own held-out split
    falcon-qlora eval --adapter results/final --data my.jsonl --max_rows 200 --batch_size 4 --max_length 512
    from falcon_qlora.evaluate import evaluate; evaluate("results/final")          # -> {"base": {...}, ...}

One 4-bit base is loaded; the base rows are computed with the adapter switched off. Batch size and length are the
eval's own (default: at most 8 rows of at most the training max_length), so evaluation never needs more memory
than a training step. Loss is the mean over all predicted tokens of the whole text (as trained), EOS included.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import UserError

MAX_EVAL_BATCH = 8


def _batches(texts: list[str], tok, batch_size: int, max_length: int):
    """Tokenized batches (EOS appended like TRL does), right-padded, labels -100 on padding."""
    import torch
    for i in range(0, len(texts), batch_size):
        ids = [tok(t + tok.eos_token, add_special_tokens=False)["input_ids"][:max_length]
               for t in texts[i:i + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tok.pad_token_id)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        yield input_ids, mask


def score(model, tok, texts: list[str], batch_size: int = MAX_EVAL_BATCH, max_length: int = 512) -> dict:
    """Token-weighted mean negative log-likelihood, its exp (perplexity) and top-1 accuracy of next tokens."""
    import torch
    device = next(p.device for p in model.parameters())
    nll, correct, count = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for input_ids, mask in _batches(texts, tok, batch_size, max_length):
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target, valid = input_ids[:, 1:], mask[:, 1:].bool()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll -= logp[valid].sum().item()
            correct += (logits.argmax(-1) == target)[valid].sum().item()
            count += valid.sum().item()
            del logits, logp
    loss = nll / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "mean_token_accuracy": correct / max(count, 1),
            "tokens": count, "rows": len(texts)}


def evaluate(adapter: str | Path, data: str | None = None, split: str | None = None, max_rows: int | None = None,
             batch_size: int | None = None, max_length: int | None = None, base: str | None = None) -> dict:
    """Score the held-out split for the base and for base + adapter. Defaults come from the run config saved
    with the adapter (its dataset and eval split)."""
    from . import data as D
    from .model import load_adapter_model
    model, tok, cfg = load_adapter_model(adapter, base=base)
    overrides = {"train_split": split or cfg.eval_split or "test", "eval_split": None, "eval_steps": None}
    if data is not None:
        overrides["dataset_name"] = data
    if max_rows is not None:
        overrides["max_train_rows"] = max_rows
    eval_cfg = type(cfg)(**{**cfg.__dict__, **overrides})
    try:  # the held-out split is loaded (and validated) through the same code as training data
        ds, _ = D.load_dataset_splits(eval_cfg, tokenizer=tok)  # rendered in the template saved with the adapter
    except UserError as err:
        raise UserError(f"no held-out data to evaluate on: {err}") from None
    texts = list(ds[cfg.dataset_text_field])
    bs = batch_size or min(cfg.per_device_eval_batch_size, MAX_EVAL_BATCH)
    length = max_length or cfg.max_length
    with model.disable_adapter():
        base_scores = score(model, tok, texts, bs, length)
    result = {"base": base_scores, "adapter": score(model, tok, texts, bs, length),
              "data": eval_cfg.dataset_name, "split": eval_cfg.train_split, "batch_size": bs, "max_length": length,
              "adapter_dir": str(adapter), "base_model": cfg.model_name_or_path}
    return result


def render(result: dict) -> str:
    lines = [f"held-out: {result['data']} [{result['split']}], {result['adapter']['rows']} rows, "
             f"{result['adapter']['tokens']:,} tokens (batch {result['batch_size']}, max_length {result['max_length']})",
             f"{'':10}{'loss':>10}{'perplexity':>14}{'token accuracy':>17}"]
    for name in ("base", "adapter"):
        r = result[name]
        lines.append(f"{name:10}{r['loss']:>10.4f}{r['perplexity']:>14.2f}{r['mean_token_accuracy']:>17.4f}")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    from .cli import CommandParser
    p = CommandParser(prog="falcon-qlora eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="adapter folder written by `falcon-qlora train`")
    p.add_argument("--data", help="dataset name, file or folder (default: the run's dataset)")
    p.add_argument("--split", help="split to score (default: the run's eval_split)")
    p.add_argument("--max_rows", type=int, help="score only the first N rows")
    p.add_argument("--batch_size", type=int, help=f"rows per forward (default: eval batch, at most {MAX_EVAL_BATCH})")
    p.add_argument("--max_length", type=int, help="truncate rows to N tokens (default: the run's max_length)")
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--out", help="JSON file to write (default: <adapter>/eval.json)")
    a = p.parse_args(argv)
    for name in ("max_rows", "batch_size", "max_length"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer")
    result = evaluate(a.adapter, a.data, a.split, a.max_rows, a.batch_size, a.max_length, a.base)
    from .rundir import RunDir
    out = Path(a.out) if a.out else RunDir(a.adapter).eval
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(render(result))
    print(f"written to {out}")
    return 0
