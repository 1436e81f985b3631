"""Config loading, typed overrides and validation: one clear line naming the key and the fix."""

import importlib.util
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from musicdiff.config import choose_preset, load_config, validate
from musicdiff.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _every_preset() -> list[str]:
    """`file[:preset]` for every config file and each name in its PRESETS (the file alone when it has none)."""
    specs = []
    for file in sorted(CONFIG_DIR.glob("*.py")):
        module_spec = importlib.util.spec_from_file_location(f"presets_of_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        presets = getattr(module, "PRESETS", None) or {"": None}
        specs += [f"{file}:{name}" if name else str(file) for name in presets]
    return specs

CONFIG = textwrap.dedent(
    """
    import ml_collections
    from musicdiff.parallel import DEFAULT_SHARDING_RULES, mesh_config

    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.batch_size = 8
        c.mesh = mesh_config()
        c.sharding_rules = DEFAULT_SHARDING_RULES
        c.data = ml_collections.ConfigDict(dict(sample_rate=44100, sample_size=4096, root=""))
        c.autoencoder = ml_collections.ConfigDict(dict(name="none", strides=(2, 4, 4, 8), sample_rate=44100))
        c.flag = False
        c.lr = 1e-4
        c.betas = (0.9, 0.999)
        c.note = arg or "default"
        return c
    """
)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "sample_config.py"
    path.write_text(CONFIG)
    return str(path)


def test_overrides_are_typed_after_defaults(config_file):
    config = load_config(
        f"{config_file}:preset",
        ["mesh.fsdp=2", "flag=true", "lr=3e-4", "betas=(0.8, 0.99)", "data.root=/tmp/x", "seed=7"],
    )
    assert config.note == "preset"
    assert config.mesh.fsdp == 2 and config.flag is True and config.lr == pytest.approx(3e-4)
    assert config.betas == (0.8, 0.99) and config.data.root == "/tmp/x" and config.seed == 7


def test_config_is_locked(config_file):
    config = load_config(config_file)
    with pytest.raises(AttributeError):
        config.new_key = 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("mesh.dta=2", r"config\.mesh\.dta: unknown key 'dta'; did you mean config\.mesh\.data\?"),
        ("bogus=1", r"config\.bogus: unknown key 'bogus'"),
        ("seed=abc", r"config\.seed='abc': expected a int"),
        ("flag=maybe", r"config\.flag='maybe': expected a bool"),
        ("mesh=3", r"config\.mesh: is a group of keys"),
        ("seed", r"needs a value"),
    ],
)
def test_bad_overrides_name_the_key(config_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file, [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("configs/does_not_exist.py:tiny")


@pytest.mark.parametrize(
    "overrides, devices, message",
    [
        (["mesh.data=3"], 8, r"config\.mesh: .*3 devices but 8 are available"),
        (["batch_size=6", "mesh.data=4", "mesh.fsdp=2"], 8, r"config\.batch_size=6: .*divisible by the data-parallel "
                                                            r"size 8 .*--config\.batch_size=8"),
        (["data.sample_size=5000"], 8, r"config\.data\.sample_size=5000: .*multiple of .* 256; "
                                       r"use --config\.data\.sample_size=5120"),
        (["data.sample_rate=48000"], 8, r"config\.data\.sample_rate=48000: the model runs at 44100"),
    ],
)
def test_validation_errors(config_file, overrides, devices, message):
    config = load_config(config_file, overrides)
    with pytest.raises(ConfigError, match=message):
        validate(config, devices)


def test_valid_config_passes(config_file):
    validate(load_config(config_file, ["mesh.data=2", "mesh.fsdp=4"]), 8)


@pytest.mark.parametrize("spec", _every_preset(), ids=lambda spec: spec.rpartition("/")[2])
def test_every_preset_loads_and_validates(spec):
    # On 8 devices where the global batch splits 8 ways; a one-machine preset (the demo autoencoder's batch 4) on as
    # many devices as its batch admits.
    config = load_config(spec)
    validate(config, math.gcd(8, int(config.get("batch_size", 8))))


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match=r"diffusion.py:huge: unknown preset 'huge'; choose one of sao, sao_small"):
        load_config(f"{CONFIG_DIR / 'diffusion.py'}:huge")
    with pytest.raises(ConfigError, match=r"demo.py:fast: unknown preset 'fast'; choose one of \(none\), long"):
        load_config(f"{CONFIG_DIR / 'demo.py'}:fast")
    assert choose_preset(None, {"": 1, "tiny": 2}) == 1


def test_cli_prints_one_error_line(config_file, tmp_path, repo_root):
    result = subprocess.run(
        [sys.executable, "-m", "launch.describe", f"--config={config_file}", "--config.mesh.tensr=2",
         f"--workdir={tmp_path / 'out'}"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: config.mesh.tensr: unknown key 'tensr'; did you mean config.mesh.tensor?"]
