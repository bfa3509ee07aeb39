"""The ``hf-longctx card`` subcommand: render a checkpoint's model card, save it, optionally push it.

    hf-longctx card PATH [--eval-dir DIR ...] [--base-model ID] [--description TEXT] [--tag TAG ...]
        [--license ID] [--push REPO_ID]

Writes ``PATH/README.md`` from ``PATH/config.json`` and the result JSONs of the evaluation folders
(default ``PATH/eval``). With ``--push`` it uploads the card and those folders to the Hub repo REPO_ID,
using the logged-in token (``hf auth login`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .card import push_card_to_hub, render_card, save_card


def add_card_arguments(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``card`` subcommand on ``subparsers``; its parser's ``func`` default is :func:`run_card`."""
    parser = subparsers.add_parser(
        "card",
        help="render a model card from hf-longctx eval results",
        description="Write PATH/README.md from PATH/config.json and the hf-longctx eval results inside PATH.",
    )
    parser.add_argument("path", metavar="PATH", help="saved checkpoint folder (config.json)")
    parser.add_argument(
        "--eval-dir",
        action="append",
        metavar="DIR",
        help="folder of eval results inside PATH; repeatable (default: PATH/eval)",
    )
    parser.add_argument("--base-model", metavar="ID", help="Hub id of the model this one was trained from")
    parser.add_argument("--description", metavar="TEXT", help="opening paragraph of the card")
    parser.add_argument("--tag", action="append", default=[], metavar="TAG", help="extra Hub tag; repeatable")
    parser.add_argument("--license", metavar="ID", help="license identifier, e.g. apache-2.0")
    parser.add_argument("--push", metavar="REPO_ID", help="also upload the card and its results to this Hub repo")
    parser.set_defaults(func=run_card)
    return parser


def run_card(args: argparse.Namespace) -> Path:
    """Render and save ``args.path``'s card (named after ``--push`` when given); push it if asked."""
    card = render_card(
        args.path,
        eval_dirs=args.eval_dir,
        base_model=args.base_model,
        description=args.description,
        extra_tags=args.tag,
        model_name=args.push,
        license=args.license,
    )
    path = save_card(card, args.path)
    print(f"wrote {path}")
    if args.push:
        print(f"pushed {push_card_to_hub(args.path, args.push, eval_dirs=args.eval_dir)}")
    return path
