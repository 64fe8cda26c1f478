import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import make_checkpoint, write_ids  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny checkpoints built once per session, by family: {family: path}."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(family="llama", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_checkpoint(root / f"{family}-{len(cache)}", family, **overrides)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def ids_file(tmp_path_factory):
    return write_ids(tmp_path_factory.mktemp("calib") / "ids.jsonl", 8, 32)


@pytest.fixture(scope="session")
def smollm2():
    try:
        from streamprune.demo import build_smollm2

        return build_smollm2()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2-135M checkpoint cannot be built here: {e}")


@pytest.fixture
def copy_model(tmp_path):
    def copy(src):
        dst = tmp_path / "model"
        shutil.copytree(src, dst)
        return dst
    return copy
