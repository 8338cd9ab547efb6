"""backend.self_check refuses checkpoints that would serve garbage, and passes the right ones.

The broken checkpoints are built from the real converted one (tests/broken_checkpoints.py): the
tokenizer transformers 5.17 made of the packaged GGUF (character pieces, no <bos>), the real
tokenizer without or with a doubled <bos>, norms still holding llama.cpp's `1 +`, a config parsed
differently than at conversion.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from backend import self_check
from backend.self_check import SelfCheckError, check_greedy, check_tokenizer, load_checked_tokenizer
from backend.tokenizer import Tokenizer
from tests.broken_checkpoints import CONFIG_517, checkpoint_like, real_tokenizer, tokenizer_517

ROOT = Path(__file__).resolve().parents[1]
ISSUE_HELLO_IDS = [236814, 236744, 236752, 236752, 236748]  # "Hello" as transformers 5.17's conversion cut it
INSTALLED_TRANSFORMERS = self_check.installed_versions()["transformers"]


@pytest.fixture(scope="module")
def checkpoint_517(tmp_path_factory, default_checkpoint) -> Path:
    return checkpoint_like(default_checkpoint, tmp_path_factory.mktemp("tf517") / "ckpt", {
        "tokenizer.json": tokenizer_517(default_checkpoint), "tokenizer_config.json": CONFIG_517,
        self_check.STAMP: None})


# --- tokenizer checks ---------------------------------------------------------------------------

def test_the_transformers_517_tokenizer_is_refused_with_versions_and_advice(checkpoint_517):
    broken = Tokenizer(checkpoint_517)
    assert broken.encode("Hello") == ISSUE_HELLO_IDS  # the bug, reproduced
    with pytest.raises(SelfCheckError) as refused:
        load_checked_tokenizer(checkpoint_517)
    message = str(refused.value)
    assert str(checkpoint_517) in message and "<bos> (id 2) first" in message
    assert f"transformers {INSTALLED_TRANSFORMERS}" in message
    assert f"pip install 'transformers=={self_check.TESTED_VERSIONS['transformers']}'" in message


def test_character_pieces_after_a_bos_are_still_refused_for_the_default_model(tmp_path, default_checkpoint):
    # <bos> alone does not prove the tokenizer right: the known ids do.
    path = checkpoint_like(default_checkpoint, tmp_path / "ckpt", {
        "tokenizer.json": tokenizer_517(default_checkpoint, "<bos> $A"), "tokenizer_config.json": CONFIG_517})
    tokenizer = Tokenizer(path)
    check_tokenizer(tokenizer)  # passes the check every checkpoint gets
    with pytest.raises(SelfCheckError, match=r"encodes 'Hello' as \[2, 236814, 236744, 236752, 236752, 236748\], "
                                             r"expected \[2, 9259\]"):
        load_checked_tokenizer(path)  # the stamp says: the default model


@pytest.mark.parametrize("template, problem", [("$A", "without"), ("<bos> <bos> $A", "twice")])
def test_bos_missing_or_doubled_is_refused(tmp_path, default_checkpoint, template, problem):
    path = checkpoint_like(default_checkpoint, tmp_path / "ckpt", {
        "tokenizer.json": real_tokenizer(default_checkpoint, template), self_check.STAMP: None})
    with pytest.raises(SelfCheckError, match="first, exactly once"):
        load_checked_tokenizer(path)


def test_a_tiny_checkpoint_with_the_real_tokenizer_passes(servable_checkpoint):
    # The check reads nothing family-specific: the tiny Gemma 1/2/3 test checkpoints share this
    # tokenizer (tests/tiny_models.py), and every Gemma tokenizer puts <bos> first.
    assert load_checked_tokenizer(servable_checkpoint).encode("Hello") == [2, 9259]


# --- the default model --------------------------------------------------------------------------

@pytest.mark.slow
def test_the_default_model_passes(default_checkpoint):
    assert self_check.is_verified(default_checkpoint)
    stamp = json.loads((default_checkpoint / self_check.STAMP).read_text())
    assert stamp["version"] == self_check.STAMP_VERSION and stamp["model_config"]["family"] == "gemma3_text"
    assert self_check.main([str(default_checkpoint)]) == 0  # the start checks, as scripts/serve.sh runs them
    check_greedy(default_checkpoint, Tokenizer(default_checkpoint))


@pytest.mark.slow
def test_norms_off_by_the_gemma_plus_one_are_refused(tmp_path, default_checkpoint):
    # llama.cpp stores Gemma's norm weights as 1 + w; a converter that forgets to subtract it makes
    # a model that loads and runs, and writes nonsense.
    def shifted(path: Path) -> None:
        state = load_file(str(default_checkpoint / "model.safetensors"))
        save_file({k: v + 1 if k.endswith("norm.weight") else v for k, v in state.items()}, str(path))

    path = checkpoint_like(default_checkpoint, tmp_path / "ckpt", {"model.safetensors": shifted,
                                                                   self_check.STAMP: None})
    tokenizer = load_checked_tokenizer(path)  # the tokenizer is fine; only the model check can see this
    with pytest.raises(SelfCheckError, match=r"continues '1, 2, 3, 4, 5,' greedily with .*expected ' 6, 7, 8, 9,'"):
        check_greedy(path, tokenizer)


def test_a_config_parsed_differently_than_at_conversion_is_refused(tmp_path, default_checkpoint):
    # As if another transformers release read the local layers' rope base differently.
    config = json.loads((default_checkpoint / "config.json").read_text())
    config["rope_local_base_freq"] = config["rope_theta"]
    path = checkpoint_like(default_checkpoint, tmp_path / "ckpt", {"config.json": json.dumps(config)})
    with pytest.raises(SelfCheckError, match="different model config than the one checked at conversion"):
        load_checked_tokenizer(path)


def test_a_stamp_from_an_older_release_is_refused(tmp_path, default_checkpoint):
    stamp = json.loads((default_checkpoint / self_check.STAMP).read_text()) | {"version": 0}
    path = checkpoint_like(default_checkpoint, tmp_path / "ckpt", {self_check.STAMP: json.dumps(stamp)})
    assert not self_check.is_verified(path)
    with pytest.raises(SelfCheckError, match="older release; convert again"):
        load_checked_tokenizer(path)


# --- entry points -------------------------------------------------------------------------------

def test_engine_start_refuses_a_broken_tokenizer(checkpoint_517):
    from backend.loader import start_engine
    from backend.params import EngineConfig

    with pytest.raises(SelfCheckError, match="failed its self-check"):
        start_engine(EngineConfig(checkpoint=str(checkpoint_517), device="cpu"))


def test_serve_script_refuses_a_broken_checkpoint_before_starting_triton(checkpoint_517):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(checkpoint_517.parent),
           "GEMMA_CHECKPOINT": str(checkpoint_517)}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "serve.sh")], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 1
    assert "failed its self-check" in run.stderr and "Installed: transformers " in run.stderr
    assert "Serving" not in run.stdout  # tritonserver was never started
