import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import make_checkpoint, real_text, write_ids  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny checkpoints built once per session, by family and options (realistic ones unless asked otherwise,
    see tiny.py)."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(family="llama", **overrides):
        overrides.setdefault("realistic", True)
        key = (family, tuple(sorted(overrides.items(), key=str)))
        if key not in cache:
            cache[key] = make_checkpoint(root / f"{family}-{len(cache)}", family, **overrides)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def ids_file(tmp_path_factory):
    return write_ids(tmp_path_factory.mktemp("calib") / "ids.jsonl", 8, 32)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Real English text any machine has (tiny.real_text)."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(real_text())
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M checkpoint. Skips where it cannot be built, except under CI (`CI` set), where
    the suite must run every test its machine can run: there a failure to build it fails."""
    try:
        from streamprune.demo import build_smollm2

        return build_smollm2()
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CI"):
            pytest.fail(f"SmolLM2-135M checkpoint cannot be built under CI: {e}")
        pytest.skip(f"SmolLM2-135M checkpoint cannot be built here: {e}")


@pytest.fixture
def copy_model(tmp_path):
    def copy(src):
        dst = tmp_path / "model"
        shutil.copytree(src, dst)
        return dst
    return copy
