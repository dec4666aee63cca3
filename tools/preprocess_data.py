"""Tokenize a JSONL corpus into a Megatron IndexedDataset (PREFIX_<key>_document.bin/.idx).

Example:
    PYTHONPATH=. python tools/preprocess_data.py --input corpus.jsonl --json-key text \\
        --output-prefix data/corpus --tokenizer-type tiktoken \\
        --tokenizer-model /models/llama3/tokenizer.model --workers 8 --append-eod

The result is used as ``data.data_path: [data/corpus_text_document]``. The logic lives in
``splitllama.data.preprocess``; this file only parses arguments.
"""
from __future__ import annotations

import argparse
import sys

from splitllama import logs
from splitllama.config.data import TOKENIZER_TYPES
from splitllama.data.preprocess import TokenizerSpec, preprocess_jsonl
from splitllama.errors import cli_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--json-key", default="text", help="key holding the document text (or a list of token ids)")
    p.add_argument("--values-key", default=None,
                   help="critic data: key holding value targets (a number: target of the last token; "
                        "a list: one number or null per token); also writes PREFIX_<key>_document_values.bin/.idx")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", default=None,
                   help=".model file (sentencepiece, tiktoken), or HF directory or tokenizer.json file")
    p.add_argument("--vocab-size", type=int, default=None, help="null tokenizer vocab size")
    p.add_argument("--model-vocab-size", type=int, default=None,
                   help="fail if the tokenizer's vocab is larger than this")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64, help="lines per Pool.imap chunk")
    p.add_argument("--append-eod", action="store_true", help="end every document with EOD")
    p.add_argument("--prepend-bos", action="store_true", help="start every document with BOS")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX_<key>_document.bin/.idx")
    p.add_argument("-v", "--verbose", action="store_true", help="show library diagnostics too")
    return p.parse_args(argv)


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.verbose)
    spec = TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    stats = preprocess_jsonl(
        args.input, args.output_prefix, spec, json_key=args.json_key, workers=args.workers,
        append_eod=args.append_eod, prepend_bos=args.prepend_bos,
        model_vocab_size=args.model_vocab_size, chunk_size=args.chunk_size,
        progress=not args.no_progress, values_key=args.values_key, overwrite=args.overwrite,
    )
    print(stats.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Bad input: one `error: ...` line, exit 2 (splitllama.errors)."""
    return cli_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
