"""Publishing to the Hugging Face hub: a complete folder (adapter or merged weights, tokenizer, run config and a
model card with the recipe and metrics), then one upload with huggingface_hub.

    falcon-qlora train ... --push_to_hub me/falcon-7b-guanaco-qlora      # the adapter, at the end of training
    falcon-qlora merge --adapter results/final --out merged --push_to_hub me/falcon-7b-guanaco
    from falcon_qlora.publish import publish; publish("results/final", "me/my-adapter")

The folder is built (and kept) before anything touches the network, so an upload that fails leaves a folder that can
be uploaded later with `hf upload REPO FOLDER`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import UserError

RECIPE_KEYS = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "compute_dtype", "lora_r",
               "lora_alpha", "lora_dropout", "lora_target_modules", "max_length", "per_device_train_batch_size",
               "gradient_accumulation_steps", "optim", "learning_rate", "lr_scheduler_type", "warmup_ratio",
               "max_grad_norm", "max_steps", "gradient_checkpointing", "completion_only_loss", "packing", "seed")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "model.safetensors.index.json",
                "config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja")


def kind_of(folder: Path) -> str:
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "merged"
    raise UserError(f"{folder} holds neither an adapter (adapter_config.json) nor a model (config.json): pass the "
                    "folder written by `falcon-qlora train` (results/final) or `falcon-qlora merge`")


def known_metrics(folder: Path) -> dict:
    """Held-out figures saved near a run: eval.json (falcon-qlora eval) or the last eval of metrics.jsonl."""
    from .rundir import RunDir
    near = (RunDir(folder), RunDir(Path(folder).parent))  # the adapter folder, then its run dir
    for candidate in (d.eval for d in near):
        if candidate.is_file():
            r = json.loads(candidate.read_text())
            return {f"{k} {m}": round(r[k][m], 4) for k in ("base", "adapter") for m in ("loss", "perplexity",
                                                                                          "mean_token_accuracy")}
    for candidate in (d.metrics for d in near):
        if candidate.is_file():
            rows = [json.loads(x) for x in candidate.read_text().splitlines() if x.strip()]
            evals = [x for x in rows if "eval_loss" in x]
            losses = [x for x in rows if "loss" in x]
            out = {}
            if losses:
                out["final train loss"] = round(losses[-1]["loss"], 4)
            if evals:
                out["held-out loss"] = round(evals[-1]["eval_loss"], 4)
            return out
    return {}


def model_card(cfg, kind: str, metrics: dict, repo_id: str | None = None) -> str:
    """README.md for the hub: front matter (base model, dataset, library) and the recipe that produced it."""
    lib = "peft" if kind == "adapter" else "transformers"
    front = ["---", f"base_model: {cfg.model_name_or_path}", f"library_name: {lib}", "pipeline_tag: text-generation",
             "tags: [qlora, lora, falcon-qlora" + (", merged" if kind == "merged" else "") + "]"]
    from .config import dataset_names
    hub = [d for d in dataset_names(cfg) if "/" in d and not Path(d).exists()]
    if hub:
        front.append(f"datasets: [{', '.join(hub)}]")
    front.append("---")
    title = repo_id or f"{cfg.model_name_or_path} + QLoRA"
    what = ("a LoRA adapter for" if kind == "adapter" else "a merged (base + LoRA, full-precision) copy of")
    data = ", ".join(dataset_names(cfg))
    body = [f"# {title}", "", f"This is {what} `{cfg.model_name_or_path}`, trained with falcon-qlora (QLoRA: 4-bit NF4 "
            f"base, LoRA, TRL SFTTrainer) on `{data}` (split `{cfg.train_split}`), prompts in the chat template "
            "saved with its tokenizer (`tok.apply_chat_template`; Guanaco's `### Human: ... ### Assistant: ...` "
            "unless the base brings its own).", "", "## Recipe", "", "| key | value |", "|---|---|"]
    body += [f"| {k} | {getattr(cfg, k)} |" for k in RECIPE_KEYS]
    body += ["", "## Metrics", ""]
    body += ([f"- {k}: {v}" for k, v in metrics.items()] or ["(none recorded)"])
    body += ["", "## Use", "", "```python"]
    if kind == "adapter":
        body += ["from falcon_qlora.chat import load_chat_model, generate, build_prompt",
                 "model, tok = load_chat_model(\"ADAPTER_DIR\")  # or peft.AutoPeftModelForCausalLM.from_pretrained",
                 "print(generate(model, tok, [build_prompt([], \"Hello!\", tok)]))"]
    else:
        body += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                 "model = AutoModelForCausalLM.from_pretrained(\"MODEL_DIR\")",
                 "tok = AutoTokenizer.from_pretrained(\"MODEL_DIR\")"]
    body += ["```", ""]
    name = repo_id or "."
    return "\n".join(front + body).replace("ADAPTER_DIR", name).replace("MODEL_DIR", name)


def build_hub_folder(src: str | Path, dest: str | Path, cfg=None, repo_id: str | None = None) -> Path:
    """Copy weights, tokenizer and run config from `src` (an adapter or a merged model) into `dest` and write the
    model card. Returns dest."""
    from .rundir import RUN_CONFIG, RunDir, load_run_config
    src, dest = Path(src), Path(dest)
    kind = kind_of(src)
    cfg = cfg or load_run_config(src)
    dest.mkdir(parents=True, exist_ok=True)
    names = set(WEIGHT_FILES + TOKENIZER_FILES + (RUN_CONFIG,))
    for f in src.iterdir():
        if f.is_file() and (f.name in names or (f.name.startswith("model-") and f.suffix == ".safetensors")):
            shutil.copy2(f, dest / f.name)
    RunDir(dest).card.write_text(model_card(cfg, kind, known_metrics(src), repo_id), encoding="utf-8")
    return dest


def upload(folder: str | Path, repo_id: str, private: bool = True) -> str:
    """One upload of a finished folder. Any failure becomes one line that says where the folder is."""
    from huggingface_hub import HfApi, constants
    later = f"the folder is ready at {folder}; upload it later with: hf upload {repo_id} {folder}"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 is set; {later}")
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                 commit_message="Upload with falcon-qlora")
    except Exception as err:  # network, auth, permissions: all end the same way for the user
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"push to {repo_id} failed ({type(err).__name__}: {reason}); {later}") from None
    return str(getattr(info, "commit_url", info))


def publish(src: str | Path, repo_id: str, cfg=None, private: bool = True) -> str:
    """Build <src>/../hub-<name> and upload it."""
    from .rundir import RunDir
    src = Path(src)
    folder = build_hub_folder(src, RunDir(src.parent).hub_folder(repo_id), cfg, repo_id)
    print(f"hub folder: {folder}")
    return upload(folder, repo_id, private)
