"""``python -m gptkernels.serve``: an OpenAI-compatible server for a trained checkpoint.

    python -m gptkernels.serve --checkpoint out/ [--host 127.0.0.1 --port 8000 --api-key KEY]

Then ``curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json'
-d '{"model": "out/", "prompt": "Hello", "max_tokens": 20}'`` or the ``openai`` client with
``base_url="http://127.0.0.1:8000/v1"``. See :mod:`gptkernels.serving.server` for the endpoints.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .checkpoint import load_model
from .cli import OneLineErrorParser, UsageError, cli_main, resolve_device


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog="python -m gptkernels.serve", description="Serve a model over an OpenAI-style API.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file or a training output folder (newest)")
    src.add_argument("--hf", metavar="FOLDER", help="a Hugging Face GPT-2 folder (GPT2LMHeadModel) instead")
    p.add_argument("--tokenizer", help="with --hf: the tokenizer (default gpt2); a checkpoint brings its own")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("GPTKERNELS_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $GPTKERNELS_API_KEY, else no key)",
    )
    p.add_argument("--served-model-name", help="the model name clients pass (default: the --checkpoint/--hf path)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (default: 32)")
    p.add_argument("--max-model-len", type=int, help="prompt + output tokens per request (default: the context)")
    p.add_argument("--max-prefill-tokens", type=int, default=512, help="prompt tokens prefilled per step (512)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto", help="(default: auto)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_prefill_tokens < 1:
        raise UsageError(f"--max-prefill-tokens must be >= 1, got {args.max_prefill_tokens}")
    if args.tokenizer is not None and args.checkpoint is not None:
        raise UsageError("--tokenizer goes with --hf; a checkpoint uses the tokenizer it was trained with")
    try:
        from .serving.server import build_app, serve
    except ImportError as e:
        raise UsageError(f"serving needs fastapi and uvicorn ({e}); pip install 'gptkernels[serve]'") from None
    device = resolve_device(args.device)
    if args.checkpoint is not None:
        model, tokenizer = load_model(args.checkpoint, device=device, kernels=args.kernels)
    else:
        from .model import GPT
        from .tokenizer import get_tokenizer

        model = GPT.from_hf(args.hf, kernels=args.kernels).to(device).eval()
        tokenizer = get_tokenizer(args.tokenizer or "gpt2")
    name = args.served_model_name or args.checkpoint or args.hf
    app = build_app(
        model,
        tokenizer,
        model_name=name,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_len=args.max_model_len,
        max_prefill_tokens=args.max_prefill_tokens,
    )
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({device})", file=sys.stderr)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    cli_main(main)
