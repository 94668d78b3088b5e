"""A flow's config by reference: a name or a file path, looked up in the settings' configs_dir and then
the repository's configs/, with a partial config merged on top; every bad key still an error."""

import pytest
import yaml

from pogdiff.config import ConfigError
from tasks.config import SHIPPED_CONFIGS, load_config, parse_config, resolve_config


def test_a_name_is_a_shipped_config_unless_configs_dir_has_its_own(tmp_path):
    demo = load_config(SHIPPED_CONFIGS / "demo.yaml")
    assert resolve_config("demo", None, tmp_path) == demo
    assert resolve_config("demo.yaml", None, tmp_path) == demo
    (tmp_path / "demo.yaml").write_text("train: {steps: 7}\n")
    assert resolve_config("demo", None, tmp_path).train.steps == 7
    (tmp_path / "nightly").mkdir()
    (tmp_path / "nightly" / "a.yml").write_text("index: {k: 2}\n")
    assert resolve_config("nightly/a.yml", None, tmp_path).index.k == 2
    assert resolve_config(str(tmp_path / "demo.yaml"), None, tmp_path / "elsewhere").train.steps == 7


def test_overrides_merge_into_the_file_section_by_section(tmp_path):
    demo = load_config(SHIPPED_CONFIGS / "demo.yaml")
    config = resolve_config("demo", {"train": {"steps": 3}, "registry": {"gate": {"min_improvement": 0.0}}}, tmp_path)
    assert config.train.steps == 3
    # the rest of each section is the file's, not the defaults
    assert config.train.batch_size == demo.train.batch_size == 32 and config.train.pog == demo.train.pog
    assert config.registry.model_name == demo.registry.model_name and config.registry.gate.guard_metric == demo.registry.gate.guard_metric
    assert config.registry.gate.min_improvement == 0.0
    assert config.evaluate == demo.evaluate and config.index == demo.index


def test_overrides_on_a_config_object(tmp_path):
    base = parse_config({"train": {"steps": 5, "batch_size": 4}})
    assert resolve_config(base, None, tmp_path) is base
    merged = resolve_config(base, {"train": {"steps": 9}}, tmp_path)
    assert (merged.train.steps, merged.train.batch_size) == (9, 4)


def test_bad_references_and_keys_are_one_line_naming_them(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_config("nightly", None, tmp_path)
    assert str(err.value) == (f"config 'nightly' not found: no {tmp_path / 'nightly.yaml'} (POGDIFF_CONFIGS_DIR) "
                              f"and no {SHIPPED_CONFIGS / 'nightly.yaml'}")
    with pytest.raises(ConfigError, match=f"config {SHIPPED_CONFIGS / 'demo.yaml'} with overrides: unknown config key 'train.stepz'"):
        resolve_config("demo", {"train": {"stepz": 3}}, tmp_path)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"evaluate": {"bukets": {}}}))
    with pytest.raises(ConfigError, match=f"config {tmp_path / 'bad.yaml'}: unknown config key 'evaluate.bukets'"):
        resolve_config("bad", None, tmp_path)
    with pytest.raises(ConfigError, match="config file not found: /no/such.yaml"):
        resolve_config("/no/such.yaml", None, tmp_path)
