"""Training on the tiny Falcon: loss goes down, checkpoints hold only the adapter, the adapter reloads exactly,
resume continues where it stopped, each row ends with EOS."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from falcon_qlora.cli import main
from falcon_qlora.config import load_config
from falcon_qlora.model import load_adapter_model
from falcon_qlora.train import build_trainer, train


@pytest.fixture(scope="module")
def run(tiny_falcon_7b_arch, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, out)))


def losses(history):
    return [x["loss"] for x in history if "loss" in x]


def test_loss_goes_down(run):
    ls = losses(run.log_history)
    assert len(ls) == 6 and ls[-1] < ls[0] - 0.2
    assert run.metrics["eval_loss"] < ls[0]


def test_checkpoints_hold_only_the_adapter_tokenizer_and_config(run):
    ckpts = sorted(p.name for p in run.output_dir.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-3", "checkpoint-6"]
    for d in [run.output_dir / c for c in ckpts] + [run.final_dir]:
        names = {p.name for p in d.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "run_config.yaml", "tokenizer.json"} <= names
        assert not any(n.startswith(("model", "pytorch_model")) for n in names)
        tensors = load_file(d / "adapter_model.safetensors")
        assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)


def test_lora_b_matrices_are_trained(run):
    tensors = load_file(run.final_dir / "adapter_model.safetensors")
    b = [v for k, v in tensors.items() if "lora_B" in k]
    assert len(b) == 8 and all(v.abs().max() > 0 for v in b)


def test_run_dir_has_config_metrics_and_plot(run):
    assert load_config(run.output_dir / "run_config.yaml").max_steps == 6
    lines = [json.loads(x) for x in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4, 5, 6]
    assert (run.output_dir / "loss.png").stat().st_size > 1000


def test_adapter_reloads_onto_a_fresh_4bit_base_with_equal_logits(run):
    ids = run.tokenizer(["### Human: what is two plus two? ### Assistant:"], return_tensors="pt").input_ids
    ids = ids.to(next(run.model.parameters()).device)
    run.model.eval()
    with torch.no_grad():
        want = run.model(input_ids=ids).logits
        model, _, _ = load_adapter_model(run.final_dir)
        got = model(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_resume_continues_from_the_step_it_stopped_at(tiny_falcon_7b_arch, tiny_data, tmp_path):
    first = train(load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path, max_steps=3,
                                               eval_split=None)))
    assert first.metrics["train_steps"] == 3
    second = train(load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path, max_steps=6,
                                                eval_split=None, resume=True)))
    assert second.metrics["train_steps"] == 6
    new_steps = [x["step"] for x in second.log_history if "loss" in x]
    assert new_steps[-3:] == [4, 5, 6] and new_steps.count(3) <= 1


def test_every_training_row_ends_with_eos(tiny_falcon_7b_arch, tiny_data, tmp_path):
    from falcon_qlora.data import load_dataset_splits
    from falcon_qlora.model import attach_lora, load_base_model, load_tokenizer
    cfg = load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path))
    tok = load_tokenizer(cfg.model_name_or_path, cfg)
    train_ds, _ = load_dataset_splits(cfg)
    trainer = build_trainer(cfg, attach_lora(load_base_model(cfg), cfg), tok, train_ds, None)
    rows = trainer.train_dataset["input_ids"]
    assert all(r[-1] == tok.eos_token_id for r in rows)
    assert all(tok.pad_token_id not in r for r in rows)


def test_both_decoder_architectures_train(tiny_falcon, tiny_data, tmp_path, capsys):
    result = train(load_config(**tiny_overrides(tiny_falcon, tiny_data, tmp_path, max_steps=4, eval_split=None)))
    ls = losses(result.log_history)
    assert ls[-1] < ls[0]
    assert "8 bnb Linear4bit layers; trainable parameters:" in capsys.readouterr().out  # 4 linears x 2 layers


def test_train_without_a_gpu_names_the_demo(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, so training Falcon-7B is not refused for the want of one")
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err and "falcon-qlora demo" in err


def test_push_to_hub_offline_fails_in_one_line_after_everything_is_saved(tiny_falcon_7b_arch, tiny_data, tmp_path,
                                                                          monkeypatch):
    from falcon_qlora.errors import UserError
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path, max_steps=2, eval_split=None,
                                       push_to_hub="someone/tiny-adapter"))
    with pytest.raises(UserError) as err:
        train(cfg)
    assert len(str(err.value).splitlines()) == 1 and "someone/tiny-adapter" in str(err.value)
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert list(tmp_path.glob("hub-*/README.md"))


def test_tensorboard_logging_writes_event_files(tiny_falcon_7b_arch, tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    train(load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path, max_steps=2, eval_split=None,
                                       report_to="tensorboard")))
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_missing_logger_package_is_one_clear_error(tiny_falcon_7b_arch, tiny_data, tmp_path, monkeypatch):
    import importlib.util
    from falcon_qlora.errors import UserError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="pip install wandb"):
        train(load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path, report_to="wandb")))


def test_steps_skip_trainers_module_walks_with_the_same_numbers(tiny_falcon_7b_arch, tiny_data, tmp_path,
                                                                monkeypatch):
    """The parameter count for the FLOP total is taken once, the gradients to clip are listed once and what exists
    before training is kept out of the garbage collector's walks: losses, gradient norms and FLOPs are Trainer's."""
    import gc
    from transformers import TrainerCallback
    import falcon_qlora.safety as S
    import falcon_qlora.train as T
    from transformers import PreTrainedModel
    frozen, counted = [], []
    real = PreTrainedModel.num_parameters
    monkeypatch.setattr(PreTrainedModel, "num_parameters", lambda m, *a, **k: counted.append(1) or real(m, *a, **k))

    class Seen(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            frozen.append(gc.get_freeze_count())

    build = T.build_trainer
    monkeypatch.setattr(T, "build_trainer", lambda *a, callbacks=(), **k: build(*a, callbacks=[*callbacks, Seen()],
                                                                                  **k))
    runs = {}
    for lean in (False, True):
        monkeypatch.setattr(S, "LEAN_STEPS", lean)
        frozen.clear()
        counted.clear()
        cfg = load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / str(lean), max_steps=3,
                                           gradient_accumulation_steps=2, save_steps=100, eval_split=None,
                                           max_grad_norm=0.01,  # small enough that clipping acts
                                           profile="reference"))  # 2 micro-batches a step on a GPU too
        result = train(cfg)
        runs[lean] = ([(x["loss"], x["grad_norm"]) for x in result.log_history if "loss" in x],
                      result.log_history[-1]["total_flos"], list(frozen), len(counted))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6) and len(runs[True][0]) == 3
    assert runs[True][1] == runs[False][1] > 0
    stock = runs[False][2]  # what other code froze, if any (some environments freeze a few hundred objects)
    assert len(set(stock)) == 1 and min(runs[True][2]) > stock[0] + 100_000
    assert (runs[False][3], runs[True][3]) == (6, 1)  # once per micro-batch in Trainer; once per run
    assert gc.get_freeze_count() == 0  # handed back after training


@pytest.mark.parametrize("begun,resumed", [("adamw_torch", "paged_adamw_32bit"), ("paged_adamw_32bit", "adamw_torch")])
def test_resume_under_the_other_adamw_continues_with_its_moments(begun, resumed, tiny_falcon_7b_arch, tiny_data,
                                                                 tmp_path):
    """The reference's bitsandbytes AdamW 32-bit and the profiles' torch AdamW keep the same moments under other names:
    a run resumed under the other one (another profile, another machine) takes the steps it would have taken."""
    over = dict(eval_split=None, save_steps=2, learning_rate=0.01)
    straight = train(load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / "straight", max_steps=4,
                                                  optim=begun, **over)))
    train(load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / "r", max_steps=2, optim=begun,
                                       **over)))
    again = train(load_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / "r", max_steps=4,
                                               optim=resumed, resume=True, **over)))
    assert [x["step"] for x in again.log_history if "loss" in x][-2:] == [3, 4]
    assert losses(again.log_history)[-2:] == pytest.approx(losses(straight.log_history)[-2:], rel=1e-4)
