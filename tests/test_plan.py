"""The RunPlan: one function decides the profile, the micro-batch split and what changes, from the config, the model's
shape and the free GPU memory (given here, so no GPU is needed). Figures measured on the H200: bench/RESULTS.md."""
from __future__ import annotations

import pytest

from falcon_qlora import plan as P
from falcon_qlora.config import ConfigError, load_config
from falcon_qlora.errors import UserError
from falcon_qlora.memory import peak

GiB = 2 ** 30
H200_FREE, T4_FREE = 139 * GiB, 15 * GiB  # what a run sees free on each before loading anything


def _split(plan) -> tuple:
    return plan.profile, plan.micro_batch, plan.accumulation


def test_h200_falcon_7b_at_512_tokens_runs_speed_in_one_micro_batch():
    """Measured (bench/raw/h200_run9_512.json): speed at 16 x 1 with the dequantized weights peaks at 60.2 GiB
    allocated (47.66 without them); the model predicts within 1% of both."""
    cfg = load_config("reference")
    plan = P.make_plan(cfg, H200_FREE, device="cuda")
    assert _split(plan) == ("speed", 16, 1) and not plan.checkpointing and "weight_cache" in plan.parts
    assert abs(peak(cfg, plan)["peak_bytes"] / (60.2 * GiB) - 1) < 0.02
    eager = P.make_plan(cfg, H200_FREE, device="cuda", parts=tuple(p for p in P.PARTS if p != "weight_cache"))
    assert abs(peak(cfg, eager)["peak_bytes"] / (47.66 * GiB) - 1) < 0.02


def test_h200_falcon_7b_at_2048_tokens_splits_in_two():
    """Measured (bench/raw/h200_run9_2048.json): speed at 8 x 2 peaks at 102.5 GiB with the dequantized weights
    (90.2 without, h200_speed_2048.json); 16 rows of 2048 tokens would need about twice that, more than the H200
    has, so 16 x 1 must not be chosen."""
    cfg = load_config("reference", max_length=2048)
    plan = P.make_plan(cfg, H200_FREE, device="cuda")
    assert _split(plan) == ("speed", 8, 2) and "weight_cache" in plan.parts
    assert abs(peak(cfg, plan)["peak_bytes"] / (102.51 * GiB) - 1) < 0.02
    assert peak(cfg, P.with_split(plan, 16, 1, False, False))["peak_bytes"] > H200_FREE


def test_t4_runs_the_memory_profile():
    """16 GiB T4: fewer than 4 rows per micro-batch fit without checkpointing, so auto takes memory (8 x 2)."""
    plan = P.make_plan(load_config("reference"), T4_FREE, device="cuda")
    assert _split(plan) == ("memory", 8, 2) and plan.checkpointing and plan.offload
    assert "15 GiB free" in plan.reason


def test_a_smaller_model_gets_a_larger_micro_batch_at_the_same_memory():
    """The split is costed for the model's own shape: of 64 rows, SmolLM2-135M takes 32 per micro-batch where
    Falcon-7B takes 8 (the old rule costed every model at Falcon-7B's widths)."""
    rows = dict(per_device_train_batch_size=16, gradient_accumulation_steps=4, profile="speed")
    smol = load_config("reference", model_name_or_path="smollm2-135m",
                       lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **rows)
    falcon = load_config("reference", **rows)
    small, big = (P.make_plan(c, 40 * GiB, device="cuda") for c in (smol, falcon))
    assert small.micro_batch > big.micro_batch
    assert (small.micro_batch, big.micro_batch) == (32, 8)


def test_speed_split_keeps_the_margin():
    """The chosen micro-batch's peak times MARGIN fits; the next larger divisor's does not."""
    cfg = load_config("reference")
    plan = P.make_plan(cfg, 40 * GiB, device="cuda", profile="speed")
    assert (plan.micro_batch, plan.accumulation) == (8, 2)
    assert peak(cfg, plan)["peak_bytes"] * P.MARGIN <= 40 * GiB
    assert peak(cfg, P.with_split(plan, 16, 1, False, False))["peak_bytes"] * P.MARGIN > 40 * GiB


def test_speed_without_room_keeps_the_configs_split_and_checkpointing():
    plan = P.make_plan(load_config("reference"), 4 * GiB, device="cuda", profile="speed")
    assert (plan.micro_batch, plan.accumulation, plan.checkpointing) == (4, 4, True)
    assert "no micro-batch fits" in plan.reason


def test_memory_profile_takes_up_to_memory_rows_per_micro_batch():
    assert _split(P.make_plan(load_config("reference"), profile="memory")) == ("memory", 8, 2)
    assert P.make_plan(load_config("reference", gradient_accumulation_steps=3), profile="memory").micro_batch == 6
    no_offload = P.make_plan(load_config("reference"), profile="memory",
                             parts=[p for p in P.PROFILE_PARTS["memory"] if p != "offload"])
    assert (no_offload.micro_batch, no_offload.accumulation, no_offload.offload) == (4, 4, False)


def test_memory_profile_takes_fewer_rows_where_long_rows_would_not_fit():
    """8 rows of 8192 tokens are estimated at ~22 GiB: on a 15 GiB T4 the plan takes the most rows that fit."""
    cfg = load_config("reference", max_length=8192)
    plan = P.make_plan(cfg, T4_FREE, device="cuda", profile="memory")
    assert plan.micro_batch * plan.accumulation == 16 and plan.offload
    assert 1 <= plan.micro_batch < P.MEMORY_ROWS
    assert peak(cfg, plan)["peak_bytes"] * P.MARGIN <= T4_FREE
    bigger = P.with_split(plan, plan.micro_batch * 2, plan.accumulation // 2, True, True)
    assert peak(cfg, bigger)["peak_bytes"] * P.MARGIN > T4_FREE


def test_memory_profile_with_no_row_that_fits_says_so():
    plan = P.make_plan(load_config("reference", max_length=8192), 2 * GiB, device="cuda", profile="memory")
    assert plan.micro_batch == 1 and "even 1 row per micro-batch" in plan.reason


def test_auto_is_reference_on_a_cpu_and_without_a_known_gpu():
    cfg = load_config("reference")
    assert P.make_plan(cfg, H200_FREE, device="cpu").profile == "reference"
    assert P.make_plan(cfg, None, device="cpu").reason == "auto on a CPU"


def test_the_plan_carries_what_the_profile_changes():
    """One owner for what estimate used to re-derive: fused AdamW for paged AdamW on a GPU (the memory profile's with
    its moments still paged), norms in bf16, the memory profile's narrower LM-head tiles, padding-free rows unless
    packing lays them out already."""
    cfg = load_config("reference")
    speed = P.make_plan(cfg, H200_FREE, device="cuda", profile="speed")
    assert speed.optim == "adamw_torch_fused" and speed.norms and speed.padding_free and speed.head_chunk is None
    assert P.make_plan(cfg, H200_FREE, device="cpu", profile="speed").optim == cfg.optim == "paged_adamw_32bit"
    memory = P.make_plan(cfg, device="cuda", profile="memory")
    assert memory.head_chunk == P.HEAD_CHUNK and memory.optim == P.PAGED_FUSED_ADAM
    assert P.make_plan(cfg, device="cpu", profile="memory").optim == cfg.optim
    assert not P.make_plan(load_config("reference", packing=True), device="cuda", profile="memory").padding_free
    ref = P.make_plan(cfg, device="cuda", profile="reference")
    assert (ref.micro_batch, ref.accumulation, ref.checkpointing, ref.parts, ref.norms) == (4, 4, True, (), False)


def test_processes_split_the_rows_before_the_profile_does():
    """batch_policy=effective: two processes take 8 rows each of the 16; speed then fits them in one micro-batch."""
    plan = P.make_plan(load_config("reference"), H200_FREE, processes=2, device="cuda")
    assert (plan.processes, plan.micro_batch, plan.accumulation, plan.effective) == (2, 8, 1, 16)
    assert "world size 2" in plan.describe() and "effective batch 16" in plan.describe()


def test_metrics_record_what_ran():
    """A speed run of the 4 x 4 config records 16 x 1, the split that ran."""
    m = P.make_plan(load_config("reference"), H200_FREE, device="cuda").as_metrics()
    assert (m["per_device_batch"], m["gradient_accumulation"], m["effective_batch"], m["world_size"]) == (16, 1, 16, 1)
    assert m["profile"] == "speed" and m["gradient_checkpointing"] is False


def test_profiles_refuse_fsdp_and_auto_falls_back_to_reference(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="not supported under FSDP"):
        P.make_plan(load_config("reference", profile="speed"), H200_FREE, device="cuda")
    assert P.make_plan(load_config("reference"), H200_FREE, device="cuda").profile == "reference"


def test_an_uneven_effective_batch_is_the_batch_policys_error():
    with pytest.raises(ConfigError, match="batch_policy=per_device"):
        P.make_plan(load_config("reference"), processes=3)


def test_train_prints_and_records_the_split_that_ran(tiny_falcon_7b_arch, tiny_data, tmp_path, capsys):
    """The memory profile runs the config's 2 x 2 as 4 x 1: the printed plan, the returned metrics and the first
    line of metrics.jsonl say 4 x 1."""
    import json
    from conftest import tiny_overrides
    from falcon_qlora.train import train
    cfg = load_config(None, **tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path, max_steps=1, save_steps=100,
                                             eval_split=None, profile="memory", per_device_train_batch_size=2,
                                             gradient_accumulation_steps=2))
    result = train(cfg)
    assert "profile memory (as configured); effective batch 4 rows = 4 per device x 1 accumulation" in \
        capsys.readouterr().out
    assert (result.metrics["per_device_batch"], result.metrics["gradient_accumulation"]) == (4, 1)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["plan"]["profile"] == "memory" and first["plan"]["per_device_batch"] == 4


def test_weight_cache_is_kept_only_where_the_speed_split_still_fits():
    """The dequantized weights cost 2 bytes per 4-bit weight (13 GiB for Falcon-7B); rows per micro-batch come first,
    and the cache is dropped, saying so, where it would not fit beside them."""
    cfg = load_config("reference")
    parts = P.PARTS
    roomy = P.make_plan(cfg, H200_FREE, device="cuda", profile="speed", parts=parts)
    assert (roomy.micro_batch, "weight_cache" in roomy.parts) == (16, True)
    eager = P.make_plan(cfg, H200_FREE, device="cuda", profile="speed", parts=tuple(p for p in P.PARTS if p not in ("weight_cache", "compile")))
    with_cache, without = peak(cfg, roomy), peak(cfg, eager)
    extra = with_cache["peak_bytes"] - without["peak_bytes"]
    assert with_cache["quantized_params"] > 6.6e9  # Falcon-7B's linears; bf16 copies, less the one dequantized at a time
    assert with_cache["weight_cache_bytes"] == 2 * with_cache["quantized_params"] and not without["weight_cache_bytes"]
    assert abs(extra / with_cache["weight_cache_bytes"] - 1) < 0.03
    tight = P.make_plan(cfg, 60 * GiB, device="cuda", profile="speed", parts=parts)
    assert (tight.micro_batch, "weight_cache" in tight.parts) == (16, False)
    assert "no room for the dequantized weights" in tight.reason


def test_the_layers_compile_only_where_it_was_measured_to_pay(monkeypatch):
    """compile_layers=auto compiles the layers of both profiles on a GPU of compute capability 8.0+ with Triton, for
    runs long enough to pay the compiling back (P.COMPILE_MIN_STEPS); on/off decide it everywhere. The dequantized
    weights never go to a CPU."""
    long_run, recipe = (load_config("reference", max_steps=n) for n in (P.COMPILE_MIN_STEPS, 500))
    monkeypatch.setattr(P, "compiles", lambda device: device == "cuda")
    assert "compile" in P.make_plan(long_run, H200_FREE, device="cuda").parts
    assert "compile" in P.make_plan(long_run, T4_FREE, device="cuda").parts  # memory
    assert "compile" not in P.make_plan(recipe, H200_FREE, device="cuda").parts
    on = load_config("reference", compile_layers="on")
    assert "compile" in P.make_plan(on, H200_FREE, device="cuda").parts
    monkeypatch.setattr(P, "compiles", lambda device: False)  # a T4, or no Triton
    assert "compile" not in P.make_plan(long_run, H200_FREE, device="cuda").parts
    off = load_config("reference", max_steps=10**4, compile_layers="off")
    monkeypatch.setattr(P, "compiles", lambda device: True)
    assert "compile" not in P.make_plan(off, H200_FREE, device="cuda").parts
    monkeypatch.undo()
    cpu = P.make_plan(long_run, device="cpu", profile="speed")
    assert "compile" not in cpu.parts and "weight_cache" not in cpu.parts
    assert P.compiles("cpu") is False
