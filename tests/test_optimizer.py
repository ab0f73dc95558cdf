"""The memory profile's optimizer is the reference's paged AdamW 32-bit stepped by one fused kernel: the same update,
moments in two flat buffers (unified memory on a GPU, outside torch's allocator), resumable from its state_dict."""
from __future__ import annotations

import io

import pytest
import torch

from falcon_qlora.optimizer import PagedAdamW

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (48, 64), (64, 16), (7,)]  # LoRA A/B-like tensors and one odd size
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)


def _train(opt, params, steps, first=0):
    for s in range(first, first + steps):
        _grads(params, s)
        opt.step()


def _resumed(run, trained, fresh):
    """Trainer's resume: `fresh` takes `trained`'s values, a new PagedAdamW loads `run`'s saved state_dict under the
    names it uses (as SafeTrainer hands it over)."""
    from falcon_qlora.optimizer import convert_adamw_state
    saved = io.BytesIO()
    torch.save(run.state_dict(), saved)
    for x, y in zip(trained, fresh):
        y.data.copy_(x.data)
    resumed = PagedAdamW(fresh, **HYPER)
    resumed.load_state_dict(convert_adamw_state(torch.load(io.BytesIO(saved.getvalue()), map_location=DEVICE),
                                                resumed))
    return resumed


def test_steps_are_torch_fused_adamw_steps():
    """The same kernel, hyper-parameters and fp32 moments: bit for bit the update of torch.optim.AdamW(fused)."""
    a, b = _params(), _params()
    _train(PagedAdamW(a, **HYPER), a, 5)
    _train(torch.optim.AdamW(b, fused=True, **HYPER), b, 5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_steps_match_bitsandbytes_paged_adamw_32bit():
    """The reference recipe's optimizer (bitsandbytes' PagedAdamW32bit, its non-paged path on a CPU) takes the same
    steps, up to fp32 rounding: the memory profile learns what the reference learns."""
    import bitsandbytes as bnb
    a, b = _params(), _params()
    before = [p.detach().clone() for p in a]
    _train(PagedAdamW(a, **HYPER), a, 5)
    _train(bnb.optim.PagedAdamW32bit(b, **HYPER), b, 5)
    for x, y, x0 in zip(a, b, before):
        assert not torch.equal(x, x0)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_moments_are_views_of_two_flat_buffers():
    """One buffer per moment holds every tensor's slice, so one kernel launch steps them all."""
    params = _params()
    opt = PagedAdamW(params, **HYPER)
    _train(opt, params, 1)
    for key in ("exp_avg", "exp_avg_sq"):
        storages = {opt.state[p][key].untyped_storage().data_ptr() for p in params}
        assert len(storages) == 1
        assert opt.state[params[0]][key].untyped_storage().nbytes() == 4 * sum(p.numel() for p in params)
    assert opt.state[params[0]]["exp_avg"].abs().sum() > 0


def test_resumed_state_continues_the_same_steps():
    """A checkpoint's state_dict, loaded into a fresh optimizer (Trainer's resume), lands back in the flat buffers
    and the next steps are those of the run that never stopped."""
    a, b = _params(), _params()
    run = PagedAdamW(a, **HYPER)
    _train(run, a, 3)
    resumed = _resumed(run, a, b)
    assert len({resumed.state[p]["exp_avg"].untyped_storage().data_ptr() for p in b}) == 1
    _train(run, a, 2, first=3)
    _train(resumed, b, 2, first=3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_mixed_dtypes_are_refused_with_the_fix():
    params = [torch.nn.Parameter(torch.zeros(4, device=DEVICE)),
              torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16, device=DEVICE))]
    from falcon_qlora.errors import UserError
    with pytest.raises(UserError, match="profile=reference"):
        PagedAdamW(params, **HYPER)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="unified memory needs a CUDA GPU")
def test_moments_stay_out_of_the_gpus_allocator():
    """As bitsandbytes' paged states: the two moments are in unified memory, so they neither count in torch's peak
    nor take the allocator's memory; after the first step only the step counters are new."""
    params = _params()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt = PagedAdamW(params, **HYPER)
    _train(opt, params, 2)
    torch.cuda.synchronize()
    grads = sum(p.grad.numel() * 4 for p in params)
    moments = 2 * sum(p.numel() * 4 for p in params)
    assert torch.cuda.memory_allocated() - before < grads + moments // 4
    assert opt.state[params[0]]["exp_avg"].is_cuda


def test_memory_profile_trains_with_it_through_the_trainer(tiny_falcon_7b_arch, tiny_data, tmp_path, monkeypatch):
    """On a GPU the memory profile's plan hands Trainer this optimizer with the run's hyper-parameters (here the
    plan for a GPU, run on this machine's device): three steps log the losses of the reference's optimizer."""
    from conftest import tiny_overrides
    from falcon_qlora import plan as P
    from falcon_qlora.config import load_config
    from falcon_qlora.train import train
    built, real_init = [], PagedAdamW.__init__

    def spy(self, params, **kw):
        built.append(kw)
        real_init(self, params, **kw)
    monkeypatch.setattr(PagedAdamW, "__init__", spy)
    losses = {}
    for profile in ("reference", "memory"):
        cfg = load_config(None, **tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / profile, max_steps=3,
                                                 save_steps=100, eval_split=None, profile=profile,
                                                 optim="paged_adamw_32bit"))  # the recipe's, which the profile swaps
        if profile == "memory":
            gpu_plan = P.make_plan(cfg, 10**12, device="cuda", profile="memory", parts=("optim",))
            assert gpu_plan.optim == P.PAGED_FUSED_ADAM
            monkeypatch.setattr(P, "make_plan", lambda *a, **k: gpu_plan)
        result = train(cfg)
        losses[profile] = [x["loss"] for x in result.log_history if "loss" in x]
    assert built == [dict(lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)]
    assert result.metrics["optim"] == P.PAGED_FUSED_ADAM
    assert len(losses["memory"]) == 3 and losses["memory"] == pytest.approx(losses["reference"], rel=1e-4)


def test_a_bitsandbytes_checkpoint_resumes_with_the_same_moments():
    """A run begun with the reference's bitsandbytes AdamW 32-bit (its state1 / state2 and an int step) resumes on
    this optimizer and takes the steps bitsandbytes would have taken."""
    import bitsandbytes as bnb
    a, b = _params(), _params()
    run = bnb.optim.PagedAdamW32bit(a, **HYPER)
    _train(run, a, 3)
    resumed = _resumed(run, a, b)
    assert float(resumed.state[b[0]]["step"]) == 3
    _train(run, a, 2, first=3)
    _train(resumed, b, 2, first=3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_moments_for_an_8bit_optimizer_are_refused_with_the_fix():
    """32-bit moments cannot resume bitsandbytes' 8-bit AdamW: one line that names the optim to resume with."""
    import bitsandbytes as bnb
    from falcon_qlora.errors import UserError
    from falcon_qlora.optimizer import convert_adamw_state
    a = _params()
    run = PagedAdamW(a, **HYPER)
    _train(run, a, 1)
    with pytest.raises(UserError, match="optim=paged_adamw_32bit"):
        convert_adamw_state(run.state_dict(), bnb.optim.AdamW8bit(_params(), **HYPER))
