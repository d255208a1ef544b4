"""Config files and ``--set``: YAML 1.2 scalars (enum strings survive), list items by index, an empty run folder refused."""

import subprocess
import sys
from pathlib import Path

import pytest

from drpo_core.config import ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_enum_strings_that_yaml_1_1_reads_as_booleans_stay_strings(tmp_path):
    cfg = load_config([], ["trainer.mixed_precision=no"])
    assert cfg.trainer.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  mixed_precision: no\nlora:\n  enabled: off\nrewards:\n  - kind: hue_fraction\n    options: {min_saturation: 3e-1, flag: yes}\n")
    cfg = load_config([f])
    assert cfg.trainer.mixed_precision == "no"
    assert cfg.lora.enabled is False  # a bool field still takes no/off
    assert cfg.rewards[0].options == {"min_saturation": 0.3, "flag": "yes"}  # 3e-1 is a float (YAML 1.2)
    assert load_config([], ["lora.enabled=no", "trainer.lr=1e-3"]).trainer.lr == 0.001
    reloaded = tmp_path / "dumped.yaml"
    reloaded.write_text(dump_config(cfg))
    assert load_config([reloaded]) == cfg


def test_list_items_are_overridden_by_index_and_the_rest_is_kept(tmp_path):
    assert load_config([], ["rewards.0.weight=2"]).rewards[0].weight == 2.0  # the default list
    f = tmp_path / "two.yaml"
    f.write_text("rewards:\n  - kind: hue_fraction\n    name: a\n  - kind: hue_fraction\n    name: b\n    weight: 0.5\n")
    cfg = load_config([f], ["rewards.1.weight=3", "rewards.0.options.min_saturation=0.4", "algo.radii.2=0.3"])
    assert [(r.label, r.weight) for r in cfg.rewards] == [("a", 1.0), ("b", 3.0)]
    assert cfg.rewards[0].options == {"min_saturation": 0.4}
    assert cfg.algo.radii == [0.02, 0.05, 0.3]
    with pytest.raises(ConfigError, match=r"rewards is a list of 2 item\(s\); '2' is not an index"):
        load_config([f], ["rewards.2.weight=1"])
    with pytest.raises(ConfigError, match="'first' is not an index"):
        load_config([f], ["rewards.first.weight=1"])


def test_empty_output_dir_is_refused():
    with pytest.raises(ConfigError, match="output.dir: must name a folder"):
        load_config([], ["output.dir="])
    with pytest.raises(ConfigError, match="output.dir"):
        load_config([], ["output.dir=  "])


def test_cli_prints_the_typed_and_indexed_overrides():
    proc = subprocess.run([sys.executable, "-m", "services.cli", "print-config", "--set", "trainer.mixed_precision=no",
                           "--set", "rewards.0.weight=2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mixed_precision: 'no'" in proc.stdout and "weight: 2.0" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "services.cli", "print-config", "--set", "output.dir="],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["drpo: error: output.dir: must name a folder (got an empty string)"]
