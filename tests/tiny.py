"""Builders for the test fixtures: a tiny random Falcon with a tokenizer trained here, and Guanaco-style rows."""
from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("zero one two three four five six seven eight nine ten plus minus is what the answer "
         "please tell me a colour red green blue sky grass sun yellow name of").split()


def guanaco_rows(n: int, seed: int = 0) -> list[dict]:
    """Deterministic '### Human: ... ### Assistant: ...' rows on a tiny arithmetic task."""
    r = random.Random(seed)
    nums = WORDS[:11]
    rows = []
    for _ in range(n):
        a, b = r.randrange(5), r.randrange(5)
        rows.append({"text": f"### Human: what is {nums[a]} plus {nums[b]}? ### Assistant: {nums[a]} plus "
                             f"{nums[b]} is {nums[a + b]}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
    return path


def logits(model, tok, text: str):
    """fp32 logits of `text` on the CPU, whatever device the model sits on."""
    import torch
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt").to(device)).logits.float().cpu()


def build_tokenizer(path: Path, eos_only: bool = False):
    """A byte-level BPE trained on the task's words, with Falcon's special tokens (EOS <|endoftext|>, no pad);
    eos_only: EOS is its only special token, as in GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    extra = [] if eos_only else [">>TITLE<<", ">>ABSTRACT<<", ">>SUFFIX<<"]
    specials = extra + ["<|endoftext|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [x["text"] for x in guanaco_rows(400, seed=1)] + [" ".join(WORDS)] * 5
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                  **({"additional_special_tokens": extra} if extra else {}))
    tok.save_pretrained(path)
    return tok


def build_falcon(path: Path, new_decoder_architecture: bool, seed: int = 0, eos_only: bool = False) -> Path:
    """A 2-layer random Falcon (~100k params) saved as safetensors with its tokenizer."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, eos_only=eos_only)
    extra = dict(num_kv_heads=2) if new_decoder_architecture else dict(multi_query=True)
    cfg = FalconConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       new_decoder_architecture=new_decoder_architecture, parallel_attn=True, bias=False,
                       alibi=False, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(seed)
    FalconForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def build_word_falcon(path: Path, seed: int = 0) -> Path:
    """A tiny random Falcon with a word-level tokenizer (whitespace-split words, as the GPU benchmarks use): the kind
    of tokenizer transformers' stop_strings cannot handle."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import FalconConfig, FalconForCausalLM, PreTrainedTokenizerFast
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<pad>", "[UNK]", "###", "Human:", "Assistant:"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)) + ["?", "."])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>", unk_token="[UNK]")
    tok.save_pretrained(path)
    cfg = FalconConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       multi_query=True, parallel_attn=True, bias=False, alibi=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    FalconForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path
