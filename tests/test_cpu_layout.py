"""bitsandbytes' CPU repacking: on CPUs with AVX512-BF16 an eval-mode forward repacks a Linear4bit's weight into an
inference-only layout that cannot train or dequantize. falcon-qlora keeps the trainable layout everywhere, and
training and merge stop on a repacked layer instead of computing garbage."""
import pytest
import torch

from conftest import tiny_overrides
from falcon_qlora.config import load_config, make_config
from falcon_qlora.errors import UserError
from falcon_qlora.model import (attach_lora, check_trainable_layout, keep_trainable_layout, load_base_model,
                                load_tokenizer, repacked_layers)

TEXT = "### Human: what is two plus two? ### Assistant: two plus two is four."


def _cfg(path):
    return load_config(model_name_or_path=str(path), compute_dtype="fp32", lora_r=4, lora_dropout=0.0)


def _repack(layer):
    """Put one layer's weight into the CPU inference layout exactly as bitsandbytes' Linear4bit.forward does
    (a pure tensor reshuffle, so this works on any CPU)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)


def _lora_grads(model, tok):
    batch = {k: v.to(next(model.parameters()).device) for k, v in tok(TEXT, return_tensors="pt").items()}
    model.train()
    model.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _eval_forward(model, tok):
    batch = {k: v.to(next(model.parameters()).device) for k, v in tok(TEXT, return_tensors="pt").items()}
    model.eval()
    with torch.no_grad():
        model(**batch)


def test_eval_then_train_gives_the_same_gradients_as_training_alone(tiny_falcon_7b_arch):
    """The real sequence that broke the demo on AVX512-BF16 CPUs: evaluate, then train the same model."""
    cfg = _cfg(tiny_falcon_7b_arch)
    tok = load_tokenizer(str(tiny_falcon_7b_arch), cfg)
    torch.manual_seed(0)
    fresh = attach_lora(load_base_model(cfg), cfg)
    torch.manual_seed(0)
    evaluated = attach_lora(load_base_model(cfg), cfg)
    for p in [p for n, p in evaluated.named_parameters() if "lora_B" in n] + \
             [p for n, p in fresh.named_parameters() if "lora_B" in n]:
        torch.nn.init.constant_(p, 0.01)  # non-zero B, so every LoRA factor gets a gradient
    _eval_forward(evaluated, tok)
    assert repacked_layers(evaluated) == []
    want, got = _lora_grads(fresh, tok), _lora_grads(evaluated, tok)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bitsandbytes_would_repack_on_this_cpu_without_the_guard(tiny_falcon_7b_arch):
    """Shows the hazard is real where the CPU has AVX512-BF16 (skipped elsewhere: there is nothing to repack)."""
    from bitsandbytes.functional import has_avx512bf16
    if torch.cuda.is_available() or not has_avx512bf16():
        pytest.skip("bitsandbytes repacks only 4-bit layers that run on a CPU with AVX512-BF16; here "
                    + ("the model loads onto the GPU" if torch.cuda.is_available() else "the CPU lacks AVX512-BF16"))
    cfg = _cfg(tiny_falcon_7b_arch)
    model = load_base_model(cfg)
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on such a CPU
    _eval_forward(model, load_tokenizer(str(tiny_falcon_7b_arch), cfg))
    assert len(repacked_layers(model)) == 4 * model.config.num_hidden_layers


def test_every_loaded_4bit_layer_has_repacking_turned_off(tiny_falcon_7b_arch):
    model = load_base_model(_cfg(tiny_falcon_7b_arch))
    flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert flags and not any(flags)
    assert keep_trainable_layout(model) == len(flags)


def test_the_guard_names_a_repacked_layer(tiny_falcon_7b_arch):
    model = load_base_model(_cfg(tiny_falcon_7b_arch))
    _repack(model.transformer.h[1].mlp.dense_4h_to_h)
    with pytest.raises(UserError, match=r"transformer\.h\.1\.mlp\.dense_4h_to_h.*training"):
        check_trainable_layout(model, "training")


def test_train_stops_on_a_repacked_model_before_any_step(tiny_falcon_7b_arch, tiny_data, tmp_path):
    from falcon_qlora.train import train
    cfg = make_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / "run"))
    model = load_base_model(cfg)
    _repack(model.transformer.h[0].self_attention.query_key_value)
    with pytest.raises(UserError, match="query_key_value.*CPU inference layout"):
        train(cfg, model=model)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_merge_stops_on_a_repacked_base(tiny_falcon_7b_arch):
    from falcon_qlora.merge import merged_model
    model = load_base_model(_cfg(tiny_falcon_7b_arch))
    _repack(model.transformer.h[0].mlp.dense_h_to_4h)
    with pytest.raises(UserError, match="dense_h_to_4h.*dequantizing"):
        merged_model(model, adapter=None)
