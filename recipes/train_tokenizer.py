"""Train the reference models' tokenizer: byte-level BPE on the corpus's train split.

    PYTHONPATH=. python recipes/train_tokenizer.py --output build/tokenizer --vocab-size 8192

Byte-level BPE (GPT-2 style: any byte sequence encodes, nothing is unknown) trained with the `tokenizers`
library, saved as a `PreTrainedTokenizerFast` so ``AutoTokenizer.from_pretrained(output)`` loads it. One
special token, ``<|endoftext|>``, serves as BOS, EOS and padding; no token is added automatically, the
pretraining recipe puts EOS between documents itself.
"""

import argparse
import time
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_longctx.eval.corpus import iter_documents, line_chunks

END_OF_TEXT = "<|endoftext|>"
def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts` and wrap it for transformers.

    Args:
        texts: training texts (whole documents; they are cut into line chunks here).
        vocab_size: size of the vocabulary including the 256 byte symbols and ``<|endoftext|>``.
        model_max_length: the length the models are trained at, in tokens.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + 1 special + 1 merge), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(line_chunks(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=model_max_length,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to save the tokenizer into")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-max-length", type=int, default=1024, help="training length in tokens")
    parser.add_argument("--max-bytes", type=int, default=None, help="train on at most this much text")
    parser.add_argument("--roots", nargs="+", default=None, help="corpus roots (default: this Python's)")
    args = parser.parse_args(argv)

    start = time.monotonic()
    texts = [doc.text for doc in iter_documents("train", roots=args.roots, max_bytes=args.max_bytes)]
    num_chars = sum(map(len, texts))
    print(f"corpus: {len(texts)} train documents, {num_chars / 1e6:.1f} M chars, {time.monotonic() - start:.1f} s")
    tokenizer = train_tokenizer(texts, args.vocab_size, args.model_max_length)
    tokenizer.save_pretrained(args.output)
    print(f"tokenizer: vocab {len(tokenizer)} saved to {args.output}, {time.monotonic() - start:.1f} s total")


if __name__ == "__main__":
    main()
