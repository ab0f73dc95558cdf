"""falcon-qlora: QLoRA fine-tuning of Falcon-7B (and friends) on Guanaco-style chat data."""
__version__ = "0.1.0"

from .guards import quiet_bitsandbytes as _quiet_bitsandbytes

_quiet_bitsandbytes()  # before any module imports bitsandbytes (see guards.quiet_bitsandbytes)
