"""A tritonserver given a checkpoint that fails backend/self_check.py never serves it: the model
fails to load, the server exits, and its log says why (what a bare `tritonserver` or a container
whose serve.sh check was skipped would show)."""
from __future__ import annotations

import pytest

from tests.support.server import STARTUP_TIMEOUT_S, launch


@pytest.fixture
def checkpoint_517(tmp_path, own_servers_only):
    """The default checkpoint with the tokenizer transformers 5.17 made of it (no <bos>, one piece
    per character)."""
    from backend import self_check
    from backend.default_model import ensure_default_checkpoint
    from tests.broken_checkpoints import CONFIG_517, checkpoint_like, tokenizer_517

    default = ensure_default_checkpoint()
    return checkpoint_like(default, tmp_path / "ckpt", {"tokenizer.json": tokenizer_517(default),
                                                        "tokenizer_config.json": CONFIG_517, self_check.STAMP: None})


def test_server_exits_rather_than_serve_a_broken_tokenizer(tmp_path, checkpoint_517):
    server = launch(tmp_path / "server.log", {"GEMMA_CHECKPOINT": str(checkpoint_517)})
    try:
        returncode = server.process.wait(timeout=STARTUP_TIMEOUT_S)
    finally:
        server.stop()
    log = server.log_tail(400)
    assert returncode != 0, log
    assert "failed its self-check" in log and "<bos> (id 2) first" in log and "pip install" in log, log
