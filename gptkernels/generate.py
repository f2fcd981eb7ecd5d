"""``python -m gptkernels.generate``: sample text from a trained checkpoint or a Hugging Face GPT-2 folder.

The text streams to stdout as it is sampled (the prompt first, then each decoded piece)::

    python -m gptkernels.generate --checkpoint out/ --prompt "The list" --max-new-tokens 50 --seed 1
    python -m gptkernels.generate --hf ./gpt2 --prompt "Hello" --temperature 0.7 --top-p 0.9 --stop-at-eos
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .checkpoint import load_model
from .cli import OneLineErrorParser, UsageError, cli_main, resolve_device


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog="python -m gptkernels.generate", description="Sample text from a trained model.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file or a training output folder (newest)")
    src.add_argument("--hf", metavar="FOLDER", help="a Hugging Face GPT-2 folder (GPT2LMHeadModel) instead")
    p.add_argument("--prompt", default="Every effort moves you", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to sample (default: %(default)s)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default: %(default)s)"
    )
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set with this much probability")
    p.add_argument("--min-p", type=float, help="drop tokens less likely than min-p × the most likely one")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages tokens already in the text (CTRL)")
    p.add_argument("--seed", type=int, help="seed for reproducible samples")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at <|endoftext|>")
    p.add_argument("--tokenizer", help="with --hf: the tokenizer (default gpt2); a checkpoint brings its own")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto", help="(default: auto)")
    return p


def _check(args) -> None:
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        raise UsageError(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be positive, got {args.repetition_penalty}")
    if not args.prompt:
        raise UsageError("--prompt must not be empty")
    if args.tokenizer is not None and args.checkpoint is not None:
        raise UsageError("--tokenizer goes with --hf; a checkpoint uses the tokenizer it was trained with")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    device = resolve_device(args.device)
    from .generation import check_kernels, check_vocab, generate_text

    check_kernels(args.kernels, device)
    if args.checkpoint is not None:
        model, tokenizer = load_model(args.checkpoint, device=device, kernels=args.kernels)
    else:
        from .model import GPT
        from .tokenizer import get_tokenizer

        model = GPT.from_hf(args.hf, kernels=args.kernels).to(device).eval()
        tokenizer = get_tokenizer(args.tokenizer or "gpt2")
    check_vocab(model, tokenizer)
    from .sampling import extension_status

    started = False

    def on_text(piece: str) -> None:
        nonlocal started
        if not started:  # the prompt was accepted: say which op samples, then echo the prompt
            started = True
            print(f"sampling: {extension_status()}", file=sys.stderr, flush=True)
            sys.stdout.write(args.prompt)
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate_text(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        tokenizer=tokenizer,
        stop_at_eos=args.stop_at_eos,
        on_text=on_text,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    on_text("\n")  # the prompt too, when no token was generated
    return 0


if __name__ == "__main__":
    cli_main(main)
