"""Several processes: the batch plan, data parallel on CPU (two processes, gloo, through torchrun), and what
FSDP-QLoRA needs from falcon-qlora (4-bit storage in the compute dtype, one dtype per FSDP unit).

FSDP itself does not run on CPU in this stack (accelerate 1.15.0, torch 2.13.0+cpu), tried both ways:
  - `accelerate launch --cpu --num_processes 2 --config_file fsdp_qlora.yaml ...` silently starts ONE plain
    process without FSDP: accelerate's launch_command takes its simple launcher whenever --cpu is given.
  - `torchrun --nproc_per_node 2` with the environment accelerate sets for FSDP (ACCELERATE_USE_FSDP=true, FSDP_*)
    stops in Trainer.__init__ -> Accelerator -> FullyShardedDataParallelPlugin.__post_init__ with
    `RuntimeError: There are currently no available devices found, must be one of 'XPU', 'CUDA', 'MLU', 'NPU',
    'MUSA', or 'HPU'.`
So FSDP runs on a GPU (bench/fsdp_40b_shape.py, world size 1); here its preconditions are tested.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides
from tiny import write_jsonl

from falcon_qlora import distributed as dist
from falcon_qlora.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


# --- the batch plan ---------------------------------------------------------------------------------------------

def test_effective_policy_divides_the_accumulation_among_processes():
    assert dist.split_batch(load_config(), processes=2) == (4, 2)  # reference: 4 x 4


def test_effective_policy_lowers_the_per_device_batch_only_when_it_must():
    assert dist.split_batch(load_config(), 8) == (2, 1)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps.*batch_policy=per_device"):
        dist.split_batch(load_config(), processes=3)


def test_per_device_policy_grows_the_effective_batch():
    from falcon_qlora.plan import make_plan
    plan = make_plan(load_config(batch_policy="per_device", profile="reference"), processes=4)
    assert (plan.micro_batch, plan.accumulation, plan.effective) == (4, 4, 64)
    assert "batch_policy=per_device" in plan.describe()


# --- the shipped accelerate configs -------------------------------------------------------------------------------

def test_accelerate_configs_are_shipped_and_wrap_falcon_decoder_layers(capsys):
    assert dist.main(["fsdp_qlora"]) == 0
    fsdp = yaml.safe_load(Path(capsys.readouterr().out.strip()).read_text())
    assert fsdp["distributed_type"] == "FSDP"
    assert fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "FalconDecoderLayer"
    assert fsdp["fsdp_config"]["fsdp_use_orig_params"] is False  # so trainable/frozen must not share a unit
    assert yaml.safe_load(dist.config_path("ddp").read_text())["distributed_type"] == "MULTI_GPU"
    assert "accelerate_configs/*.yaml" in (ROOT / "pyproject.toml").read_text()  # package data


# --- FSDP-QLoRA's preconditions -----------------------------------------------------------------------------------

def _load(model_dir, fsdp: bool, monkeypatch, **kw):
    from falcon_qlora.model import attach_lora, load_base_model
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true" if fsdp else "false")
    cfg = load_config(**tiny_overrides(model_dir, model_dir, model_dir, **kw))
    return attach_lora(load_base_model(cfg), cfg)


def _linear4bit_dtypes(model) -> set:
    return {str(m.weight.dtype) for m in model.modules() if type(m).__name__ == "Linear4bit"}


def test_fsdp_stores_4bit_weights_in_the_compute_dtype_without_changing_the_math(tiny_falcon, monkeypatch):
    import torch
    from falcon_qlora.model import trainable_summary
    fsdp = _load(tiny_falcon, True, monkeypatch)
    plain = _load(tiny_falcon, False, monkeypatch)
    assert _linear4bit_dtypes(fsdp) == {"torch.float32"} and _linear4bit_dtypes(plain) == {"torch.uint8"}
    assert trainable_summary(fsdp) == trainable_summary(plain)  # counts parameters, not storage elements
    ids = torch.arange(1, 17).view(2, 8).to(next(plain.parameters()).device)
    with torch.no_grad():
        torch.testing.assert_close(fsdp(input_ids=ids).logits, plain(input_ids=ids).logits)


def _fsdp_units(model, monkeypatch) -> dict:
    """What FSDP would flatten: each unit the shipped policy wraps (plus the root) -> (dtype, requires_grad) of the
    parameters it owns itself (not those of units nested in it)."""
    from peft.utils.other import fsdp_auto_wrap_policy
    cls = yaml.safe_load(dist.config_path("fsdp_qlora").read_text())["fsdp_config"]
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", cls["fsdp_transformer_layer_cls_to_wrap"])
    policy = fsdp_auto_wrap_policy(model)  # what transformers' Trainer installs for a peft model under FSDP
    units = {"": model} | {n: m for n, m in model.named_modules()
                           if m is not model and policy(module=m, recurse=False, nonwrapped_numel=0)}
    ids = {n: {id(p) for p in m.parameters()} for n, m in units.items()}
    kinds = {}
    for n, m in units.items():
        nested = set().union(*[ids[o] for o in units if o != n and ids[o] < ids[n]])
        kinds[n] = {(str(p.dtype), p.requires_grad) for p in m.parameters() if id(p) not in nested}
    return {"types": {n: type(m).__name__ for n, m in units.items()}, "kinds": kinds}


def test_each_fsdp_unit_holds_one_dtype_and_one_requires_grad(tiny_falcon, monkeypatch):
    units = _fsdp_units(_load(tiny_falcon, True, monkeypatch, compute_dtype="bf16"), monkeypatch)
    assert list(units["types"].values()).count("FalconDecoderLayer") == 2
    assert any(n.endswith("lora_A.default") for n in units["types"])  # LoRA layers are units of their own
    mixed = {n: k for n, k in units["kinds"].items() if len(k) > 1}
    assert not mixed, mixed
    # the same check fails with the default uint8 storage: 4-bit weights and bf16 layer norms in one unit
    plain = _fsdp_units(_load(tiny_falcon, False, monkeypatch, compute_dtype="bf16"), monkeypatch)
    assert any(len(k) > 1 for k in plain["kinds"].values())


# --- two processes --------------------------------------------------------------------------------------------

DRIVER = """
import os, sys
from falcon_qlora.cli import main
rec, args = sys.argv[1], sys.argv[2:]
os.environ["FALCON_QLORA_RECORD_ROWS"] = rec + "/run1"
code = main(["train", *args, "--max_steps", "2"])
if code:
    sys.exit(code)
if os.environ["RANK"] == "0":  # rank 0 alone prints run 1's lines, so this marker comes after all of them
    print("=== resume ===", flush=True)
os.environ["FALCON_QLORA_RECORD_ROWS"] = rec + "/run2"
sys.exit(main(["train", *args, "--max_steps", "3", "--resume", "true"]))
"""


@pytest.fixture(scope="module")
def two_process_run(tiny_falcon_7b_arch, tmp_path_factory):
    """torchrun, two CPU processes (gloo): train 2 steps (checkpoint at 2), then, in the same processes, resume to
    step 3. Rows are numbered so that the rows each rank trained on can be told apart."""
    from tiny import guanaco_rows
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "data"
    data.mkdir()
    rows = [{"text": r["text"].replace("### Human: ", f"### Human: row {i}: ")} for i, r in
            enumerate(guanaco_rows(32, seed=3))]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "test.jsonl", rows[:8])
    over = tiny_overrides(tiny_falcon_7b_arch, data, tmp / "run", per_device_train_batch_size=4,
                          gradient_accumulation_steps=2, save_steps=2, per_device_eval_batch_size=4)
    over.pop("max_steps")
    args = [x for k, v in over.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
    (tmp / "driver.py").write_text(DRIVER)
    # Two CPU processes over gloo everywhere: on a one-GPU machine two NCCL ranks would share the GPU, which NCCL
    # refuses ("invalid usage"); several GPUs are measured by bench/, not by this test.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp / "driver.py"), str(tmp / "rec"), *args], env=env, capture_output=True,
                          text=True, timeout=400)
    (tmp / "stdout.txt").write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp, proc.stdout


def _rows_seen(folder: Path, tokenizer) -> dict:
    """(rank, step) -> row numbers trained on."""
    seen = {}
    for r in (0, 1):
        for line in (folder / f"rows-rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            texts = tokenizer.batch_decode(rec["input_ids"], skip_special_tokens=True)
            seen.setdefault((r, rec["step"]), []).extend(int(re.search(r"row (\d+):", t).group(1)) for t in texts)
    return seen


@pytest.mark.slow
def test_two_processes_see_different_rows_and_log_once(two_process_run, tiny_falcon_7b_arch):
    from transformers import AutoTokenizer
    tmp, out = two_process_run
    first, second = out.split("=== resume ===", 1)
    assert first.count("world size 2") == 1 and first.count("adapter saved to") == 1  # the main process only
    metrics = json.loads(re.search(r'\{"train_steps".*\}', first).group(0))
    # batch_policy=effective: 4 x 2 for one process becomes 4 x 1 on each of two; the effective batch stays 8
    assert (metrics["world_size"], metrics["effective_batch"], metrics["gradient_accumulation"]) == (2, 8, 1)
    seen = _rows_seen(tmp / "rec" / "run1", AutoTokenizer.from_pretrained(tiny_falcon_7b_arch))
    assert sorted(seen) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for step in (1, 2):
        assert len(seen[0, step]) == len(seen[1, step]) == 4
        assert not set(seen[0, step]) & set(seen[1, step]), seen


@pytest.mark.slow
def test_two_processes_save_rank_zeros_adapter_which_loads_back(two_process_run):
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from falcon_qlora.model import load_adapter_model
    tmp, _ = two_process_run
    final = tmp / "run" / "final"
    saved = load_file(str(final / "adapter_model.safetensors"))
    rank0 = load_file(str(tmp / "rec" / "run2" / "adapter-rank0.safetensors"))
    rank1 = load_file(str(tmp / "rec" / "run2" / "adapter-rank1.safetensors"))
    assert saved.keys() == rank0.keys() == rank1.keys()
    for k in saved:
        torch.testing.assert_close(saved[k].float(), rank0[k], rtol=0, atol=0)
        torch.testing.assert_close(rank1[k], rank0[k], rtol=0, atol=0)  # DDP kept the ranks identical
    assert any(k.endswith("lora_B.weight") and saved[k].abs().sum() > 0 for k in saved)  # trained (B starts at 0)
    model, _, _ = load_adapter_model(final)
    loaded = get_peft_model_state_dict(model)
    for k in saved:
        torch.testing.assert_close(loaded[k].float().cpu(), saved[k].float())


@pytest.mark.slow
def test_resume_under_two_processes_continues_at_the_next_step(two_process_run, tiny_falcon_7b_arch):
    from transformers import AutoTokenizer
    tmp, out = two_process_run
    _, second = out.split("=== resume ===", 1)
    assert second.count("resuming from") == 1 and "checkpoint-2" in second
    tok = AutoTokenizer.from_pretrained(tiny_falcon_7b_arch)
    before, after = _rows_seen(tmp / "rec" / "run1", tok), _rows_seen(tmp / "rec" / "run2", tok)
    assert sorted(after) == [(0, 3), (1, 3)]  # steps 1-2 are not redone
    earlier = {row for rows in before.values() for row in rows}
    assert len(earlier) == 16 and not earlier & set(after[0, 3] + after[1, 3])  # the epoch goes on, no restart
    history = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]


# --- the GPU benchmark's script, on a tiny shape ------------------------------------------------------------------

def test_fsdp_40b_bench_script_runs_on_a_tiny_shape(tmp_path):
    spec = importlib.util.spec_from_file_location("fsdp_bench", ROOT / "bench" / "fsdp_40b_shape.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "fsdp.json"
    bench.main(["--tiny", "--no-fsdp", "--layers", "2", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["ok"] and result["train"]["loss"] > 0 and len(result["steps"]) == 2
    assert result["checkpoint"]["ok"] and "adapter_model.safetensors" in result["checkpoint"]["files"]
    assert result["final_adapter_tensors"] == result["expected_adapter_tensors"]
    assert result["load"]["per_layer_4bit_bytes"] > 0
