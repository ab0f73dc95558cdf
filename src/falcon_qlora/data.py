"""Data stage: load rows in any supported format, validate them before any model is loaded, render them in the
run's chat template, summarize their lengths.

Sources: a hub dataset name, a local file (jsonl, json, parquet, csv), a folder of `<split>.<ext>` files, a built-in
alias, an in-memory `datasets.Dataset` / `DatasetDict`, or a list of these (mixed with the run's seed). Row formats
(formats.py): Guanaco text, messages, ShareGPT, Alpaca, prompt/completion, detected from the columns. Bad rows stop
the run with their row numbers and the field (or are dropped on request).

What comes out has two columns: the text as trained (`dataset_text_field`) and `completion_spans`, the character
spans of the assistant turns (the only tokens completion_only_loss trains on).
A check of the rows goes here: it runs before training, like guards.py's checks of the machine and output dir.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Callable

from . import demo_data, formats
from .config import RunConfig, parse_source
from .errors import UserError
from .formats import ASSISTANT, HUMAN  # noqa: F401  (the Guanaco markers, re-exported)

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPANS = "completion_spans"
# Built-in dataset names -> a function returning a local file or folder (filled in by the modules that own them).
DATASET_ALIASES: dict[str, Callable[[], str]] = {"demo-guanaco": demo_data.dataset_path}
MAX_PROBLEMS = 4  # kinds of problems named in one error line


def _read_json_rows(path: Path) -> list[dict]:
    """jsonl or a JSON array, with errors that give the line; a BOM and CRLF line ends are accepted."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not valid UTF-8 (byte {err.start}); re-save the file as UTF-8") \
            from None
    if not text.strip():
        raise UserError(f"{path} is empty: it needs one JSON object per line with a text field")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON at line {err.lineno}: {err.msg}") from None
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}: line {i} is not JSON ({err.msg}); each line must be one JSON "
                                    "object such as {\"text\": \"### Human: ... ### Assistant: ...\"}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: every row must be a JSON object with a text field")
    return rows


@dataclass
class Part:
    """Rows of one source and split, validated: {"text": str} (text format) or {"messages": [...]} each."""
    label: str
    fmt: str
    records: list = dc_field(default_factory=list)
    prepared: object = None  # a dataset load_dataset_splits already returned (rendered), passed through as it is


def _read_file(path: Path):
    """JSON -> a list of row dicts (nothing reaches Arrow before validation); parquet/csv -> a Dataset."""
    from datasets import Dataset
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FILE_TYPES)}")
    if kind == "json":
        return _read_json_rows(path)
    try:
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty")
        return Dataset.from_parquet(str(path)) if kind == "parquet" else Dataset.from_csv(str(path))
    except UserError:
        raise
    except Exception as err:  # pyarrow/pandas parse errors
        raise UserError(f"{path}: cannot read as {kind}: {str(err).splitlines()[0][:200]}") from None


def _local_splits(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"train": path}
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_TYPES)
    if not files:
        raise UserError(f"{path} holds no data files; put train.jsonl (and test.jsonl) there")
    return {p.stem: p for p in files}


def _pick(splits: dict, name: str, source: str):
    if name not in splits:
        raise UserError(f"dataset {source} has no split '{name}' (it has: {', '.join(splits)}); "
                        "set train_split / eval_split")
    return splits[name]


def _load_hub(name: str):
    import datasets
    try:
        return datasets.load_dataset(name)
    except Exception as err:
        raise UserError(f"cannot load dataset '{name}' from the hub ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160]}); pass a local file or folder as dataset_name") from None


def _source_splits(name: str, cfg: RunConfig):
    """(train rows, held-out rows or None) of one named source, as files/hub give them."""
    from .config import RunConfig as Defaults
    name = DATASET_ALIASES[name]() if name in DATASET_ALIASES else name
    path = Path(name)
    if path.is_file():
        if cfg.eval_split and cfg.eval_split != Defaults.__dataclass_fields__["eval_split"].default:
            raise UserError(f"eval_split={cfg.eval_split}: {name} is a single file, so it has no such split; put "
                            f"train and {cfg.eval_split} files in a folder, or set eval_split=None")
        if cfg.eval_split and _main():
            print(f"{name} is a single file, so there is no held-out split: training without evaluation")
        return name, _read_file(path), None
    if path.exists():
        files = _local_splits(path)
        held = _read_file(_pick(files, cfg.eval_split, name)) if cfg.eval_split else None
        return name, _read_file(_pick(files, cfg.train_split, name)), held
    if name.startswith((".", "/", "~")) or Path(name).suffix in FILE_TYPES:
        raise UserError(f"dataset file {name} does not exist: check dataset_name")
    splits = _load_hub(name)
    held = _pick(splits, cfg.eval_split, name) if cfg.eval_split else None
    return name, _pick(splits, cfg.train_split, name), held


def _cap(rows, n):
    if n is None:
        return rows
    return rows[:n] if isinstance(rows, list) else rows.select(range(min(n, len(rows))))


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(str(r + 1) for r in rows[:5])
    return shown + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def _part(rows, fmt: str, cfg: RunConfig, label: str, max_rows: int | None = None) -> Part:
    """Detect the format (unless given), keep only its fields, check every row. Bad rows stop the run, named by
    their numbers counted from 1, unless drop_invalid_rows is set."""
    from datasets import Dataset
    text_field = cfg.dataset_text_field
    if isinstance(rows, Dataset) and SPANS in rows.column_names:  # already rendered by load_dataset_splits
        return Part(label, "prepared", prepared=_cap(rows, max_rows))
    columns = rows.column_names if isinstance(rows, Dataset) else list(dict.fromkeys(k for r in rows for k in r))
    fmt = fmt if fmt != "auto" else formats.detect(columns, text_field)
    if fmt is None:
        raise UserError(f"{label}: no '{text_field}' column (columns: {', '.join(columns) or 'none'}); set "
                        "dataset_text_field to the column holding the conversation, or use one of the formats "
                        "messages, conversations (ShareGPT), instruction/output (Alpaca), prompt/completion")
    missing = [c for c in formats.required(fmt, text_field) if c not in columns]
    if missing:
        raise UserError(f"{label}: format {fmt} needs the column '{missing[0]}' (columns: "
                        f"{', '.join(columns) or 'none'}); set dataset_format to the format the file is in")
    wanted = [c for c in formats.fields(fmt, text_field) if c in columns]
    rows = _cap(rows, max_rows)
    if isinstance(rows, Dataset):
        rows = rows.select_columns(wanted).to_list()
    if not rows:
        raise UserError(f"{label} has no rows")
    problems: dict[str, list[int]] = {}
    records = []
    for i, row in enumerate(rows):
        try:
            absent = [c for c in formats.required(fmt, text_field) if c not in row]
            if absent:
                raise formats.RowError(f"no '{absent[0]}' field")
            records.append({"text": formats.check_text(row[text_field], text_field)} if fmt == "text" else
                           {"messages": formats.to_messages(row, fmt)})
        except formats.RowError as err:
            problems.setdefault(str(err), []).append(i)
    _report(problems, len(rows), cfg, label)
    return Part(label, fmt, records)


def _report(problems: dict, n: int, cfg: RunConfig, label: str) -> None:
    bad = sum(len(v) for v in problems.values())
    if bad and not cfg.drop_invalid_rows:
        shown = list(problems.items())[:MAX_PROBLEMS]
        what = "; ".join(f"rows {_rows_text(rows)}: {msg}" for msg, rows in shown)
        more = f"; and {len(problems) - len(shown)} more kinds of problem" if len(problems) > len(shown) else ""
        raise UserError(f"{label}: {what}{more}. Fix these rows, or set drop_invalid_rows=true to drop them")
    if bad:
        print(f"{label}: dropped {bad} invalid rows of {n}")
        if bad == n:
            raise UserError(f"{label}: no valid rows left after dropping {bad}")


def _load_parts(cfg: RunConfig, train_dataset, eval_dataset) -> tuple[list[Part], list[Part]]:
    from datasets import DatasetDict
    if isinstance(train_dataset, DatasetDict):
        train_dataset, eval_dataset = (_pick(train_dataset, cfg.train_split, "in memory"),
                                       train_dataset.get(cfg.eval_split) if cfg.eval_split else None)
    fmt = cfg.dataset_format
    if train_dataset is not None:
        train = [_part(train_dataset, fmt, cfg, f"in-memory dataset [{cfg.train_split}]")]
        held = [_part(eval_dataset, fmt, cfg, f"in-memory dataset [{cfg.eval_split}]")] if eval_dataset else []
        return train, held
    train, held = [], []
    for spec in (cfg.dataset_name if isinstance(cfg.dataset_name, list) else [cfg.dataset_name]):
        src = parse_source(spec, cfg.dataset_format)
        name, rows, held_rows = _source_splits(src["name"], cfg)
        train.append(_part(rows, src["format"], cfg, f"{name} [{cfg.train_split}]", src["max_rows"]))
        if held_rows is not None:
            held.append(_part(held_rows, src["format"], cfg, f"{name} [{cfg.eval_split}]"))
    return train, held


def choose_template(tokenizer, fmts) -> None:
    """One chat template per run. Guanaco text rows are already rendered, so a run that has any keeps the Guanaco
    template; otherwise the tokenizer's own template, or the Guanaco one where it has none (template.py)."""
    from . import template
    if tokenizer is None:
        return
    if "text" in fmts:
        if getattr(tokenizer, "chat_template", None) and not template.is_guanaco(tokenizer):
            print("rows in Guanaco text format: this run prompts in the Guanaco format, not the tokenizer's own "
                  "chat template")
        template.use_guanaco(tokenizer)
    elif any(f != "prepared" for f in fmts):
        template.ensure_template(tokenizer)


def _render(part: Part, tokenizer, text_field: str) -> list[dict]:
    """Each record as the text that is trained, with its assistant spans."""
    from . import template
    out = []
    for n, rec in enumerate(part.records, 1):
        if "text" in rec:
            text, spans = rec["text"], formats.guanaco_spans(rec["text"])
        else:
            try:
                text, spans = template.assistant_spans(tokenizer, rec["messages"])
            except Exception as err:  # jinja errors of a template that refuses this conversation
                raise UserError(f"{part.label}: row {n}: the chat template cannot render it "
                                f"({str(err).splitlines()[0][:160]})") from None
            text = text.rstrip()  # ChatML ends '<|im_end|>\n', Guanaco a space: EOS follows the last turn directly
            spans = [(s, min(e, len(text))) for s, e in spans]
        out.append({text_field: text, SPANS: [list(s) for s in spans]})
    return out


def _combine(parts: list[Part], tokenizer, cfg: RunConfig, split: str, cap: int | None):
    from datasets import Dataset, concatenate_datasets
    pieces = [p.prepared if p.prepared is not None else
              Dataset.from_list(_render(p, tokenizer, cfg.dataset_text_field)) for p in parts]
    ds = pieces[0] if len(pieces) == 1 else concatenate_datasets(pieces).shuffle(seed=cfg.seed)
    ds = _cap(ds, cap)
    if _main():
        if len(parts) == 1:
            print(f"{split}: {parts[0].label}, {len(ds)} rows, format {parts[0].fmt}")
        else:
            counts = ", ".join(f"{p.label} {len(x)} ({p.fmt})" for p, x in zip(parts, pieces))
            print(f"{split}: {len(ds)} rows from {len(parts)} sources mixed with seed {cfg.seed}: {counts}")
    return ds


def _main() -> bool:
    from . import distributed as dist
    return dist.is_main()


def load_dataset_splits(cfg: RunConfig, train_dataset=None, eval_dataset=None, tokenizer=None):
    """-> (train, eval or None): validated, rendered in the run's chat template (chosen here and set on
    `tokenizer`; without one, conversations render in the Guanaco format). In-memory datasets win over
    cfg.dataset_name."""
    train_parts, held_parts = _load_parts(cfg, train_dataset, eval_dataset)
    choose_template(tokenizer, {p.fmt for p in train_parts + held_parts})
    train = _combine(train_parts, tokenizer, cfg, "train", cfg.max_train_rows)
    held = _combine(held_parts, tokenizer, cfg, "held-out", cfg.max_eval_rows) if held_parts else None
    if held is None and cfg.eval_steps is not None:
        where = "the in-memory dataset" if train_dataset is not None else cfg.dataset_name
        raise UserError(f"eval_steps={cfg.eval_steps} needs held-out rows, but {where} has no "
                        f"'{cfg.eval_split}' split: give a folder with train and {cfg.eval_split or 'test'} files "
                        "(and eval_split), or set eval_steps=None")
    if _main():
        print(f"first training row as rendered: {train[0][cfg.dataset_text_field][:400]!r}")
    return train, held


def for_trainer(ds, tokenizer, cfg: RunConfig):
    """What SFTTrainer gets: token ids with a completion mask under completion_only_loss, else the text alone."""
    if ds is None or "input_ids" in ds.column_names:
        return ds
    if cfg.completion_only_loss:
        return tokenize_completion_only(ds, tokenizer, cfg)
    return ds.remove_columns(SPANS) if SPANS in ds.column_names else ds

def summarize(ds, tokenizer, cfg: RunConfig, name: str = "train") -> dict:
    """Rows, token-length percentiles with the model's tokenizer, share of rows over max_length, duplicates."""
    import numpy as np
    texts = list(ds[cfg.dataset_text_field])
    lengths = np.array([len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]) + 1  # + EOS
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    over = int((lengths > cfg.max_length).sum())
    dups = len(texts) - len(set(texts))
    out = dict(split=name, rows=len(texts), tokens_p50=p50, tokens_p90=p90, tokens_p99=p99,
               tokens_max=int(lengths.max()), over_max_length=over, over_share=round(over / len(texts), 4),
               duplicates=dups)
    print(f"{name}: {len(texts)} rows; tokens p50 {p50}, p90 {p90}, p99 {p99}, max {out['tokens_max']}; "
          f"{over} rows ({100 * out['over_share']:.1f}%) longer than max_length={cfg.max_length} will be truncated")
    if dups:
        print(f"Warning: {name} holds {dups} duplicated rows (kept; they weigh more in training)")
    return out


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns of a Guanaco text row (see formats.guanaco_spans)."""
    return formats.guanaco_spans(text)


def tokenize_completion_only(ds, tokenizer, cfg: RunConfig):
    """Pre-tokenize with a completion_mask that is 1 on the tokens of every assistant turn and on the final EOS,
    0 elsewhere (system and user turns, the template's turn openings). The spans come from the rendering
    (completion_spans); a plain Guanaco text column is split at its markers. EOS is appended unless the text
    already ends with it (ChatML's <|im_end|>). Rows whose assistant tokens are all cut off by max_length are
    counted and dropped: they would train nothing."""
    field, eos = cfg.dataset_text_field, tokenizer.eos_token

    def encode(batch):
        enc = tokenizer(batch[field], add_special_tokens=False, return_offsets_mapping=True)
        all_spans = batch[SPANS] if SPANS in batch else [assistant_spans(t) for t in batch[field]]
        ids, masks = [], []
        for text, row_ids, offsets, spans in zip(batch[field], enc["input_ids"], enc["offset_mapping"], all_spans):
            mask = [int(any(s <= a < e for s, e in spans)) for a, _ in offsets]
            if not text.endswith(eos):
                row_ids, mask = row_ids + [tokenizer.eos_token_id], mask + [1]
            row_ids, mask = row_ids[: cfg.max_length], mask[: cfg.max_length]
            ids.append(row_ids)
            masks.append(mask)
        return {"input_ids": ids, "completion_mask": masks}

    out = ds.map(encode, batched=True, remove_columns=ds.column_names)
    keep = [i for i, m in enumerate(out["completion_mask"]) if any(m)]
    if len(keep) < len(out):
        print(f"Warning: {len(out) - len(keep)} rows have no assistant token within max_length={cfg.max_length} "
              "and were dropped (they would train nothing)")
        if not keep:
            raise UserError(f"every row's answer lies beyond max_length={cfg.max_length}: raise max_length")
        out = out.select(keep)
    return out
