import pytest

from tests.tiny_models import write_checkpoint


@pytest.fixture(scope="session")
def default_checkpoint():
    """The real Gemma 3 270M (converted from the packaged GGUF once, then cached)."""
    from backend.default_model import ensure_default_checkpoint

    return ensure_default_checkpoint()


@pytest.fixture(scope="session")
def servable_checkpoint(tmp_path_factory, default_checkpoint):
    """A tiny random Gemma 3 with the real Gemma tokenizer: the engine serves it end to end, fast."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3_text", seed=1,
                            tokenizer_dir=default_checkpoint)
