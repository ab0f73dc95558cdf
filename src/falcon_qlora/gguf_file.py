"""Writing a transformers model as a GGUF file that llama.cpp runs: tensor names, hyperparameters and the BPE
tokenizer, for the two architectures falcon-qlora trains (Falcon, both decoder layouts, and Llama).

    plan = tensor_plan(model.config, model.state_dict(), "q8_0")   # also works on a meta-device model: sizes only
    write(path, model, tokenizer, chat_template, "q8_0")

Names and layouts follow llama.cpp's own converter (convert_hf_to_gguf.py): Falcon's fused query_key_value is
regrouped from (kv group: its queries, one key, one value) into (all queries, all keys, all values); Llama's q_proj
and k_proj rows are permuted back to the interleaved rotary layout llama.cpp expects. Tensors are streamed into the
file one at a time, so host memory never holds a second copy of the model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from .errors import UserError

WRITTEN = ("f32", "f16", "bf16", "q8_0")   # quantized by the gguf package itself
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}   # llama_ftype, written as general.file_type
# llama.cpp's converter names a BPE pre-tokenizer by hashing how the tokenizer encodes this text (chktxt in
# convert_hf_to_gguf.py); these are its hashes for the tokenizers of the models falcon-qlora is used with.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 '
          '3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}


def unsupported(config) -> str | None:
    """Why llama.cpp could not run a model of this config, or None. Checked before any work is done."""
    kind = getattr(config, "model_type", None)
    if kind == "falcon":
        if config.alibi:
            return ("this Falcon uses ALiBi position biases (Falcon-RW): llama.cpp's Falcon has rotary positions only, "
                    "so it cannot run this model")
        if config.bias:
            return "this Falcon has linear-layer biases, which llama.cpp's Falcon does not load"
        if not (config.parallel_attn or config.new_decoder_architecture):
            return "this Falcon has sequential attention/MLP blocks; llama.cpp's Falcon runs only parallel ones"
        return None
    if kind == "llama":
        rope = _rope(config)
        if rope.get("rope_type", "default") not in ("default", "linear") or getattr(config, "attention_bias", False):
            return (f"this Llama uses {rope.get('rope_type')} rope scaling or attention biases, which the GGUF "
                    "export does not write")
        return None
    return f"architecture {kind!r}: GGUF export writes Falcon and Llama-architecture models only"


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {**rope, "rope_theta": theta}


@dataclass
class Tensor:
    name: str          # GGUF name
    source: str        # state-dict key
    shape: tuple       # logical shape, numpy order (rows, columns)
    qtype: object      # gguf.GGMLQuantizationType
    nbytes: int


def _gguf_name(config, key: str) -> str | None:
    import gguf
    arch = gguf.MODEL_ARCH.FALCON if config.model_type == "falcon" else gguf.MODEL_ARCH.LLAMA
    mapped = gguf.get_tensor_name_map(arch, config.num_hidden_layers).get_name(key, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise UserError(f"tensor {key} has no GGUF name for {config.model_type}: it is not part of the architecture "
                        "llama.cpp runs")
    return mapped


def tensor_plan(config, state: dict, quant: str) -> list[Tensor]:
    """Every tensor as it will be written: name, shape, type, bytes. `state` may hold meta tensors (sizes only).
    1-D tensors (norms) stay f32 as llama.cpp requires; rows not divisible by q8_0's block of 32 fall back to f16, as
    in llama.cpp's converter. A tied output matrix is not written: llama.cpp reuses token_embd."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape
    Q = gguf.GGMLQuantizationType
    want = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[quant]
    tied = getattr(config, "tie_word_embeddings", False)
    plan = []
    for key, t in state.items():
        if key == "lm_head.weight" and tied:
            continue
        shape = tuple(t.shape)
        qtype = Q.F32 if len(shape) == 1 else want
        if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
            qtype = Q.F16
        nbytes = 1
        for d in quant_shape_to_byte_shape(shape, qtype):
            nbytes *= d
        plan.append(Tensor(_gguf_name(config, key), key, shape, qtype, nbytes))
    return plan


def _layout(config, key: str, w):
    """A state-dict tensor (torch, fp32) rearranged into the layout llama.cpp reads."""
    if config.model_type == "falcon" and key.endswith("query_key_value.weight"):
        n_head = config.num_attention_heads
        n_kv = config.num_kv_heads if config.new_decoder_architecture else 1
        hd = config.hidden_size // n_head
        qkv = w.view(n_kv, n_head // n_kv + 2, hd, w.shape[-1])
        q = qkv[:, :-2].reshape(n_head * hd, -1)
        k = qkv[:, [-2]].reshape(n_kv * hd, -1)
        v = qkv[:, [-1]].reshape(n_kv * hd, -1)
        return __import__("torch").cat((q, k, v))
    if config.model_type == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in key else config.num_key_value_heads
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w


def _metadata(writer, config, quant: str) -> None:
    rope = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if config.model_type == "falcon":
        writer.add_tensor_data_layout("jploski")   # the regrouped query_key_value, see _layout
        writer.add_feed_forward_length(getattr(config, "ffn_hidden_size", None) or 4 * config.hidden_size)
        writer.add_head_count_kv(config.num_kv_heads if config.new_decoder_architecture else 1)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_vocab_size(config.vocab_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // config.num_attention_heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        if rope.get("rope_type") == "linear":
            import gguf
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
    writer.add_file_type(FILE_TYPE[quant])
    if quant == "q8_0":
        writer.add_quantization_version(2)


def pre_tokenizer(tok) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (how text is split before BPE)."""
    name = PRE_TOKENIZERS.get(sha256(str(tok.encode(CHKTXT)).encode()).hexdigest())
    if name:
        return name
    pre = json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"     # a plain byte-level BPE splits text exactly as GPT-2's does
    raise UserError("the tokenizer splits text in a way this export does not recognise, so llama.cpp would tokenize "
                    "differently than training did; export supports Falcon, SmolLM2, Llama 3, Qwen2 and GPT-2 style "
                    "byte-level BPE tokenizers")


def adds_bos(tok) -> bool:
    """Whether the tokenizer starts every encoding with BOS (llama.cpp then does the same)."""
    return tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]


def _tokenizer(writer, tok, vocab_size: int, template: str) -> None:
    import gguf
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise UserError(f"the tokenizer is a {spec['model']['type']} tokenizer; GGUF export writes byte-level BPE "
                        "tokenizers (those of Falcon, SmolLM2, Llama 3) only")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} "
                        "embeddings: export the tokenizer the model was trained with")
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id")
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)
    writer.add_add_bos_token(adds_bos(tok))
    writer.add_add_eos_token(False)
    writer.add_chat_template(template)


def write(path: Path, model, tok, template: str, quant: str, name: str) -> int:
    """Write `model` (a transformers causal LM) and its tokenizer to `path` as GGUF. Returns the file size."""
    import gguf
    import numpy as np
    import torch
    config = model.config
    state = model.state_dict()
    plan = tensor_plan(config, state, quant)
    writer = gguf.GGUFWriter(path, "falcon" if config.model_type == "falcon" else "llama")
    writer.add_type("model")
    writer.add_name(name)
    _metadata(writer, config, quant)
    _tokenizer(writer, tok, config.vocab_size, template)
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in plan:   # one tensor in host memory at a time
        with torch.no_grad():
            w = _layout(config, t.source, state[t.source].detach().to("cpu", torch.float32))
        data = gguf.quants.quantize(np.ascontiguousarray(w.numpy()), t.qtype)
        writer.write_tensor_data(data)
    writer.close()
    return path.stat().st_size
