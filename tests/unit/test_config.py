import pytest

from hasten.config import MODEL_PRESETS, ConfigError, RunConfig, field_help, load_config, save_config


def test_default_recipe_loads_and_applies_preset():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.model.dim == MODEL_PRESETS["small"]["dim"]
    assert cfg.data.source == "stdlib"


def test_overrides_are_typed():
    cfg = load_config("default", ["train.steps=7", "optim.lr=3e-4", "train.compile=true", "precision.dtype=bf16",
                                  "log.sample_prompt=class "])
    assert cfg.train.steps == 7 and cfg.optim.lr == 3e-4 and cfg.train.compile is True
    assert cfg.precision.dtype == "bf16" and cfg.log.sample_prompt == "class "


def test_explicit_model_fields_beat_the_preset():
    cfg = load_config("default", ["model.preset=gpt2-124m", "model.n_layers=3"])
    assert cfg.model.dim == 768 and cfg.model.n_layers == 3


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"Unknown config key 'train.setps'.*Did you mean train.steps\?"):
        load_config("default", ["train.setps=3"])


def test_a_misspelt_choice_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"optim.name='sophai' is not allowed: choose one of .*\. Did you mean sophia\?"):
        load_config("default", ["optim.name=sophai"])
    with pytest.raises(ConfigError, match=r"model.preset='smal' .* Did you mean small\?"):
        load_config("default", ["model.preset=smal"])


@pytest.mark.parametrize("override, fragment", [
    ("precision.dtype=fp9", "precision.dtype='fp9' is not allowed: choose one of auto, fp32, bf16, fp16"),
    ("train.steps=0", "train.steps=0 is not allowed: it must be > 0"),
    ("train.steps=abc", "train.steps='abc' is not allowed: it must be an integer"),
    ("optim.lr=fast", "optim.lr='fast' is not allowed: it must be a number"),
    ("train.compile=maybe", "train.compile='maybe' is not allowed: it must be true or false"),
    ("model.n_heads=3", "model.n_heads=3 is not allowed: model.dim=256 must be divisible by it"),
    ("train.seq_len=512", "train.seq_len=512 is not allowed: it must be <= model.max_seq_len=256"),
    ("model.preset=huge", "model.preset='huge' is not allowed: choose one of tiny"),
    ("optim.schedule=linear", "choose one of cosine, wsd, constant"),
    ("train.device=tpu", "use auto, cpu, cuda or cuda:N"),
    ("train.loss_chunk=-1", "train.loss_chunk=-1 is not allowed: it must be >= 0 (0 = off)"),
    ("train.loss_kernel=quack", "train.loss_kernel='quack' is not allowed: it chooses the kernel of the "
                                "train.loss_chunk path, which is off: set train.loss_chunk > 0 too"),
    ("train.loss_kernel=cutlass", "choose one of auto, quack, triton, torch"),
    ("nosuchform", "not of the form section.field=value"),
])
def test_bad_values_name_key_value_and_allowed(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a shipped recipe"):
        load_config("no-such-recipe")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    flat = tmp_path / "flat.toml"
    flat.write_text("steps = 3\n")
    with pytest.raises(ConfigError, match="must be a table"):
        load_config(flat)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("gpt2-124m", ['log.sample_prompt="quote \\" and ünïcode"', "optim.lr=1e-5"])
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg


def test_every_field_is_documented():
    rows = field_help()
    assert len(rows) > 40
    assert all(help_text for *_, help_text in rows)
    keys = [key for key, *_ in rows]
    assert "train.resume" in keys and "precision.dtype" in keys and len(keys) == len(set(keys))


def test_shipped_recipes_are_valid():
    for name in ("default", "gpt2-124m"):
        load_config(name)


@pytest.mark.parametrize("optim, strategy", [("sophia", "zero1"), ("schedulefree_adamw", "zero1"), ("muon", "zero1")])
def test_optimizers_that_cannot_shard_yet_are_refused(optim, strategy):
    with pytest.raises(ConfigError, match=f"optim.name='{optim}' is not allowed"):
        load_config("default", [f"optim.name={optim}", f"parallel.strategy={strategy}"])


def test_explicit_keys_come_from_the_recipe_file_and_overrides(tmp_path):
    from hasten.config import explicit_keys

    recipe = tmp_path / "r.toml"
    recipe.write_text("[optim]\nlr = 1e-4\n")
    assert explicit_keys(recipe, ["model.from=x", "train.steps=3"]) == {"optim.lr", "model.from_path", "train.steps"}
    assert explicit_keys(None, []) == set()


def test_finetune_without_a_model_is_refused(capsys):
    from hasten.cli import main

    assert main(["finetune", "train.steps=2"]) == 2
    assert "hasten finetune needs model.from=PATH" in capsys.readouterr().err


def test_a_removed_key_loads_at_its_old_default_and_is_refused_otherwise(monkeypatch):
    """A saved run's config.toml that holds a removed key at its old default still loads; asking for it fails."""
    from hasten import config

    monkeypatch.setitem(config.REMOVED_KEYS, "model.old_knob", (False, "it measured no faster"))
    assert load_config("default", ["model.old_knob=false"]) == load_config("default")
    with pytest.raises(ConfigError, match="model.old_knob was removed: it measured no faster"):
        load_config("default", ["model.old_knob=true"])


def test_fa4_attention_without_its_package_is_refused_with_the_install_line():
    """train.attention_backend=fa4 is a valid key; on a GPU, without flash-attn-4 installed (as
    here), activating it raises a ConfigError that names the package. On the CPU the key is a
    no-op, as the other attention backends are."""
    import importlib.util

    import torch

    from hasten.train.build import activate_fa4, select_attention_backend

    assert load_config("gpt2-124m", ["train.attention_backend=fa4"]).train.attention_backend == "fa4"
    select_attention_backend("fa4", torch.device("cpu"))  # nothing to select on the CPU
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="pip install flash-attn-4"):
        activate_fa4(torch.device("cuda"))
