"""`gemma-engine "prompt"`: generate with the engine in-process, no server (a quick local check)."""
from __future__ import annotations

import argparse
import sys

from .errors import InvalidRequestError
from .loader import start_engine
from .params import EngineConfig, SamplingParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemma-engine", description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("--checkpoint", help="HF Gemma checkpoint dir (default: packaged Gemma 3 270M)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="auto", choices=["auto", "te", "torch"])
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)

    engine = start_engine(EngineConfig(checkpoint=args.checkpoint, dtype=args.dtype, device=args.device,
                                       engine=args.engine))
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
        prompt = args.prompt
        if args.chat:  # the template already starts with <bos>
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            prompt = engine.tokenizer.encode(text, add_special_tokens=False)
        for out in engine.submit(prompt, params):
            sys.stdout.write(out.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    except InvalidRequestError as e:
        print(f"gemma-engine: {e}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()


if __name__ == "__main__":
    sys.exit(main())
