"""Bad input, table-driven: each case runs the real CLI (`falcon_qlora.cli.main`) in-process and must end in ONE
line, `falcon-qlora train: error: ...`, that names the file/row/field/key and says what to do, with no traceback,
exit status 2, and every file already in the output dir untouched. A few inputs are accepted on purpose (BOM, CRLF,
duplicates, an over-long row): those must train and print the warning or count instead."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_overrides, train_argv
from tiny import build_falcon, guanaco_rows, write_jsonl

ROW = "### Human: what is two plus two? ### Assistant: two plus two is four."


def _good(n=8):
    return guanaco_rows(n, seed=3)


# id -> (setup(ctx) -> argv (list) | dict of overrides, expected substrings of the error line, or "ok" + substrings)
def _data(rows_or_bytes, name="train.jsonl"):
    def setup(c):
        p = c.tmp / name
        if isinstance(rows_or_bytes, bytes):
            p.write_bytes(rows_or_bytes)
        else:
            write_jsonl(p, rows_or_bytes)
        return {"dataset_name": str(p)}
    return setup


def _yaml(text):
    def setup(c):
        p = c.tmp / "run.yaml"
        p.write_text(text, encoding="utf-8")
        return {"config": str(p)}
    return setup


def _checkpoint_there(c):
    ck = c.out / "checkpoint-3"
    ck.mkdir()
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (ck / "adapter_model.safetensors").write_bytes(b"weights of an earlier run")
    return {}


def _u(text="what is two plus two?"):
    return {"role": "user", "content": text}


def _a(text="two plus two is four."):
    return {"role": "assistant", "content": text}


def _conv():
    return {"messages": [_u(), _a()]}


def _cpu_without_bf16(c):
    import torch
    from falcon_qlora import config
    c.mp.setattr(torch.cuda, "is_available", lambda: False)
    c.mp.setattr(config, "cpu_has_bf16", lambda: False)
    return {"compute_dtype": "bf16"}


def _gpu_without_bf16(c):
    import torch
    c.mp.setattr(torch.cuda, "is_available", lambda: True)
    c.mp.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    c.mp.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    return {"compute_dtype": "bf16"}


def _no_bitsandbytes(c):
    c.mp.setitem(sys.modules, "bitsandbytes.functional", None)  # as if its native library failed to load
    return {}


def _not_writable(c):
    (c.tmp / "a-file").write_text("")
    return {"output_dir": str(c.tmp / "a-file" / "out")}


def _model_without_config(c):
    (c.tmp / "weights").mkdir()
    return {"model_name_or_path": str(c.tmp / "weights")}


CASES = {
    "empty file": (_data(b""), ["train.jsonl is empty", "one JSON object per line"]),
    "not JSON": (_data(json.dumps({"text": ROW}).encode() + b"\n{text: oops\n"), ["line 2 is not JSON"]),
    "invalid UTF-8": (_data(b'{"text": "### Human: caf\xe9 ### Assistant: ok"}\n'),
                      ["line 1 is not valid UTF-8", "re-save the file as UTF-8"]),
    "JSON array, broken": (_data(b'[{"text": "a"},\n{"text": ]'), ["not valid JSON at line 2"]),
    "row not an object": (_data([{"text": ROW}, ["a list"]]), ["every row must be a JSON object"]),
    "unsupported file type": (_data(b"hello", name="train.txt"), ["train.txt", "unsupported file type '.txt'"]),
    "dataset path missing": (lambda c: {"dataset_name": str(c.tmp / "nope.jsonl")}, ["nope.jsonl does not exist"]),
    "missing text field": (_data([{"prompt": ROW}] * 3), ["no 'text' column (columns: prompt)",
                                                        "set dataset_text_field"]),
    "non-string text": (_data([{"text": ROW}, {"text": 42}]), ["rows 2: 'text' is not a string"]),
    "empty text": (_data([{"text": ROW}, {"text": ""}, {"text": "   \n"}]), ["rows 2, 3: 'text' is empty",
                                                                          "drop_invalid_rows"]),
    "no Human marker": (_data([{"text": "### Assistant: hi"}, {"text": ROW}]), ["rows 1: 'text' has no '### Human:'"]),
    "no Assistant marker": (_data([{"text": ROW}, {"text": "### Human: hi"}]),
                            ["rows 2: 'text' has no '### Assistant:' marker"]),
    "split missing": (lambda c: {"train_split": "training"}, ["has no split 'training' (it has: test, train)",
                                                             "set train_split"]),
    "unknown key in YAML": (_yaml("lora_rnk: 8\n"), ["unknown config key lora_rnk in the config file",
                                                    "falcon-qlora train --help"]),
    "unknown flag": (lambda c: ["--lora_rnk", "8"], ["unknown config key lora_rnk on the command line",
                                                      "falcon-qlora train --help"]),
    "wrong type": (lambda c: {"max_steps": "ten"}, ["--max_steps", "invalid int value: 'ten'"]),
    "wrong type in YAML": (_yaml("weight_decay: lots\n"), ["weight_decay", "lots"]),
    "zero steps": (lambda c: {"max_steps": 0}, ["max_steps=0 must be a positive integer"]),
    "negative steps": (lambda c: {"max_steps": -5}, ["max_steps=-5 must be a positive integer"]),
    "lr zero": (lambda c: {"learning_rate": 0}, ["learning_rate=0.0 must be > 0"]),
    "lr negative": (lambda c: {"learning_rate": -1e-4}, ["learning_rate=-0.0001 must be > 0"]),
    "LoRA r zero": (lambda c: {"lora_r": 0}, ["lora_r=0 must be a positive integer"]),
    "unknown target module": (lambda c: {"lora_target_modules": "q_proj"},
                              ["lora_target_modules: q_proj not found", "query_key_value"]),
    "model path missing": (lambda c: {"model_name_or_path": str(c.tmp / "no-model")},
                           ["no-model does not exist", "model_name_or_path"]),
    "model folder without config.json": (_model_without_config, ["has no config.json"]),
    "config file missing": (lambda c: {"config": str(c.tmp / "missing.yaml")}, ["missing.yaml does not exist"]),
    "output dir not writable": (_not_writable, ["is not writable", "choose another --output_dir"]),
    "output dir holds another run": (_checkpoint_there, ["already holds checkpoints (checkpoint-3)", "--resume",
                                                        "--overwrite"]),
    "resume and overwrite": (lambda c: {"resume": True, "overwrite": True}, ["resume and overwrite", "choose one"]),
    "bf16 on a GPU without it": (_gpu_without_bf16, ["compute_dtype=bf16 is not supported on Tesla T4",
                                                     "compute_dtype=fp16"]),
    "bitsandbytes broken": (_no_bitsandbytes, ["bitsandbytes cannot quantize", "pip install -U bitsandbytes",
                                               "load_in_4bit=false"]),
    # conversational formats: one line naming the row, the field and the turn
    "messages: turn without a role": (_data([_conv(), {"messages": [{"content": "hi"}, _a()]}]),
                                      ["rows 2: 'messages' turn 1 has no 'role'"]),
    "messages: unknown role": (_data([{"messages": [{"role": "bot", "content": "hi"}, _a()]}, _conv()]),
                               ["rows 1: 'messages' turn 1 has an unknown role 'bot' (use assistant, system, user)"]),
    "messages: no assistant turn": (_data([_conv(), {"messages": [_u()]}]),
                                    ["rows 2: 'messages' has no assistant turn"]),
    "messages: empty content": (_data([_conv(), {"messages": [_u(), {"role": "assistant", "content": " "}]}]),
                                ["rows 2: 'messages' turn 2 'content' is empty"]),
    "messages: non-string content": (_data([_conv(), {"messages": [_u(), {"role": "assistant", "content": 4}]}]),
                                     ["rows 2: 'messages' turn 2 'content' is not a string (got int)"]),
    "messages: roles out of order": (_data([{"messages": [_a(), _u(), _a()]}, _conv()]),
                                     ["rows 1: 'messages' turn 1 is 'assistant' where 'user' was expected"]),
    "messages: system turn later": (_data([{"messages": [_u(), _a(), {"role": "system", "content": "x"}]}]),
                                    ["rows 1: 'messages' turn 3 is a system turn"]),
    "messages: not a list": (_data([_conv(), {"messages": "hi"}]), ["rows 2: 'messages' is not a list of turns"]),
    "sharegpt: unknown from": (_data([{"conversations": [{"from": "bot", "value": "hi"}]}]),
                               ["rows 1: 'conversations' turn 1 has an unknown from 'bot'"]),
    "sharegpt: ends with the human": (_data([{"conversations": [{"from": "human", "value": "a"},
                                                                {"from": "gpt", "value": "b"},
                                                                {"from": "human", "value": "c"}]}]),
                                      ["rows 1: 'conversations' ends with a user turn that nothing answers"]),
    "alpaca: no output": (_data([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}]),
                          ["rows 2: 'output' is not a string (got NoneType)"]),
    "alpaca: input not a string": (_data([{"instruction": "a", "input": ["x"], "output": "b"}]),
                                   ["rows 1: 'input' is not a string (got list)"]),
    "prompt/completion: empty prompt": (_data([{"prompt": "", "completion": "b"}]), ["rows 1: 'prompt' is empty"]),
    "prompt/completion: user turn in completion": (
        _data([{"prompt": [_u()], "completion": [_u()]}]),
        ["rows 1: 'completion' holds a turn that is not the assistant's"]),
    "format forced, column missing": (lambda c: {**_data([_conv()])(c), "dataset_format": "alpaca"},
                                      ["format alpaca needs the column 'instruction' (columns: messages)"]),
    "row without the text field": (_data([{"text": ROW}, {"body": ROW}]), ["rows 2: no 'text' field"]),
    # config values that used to end in tracebacks or be silently wrong
    "YAML syntax error": (_yaml("lora_r: [8\n"), ["run.yaml is not valid YAML"]),
    "optimizer unknown": (lambda c: {"optim": "bogus"}, ["optim='bogus' is not an optimizer transformers knows"]),
    "schedule unknown": (lambda c: {"lr_scheduler_type": "bogus"},
                         ["lr_scheduler_type='bogus' is not a schedule transformers knows"]),
    "seed negative": (lambda c: {"seed": -1}, ["seed=-1 must be an integer from 0"]),
    "eval_steps zero": (lambda c: {"eval_steps": 0}, ["eval_steps=0 must be a positive integer"]),
    "eval_steps without held-out rows": (lambda c: {**_data(_good())(c), "eval_steps": 2},
                                         ["eval_steps=2 needs held-out rows", "set eval_steps=None"]),
    "eval_split on a single file": (lambda c: {**_data(_good())(c), "eval_split": "validation"},
                                    ["eval_split=validation", "is a single file", "eval_split=None"]),
    "bf16 on a CPU without it": (_cpu_without_bf16, ["compute_dtype=bf16", "this CPU has no native bf16",
                                                     "compute_dtype=fp32"]),
    "dataset entry malformed": (lambda c: ["--dataset_name", str(c.data), "{name: x, rows: 3}"],
                                ["dataset_name entry '{name: x, rows: 3}'", "unknown: rows"]),
    # accepted on purpose: trains, and says what it did
    "BOM": (_data(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in _good()).encode()), "ok"),
    "CRLF": (_data("".join(json.dumps(r) + "\r\n" for r in _good()).encode()), "ok"),
    "duplicated rows": (_data([{"text": ROW}] * 3 + _good(5)), ("ok", "holds 2 duplicated rows")),
    "row far over max_length": (_data(_good(5) + [{"text": ROW + " four" * 400}]),
                                ("ok", "1 rows (16.7%) longer than max_length=64 will be truncated")),
    # columns the format does not read never reach Arrow, whatever their types
    "other column of mixed types": (_data([dict(r, id=i if i % 2 else str(i)) for i, r in enumerate(_good())]),
                                    "ok"),
    "other column list then dict": (_data([dict(r, meta=[1] if i % 2 else {"a": 1}) for i, r in enumerate(_good())]),
                                    "ok"),
    "text of mixed types, dropped": (lambda c: {**_data(_good() + [{"text": 7}, {"text": [ROW]}])(c),
                                                "drop_invalid_rows": True},
                                     ("ok", "dropped 2 invalid rows of 10")),
    "messages with mixed extra fields": (_data([dict(_conv(), id=1, tags={"a": 1}), dict(_conv(), id="x", tags=[2])]
                                               * 3), ("ok", "format messages")),
    "messages, bad rows dropped": (lambda c: {**_data([_conv()] * 4 + [{"messages": [{"role": 3, "content": []}]}])(c),
                                              "drop_invalid_rows": True}, ("ok", "dropped 1 invalid rows of 5")),
}


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def _argv(setup_result, c) -> list[str]:
    if isinstance(setup_result, list):  # extra raw flags
        extra, over = setup_result, {}
    else:
        extra, over = [], dict(setup_result)
    config = over.pop("config", None)
    argv = train_argv(c.model, c.data, c.out, **{"max_steps": 1, "save_steps": 1, **over})
    return argv[:1] + (["--config", config] if config else []) + argv[1:] + extra


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_falcon_7b_arch, tiny_data, tmp_path, monkeypatch, capsys):
    from falcon_qlora.cli import main
    c = SimpleNamespace(tmp=tmp_path, model=tiny_falcon_7b_arch, data=tiny_data, out=tmp_path / "out", mp=monkeypatch)
    c.out.mkdir()
    (c.out / "notes.txt").write_text("earlier work that must survive")
    setup, expect = CASES[case]
    if not (expect == "ok" or isinstance(expect, tuple)):  # a failing config must not overwrite an earlier run's
        (c.out / "run_config.yaml").write_text("# the run config of an earlier run\n")
    argv = _argv(setup(c), c)
    before = _snapshot(c.out)
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    after = _snapshot(c.out)
    assert {k: after.get(k) for k in before} == before  # nothing already written is lost or changed
    if expect == "ok" or isinstance(expect, tuple):
        assert code == 0, err[-2000:]
        assert (c.out / "final" / "adapter_model.safetensors").is_file()
        if isinstance(expect, tuple):
            assert expect[1] in out + err
        return
    assert code == 2, (out + err)[-2000:]
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("falcon-qlora train: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err[-2000:]
    for part in expect:
        assert part in errors[0], errors[0]


@pytest.fixture(scope="module")
def adapter_dir(tiny_falcon_7b_arch, tmp_path_factory) -> Path:
    """An untrained LoRA adapter for the 7B-style tiny Falcon, saved as `train` would save it."""
    from falcon_qlora.config import make_config
    from falcon_qlora.model import attach_lora, load_base_model
    cfg = make_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_falcon_7b_arch, tmp_path_factory.mktemp("a")))
    folder = tmp_path_factory.mktemp("adapter")
    attach_lora(load_base_model(cfg), cfg).save_pretrained(folder)
    return folder


def test_adapter_dir_without_adapter_config(tmp_path):
    from falcon_qlora.errors import UserError
    from falcon_qlora.model import load_adapter_model
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as err:
        load_adapter_model(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and f"{tmp_path} has no adapter_config.json" in msg and "results/final" in msg


def test_adapter_for_a_different_base(adapter_dir, tmp_path):
    """An adapter trained on the multi-query Falcon does not fit the grouped-query one (query_key_value shapes)."""
    from falcon_qlora.errors import UserError
    from falcon_qlora.model import load_adapter_model
    other = build_falcon(tmp_path / "falcon-40b-arch", new_decoder_architecture=True)
    with pytest.raises(UserError) as err:
        load_adapter_model(adapter_dir, base=str(other))
    msg = str(err.value)
    assert "\n" not in msg and f"the adapter in {adapter_dir} does not fit the base {other}" in msg
    assert "--base" in msg
