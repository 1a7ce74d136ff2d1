import pytest
import yaml

from siren_batch.config import Config, ConfigError, load_config, parse_overrides


def test_defaults_load_with_dataset_layer():
    cfg = load_config()
    assert cfg.dataset == "ml-100k"
    assert cfg.data.source == "movielens100k"
    assert cfg.topics.k == 20 and cfg.sketches.theta == 4.0


def test_dataset_switch_pulls_its_layer():
    cfg = load_config(overrides=["dataset=siren-movies"])
    assert cfg.data.source == "siren_movies" and cfg.data.split == "source"


def test_overrides_are_typed():
    cfg = load_config(overrides=["topics.k=30", "sketches.theta=3.5", "embed.normalize=false",
                                 "prompts.variants=sketch,raw"])
    assert cfg.topics.k == 30 and cfg.sketches.theta == 3.5
    assert cfg.embed.normalize is False and cfg.prompts.variants == ["sketch", "raw"]


def test_unknown_key_suggests_fix():
    with pytest.raises(ConfigError, match=r"unknown config key topics.kk.*did you mean topics.k"):
        load_config(overrides=["topics.kk=3"])


def test_bad_values_fail_with_fix():
    with pytest.raises(ConfigError, match="sketches.rule must be mean or majority"):
        load_config(overrides=["sketches.rule=vote"])
    with pytest.raises(ConfigError, match="topics.k must be a int"):
        load_config(overrides=["topics.k=many"])
    with pytest.raises(ConfigError, match="looks like|must look like"):
        parse_overrides(["topics.k"])
    for scale in (["data.rating_min=0.5"], ["data.rating_max=10"]):    # half stars from 0.5, a 1-10 scale
        with pytest.raises(ConfigError, match="lie outside the scale 1-5: set data.scale_min/scale_max"):
            load_config(overrides=scale)
    assert load_config(overrides=["data.rating_min=2"]).data.rating_min == 2.0   # a narrower range is fine
    ten = load_config(overrides=["data.scale_max=10"]).data                      # the accepted range follows
    assert (ten.rating_min, ten.rating_max) == (1.0, 10.0)
    with pytest.raises(ConfigError, match="data.scale_min must be < data.scale_max"):
        load_config(overrides=["data.scale_min=5"])


def test_conf_file_and_local_layers(tmp_path):
    conf_dir = tmp_path / "conf"
    (conf_dir / "datasets").mkdir(parents=True)
    (conf_dir / "base.yaml").write_text(yaml.safe_dump({"topics": {"k": 5}}))
    (conf_dir / "local.yaml").write_text(yaml.safe_dump({"topics": {"seed": 7}}))
    extra = tmp_path / "x.yaml"
    extra.write_text(yaml.safe_dump({"topics": {"k": 9, "seed": 1}}))
    cfg = load_config([str(extra)], ["topics.max_iter=3"], conf_dir=conf_dir)
    assert (cfg.topics.k, cfg.topics.seed, cfg.topics.max_iter) == (9, 7, 3)


def test_hash_changes_with_config():
    assert Config().hash() == Config().hash()
    assert load_config(overrides=["topics.k=21"]).hash() != load_config().hash()
