"""Synthetic passkey documents: a 5-digit key hidden at a chosen depth inside repeated filler text.

The same text generator serves two sides: the pretraining recipe mixes passkey documents into the
reference models' training data, and the evaluation harness asks the trained models to retrieve the key
from prompts far longer than the training length. Both must build the documents identically, so the
strings live here.

A prompt looks like this (``num_filler`` = 4, ``depth`` = 0.5; filler lines shortened)::

    The grass is green. ... There and back again. The grass is green. ... There and back again.
    The pass key is 41962. Remember it. 41962 is the pass key.
    The grass is green. ... There and back again. The grass is green. ... There and back again.
    What is the pass key? The pass key is

and its answer is ``" 41962"``.
"""

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _key_line(passkey: int) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def passkey_text(num_filler: int, depth: float, passkey: int) -> tuple[str, str]:
    """Build one passkey prompt and its expected completion.

    Args:
        num_filler: how many copies of `FILLER` (five short sentences, about 90 characters) surround the
            key line; 0 gives a prompt of just the key line and the question.
        depth: where the key line sits, as a fraction of the filler before it: 0.0 = at the start,
            1.0 = just before the question. The split point is ``round(depth * num_filler)`` copies.
        passkey: the key, a non-negative integer (5 digits from `random_passkey`).

    Returns:
        ``(prompt, answer)``: the prompt ends with ``"\\n" + PASSKEY_QUESTION`` (no trailing space);
        the answer is ``f" {passkey}"``, so ``prompt + answer`` is the natural continuation.
    """
    if isinstance(num_filler, bool) or not isinstance(num_filler, int) or num_filler < 0:
        raise ValueError(f"num_filler must be an integer >= 0, got {num_filler!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1] (0 = start, 1 = end), got {depth!r}")
    if isinstance(passkey, bool) or not isinstance(passkey, int) or passkey < 0:
        raise ValueError(f"passkey must be an integer >= 0, got {passkey!r}")
    before = round(depth * num_filler)
    lines = [
        " ".join([FILLER] * before),
        _key_line(passkey),
        " ".join([FILLER] * (num_filler - before)),
        PASSKEY_QUESTION,
    ]
    prompt = "\n".join(line for line in lines if line)
    return prompt, f" {passkey}"


def random_passkey(rng: random.Random) -> int:
    """A uniformly random 5-digit key in [10000, 99999], drawn from `rng` (reproducible by seed)."""
    return rng.randint(10_000, 99_999)


def passkey_training_document(rng: random.Random, num_filler: int) -> str:
    """One training document: a passkey prompt at a random depth, its answer, and a final newline.

    Args:
        rng: source of the key and the depth (uniform in [0, 1]).
        num_filler: copies of `FILLER`, which sets the document's length (see `passkey_text`).

    Returns:
        ``prompt + answer + "\\n"``.
    """
    depth = rng.random()
    prompt, answer = passkey_text(num_filler, depth, random_passkey(rng))
    return prompt + answer + "\n"
