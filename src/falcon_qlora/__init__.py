"""falcon-qlora: QLoRA fine-tuning of Falcon-7B (and friends) on Guanaco-style chat data."""
__version__ = "0.1.0"
