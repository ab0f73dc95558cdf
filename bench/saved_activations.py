"""What a compiled LoRA MLP block of the tiny Falcon saves for backward, at torch's default activation memory budget
and at 0.5, and whether its gradients stay those of the eager block (same dropout masks). CPU, ~1 min:

    python bench/saved_activations.py

Results: bench/NOTES.md ("Weighed on the CPU"). The memory profile's reentrant checkpointing is not part of this
measurement: tests/test_profiles.py's mask test is where the budget failed under it.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import torch._functorch.config as fc
    from peft import LoraConfig, get_peft_model
    from tiny import build_falcon
    from transformers import FalconForCausalLM
    from falcon_qlora import fast_paths as F
    path = build_falcon(Path(tempfile.mkdtemp()), new_decoder_architecture=False)
    model = FalconForCausalLM.from_pretrained(path)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=[
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]))
    model.train()
    F.patch_lora_forward(model)
    mlp = F.decoder_layers(model)[0].mlp
    x0 = torch.randn(1, 256, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def run(seed=3):
        x = x0.clone().requires_grad_()
        saved = []
        torch.manual_seed(seed)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            y = mlp(x)
        y.pow(2).sum().backward()
        grads = [x.grad] + [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
        mlp.zero_grad(set_to_none=True)
        return sum(saved), grads

    def rel(a, b):
        return max(((u - v).norm() / v.norm()).item() for u, v in zip(a, b))

    eager_bytes, eager = run()
    print(f"eager: {eager_bytes:,} bytes saved; another seed's gradients {rel(run(seed=4)[1], eager):.2f} apart")
    for budget in (1.0, 0.5):
        fc.activation_memory_budget = budget
        torch._dynamo.reset()
        mlp.compile()
        n, grads = run()
        print(f"compiled, activation_memory_budget {budget}: {n:,} bytes saved; gradients {rel(grads, eager):.1e} "
              "from the eager block's")
        mlp._compiled_call_impl = None


if __name__ == "__main__":
    main()
