"""Shared test set-up: OpenMP policy, the installed-extension guard, SIMD levels, data paths."""
import os

# Before torch loads its OpenMP runtime: sleeping (not spinning) idle threads keep 2 cores usable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import minillm  # noqa: E402
from minillm.ops import _backend  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"


def pytest_configure(config):
    if _backend._C is None and os.environ.get("MINILLM_FORCE_TORCH") != "1":
        raise pytest.UsageError(
            f"minillm was imported from {pathlib.Path(minillm.__file__).parent} without its native extension "
            f"({_backend._IMPORT_ERROR}). Install it (pip install .) and run `pytest` rather than "
            "`python -m pytest`, which puts the source tree first on sys.path."
        )


@pytest.fixture(params=_backend.simd_levels() or ["none"])
def simd_level(request):
    """Runs a test once per SIMD level this CPU supports, restoring the default afterwards."""
    if request.param == "none":
        pytest.skip("native extension not built")
    before = _backend.simd_level()
    _backend.set_simd_level(request.param)
    yield request.param
    _backend.set_simd_level(before)


@pytest.fixture
def data_dir():
    """../shared/data beside the repository; tests using it skip when it is absent (a user's clone)."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
