"""Shared by the GPU benchmarks: the word-level tokenizer of the random Falcons (no hub here)."""
from pathlib import Path


def save_word_tokenizer(path: Path, vocab: int) -> None:
    """w0 .. w{vocab-9} plus EOS and the chat markers, as a PreTrainedTokenizerFast saved into path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {f"w{i}": i for i in range(vocab - 8)}
    for j, sp in enumerate(["<|endoftext|>", "###", "Human:", "Assistant:", "[UNK]"]):
        words[sp] = vocab - 8 + j
    tk = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(path)
