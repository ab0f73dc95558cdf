"""The memory profile's optimizer: bitsandbytes' paged AdamW 32-bit, the same steps without a host sync per tensor."""
from __future__ import annotations

import pytest
import torch

from falcon_qlora.optimizer import unsynced, without_syncs

bnb = pytest.importorskip("bitsandbytes")


def _params(device):
    """A LoRA-like A/B pair, one of them large enough (>= 1e5 values) for bitsandbytes to page its states on a GPU."""
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 2048, generator=g).to(device)),
            torch.nn.Parameter(torch.randn(96, 64, generator=g).to(device))]


def _train(cls, device, steps=3):
    params = _params(device)
    opt = cls(params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, is_paged=True, optim_bits=32)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        opt.step()
    return params, opt


def test_unsynced_paged_adamw_takes_bitsandbytes_steps_without_waiting(monkeypatch):
    """Bit for bit bitsandbytes' own parameters and states after three steps, with no device-wide wait in between
    (bitsandbytes waits after every tensor)."""
    import bitsandbytes.optim.optimizer as bnb_opt
    device = "cuda" if torch.cuda.is_available() else "cpu"
    waits = []
    monkeypatch.setattr(bnb_opt, "sync_gpu", lambda t: waits.append(t.device))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: waits.append("synchronize"))
    ref, ref_opt = _train(bnb.optim.AdamW, device)
    assert len(waits) >= 6  # bitsandbytes: one per tensor per step (the comparison below can tell)
    waits.clear()
    got, got_opt = _train(unsynced(bnb.optim.AdamW), device)
    assert waits == []
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    got_opt.state_dict()  # waits for the last step's kernels
    for a, b in zip((got_opt.state[p] for p in got), (ref_opt.state[p] for p in ref)):
        assert a["step"] == b["step"] == 3
        assert torch.equal(a["state1"], b["state1"]) and torch.equal(a["state2"], b["state2"])


def test_without_syncs_keeps_the_trainers_optimizer_arguments():
    """The class replaces Trainer's for paged bitsandbytes optimizers only, with Trainer's own keyword arguments."""
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments(output_dir="unused", optim="paged_adamw_32bit", learning_rate=2e-4, weight_decay=0.1,
                             report_to="none")
    cls, kwargs = without_syncs(args)
    base, want = Trainer.get_optimizer_cls_and_kwargs(args)
    assert issubclass(cls, base) and cls is not base
    assert kwargs == want and kwargs["is_paged"] and kwargs["lr"] == 2e-4
    for other in ("adamw_torch", "adamw_bnb_8bit"):  # not paged: Trainer's choice stands
        assert without_syncs(TrainingArguments(output_dir="unused", optim=other, report_to="none")) is None


def test_memory_profile_trains_with_the_unsynced_optimizer(tiny_falcon_7b_arch, tiny_data, tmp_path, monkeypatch):
    """Through falcon_qlora.train with the recipe's paged AdamW: the memory profile's optimizer is the unsynced
    twin, and its per-step losses are the reference profile's (which keeps bitsandbytes' class)."""
    from conftest import tiny_overrides
    from falcon_qlora.config import load_config
    from transformers import Trainer
    from falcon_qlora.train import train
    losses, kinds = {}, {}
    create = Trainer.create_optimizer

    def record(self, *a, **kw):
        out = create(self, *a, **kw)
        kinds[self.args.output_dir] = type(self.optimizer).__name__
        return out

    monkeypatch.setattr(Trainer, "create_optimizer", record)
    for p in ("reference", "memory"):
        cfg = load_config(None, **tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / p, max_steps=3,
                                                 save_steps=100, eval_split=None, profile=p,
                                                 optim="paged_adamw_32bit", per_device_train_batch_size=2,
                                                 gradient_accumulation_steps=2))
        result = train(cfg)
        losses[p] = [x["loss"] for x in result.log_history if "loss" in x]
    assert sorted(kinds.values()) == ["AdamW", "UnsyncedAdamW"]
    assert [k for n, k in kinds.items() if "/memory/" in n + "/"] == ["UnsyncedAdamW"], kinds
    assert len(losses["memory"]) == 3
    assert losses["memory"] == pytest.approx(losses["reference"], rel=1e-4)
