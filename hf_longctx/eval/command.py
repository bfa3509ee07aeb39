"""The ``hf-longctx eval`` subcommand: run the evaluations on a checkpoint and write their results.

    hf-longctx eval MODEL_PATH --output DIR [--task {ppl,passkey,needle,all,agreement}] [--target PATH]
        [--lengths 1024,2048 | --multiples 1,2,4,8,16] [--depths 0,0.5,1] [--samples N]
        [--batch-size B] [--seed S] [--max-tokens N] [--device cuda] [--dtype bfloat16]
        [--tokenizer PATH] [--longctx attention=sink:2048 ...]

For each task it prints a markdown table and writes ``DIR/<task>.json``, ``.md`` and ``.png``. The JSON
records the command that reproduces exactly that file (every default made explicit, ``--task`` set to that
task), the device, dtype, the long-context patch in effect and the library versions; model cards quote it.
"""

from __future__ import annotations

import argparse
import json
import shlex
from importlib.metadata import version

import torch
from transformers import AutoTokenizer

from .. import __version__, from_pretrained, patch, patched_config
from . import report
from .agreement import draft_agreement
from .perplexity import DEFAULT_MAX_TOKENS, perplexity_vs_length, training_length
from .retrieval import check_depths, needle_grid, passkey_accuracy

TASKS = ("ppl", "passkey", "needle")
DEFAULT_MULTIPLES = (1, 2, 4, 8, 16)
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _number_list(cast):
    def parse(text: str) -> list:
        try:
            return [cast(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {cast.__name__} values, got {text!r}") from None

    return parse


def add_eval_arguments(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand on ``subparsers``; its parser's ``func`` default is :func:`run_eval`."""
    parser = subparsers.add_parser(
        "eval",
        help="perplexity vs length, passkey retrieval and the needle-in-a-haystack grid",
        description="Evaluate a checkpoint's long context; writes DIR/<task>.json, .md and .png per task.",
    )
    parser.add_argument("model", metavar="MODEL_PATH", help="local checkpoint folder or Hub id")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for <task>.json/.md/.png")
    parser.add_argument(
        "--task",
        choices=(*TASKS, "all", "agreement"),
        default="all",
        help="all = ppl, passkey and needle; agreement = MODEL_PATH as a draft of --target",
    )
    parser.add_argument("--target", metavar="PATH", help="target model for --task agreement (MODEL_PATH is the draft)")
    lengths = parser.add_mutually_exclusive_group()
    lengths.add_argument("--lengths", type=_number_list(int), metavar="L,...", help="context lengths in tokens")
    lengths.add_argument(
        "--multiples",
        type=_number_list(float),
        metavar="M,...",
        help="lengths as multiples of the model's max_position_embeddings (default: 1,2,4,8,16)",
    )
    parser.add_argument(
        "--depths",
        type=_number_list(float),
        metavar="D,...",
        help="key depths in [0, 1], 0 = start (default: passkey 0,0.25,0.5,0.75,1; needle 0,0.1,...,1)",
    )
    parser.add_argument(
        "--samples", type=int, metavar="N", help="windows (ppl, default 4) or prompts per cell (passkey 5, needle 1)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (ppl)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random pass keys")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="refuse longer lengths")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or Hub id (default: MODEL_PATH)")
    parser.add_argument(
        "--longctx",
        action="append",
        default=[],
        metavar="SPEC",
        help="patch applied on top of the saved one: KIND=SHORTHAND (attention=sink:2048) or a JSON object; "
        "repeatable",
    )
    parser.set_defaults(func=run_eval)
    return parser


def parse_longctx(specs: list[str]) -> dict:
    """``["attention=sink:2048", '{"rope": "yarn:4"}']`` -> ``{"attention": "sink:2048", "rope": "yarn:4"}``."""
    features = {}
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                features.update(json.loads(spec))
            except (json.JSONDecodeError, TypeError, ValueError) as error:
                raise ValueError(f"--longctx: {spec!r} is not a JSON object of features ({error})") from None
        elif "=" in spec:
            kind, _, value = spec.partition("=")
            features[kind.strip()] = value.strip()
        else:
            raise ValueError(f"--longctx: expected KIND=SHORTHAND (attention=sink:2048) or a JSON object, got {spec!r}")
    return features


def run_eval(args: argparse.Namespace) -> list[report.Result]:
    """Load ``args.model`` with hf_longctx.from_pretrained, apply ``--longctx``, run the tasks, write results."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    features = parse_longctx(args.longctx)
    if (args.task == "agreement") != (args.target is not None):
        raise ValueError("--target: give it with --task agreement, and only then")
    if args.depths is not None:
        check_depths(args.depths)  # before loading a model that may take minutes
    model = from_pretrained(args.model, dtype=dtype, device_map=device).eval()
    if features:
        patch(model, patched_config(model), **features)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    if args.lengths is not None:
        lengths = args.lengths
    else:
        base = training_length(model)
        if base is None:
            raise ValueError("--multiples: the model config has no max_position_embeddings; pass --lengths")
        lengths = [round(multiple * base) for multiple in args.multiples or DEFAULT_MULTIPLES]

    samples = {} if args.samples is None else {"num_samples": args.samples}
    depths = {} if args.depths is None else {"depths": args.depths}
    metadata = {
        "device": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "longctx": None if patched_config(model) is None else patched_config(model).to_dict(),
        "versions": {"hf_longctx": __version__, "torch": torch.__version__, "transformers": version("transformers")},
    }
    results = []
    for task in TASKS if args.task == "all" else (args.task,):
        if task == "agreement":
            target = from_pretrained(args.target, dtype=dtype, device_map=device).eval()
            result = draft_agreement(model, target, tokenizer, lengths, max_tokens=args.max_tokens, **samples)
        elif task == "ppl":
            result = perplexity_vs_length(
                model, tokenizer, lengths, batch_size=args.batch_size, max_tokens=args.max_tokens, **samples
            )
        else:
            evaluate = passkey_accuracy if task == "passkey" else needle_grid
            result = evaluate(
                model, tokenizer, lengths, seed=args.seed, max_tokens=args.max_tokens, **depths, **samples
            )
        result.command = _command(args, device, result)
        result.metadata = metadata
        paths = report.save_result(result, args.output)
        print(f"\n## {task}: {result.model_name}\n\n{result.to_markdown()}\n")
        print("wrote " + ", ".join(str(path) for path in paths.values()))
        results.append(result)
    return results


def _command(args: argparse.Namespace, device: str, result: report.Result) -> str:
    """The ``hf-longctx eval`` command line that reproduces ``result`` exactly, every default explicit."""
    words = ["hf-longctx", "eval", args.model, "--output", args.output, "--task", result.task]
    words += ["--lengths", ",".join(str(length) for length in result.lengths), "--samples", str(result.num_samples)]
    if result.task == "ppl":
        words += ["--batch-size", str(args.batch_size)]
    elif result.task == "agreement":
        words += ["--target", args.target]
    else:
        words += ["--depths", ",".join(str(depth) for depth in result.depths), "--seed", str(args.seed)]
    words += ["--max-tokens", str(args.max_tokens), "--device", device, "--dtype", args.dtype]
    if args.tokenizer:
        words += ["--tokenizer", args.tokenizer]
    for spec in args.longctx:
        words += ["--longctx", spec]
    return shlex.join(words)
