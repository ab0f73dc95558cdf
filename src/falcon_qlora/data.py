"""Data stage: load Guanaco-style rows, validate them before any model is loaded, summarize their lengths.

Sources: a hub dataset name, a local file (jsonl, json, parquet, csv), a folder of `<split>.<ext>` files, a built-in
alias, or an in-memory `datasets.Dataset` / `DatasetDict`. Every row must be a non-empty string holding both
`### Human:` and `### Assistant:`; bad rows stop the run with their row numbers (or are dropped on request).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from . import demo_data
from .config import RunConfig
from .errors import UserError

HUMAN, ASSISTANT = "### Human:", "### Assistant:"
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Built-in dataset names -> a function returning a local file or folder (filled in by the modules that own them).
DATASET_ALIASES: dict[str, Callable[[], str]] = {"demo-guanaco": demo_data.dataset_path}


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


def _read_file(path: Path, cfg: RunConfig):
    from datasets import Dataset
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FORMATS)}")
    if kind == "json":
        rows = _read_json_rows(path)
        field = cfg.dataset_text_field
        if rows and all(field in r for r in rows):  # check before Arrow sees mixed types
            keep = check_texts([r[field] for r in rows], cfg, str(path))
            rows = [{field: rows[i][field]} for i in keep]
        return Dataset.from_list(rows)
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
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FORMATS)
    if not files:
        raise UserError(f"{path} holds no data files; put train.jsonl (and test.jsonl) there")
    return {p.stem: p for p in files}


def _pick(splits: dict, name: str, source: str):
    if name not in splits:
        raise UserError(f"dataset {source} has no split '{name}' (it has: {', '.join(splits)}); "
                        "set train_split / eval_split")
    return splits[name]


def load_dataset_splits(cfg: RunConfig, train_dataset=None, eval_dataset=None):
    """-> (train, eval or None), both validated. In-memory datasets win over cfg.dataset_name."""
    from datasets import DatasetDict
    source = cfg.dataset_name
    if isinstance(train_dataset, DatasetDict):
        train_dataset, eval_dataset = (_pick(train_dataset, cfg.train_split, "in memory"),
                                       train_dataset.get(cfg.eval_split) if cfg.eval_split else None)
    if train_dataset is not None:
        source = "in-memory dataset"
    else:
        name = DATASET_ALIASES[source]() if source in DATASET_ALIASES else source
        path = Path(name)
        if path.exists():
            files = _local_splits(path)
            train_dataset = _read_file(_pick(files, cfg.train_split, name), cfg)
            if cfg.eval_split and cfg.eval_split in files:
                eval_dataset = _read_file(files[cfg.eval_split], cfg)
            elif cfg.eval_split and path.is_dir():
                _pick(files, cfg.eval_split, name)
        elif name.startswith((".", "/", "~")) or Path(name).suffix in FORMATS:
            raise UserError(f"dataset file {name} does not exist: check dataset_name")
        else:
            splits = _load_hub(name)
            train_dataset = _pick(splits, cfg.train_split, name)
            eval_dataset = _pick(splits, cfg.eval_split, name) if cfg.eval_split else None
        source = name
    train = validate_rows(_cap(train_dataset, cfg.max_train_rows), cfg, f"{source} [{cfg.train_split}]")
    held = None
    if eval_dataset is not None:
        held = validate_rows(_cap(eval_dataset, cfg.max_eval_rows), cfg, f"{source} [{cfg.eval_split}]")
    return train, held


def _load_hub(name: str):
    import datasets
    try:
        return datasets.load_dataset(name)
    except Exception as err:
        raise UserError(f"cannot load dataset '{name}' from the hub ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160]}); pass a local file or folder as dataset_name") from None


def _cap(ds, n):
    return ds.select(range(min(n, len(ds)))) if n is not None else ds


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(str(r + 1) for r in rows[:5])
    return shown + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def check_texts(texts: list, cfg: RunConfig, source: str) -> list[int]:
    """Indices of the rows to keep: each a non-empty string with both markers. Bad rows stop the run, named by
    their numbers counted from 1, unless drop_invalid_rows is set."""
    field = cfg.dataset_text_field
    problems = {"is not a string": [], "is empty": [], f"has no '{HUMAN}' marker": [],
                f"has no '{ASSISTANT}' marker": []}
    keys = list(problems)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            problems[keys[0]].append(i)
        elif not text.strip():
            problems[keys[1]].append(i)
        elif HUMAN not in text:
            problems[keys[2]].append(i)
        elif ASSISTANT not in text:
            problems[keys[3]].append(i)
    bad = {i for rows in problems.values() for i in rows}
    if bad and not cfg.drop_invalid_rows:
        what = "; ".join(f"rows {_rows_text(rows)}: '{field}' {k}" for k, rows in problems.items() if rows)
        raise UserError(f"{source}: {what}. Fix these rows, or set drop_invalid_rows=true to drop them")
    if bad:
        print(f"{source}: dropped {len(bad)} invalid rows of {len(texts)}")
        if len(bad) == len(texts):
            raise UserError(f"{source}: no valid rows left after dropping {len(bad)}")
    return [i for i in range(len(texts)) if i not in bad]


def validate_rows(ds, cfg: RunConfig, source: str):
    """The text column exists and every row passes check_texts; other columns are dropped."""
    field = cfg.dataset_text_field
    if field not in ds.column_names:
        raise UserError(f"{source}: no '{field}' column (columns: {', '.join(ds.column_names) or 'none'}); "
                        "set dataset_text_field to the column holding the conversation")
    if len(ds) == 0:
        raise UserError(f"{source} has no rows")
    keep = check_texts(list(ds[field]), cfg, source)
    if len(keep) < len(ds):
        ds = ds.select(keep)
    extra = [c for c in ds.column_names if c != field]
    return ds.remove_columns(extra) if extra else ds


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
    """Character spans of the assistant turns: from after each '### Assistant:' to the next '### Human:'."""
    spans, pos = [], 0
    while (start := text.find(ASSISTANT, pos)) != -1:
        start += len(ASSISTANT)
        end = text.find(HUMAN, start)
        end = len(text) if end == -1 else end
        spans.append((start, end))
        pos = end
    return spans


def tokenize_completion_only(ds, tokenizer, cfg: RunConfig):
    """Pre-tokenize with a completion_mask that is 1 on assistant tokens and the final EOS only (multi-turn aware).
    Rows whose assistant tokens are all cut off by max_length are counted and dropped: they would train nothing."""
    field = cfg.dataset_text_field

    def encode(batch):
        enc = tokenizer(batch[field], add_special_tokens=False, return_offsets_mapping=True)
        ids, masks = [], []
        for text, row_ids, offsets in zip(batch[field], enc["input_ids"], enc["offset_mapping"]):
            spans = assistant_spans(text)
            mask = [int(any(s <= a < e for s, e in spans)) for a, _ in offsets]
            row_ids, mask = (row_ids + [tokenizer.eos_token_id])[: cfg.max_length], (mask + [1])[: cfg.max_length]
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
