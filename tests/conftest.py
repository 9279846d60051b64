import os
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a machine whose
# cores are busy with other work (a training run beside the tests, a shared CI runner), spinning
# threads stall every parallel region: the suite took 4-5x as long on the 2-core VM with both
# cores loaded (72 s against 18 s for three test files, session 15). Results do not depend on it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

#: A training config that runs in about a second: capsnet_tiny on synthetic data, 3 steps per epoch.
TINY = dict(
    model="capsnet_tiny",
    dataset="synthetic",
    dataset_kwargs=dict(train_size=48, val_size=16, test_size=16),
    batch_size=16,
    epochs=3,
    checkpoint_every=1,
    log_every=1,
    figures=False,
)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _float32_by_default(monkeypatch):
    """``amp="auto"`` (the config default) resolves to float32 in tests on every CPU, as on one
    without bf16 units, so that results do not depend on the machine; tests of bf16 ask for it
    (``amp="bf16"``) or force the detector (tests/test_amp.py)."""
    monkeypatch.setattr("capsnet.precision.cpu_bf16_units", lambda: None)


@pytest.fixture
def one_thread():
    """One torch thread for the test: EM routing is many small ops, and on a shared 2-core
    machine OpenMP barriers stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data_root() -> Path:
    """The real dataset files: $CAPSNET_DATA (CI points it at ../shared/data)."""
    root = os.environ.get("CAPSNET_DATA")
    if not root or not (Path(root) / "mnist").is_dir():
        pytest.skip("CAPSNET_DATA is not set to a folder with mnist/*.gz")
    return Path(root)
