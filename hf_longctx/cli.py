"""The ``hf-longctx`` command: ``info``, ``demo`` (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

from .eval.command import add_eval_arguments
from .hub.command import add_card_arguments


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# The Triton kernel modules of hf_longctx.kernels, by what they compute.
KERNEL_MODULES = {
    "sink/window attention": "sink_window",
    "Self-Extend / dual-chunk attention": "remap",
    "softplus attention (LSSA / LSSAR)": "softplus",
    "block-sparse attention": "block_sparse",
}


def kernel_status() -> dict[str, str]:
    """Which attention paths can run here, with the reason when one cannot; and whether QLoRA can load."""
    import importlib
    import importlib.util

    import torch

    status = {"every attention, PyTorch reference (CPU and CUDA)": "usable"}
    for name, module in KERNEL_MODULES.items():
        try:
            importlib.import_module(f"hf_longctx.kernels.{module}")
        except ImportError as exc:
            state = f"unusable: the kernel cannot be imported ({exc})"
        else:
            state = "usable" if torch.cuda.is_available() else "unusable: no CUDA device"
        status[f"{name}, Triton kernel"] = state
    status["QLoRA (bitsandbytes)"] = ("usable" if importlib.util.find_spec("bitsandbytes")
                                      else "unusable: install hf-longctx[qlora]")
    return status


def run_info(args: argparse.Namespace) -> None:
    import torch

    import hf_longctx

    print(f"hf-longctx {hf_longctx.__version__}")
    print(f"python {platform.python_version()} on {platform.system()} {platform.machine()}")
    for package in ("torch", "transformers", "triton", "accelerate", "peft", "safetensors"):
        print(f"{package:<13} {_version(package)}")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA device)"
    print(f"device        {device}")
    for name, state in kernel_status().items():
        print(f"{name}: {state}")


def run_demo(args: argparse.Namespace) -> None:
    from .demo import main

    main(args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-longctx", description="Long context for Hugging Face causal LMs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    info = subparsers.add_parser("info", help="versions, device, and which kernels are usable")
    info.set_defaults(func=run_info)
    demo = subparsers.add_parser("demo", help="stock vs patched quality and memory past the model's window")
    demo.add_argument("--model", default=None, help="model folder (default: the repository's reference model)")
    demo.set_defaults(func=run_demo)
    add_eval_arguments(subparsers)
    add_card_arguments(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:  # bad arguments name the parameter: one line, not a traceback
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
