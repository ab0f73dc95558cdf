"""Model: the base is really 4-bit (Falcon included), the fix stays confined to loading, the tokenizer pads apart
from EOS."""
import pytest
import torch

from falcon_qlora.config import load_config
from falcon_qlora.errors import UserError
from falcon_qlora.model import assert_4bit, attach_lora, bnb_config, count_linear4bit, load_base_model, load_tokenizer

TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def cfg_for(path, **kw):
    return load_config(model_name_or_path=str(path), compute_dtype="fp32", **kw)


def test_stock_transformers_leaves_falcon_unquantized_and_the_check_catches_it(tiny_falcon):
    """The bug we fix: plain from_pretrained with a 4-bit config gives FalconLinear layers, not Linear4bit."""
    from transformers import AutoModelForCausalLM
    cfg = cfg_for(tiny_falcon)
    model = AutoModelForCausalLM.from_pretrained(tiny_falcon, quantization_config=bnb_config(cfg, torch.float32))
    assert count_linear4bit(model) == 0
    with pytest.raises(UserError, match="not bnb Linear4bit"):
        assert_4bit(model, TARGETS)


def test_load_base_model_gives_linear4bit_nf4_layers(tiny_falcon):
    import bitsandbytes as bnb
    model = load_base_model(cfg_for(tiny_falcon))
    assert count_linear4bit(model) == 4 * model.config.num_hidden_layers
    layer = model.transformer.h[0].mlp.dense_h_to_4h
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quant
    assert layer.weight.dtype == torch.uint8


def test_the_fix_is_confined_to_loading(tiny_falcon):
    import transformers.models.falcon.modeling_falcon as mf
    load_base_model(cfg_for(tiny_falcon))
    assert mf.FalconLinear is not torch.nn.Linear
    plain = load_base_model(cfg_for(tiny_falcon, load_in_4bit=False))
    assert type(plain.transformer.h[0].mlp.dense_h_to_4h) is mf.FalconLinear


def test_pad_token_differs_from_eos_and_pads_right(tiny_falcon_7b_arch):
    tok = load_tokenizer(str(tiny_falcon_7b_arch), cfg_for(tiny_falcon_7b_arch))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


def test_lora_on_the_four_falcon_linears_only_adapter_trains(tiny_falcon_7b_arch):
    cfg = cfg_for(tiny_falcon_7b_arch, lora_r=4)
    model = attach_lora(load_base_model(cfg), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].split(".")[-1] for n in trainable} == set(TARGETS)


def test_unknown_target_module_lists_the_real_ones(tiny_falcon_7b_arch):
    cfg = cfg_for(tiny_falcon_7b_arch, lora_target_modules=["q_proj"])
    with pytest.raises(UserError, match="q_proj not found.*query_key_value"):
        attach_lora(load_base_model(cfg), cfg)


def test_remote_code_is_off_by_default():
    assert load_config().trust_remote_code is False
