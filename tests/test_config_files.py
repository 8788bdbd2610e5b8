"""`base:` chains of YAML files (unifier.config_files), shared by train configs and tokenizer recipes."""

from __future__ import annotations

import pytest

from unifier.config_files import load_yaml_with_base


def test_bases_merge_mappings_at_every_depth_and_replace_the_rest(tmp_path):
    (tmp_path / "root.yaml").write_text("a: 1\nlist: [1, 2]\nnested: {x: 1, deeper: {y: 2, z: 3}}\n")
    (tmp_path / "mid").mkdir()
    (tmp_path / "mid" / "mid.yaml").write_text("base: ../root.yaml\nnested: {deeper: {z: 30}}\nlist: [9]\n")
    (tmp_path / "top.yaml").write_text("base: mid/mid.yaml\na: 2\n")
    values = load_yaml_with_base(tmp_path / "top.yaml", "config")
    assert values == {"a": 2, "list": [9], "nested": {"x": 1, "deeper": {"y": 2, "z": 30}}}


def test_each_file_is_checked_and_bad_chains_are_named(tmp_path):
    (tmp_path / "base.yaml").write_text("tpyo: 1\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\nok: 1\n")
    checked = []

    def check(values, path):
        checked.append(path.name)
        if "tpyo" in values:
            raise KeyError(f"{path.name}: tpyo")

    with pytest.raises(KeyError, match="base.yaml: tpyo"):
        load_yaml_with_base(tmp_path / "top.yaml", "config", check=check)
    assert checked == ["top.yaml", "base.yaml"]

    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="a config is a mapping"):
        load_yaml_with_base(tmp_path / "list.yaml", "config")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml_with_base(tmp_path / "bad.yaml", "config")
    (tmp_path / "num.yaml").write_text("base: 3\n")
    with pytest.raises(ValueError, match="base must be the path"):
        load_yaml_with_base(tmp_path / "num.yaml", "config")
    with pytest.raises(FileNotFoundError, match="config not found"):
        load_yaml_with_base(tmp_path / "nowhere.yaml", "config", missing=FileNotFoundError)
