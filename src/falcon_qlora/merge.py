"""Merge an adapter into a dequantized copy of its base: a plain transformers model, no peft or bitsandbytes needed.

    falcon-qlora merge --adapter results/final --out merged            # bf16 on a GPU, fp32 on a CPU
    falcon-qlora merge --adapter results/final --out merged --dtype fp32 --push-to-hub me/falcon-7b-guanaco
    from falcon_qlora.merge import merge; merge("results/final", "merged")

The adapter was trained against the NF4-rounded base, so that is what it is merged into: the 4-bit layers are
dequantized first (merging into NF4 itself would round most of the update away). Before anything is written, the
merged model's logits are compared with base + adapter on a few inputs. Merging the same adapter into the same
folder again does nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from .errors import UserError

MARKER = "falcon_qlora_merge.json"
CHECK_TEXTS = ("### Human: What is QLoRA? ### Assistant:",
               "### Human: Write a haiku about the sea. ### Assistant: Waves fold into foam",
               "### Human: what is two plus three? ### Assistant: two plus three is five.")
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}  # relative L2 error of the logits


def adapter_digest(adapter: Path) -> str:
    h = hashlib.sha256()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        h.update((adapter / name).read_bytes())
    return h.hexdigest()[:16]


def already_merged(adapter: Path, out: Path) -> str | None:
    marker = out / MARKER
    if (adapter / MARKER).is_file():
        return f"{adapter} is already a merged model (it has {MARKER}); nothing to merge"
    if marker.is_file() and json.loads(marker.read_text()).get("adapter_sha256") == adapter_digest(adapter):
        return f"{out} already holds this adapter merged into its base; nothing to do"
    return None


def _logits(model, tok, device):
    import torch
    with torch.no_grad():
        return [model(**{k: v.to(device) for k, v in tok(t, return_tensors="pt").items()}).logits.float().cpu()
                for t in CHECK_TEXTS]


def merge(adapter: str | Path, out: str | Path, dtype: str = "auto", base: str | None = None,
          push_to_hub: str | None = None) -> Path:
    """Dequantize the 4-bit base, merge the adapter, check logits against base + adapter, then write safetensors
    shards, the tokenizer and a model card to `out`. Returns `out`."""
    import torch
    from peft import PeftModel
    from .model import load_adapter_model
    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise UserError(f"adapter folder {adapter} does not exist")
    done = already_merged(adapter, out)
    if done:
        print(done)
        return out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"{out} exists and is not empty: choose a new --out folder")
    model, tok, cfg = load_adapter_model(adapter, base=base)  # 4-bit base + adapter, as trained
    device = next(p.device for p in model.parameters())
    compute = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point())
    reference = _logits(model, tok, device)
    base_model = model.unload()  # the 4-bit base again, adapter layers removed
    base_model.dequantize(dtype=torch.float32)  # exact NF4 values, in fp32 so the merge adds no rounding
    merged = PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload()
    name = dtype if dtype != "auto" else ("bf16" if compute == torch.bfloat16 else
                                          "fp16" if compute == torch.float16 else "fp32")
    merged = merged.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name])
    merged.eval()
    got = _logits(merged, tok, device)
    err = max(float((g - r).norm() / r.norm()) for g, r in zip(got, reference))
    if not err < TOLERANCE[name]:
        raise UserError(f"merged logits differ from base + adapter by {err:.2g} (relative; allowed "
                        f"{TOLERANCE[name]:g} in {name}): nothing was written. Try --dtype fp32")
    print(f"merged model matches base + adapter: relative logit error {err:.1e} ({name}, {len(CHECK_TEXTS)} inputs)")
    _write(merged, tok, cfg, adapter, out, name, err)
    if push_to_hub:
        from .publish import publish
        publish(out, push_to_hub, cfg)
    return out


def _write(merged, tok, cfg, adapter: Path, out: Path, dtype: str, err: float) -> None:
    from .config import save_run_config
    from .publish import known_metrics, model_card
    out.mkdir(parents=True, exist_ok=True)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attr):
            delattr(merged.config, attr)
    merged.config.use_cache = True
    merged.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    tok.save_pretrained(out)
    save_run_config(cfg, out)
    (out / "README.md").write_text(model_card(cfg, "merged", known_metrics(adapter)), encoding="utf-8")
    (out / MARKER).write_text(json.dumps({"adapter": str(adapter.resolve()), "adapter_sha256": adapter_digest(adapter),
                                          "base": cfg.model_name_or_path, "dtype": dtype,
                                          "max_relative_logit_error": err}, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out} (safetensors, tokenizer, model card); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})")


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="falcon-qlora merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="adapter folder written by `falcon-qlora train`")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights of the merged model (auto: the training compute dtype)")
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the merged folder to this hub repo")
    a = p.parse_args(argv)
    merge(a.adapter, a.out, a.dtype, a.base, a.push_to_hub)
    return 0
