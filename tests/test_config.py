"""The run config: reference defaults, presets, YAML round trip, CLI overrides, errors that name the key."""
import pytest

from falcon_qlora.config import PRESETS_DIR, ConfigError, RunConfig, load_config, to_dict
from falcon_qlora.rundir import save_run_config
from falcon_qlora.config import parse_args

REFERENCE = dict(
    model_name_or_path="tiiuae/falcon-7b", dataset_name="timdettmers/openassistant-guanaco", dataset_text_field="text",
    train_split="train", eval_split="test", load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, compute_dtype="auto", lora_r=64, lora_alpha=16, lora_dropout=0.1,
    lora_bias="none", lora_target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    max_length=512, per_device_train_batch_size=4, gradient_accumulation_steps=4, optim="paged_adamw_32bit",
    learning_rate=2e-4, max_grad_norm=0.3, max_steps=500, warmup_ratio=0.03,
    lr_scheduler_type="constant_with_warmup", save_steps=10, logging_steps=10, output_dir="./results",
    completion_only_loss=False, trust_remote_code=False,
)


def test_defaults_are_the_reference_recipe():
    cfg = to_dict(RunConfig())
    assert {k: cfg[k] for k in REFERENCE} == REFERENCE


def test_reference_preset_equals_the_defaults():
    assert load_config("reference") == RunConfig()


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    assert isinstance(load_config(preset), RunConfig)


def test_resolved_config_round_trips_through_the_run_dir(tmp_path):
    cfg = load_config(lora_r=8, lora_target_modules=["dense"], eval_split=None)
    path = save_run_config(cfg, tmp_path)
    assert load_config(path) == cfg
    versions = (tmp_path / "versions.json").read_text()
    assert '"transformers"' in versions and '"bitsandbytes"' in versions


def test_cli_overrides_win_over_the_config_file():
    cfg = parse_args(["--config", "reference", "--lora_r", "8", "--learning_rate", "1e-4",
                      "--lora_target_modules", "query_key_value", "dense", "--resume"])
    assert (cfg.lora_r, cfg.learning_rate, cfg.lora_target_modules, cfg.resume) == (
        8, 1e-4, ["query_key_value", "dense"], True)
    assert cfg.max_steps == 500


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'lora_rank'"):
        load_config(lora_rank=8)


def test_unknown_key_in_yaml_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError, match="lora_rank"):
        parse_args(["--config", str(f)])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="lora_r: Input should be a valid integer"):
        load_config(lora_r=1.5)


@pytest.mark.parametrize("key,value", [("max_steps", 0), ("learning_rate", 0.0), ("lora_r", 0),
                                       ("per_device_train_batch_size", -1), ("lora_dropout", 1.5)])
def test_bad_values_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(**{key: value})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_none_on_the_command_line_turns_evaluation_off():
    assert parse_args(["--eval_split", "None", "--save_total_limit", "none"]).eval_split is None


@pytest.mark.parametrize("preset", ["demo", "colab-t4"])
def test_presets_comment_every_change_from_the_reference(preset):
    """Each key whose value differs from the reference default carries a '# was ...' comment on its line."""
    import yaml
    reference = RunConfig()
    lines = (PRESETS_DIR / f"{preset}.yaml").read_text().splitlines()
    values = yaml.safe_load("\n".join(lines))
    changed = [k for k, v in values.items() if getattr(reference, k) != v]
    assert changed
    for key in changed:
        line = next(x for x in lines if x.startswith(f"{key}:"))
        assert "# was " in line, f"{preset}.yaml: {key} differs from the reference but its line does not say so"


def test_the_t4_preset_fits_a_t4():
    from falcon_qlora.estimate import estimate
    est = estimate(load_config("colab-t4"), free_bytes=15 * 2**30)
    assert est["profile"] == "memory" and est["peak_bytes"] < 14 * 2**30


@pytest.mark.parametrize("key,value,named", [("seed", -1, "seed=-1"), ("eval_steps", 0, "eval_steps=0")])
def test_values_that_used_to_reach_the_trainer_are_named(key, value, named):
    with pytest.raises(ConfigError, match=named):
        load_config(**{key: value})


def test_yaml_syntax_error_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora_r: [8\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid YAML") as err:
        parse_args(["--config", str(f)])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key,value", [("optim", "bogus"), ("lr_scheduler_type", "bogus")])
def test_names_only_transformers_knows_are_checked_before_training(key, value):
    from falcon_qlora.config import check_runtime
    check_runtime(load_config())  # the reference recipe passes
    with pytest.raises(ConfigError, match=f"{key}='bogus'"):
        check_runtime(load_config(**{key: value}))


def test_one_dataset_stays_a_name_several_are_a_list():
    assert load_config(dataset_name=["a.jsonl"]).dataset_name == "a.jsonl"
    assert parse_args(["--dataset_name", "a.jsonl"]).dataset_name == "a.jsonl"
    cfg = parse_args(["--dataset_name", "a.jsonl", "{name: b.json, format: alpaca, max_rows: 5}"])
    assert cfg.dataset_name == ["a.jsonl", "{name: b.json, format: alpaca, max_rows: 5}"]
    from_yaml = load_config(dataset_name=["a.jsonl", {"name": "b.json", "format": "alpaca", "max_rows": 5}])
    assert from_yaml == cfg


def test_dataset_entries_are_checked(tmp_path):
    from falcon_qlora.config import parse_source
    assert parse_source("{name: b.json, max_rows: 5}", "messages") == {"name": "b.json", "format": "messages",
                                                                       "max_rows": 5}
    with pytest.raises(ConfigError, match="format 'csv' is not one of"):
        load_config(dataset_name=["a", "{name: b, format: csv}"])
    with pytest.raises(ConfigError, match="max_rows must be a positive integer"):
        load_config(dataset_name=["a", "{name: b, max_rows: 0}"])
