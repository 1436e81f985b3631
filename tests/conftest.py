"""Every test sees 8 fake CPU devices; set before JAX is imported anywhere."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "conftest must run before JAX initialises its backend"
    return jax.devices()


@pytest.fixture
def repo_root() -> Path:
    return ROOT
