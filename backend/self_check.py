"""Refuse to serve a checkpoint that would generate garbage: checks of its tokenizer and model.

Under transformers 5.17 the packaged model's conversion produced a tokenizer that cut "Hello" into
five letters and added no <bos>; the weights were right, the server answered " 1 1 1 1", and nothing
noticed. These checks run where such a checkpoint would otherwise be trusted:

- every engine start (`load_checked_tokenizer`, from backend.loader.start_engine): the tokenizer puts <bos>
  first, once. For the converted default model (its directory holds the stamp below) also: fixed
  strings encode to the ids of the reference tokenizer, and transformers still parses config.json
  into the model config that was checked. A few encodes and a config parse; no forward pass.
- after each conversion of the default model (`verify_conversion`): the same tokenizer checks, then
  the model itself through the engine (torch reference, fp32, CPU): greedy continuations of fixed
  prompts must equal known ones. Only then is the stamp written and the directory put in place.

Why the model check runs at conversion only: the weights are written once, checked, and never
change after (the cache directory is renamed into place only once checked); what can change later
is the software that reads them, i.e. the tokenizer and config loading, which the start checks
cover. A model check at every start would cost a model load and forward passes on the CPU (seconds
for the 270M), on every GPU instance, and prove nothing new about the weights.

`python -m backend.self_check DIR` runs the start checks on a checkpoint directory (scripts/serve.sh
does so before starting Triton).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .engine import Engine
from .params import EngineConfig, SamplingParams
from .tokenizer import Tokenizer

STAMP = "self_check.json"
# Raise when a check or the converter changes: older stamps then no longer count, and the default
# model is converted and checked again.
STAMP_VERSION = 2  # 2: tokenizer_config.json as the converter writes it since it left transformers
# What the project is tested with (the libraries that load a tokenizer); error messages recommend it.
TESTED_VERSIONS = {"transformers": "5.24.0", "tokenizers": "0.23.3"}

# What the reference tokenizer (transformers 5.24's own conversion of the packaged GGUF, which
# served the right model) makes of these: words, space runs, newline and tab tokens, control
# tokens kept whole, accents, CJK, an emoji, and a character that only byte fallback can encode.
DEFAULT_TOKENIZER_IDS: dict[str, list[int]] = {
    "Hello": [2, 9259],
    "The capital of France is": [2, 818, 5279, 529, 7001, 563],
    "  two  spaces\n\nand\ttabs": [2, 138, 13498, 138, 35220, 108, 624, 255968, 39218],
    "<start_of_turn>user\nHi<end_of_turn>": [2, 105, 2364, 107, 10979, 106],
    "naïve café 世界 😀 \U0001D518": [2, 1789, 238527, 560, 33443, 84679, 163543, 236743, 478, 395, 386, 390],
}

# Greedy continuations of the packaged Gemma 3 270M (fp32, HF `generate` and this engine agree).
# At every step the best token leads the second by at least the gap noted, so rounding differences
# between CPUs (~1e-5) cannot flip one; a model with wrong weights, norms or config cannot match.
DEFAULT_GREEDY: dict[str, list[int]] = {
    # " 6, 7, 8, 9,": smallest top-2 logit gap 2.7
    "1, 2, 3, 4, 5,": [236743, 236825, 236764, 236743, 236832, 236764, 236743, 236828, 236764, 236743, 236819,
                       236764],
    # " 100 degrees Celsius.": smallest gap 1.1
    "Water boils at a temperature of": [236743, 236770, 236771, 236771, 10674, 57356, 236761],
}


class SelfCheckError(RuntimeError):
    """A checkpoint failed a self-check; the message says what failed and what to do."""


def check_tokenizer(tokenizer: Tokenizer, expected_ids: Optional[Mapping[str, Sequence[int]]] = None) -> None:
    """<bos> first and only once, for every Gemma family; with `expected_ids`, exact ids too."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise SelfCheckError("the tokenizer has no <bos> token (every Gemma tokenizer has one)")
    for text in expected_ids or ["Hello world"]:
        ids = tokenizer.encode(text)
        if not ids or ids[0] != bos or ids.count(bos) != 1:
            raise SelfCheckError(f"the tokenizer encodes {text!r} as {ids[:12]}: Gemma needs its <bos> (id {bos}) "
                                 "first, exactly once")
        if expected_ids is not None and ids != list(expected_ids[text]):
            raise SelfCheckError(f"the tokenizer encodes {text!r} as {ids}, expected {list(expected_ids[text])}")
        if expected_ids is not None and tokenizer.decode(ids[1:], skip_special_tokens=False) != text:
            raise SelfCheckError(f"the tokenizer decodes {ids[1:]} as "
                                 f"{tokenizer.decode(ids[1:], skip_special_tokens=False)!r}, expected {text!r}")


def check_greedy(path: Path, tokenizer: Tokenizer, expected: Mapping[str, Sequence[int]] = DEFAULT_GREEDY) -> None:
    """Greedy continuations of `expected`'s prompts through the engine (torch, fp32, CPU)."""
    engine = Engine(EngineConfig(checkpoint=str(path), device="cpu", dtype="float32", engine="torch",
                                 kv_cache_bytes=16 << 20, max_num_seqs=len(expected)), tokenizer)
    try:
        handles = {prompt: engine.submit(prompt, SamplingParams(max_tokens=len(ids), temperature=0, ignore_eos=True))
                   for prompt, ids in expected.items()}
        for prompt, handle in handles.items():
            got = handle.result().token_ids
            if got != list(expected[prompt]):
                raise SelfCheckError(
                    f"the model continues {prompt!r} greedily with {engine.tokenizer.decode(got)!r} {got}, expected "
                    f"{engine.tokenizer.decode(expected[prompt])!r} {list(expected[prompt])}")
    finally:
        engine.shutdown()


def verify_conversion(path: Path) -> None:
    """Check a freshly converted default checkpoint; stamp it when it passes."""
    try:
        tokenizer = Tokenizer(path)
        check_tokenizer(tokenizer, DEFAULT_TOKENIZER_IDS)
        check_greedy(path, tokenizer)
    except SelfCheckError as e:
        raise SelfCheckError(f"the packaged Gemma 3 270M, converted into {path}, failed its self-check and was "
                             f"discarded: {e}. {environment_advice()}") from None
    stamp = {"version": STAMP_VERSION, "checked_with": installed_versions(), "model_config": _parsed_config(path)}
    (path / STAMP).write_text(json.dumps(stamp, indent=2))


def is_verified(path: Path) -> bool:
    """True when `path` holds a conversion that passed the current version of these checks."""
    try:
        return json.loads((path / STAMP).read_text()).get("version") == STAMP_VERSION
    except (OSError, ValueError):
        return False


def load_checked_tokenizer(path: Path) -> Tokenizer:
    """The checkpoint's tokenizer, after the start checks (see the module docstring)."""
    path = Path(path)
    stamp_path = path / STAMP
    try:
        if stamp_path.exists():  # the converted default model
            if not is_verified(path):
                raise SelfCheckError(f"{stamp_path} is from an older release; convert again: "
                                     "python -m backend.default_model")
            # Fields added to or dropped from GemmaConfig since the conversion are not differences.
            checked, parsed = json.loads(stamp_path.read_text())["model_config"], _parsed_config(path)
            changed = sorted(k for k in checked.keys() & parsed.keys() if checked[k] != parsed[k])
            if changed:
                diffs = "; ".join(f"{k} {str(parsed[k])[:80]} (checked: {str(checked[k])[:80]})" for k in changed)
                raise SelfCheckError("transformers now parses its config.json into a different model config than "
                                     f"the one checked at conversion: {diffs}")
        tokenizer = Tokenizer(path)
        check_tokenizer(tokenizer, DEFAULT_TOKENIZER_IDS if stamp_path.exists() else None)
    except SelfCheckError as e:
        raise SelfCheckError(f"checkpoint {path} failed its self-check: {e}. {environment_advice()}") from None
    return tokenizer


def _parsed_config(path: Path) -> dict:
    from .config import GemmaConfig

    return json.loads(json.dumps(dataclasses.asdict(GemmaConfig.from_checkpoint(path))))


def installed_versions() -> dict[str, str]:
    versions = {}
    for name in ("transformers", "tokenizers", "gguf", "torch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment_advice() -> str:
    installed = ", ".join(f"{name} {version}" for name, version in installed_versions().items())
    tested = ", ".join(f"{name} {version}" for name, version in TESTED_VERSIONS.items())
    pins = " ".join(f"'{name}=={version}'" for name, version in TESTED_VERSIONS.items())
    return f"Installed: {installed}. The project is tested with {tested}: pip install {pins}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m backend.self_check CHECKPOINT_DIR", file=sys.stderr)
        return 2
    try:
        load_checked_tokenizer(Path(args[0]))
    except (SelfCheckError, OSError, ValueError) as e:  # OSError, ValueError: not a checkpoint directory
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args[0]}: self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
