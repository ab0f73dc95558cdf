"""Every run reports what it achieved: real-token throughput, peak GPU memory and MFU, in its logs and at the end."""
import json

import torch

from conftest import tiny_overrides
from falcon_qlora.throughput import flops_per_token, peak_tflops, summary


def test_every_loss_log_after_the_first_carries_the_throughput(tiny_falcon_7b_arch, tiny_data, tmp_path, capsys):
    from falcon_qlora.config import make_config
    from falcon_qlora.train import train
    result = train(make_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / "run", max_steps=4,
                                                save_steps=100, eval_split=None)))
    logs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in logs if "loss" in x]
    assert len(losses) == 4 and all(x["tokens_per_second"] > 0 for x in losses)
    assert all(("peak_gpu_memory_gib" in x) == torch.cuda.is_available() for x in losses)
    out = capsys.readouterr().out
    assert "throughput: " in out and "real tokens/s" in out and "first step" in out
    assert losses[0]["seconds_to_first_step"] > 0 and all("seconds_to_first_step" not in x for x in losses[1:])
    assert result.log_history[-2]["tokens_per_second"] == losses[-1]["tokens_per_second"]


def test_flops_per_token_counts_matmuls_lora_and_attention(tiny_falcon_7b_arch):
    """4 FLOP per frozen matmul weight (forward + input gradient), 6 per LoRA weight, attention growing with length."""
    from falcon_qlora.config import load_config
    from falcon_qlora.model import attach_lora, load_base_model
    cfg = load_config(model_name_or_path=str(tiny_falcon_7b_arch), compute_dtype="fp32", lora_r=4)
    model = attach_lora(load_base_model(cfg), cfg)
    c = model.config
    h, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    qkv = h * (h + 2 * h // c.num_attention_heads)  # multi-query: one K and one V head
    per_layer = qkv + h * h + 2 * h * 4 * h
    lora = 4 * ((h + qkv // h) + 2 * h + (h + 4 * h) * 2)
    want = 4 * (layers * per_layer + h * vocab) + 6 * layers * lora + layers * 6 * h * 10
    assert flops_per_token(model, [10], lora_r=4) == want


def test_gpu_peaks_come_from_the_name_longest_match_first():
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("Tesla T4") == 65.0
    assert peak_tflops("NVIDIA A10G") == 70.0 and peak_tflops("NVIDIA A10") == 125.0
    assert peak_tflops("Some Future GPU") is None and peak_tflops(None) is None


def test_summary_averages_the_logged_throughput():
    line = summary([{"loss": 1, "tokens_per_second": 100.0, "mfu_percent": 40.0, "peak_gpu_memory_gib": 5.0},
                    {"loss": 1, "tokens_per_second": 300.0, "mfu_percent": 50.0, "peak_gpu_memory_gib": 6.0}])
    assert line == "throughput: 200 real tokens/s, peak GPU memory 6.00 GiB, MFU 45.0 % of the GPU's dense peak"
    assert "first step 12 s after start" in summary([{"loss": 1, "tokens_per_second": 1.0,
                                                      "seconds_to_first_step": 12.4}])
    assert summary([{"loss": 1}]) is None
