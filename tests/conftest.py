import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "FEATCIRCUITS_FEATURES" not in os.environ:  # feature stores built by tests stay out of the user's cache
    import tempfile

    os.environ["FEATCIRCUITS_FEATURES"] = tempfile.mkdtemp(prefix="featcircuits-features-")

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_sfc() -> Path:
    path = SHARED / "data" / "sfc"
    if not path.is_dir():
        pytest.skip("../shared/data/sfc is not here")
    return path


@pytest.fixture(scope="session", params=["gpt_neox", "gpt2", "llama", "gemma2", "gemma3"])
def any_family(request):
    from featcircuits.testing import tiny_model

    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny():
    from featcircuits.testing import tiny_model

    return tiny_model("gemma3")


@pytest.fixture(scope="session")
def gemma_offline():
    from featcircuits.models import load_model

    return load_model("gemma-3-270m-offline")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Gemma 3 saved as a local HF folder: loads through the real ``load_model`` path."""
    from featcircuits.testing import tiny_model

    model = tiny_model("gemma3", scale=0.1)
    folder = tmp_path_factory.mktemp("tiny_gemma3")
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder
