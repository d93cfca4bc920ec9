from pathlib import Path

import pytest

from nlmm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
GUIDE = Path(__file__).parent / "fixtures" / "guide_flickr8k.yaml"


def test_guide_flat_config_loads_as_written():
    cfg = load_config(GUIDE)
    assert (cfg.d_model, cfg.n_heads, cfg.ffn_mult, cfg.L_mem) == (512, 8, 4, 64)
    assert (cfg.depth.text, cfg.depth.image, cfg.depth.audio) == (6, 8, 6)
    assert [(lv.name, lv.chunk_size, lv.lr, lv.optimizer) for lv in cfg.cms_levels] == [
        ("fast", 1, 2e-4, "dmgd"), ("mid", 32, 1e-4, "dmgd"), ("slow", 512, 5e-5, "dmgd")]
    assert cfg.ttt.enable and cfg.ttt.adapter_rank == 32 and cfg.ttt.max_steps == 3
    assert cfg.precision.amp == "bf16" and cfg.precision.grad_clip == 1.0
    assert (cfg.max_position_embeddings, cfg.vocab_size, cfg.train_steps) == (2048, 50000, 10000)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.cms_levels


def test_flickr8k_recipe_matches_the_guide():
    cfg = load_config(ROOT / "configs" / "flickr8k.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.optimizer) == (
        30, 32, 1e-3, "universal_anderson")
    assert cfg.data.image_size == 224 and cfg.precision.amp == "bf16"


def test_overrides_apply_nested_and_list_keys():
    cfg = load_config(GUIDE, ["train.lr=5e-4", "depth.image=2", "cms_levels.1.chunk_size=8",
                              "ttt.enable=false"])
    assert cfg.train.lr == 5e-4 and cfg.depth.image == 2
    assert cfg.cms_levels[1].chunk_size == 8 and cfg.ttt.enable is False


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_modle: 256\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "d_modle" in msg and str(bad) in msg and "did you mean 'd_model'" in msg


def test_unknown_nested_key_from_override_is_named():
    with pytest.raises(ConfigError, match=r"train\.epoch'.*did you mean 'train\.epochs'"):
        load_config(None, ["train.epoch=3"])


def test_wrong_type_and_out_of_range_and_choice(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("n_heads: four\n")
    with pytest.raises(ConfigError, match=r"n_heads must be an integer, got 'four'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"cms_levels\[0\]\.chunk_size must be >= 1"):
        load_config(None, ["cms_levels=[{name: a, chunk_size: 0}]"])
    with pytest.raises(ConfigError, match=r"optimizer must be one of adamw, sgd, dmgd, muon"):
        load_config(None, ["train.optimizer=adam"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        load_config(None, ["d_model=100", "n_heads=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("d_model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(broken)


def test_a_stored_config_with_the_old_num_workers_key_loads_into_both_loader_keys():
    """train.num_workers once meant the cache's prefetch depth and a pack's decoding processes;
    runs and checkpoints that stored it still load, with the value in both keys."""
    from nlmm.config import config_from_dict, resolve_config, with_legacy_defaults

    stored = resolve_config("tiny_cpu").to_dict()
    del stored["train"]["prefetch_batches"], stored["train"]["loader_workers"]
    stored["train"]["num_workers"] = 3
    cfg = config_from_dict(with_legacy_defaults(stored), "an old run")
    assert (cfg.train.prefetch_batches, cfg.train.loader_workers) == (3, 3)
    assert "num_workers" in stored["train"]  # the stored dict itself is left alone
