"""Every test sees 8 fake CPU devices; set before JAX is imported anywhere."""

import os
import sys
from pathlib import Path

# Unoptimised LLVM codegen (tests/process_fixtures.FAST_CODEGEN) compiles CPU programs about twice as fast; the
# suite's tiny programs spend far longer compiling than running.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache in a directory of this session only: a program compiled again in the same
    pytest process (a resumed training run, a second generator over the same checkpoint, the same tiny preset in
    another test file) loads the executable the first compile wrote instead of compiling it again. Loading gives the
    same executable, so results are bit-identical to a fresh compile; nothing is shared across sessions. Programs
    that compile in under half a second are not written (their write costs more than a recompile). Subprocesses
    keep their own settings (process_fixtures.compile_cache_env)."""
    from tests.autoencoder_fixtures import compilation_cache

    with compilation_cache(tmp_path_factory.mktemp("jax_compilation_cache"), min_compile_time_s=0.5) as directory:
        yield directory


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "conftest must run before JAX initialises its backend"
    return jax.devices()


@pytest.fixture
def unsharded():
    """Runs a test's bare module calls under `unsharded()`: model code outside a sharding context raises
    (musicdiff/parallel/sharding.py), so a test that calls a module directly says that it runs it unsharded."""
    from musicdiff.parallel.sharding import unsharded as unsharded_context

    with unsharded_context():
        yield


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_latents(tmp_path_factory) -> Path:
    """Latents of tests/precompute_fixtures' audio folder (43 windows of 32 frames) encoded by a random tiny
    autoencoder, shared by the training tests that run the CLI on real precomputed latents."""
    from musicdiff.inference.precompute import precompute_latents
    from tests.precompute_fixtures import precompute_config, save_autoencoder, write_audio_folder

    base = tmp_path_factory.mktemp("tiny_latents")
    root = write_audio_folder(base / "audio")
    out = base / "latents"
    precompute_latents(precompute_config(save_autoencoder(base / "autoencoder"), root), out)
    return out


_MEASUREMENTS: list[tuple[str, str]] = []


@pytest.fixture
def measurement(request):
    """`measurement(label, value)` records a measured number (parity errors, accuracies) for the end-of-run summary,
    so CI output shows them even though passing tests' output is captured."""

    def record(label: str, value) -> None:
        text = f"{value:.3e}" if isinstance(value, float) else str(value)
        _MEASUREMENTS.append((f"{request.node.nodeid}: {label}", text))

    return record


def pytest_terminal_summary(terminalreporter):
    if _MEASUREMENTS:
        terminalreporter.section("measured values")
        for label, text in _MEASUREMENTS:
            terminalreporter.write_line(f"{label} = {text}")
