from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMGS = ROOT.parent / "shared" / "data" / "iwmfdiff-imgs"


@pytest.fixture(scope="session")
def shared_imgs() -> Path:
    if not SHARED_IMGS.is_dir():
        pytest.fail(f"shared test images not found at {SHARED_IMGS} (CI lays ../shared beside the clone)")
    return SHARED_IMGS
