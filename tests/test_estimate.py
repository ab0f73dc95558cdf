"""estimate: config-only memory and disk figures, held against what a real run allocates on the CPU."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from tiny import build_tokenizer, guanaco_rows, write_jsonl

from falcon_qlora.config import load_config, make_config
from falcon_qlora.estimate import estimate
from falcon_qlora.memory import quantized_bytes
from falcon_qlora.measure import training_peak
from falcon_qlora.plan import PROFILE_PARTS


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory):
    """Rows longer than any max_length used here, so every row is truncated to it (the estimate's assumption)."""
    d = tmp_path_factory.mktemp("long")
    rows = guanaco_rows(40, seed=3)
    write_jsonl(d / "train.jsonl", [{"text": " ".join(r["text"] for r in rows[i:i + 20])} for i in range(16)])
    return d


@pytest.fixture(scope="module")
def wide_falcon(tmp_path_factory):
    """A Falcon-7B-style model (multi-query attention) wide enough that activations outweigh TRL's loss tiles."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM
    path = tmp_path_factory.mktemp("wide")
    tok = build_tokenizer(path)
    cfg = FalconConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                       multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False,
                       alibi=False, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    FalconForCausalLM(cfg).save_pretrained(path)
    return path


def test_falcon_7b_counts_offline():
    """The reference model's shapes come from the built-in table: no download, exact parameter counts."""
    est = estimate(load_config("reference"))
    assert est["params"] == 6_921_720_704            # Falcon-7B, embeddings tied to the LM head
    assert est["quantized_params"] == 32 * 4544 * (4672 + 4544 + 2 * 18176)
    assert est["lora_params"] == 64 * 32 * ((4544 + 4672) + (4544 + 4544) + 2 * (4544 + 18176))
    assert 3.4 * 2**30 < est["weights_bytes"] < 4.0 * 2**30  # ~3.6 GiB measured on the GPU (stack facts)


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_bytes_match_bitsandbytes(double_quant):
    """The 4-bit weight formula equals the bytes bitsandbytes really stores (packed weight + constants)."""
    import bitsandbytes.functional as F
    import torch
    w = torch.randn(384, 320)
    q, st = F.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)
    tensors = [q, st.absmax, st.code] + ([st.state2.absmax, st.state2.code] if double_quant else [])
    real = sum(t.numel() * t.element_size() for t in tensors)
    assert abs(quantized_bytes(w.numel(), double_quant) - real) <= 8


def test_checkpoint_count_follows_save_total_limit():
    limited = estimate(load_config("reference"))
    unlimited = estimate(load_config("reference", save_total_limit=None))
    assert (limited["checkpoints_written"], limited["checkpoints_kept"]) == (50, 3)
    assert unlimited["checkpoints_kept"] == 50
    assert unlimited["disk_bytes"] - limited["disk_bytes"] == 47 * limited["checkpoint_bytes"]


@pytest.mark.parametrize("case", ["tiny", "wide", "wide-ckpt"])
def test_peak_within_15_percent_of_measured(case, tiny_falcon_7b_arch, wide_falcon, long_rows, tmp_path):
    """A real training run (2 steps, optimizer state included) on the CPU peaks within 15% of the estimate."""
    model = tiny_falcon_7b_arch if case == "tiny" else wide_falcon
    kw = dict(max_length=64) if case == "tiny" else dict(max_length=192, per_device_train_batch_size=1)
    cfg = make_config(**tiny_overrides(model, long_rows, tmp_path, max_steps=2, eval_split=None,
                                       gradient_checkpointing=case.endswith("ckpt"), **kw))
    measured = training_peak(cfg)
    est = estimate(cfg, device=_device())  # measured where the run ran: the GPU where there is one
    print(f"{case}: estimated {est['peak_bytes']:,} measured {measured:,} ratio {est['peak_bytes'] / measured:.3f}")
    assert abs(est["peak_bytes"] / measured - 1) < 0.15, (est, measured)
    if case.startswith("wide"):  # the activations are most of what is measured, so they are what is checked
        assert est["activation_bytes"] > 0.8 * est["peak_bytes"]


def test_cli_table_and_json(capsys):
    from falcon_qlora.estimate import cli
    assert cli(["--config", "reference", "--per_device_train_batch_size", "16", "--profile", "reference"]) == 0
    table = capsys.readouterr().out
    assert "peak cuda memory" in table and "batch 16 x 512" in table
    assert cli(["--config", "reference", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 6_921_720_704


def test_cli_models_the_assumed_gpu(capsys):
    """--gpu_memory: auto resolves for that GPU; the table has one row per profile; --json carries the rows."""
    from falcon_qlora.errors import UserError
    from falcon_qlora.estimate import cli
    assert cli(["--config", "reference", "--gpu_memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "profile speed (auto: 16 rows per micro-batch fit 80 GiB free without checkpointing): micro-batch 16 x 1" \
        in out
    assert cli(["--config", "reference", "--gpu_memory", "80", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["profiles"]
    assert [r["profile"] for r in rows] == ["reference", "memory", "speed"]
    assert rows[1]["offload"] and rows[1]["host_bytes"] > 0 and rows[2]["micro_batch"] == 16
    with pytest.raises(UserError, match="--gpu_memory"):
        cli(["--config", "reference", "--gpu_memory", "lots"])


def test_cli_takes_train_keys_and_hyphenated_options(capsys):
    """Train's config keys are overrides (--max_length), the command's own options are spelled as in the other
    commands (--gpu_memory, --gpu-memory): rows of 2048 tokens on an H200 run speed at 8 x 2."""
    from falcon_qlora.estimate import cli
    assert cli(["--gpu-memory", "139", "--max_length", "2048"]) == 0
    assert "profile speed (auto: 8 rows per micro-batch fit 139 GiB free" in capsys.readouterr().out


GiB = 2**30


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_profiles_at_the_reference_recipe():
    """speed (no checkpointing) needs more GPU than the reference, memory (offloaded layer inputs) less."""
    cfg = load_config("reference")
    ref, mem = estimate(cfg, profile="reference"), estimate(cfg, profile="memory")
    speed = estimate(cfg, profile="speed", free_bytes=80 * GiB)
    assert (ref["micro_batch"], ref["accumulation"], ref["checkpointing"], ref["host_bytes"]) == (4, 4, True, 0)
    assert speed["peak_bytes"] > ref["peak_bytes"] > mem["peak_bytes"]
    assert not speed["checkpointing"] and mem["checkpointing"]
    assert speed["optim"] == "adamw_torch_fused" and ref["optimizer_paged"]  # paged states: not in the GPU peak


def test_estimate_costs_the_runs_plan():
    """estimate decides nothing: its split, optimizer and profile are make_plan's."""
    from falcon_qlora.plan import make_plan
    cfg = load_config("reference")
    for free in (16 * GiB, 40 * GiB, 80 * GiB):
        e, p = estimate(cfg, free_bytes=free), make_plan(cfg, free, device="cuda")
        assert (e["profile"], e["micro_batch"], e["accumulation"], e["checkpointing"], e["optim"]) == \
            (p.profile, p.micro_batch, p.accumulation, p.checkpointing, p.optim)


def test_auto_resolves_like_training():
    """auto without a GPU and without an assumed one models the reference path; with one, speed or memory."""
    from falcon_qlora.plan import make_plan
    cfg = load_config("reference")
    assert estimate(cfg)["profile"] == make_plan(cfg, device="cuda").profile  # this GPU's free memory, or none
    if not torch.cuda.is_available():
        assert estimate(cfg)["profile"] == "reference"
    assert estimate(cfg, device="cpu", free_bytes=80 * GiB)["profile"] == "reference"
    assert estimate(cfg, free_bytes=80 * GiB)["profile"] == "speed"
    assert estimate(cfg, free_bytes=12 * GiB)["profile"] == "memory"


def test_offload_moves_layer_inputs_to_host():
    """The same split with and without offloading: the checkpointed inputs leave the GPU for pinned host memory."""
    cfg = load_config("reference")
    on = estimate(cfg, profile="memory", split=(8, 2, True, False))
    off = estimate(cfg, profile="memory", split=(8, 2, True, True))
    inputs = 32 * 8 * 512 * 4544 * 4  # 32 layers x tokens x hidden, fp32 residual stream
    assert on["host_bytes"] == 0 and off["host_bytes"] >= inputs
    assert on["peak_bytes"] - off["peak_bytes"] > 0.8 * inputs


def test_speed_profile_peak_on_cpu(wide_falcon, long_rows, tmp_path):
    """profile=speed on a CPU (padding-free rows, Falcon attention through SDPA per row, single-GEMM LoRA; the
    split and checkpointing stay: no GPU memory to plan with) peaks within 15% of the estimate."""
    cfg = make_config(**tiny_overrides(wide_falcon, long_rows, tmp_path, max_steps=2, eval_split=None,
                                       gradient_checkpointing=False, max_length=192, per_device_train_batch_size=2,
                                       profile="speed"))
    measured = training_peak(cfg)
    est = estimate(cfg, device=_device())
    ref = estimate(cfg, device=_device(), profile="reference")
    print(f"speed: estimated {est['peak_bytes']:,} (reference path {ref['peak_bytes']:,}) measured {measured:,} "
          f"ratio {est['peak_bytes'] / measured:.3f}")
    # on a GPU with room the plan adds the dequantized weights (memory for speed): the rest is below the reference
    assert est["profile"] == "speed" and est["peak_bytes"] - est["weight_cache_bytes"] < ref["peak_bytes"]
    assert abs(est["peak_bytes"] / measured - 1) < 0.15, (est, measured)


def test_cublas_workspaces_are_a_per_process_constant(monkeypatch):
    """Two cuBLAS workspaces (the training thread's and autograd's), torch's default size or CUBLAS_WORKSPACE_CONFIG's;
    none on a CPU."""
    from falcon_qlora.estimate_activations import cublas_workspace_bytes
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert cublas_workspace_bytes((9, 0)) == cublas_workspace_bytes(None) == 32 * 2**20  # Hopper: ":4096:8"
    assert cublas_workspace_bytes((8, 0)) == 2 * 4096 * 1024 + 8 * 16 * 1024          # ":4096:2:16:8"
    cfg = load_config("demo")
    default, cpu = estimate(cfg, "cuda", "reference"), estimate(cfg, "cpu", "reference")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    small = estimate(cfg, "cuda", "reference")
    assert default["peak_bytes"] - small["peak_bytes"] == 2 * (32 * 2**20 - 16 * 1024 * 8)
    assert cpu["peak_bytes"] == estimate(cfg, "cpu", "reference")["peak_bytes"]


@pytest.mark.parametrize("fused", [False, True])
def test_lora_weight_copies_kept_under_autocast(fused):
    """Under bf16 autocast the GEMMs of a LoRA branch keep bf16 copies of its weights: A and B in peft's forward, and
    in profiles' single-GEMM forward B too when the layer's output is bf16 (as from this nn.Linear base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from falcon_qlora.estimate_activations import lora_weight_copies
    from falcon_qlora.fast_paths import patch_lora_forward

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(32, 48, bias=False)

        def forward(self, x):
            return self.q_proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj"]))
    if fused:
        assert patch_lora_forward(model) == 1
    lora_shapes = {tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    saved = {}

    def pack(t):
        if t.dtype == torch.bfloat16 and tuple(t.shape) in lora_shapes | {s[::-1] for s in lora_shapes}:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(3, 32, requires_grad=True))  # an activation: a gradient flows to it
    sh = dict(linears=[("q_proj", 32, 48)], layers=1)
    assert sum(saved.values()) == lora_weight_copies(sh, load_config("demo", lora_r=4), 2, fused, 2) == 4 * 80 * 2


def test_profiles_norm_patch_leaves_a_llama_in_bf16(tmp_path):
    """The norm patch (LayerNorm outputs in bf16, residual stream kept fp32) only touches models with LayerNorms: a
    4-bit Llama (RMSNorm) keeps its bf16 residual stream and MLP, as in the reference path, and estimate counts the
    same bytes for it with or without the patch."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    from falcon_qlora.fast_paths import norms_in_compute_dtype
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.bfloat16)
    seen = []
    model.model.layers[0].mlp.act_fn.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    ids = torch.randint(0, 64, (1, 8)).to(model.device)  # a 4-bit model loads onto the GPU where there is one
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        model(ids)
        assert norms_in_compute_dtype(model) == 0
        model(ids)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert not hasattr(model.get_input_embeddings(), "_fq_hook")
    cfg, G = load_config("demo"), 2**30
    speed = estimate(cfg, "cuda", "speed", 80 * G)
    no_norms = estimate(cfg, "cuda", "speed", 80 * G, parts=[p for p in PROFILE_PARTS["speed"] if p != "norms"])
    assert speed["layer_activation_bytes"] == no_norms["layer_activation_bytes"]


def test_gradients_without_accumulation_are_not_held_at_the_loss_head():
    """Without accumulation the LoRA gradients are None until backward reaches the layers (Trainer zeroes them to
    None): the demo's peak (at TRL's loss head) holds none; with accumulation they are held through the step."""
    cfg = load_config("demo")
    one = estimate(cfg, "cuda", "reference")
    two = estimate(cfg, "cuda", "reference", split=(4, 2, False, False))
    assert one["accumulation"] == 1 and two["accumulation"] == 2
    assert two["peak_bytes"] - one["peak_bytes"] == one["grad_bytes"]
