"""Model cards rendered from ``hf-longctx eval`` results, with huggingface_hub's ModelCard.

A card holds the metadata the Hub indexes (library_name, tags including ``hf-longctx``, base_model, and a
model-index with one entry per evaluated length), the model's ``longctx`` patch from config.json, an
architecture summary, and for every evaluation its table, plot and the exact command that produced it.
Every number on the card is read from a result JSON written by ``hf-longctx eval``; results without a
recorded command are refused.

Plots are linked by paths relative to the model folder, so the evaluation folders must live inside it
(``hf-longctx eval MODEL --output MODEL/eval``): the card then renders the same locally and on the Hub.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers import AutoConfig, AutoModelForCausalLM

from ..eval import AgreementResult, PerplexityResult, RetrievalResult
from ..eval.report import Result

DEFAULT_EVAL_DIR = "eval"
TAGS = ("hf-longctx", "long-context")
TITLES = {
    "ppl": "Perplexity vs context length",
    "passkey": "Passkey retrieval",
    "needle": "Needle in a haystack",
    "agreement": "Draft/target top-1 agreement",
}
RESULT_TYPES = {
    "ppl": PerplexityResult,
    "passkey": RetrievalResult,
    "needle": RetrievalResult,
    "agreement": AgreementResult,
}
DATASETS = {
    "passkey": ("hf-longctx/passkey", "passkey retrieval (synthetic)"),
    "needle": ("hf-longctx/needle", "needle in a haystack (synthetic)"),
}


def resolve_eval_dirs(model_dir: str | Path, eval_dirs: Sequence[str | Path] | None) -> list[Path]:
    """``eval_dirs``, or ``model_dir/eval`` when it exists; each must be an existing folder inside ``model_dir``."""
    model_dir = Path(model_dir).resolve()
    if eval_dirs is None:
        default = model_dir / DEFAULT_EVAL_DIR
        return [default] if default.is_dir() else []
    resolved = []
    for eval_dir in eval_dirs:
        path = Path(eval_dir).resolve()
        if not path.is_dir():
            raise ValueError(f"eval_dirs: {eval_dir} is not a folder")
        if not path.is_relative_to(model_dir):
            raise ValueError(
                f"eval_dirs: {eval_dir} is outside the model folder; the card links its plots by relative path, "
                "so write the results inside it (hf-longctx eval MODEL --output MODEL/eval)"
            )
        resolved.append(path)
    return resolved


def load_results(eval_dir: str | Path) -> list[tuple[Path, Result]]:
    """``(json path, result)`` for each result JSON in ``eval_dir`` written by ``hf-longctx eval``.

    Ordered as the tasks are (perplexity, passkey, needle), then by file name.
    """
    results = []
    for path in sorted(Path(eval_dir).glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("task") not in RESULT_TYPES:
            continue
        result = RESULT_TYPES[data["task"]].from_dict(data)
        if not result.command:
            raise ValueError(
                f"eval_dirs: {path} records no command, so its numbers cannot be reproduced from the card; "
                "produce it with `hf-longctx eval`"
            )
        results.append((path, result))
    return sorted(results, key=lambda item: list(RESULT_TYPES).index(item[1].task))


def architecture_summary(model_dir: str | Path) -> dict[str, str]:
    """Type, parameter count, shape and training length read from config.json (no weights are loaded)."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    text = config.get_text_config()
    heads = text.num_attention_heads
    summary = {
        "model type": f"`{config.model_type}` ({', '.join(config.architectures or ['?'])})",
        "parameters": f"{parameters:,}",
        "layers": text.num_hidden_layers,
        "hidden size": text.hidden_size,
        "attention heads (query / key-value)": f"{heads} / {getattr(text, 'num_key_value_heads', None) or heads}",
        "vocabulary": text.vocab_size,
        "training length (max_position_embeddings)": text.max_position_embeddings,
    }
    rope = getattr(text, "rope_parameters", None)
    if rope:
        summary["RoPE"] = ", ".join(f"{key}={value}" for key, value in sorted(rope.items()))
    return {key: str(value) for key, value in summary.items()}


TRAINING_LOG = "loss_curve.json"


def training_summary(model_dir: Path) -> dict | None:
    """Facts of the run that trained the model, from ``recipes/pretrain.py``'s ``loss_curve.json``, or None.

    Returns {"facts": {label: value}, "command": str | None, "plot": relative PNG path | None}.
    """
    path = model_dir / TRAINING_LOG
    if not path.is_file():
        return None
    log = json.loads(path.read_text())
    labels = {
        "steps": "optimizer steps",
        "tokens_seen": "tokens seen",
        "seq_len": "sequence length (tokens)",
        "batch_size": "batch size (sequences)",
        "learning_rate": "peak learning rate",
        "passkey_blocks": "synthetic passkey blocks",
        "train_seconds": "training time (s)",
        "train_tokens_per_s": "throughput (tokens/s)",
        "eval_loss": "final validation loss (nats/token)",
        "device": "device",
        "torch": "torch",
        "transformers": "transformers",
    }
    facts = {
        label: f"{log[key]:,}" if isinstance(log[key], int) else f"{log[key]:.4g}" if isinstance(log[key], float) else str(log[key])
        for key, label in labels.items()
        if log.get(key) is not None
    }
    plot = path.with_suffix(".png")
    return {"facts": facts, "command": log.get("command"), "plot": plot.name if plot.is_file() else None}


def _eval_results(result: Result, config_name: str) -> list[EvalResult]:
    """The model-index entries of one result: one per length (perplexity, or accuracy averaged over depths)."""
    common = dict(task_type="text-generation", task_name=TITLES[result.task], metric_config=config_name)
    if isinstance(result, PerplexityResult):
        return [
            EvalResult(
                **common,
                dataset_type="hf-longctx/heldout-long-documents",
                dataset_name=result.dataset,
                dataset_config=f"{length}-tokens",
                metric_type="perplexity",
                metric_name=f"perplexity at {length} tokens",
                metric_value=value,
            )
            for length, value in zip(result.lengths, result.perplexity)
        ]
    if isinstance(result, AgreementResult):
        return [
            EvalResult(
                **common,
                dataset_type="hf-longctx/heldout-long-documents",
                dataset_name=result.dataset,
                dataset_config=f"{length}-tokens",
                metric_type="accuracy",
                metric_name=f"top-1 agreement with {result.target_name} at {length} tokens",
                metric_value=value,
            )
            for length, value in zip(result.lengths, result.agreement)
        ]
    dataset_type, dataset_name = DATASETS[result.task]
    return [
        EvalResult(
            **common,
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_config=f"{length}-tokens",
            metric_type="accuracy",
            metric_name=f"accuracy at {length} tokens (mean over depths)",
            metric_value=value,
        )
        for length, value in zip(result.lengths, result.mean_accuracy())
    ]


def _environment(result: Result) -> str:
    """``device, dtype, versions`` from the result's metadata, as one line."""
    meta = result.metadata
    versions = ", ".join(f"{name} {number}" for name, number in meta.get("versions", {}).items())
    parts = [part for part in (meta.get("device"), meta.get("dtype"), versions) if part]
    return ", ".join(parts) or "an unrecorded device"


def render_card(
    model_dir: str | Path,
    eval_dirs: Sequence[str | Path] | None = None,
    base_model: str | None = None,
    description: str | None = None,
    extra_tags: Sequence[str] = (),
    model_name: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """The model card of the checkpoint in ``model_dir``, with the results found in ``eval_dirs``.

    ``eval_dirs`` defaults to ``model_dir/eval`` (when present); ``model_name`` (the Hub id the usage snippet
    and model-index name) defaults to the folder's name.
    """
    model_dir = Path(model_dir).resolve()
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"model_dir: {model_dir.name} has no config.json; pass a saved checkpoint folder")
    model_name = model_name or model_dir.name
    longctx = json.loads(config_path.read_text()).get("longctx")

    sections, eval_results = [], []
    for eval_dir in resolve_eval_dirs(model_dir, eval_dirs):
        where = eval_dir.relative_to(model_dir).as_posix()
        for path, result in load_results(eval_dir):
            title = TITLES[result.task] + ("" if where == DEFAULT_EVAL_DIR else f" ({where})")
            sections.append(
                {
                    "title": title,
                    "table": result.to_markdown(),
                    "plot": path.with_suffix(".png").relative_to(model_dir).as_posix(),
                    "json": path.relative_to(model_dir).as_posix(),
                    "command": result.command,
                    "environment": _environment(result),
                    "patch": json.dumps(result.metadata.get("longctx")) if result.metadata.get("longctx") else None,
                }
            )
            eval_results += _eval_results(result, where)

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*TAGS, *(tag for tag in extra_tags if tag not in TAGS)],
        base_model=base_model,
        license=license,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=(files("hf_longctx.hub") / "templates" / "model_card.md").read_text(),
        model_name=model_name,
        description=description or "A causal language model, evaluated for long context with hf-longctx.",
        longctx=json.dumps(longctx, indent=2) if longctx else None,
        architecture=architecture_summary(model_dir),
        training=training_summary(model_dir),
        sections=sections,
    )


def save_card(card: ModelCard, model_dir: str | Path) -> Path:
    """Write ``card`` to ``model_dir/README.md`` (the file the Hub shows); returns its path."""
    path = Path(model_dir) / "README.md"
    card.save(path)
    return path


def push_card_to_hub(
    model_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    eval_dirs: Sequence[str | Path] | None = None,
) -> str:
    """Upload ``model_dir/README.md`` and the evaluation folders it links to into the Hub repo ``repo_id``.

    Creates the repo if needed; ``token`` defaults to the logged-in one. Returns the commit URL. Weights,
    config and tokenizer are the model's own business (``model.push_to_hub``); only the card is pushed here.
    """
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "README.md").is_file():
        raise ValueError(f"model_dir: {model_dir.name} has no README.md; render and save the card first")
    patterns = ["README.md"]
    patterns += [f"{d.relative_to(model_dir).as_posix()}/*" for d in resolve_eval_dirs(model_dir, eval_dirs)]
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=model_dir,
        allow_patterns=patterns,
        commit_message="Model card and long-context evaluation results (hf-longctx)",
    )
    return commit.commit_url
