"""JSONL -> Megatron IndexedDataset (``PREFIX_<key>_document.bin/.idx``).

One JSON object per line; the text under ``json_key`` becomes one document. Lines are tokenized
in a ``multiprocessing.Pool`` (``imap`` keeps input order, so any worker count gives identical
files) and written with megatron.core's ``IndexedDatasetBuilder``. Output goes to temporary
names that are renamed only on success: a failed run leaves no ``.bin``/``.idx`` behind.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from splitllama.data.tokenizers import Tokenizer, check_vocab, make_tokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """Picklable recipe for a tokenizer, so each worker builds its own."""

    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_size: int | None = None

    def build(self) -> Tokenizer:
        return make_tokenizer(self.tokenizer_type, self.tokenizer_model, self.vocab_size)


@dataclass
class PreprocessStats:
    """What a run wrote."""

    output_prefix: str
    documents: int
    skipped: int
    tokens: int
    input_bytes: int
    seconds: float
    dtype: str

    def summary(self) -> str:
        mb_s = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
        return (
            f"wrote {self.output_prefix}.bin/.idx: {self.documents} documents, {self.tokens} "
            f"tokens ({self.dtype}), {self.skipped} empty skipped, "
            f"{self.input_bytes / 1e6:.2f} MB in {self.seconds:.2f} s ({mb_s:.2f} MB/s)"
        )


def output_prefix_for(output_prefix: str, json_key: str) -> str:
    """Megatron's naming: ``{prefix}_{key}_document``."""
    return f"{output_prefix}_{json_key}_document"


# --------------------------------------------------------------------------- worker side
_WORKER: dict[str, object] = {}


def _init_worker(spec: TokenizerSpec, json_key: str, append_eod: bool, prepend_bos: bool) -> None:
    tok = spec.build()
    _WORKER.update(tok=tok, key=json_key, eod=append_eod, bos=prepend_bos)


def _encode(item: tuple[int, bytes]) -> tuple[int, int, list[int] | None, str | None]:
    """(line number, raw line) -> (line number, bytes, ids or None for blank, error or None)."""
    line_no, raw = item
    if not raw.strip():
        return line_no, len(raw), None, None
    tok: Tokenizer = _WORKER["tok"]  # type: ignore[assignment]
    key: str = _WORKER["key"]  # type: ignore[assignment]
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict) or key not in obj:
            return line_no, len(raw), None, f"no key {key!r} in the JSON object"
        text = obj[key]
        if not isinstance(text, str):
            return line_no, len(raw), None, f"value of {key!r} is {type(text).__name__}, not str"
        ids = tok.tokenize(text)
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        return line_no, len(raw), None, str(err)
    if _WORKER["bos"] and ids:
        if tok.bos is None:
            return line_no, len(raw), None, "prepend_bos: the tokenizer has no BOS token"
        ids = [tok.bos] + ids
    if _WORKER["eod"] and ids:
        ids.append(tok.eod)
    return line_no, len(raw), ids, None


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            yield i, line


# --------------------------------------------------------------------------- main side
def preprocess_jsonl(
    input_path: str,
    output_prefix: str,
    spec: TokenizerSpec,
    *,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = False,
    prepend_bos: bool = False,
    model_vocab_size: int | None = None,
    chunk_size: int = 64,
    progress: bool = True,
    overwrite: bool = False,
) -> PreprocessStats:
    """Tokenize ``input_path`` into ``output_prefix_for(output_prefix, json_key)``.bin/.idx.

    Token dtype is ``DType.optimal_dtype(vocab_size)``: uint16 below 65500 ids, else int32.
    Raises FileNotFoundError/ValueError (empty input, no documents, a bad line, a tokenizer
    larger than ``model_vocab_size``) and then leaves no output files. An existing output
    (.bin or .idx) is refused unless ``overwrite``.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"input file not found: {input_path}")
    size = os.path.getsize(input_path)
    if size == 0:
        raise ValueError(f"input file {input_path} is empty: no documents to write")
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    tokenizer = spec.build()
    if model_vocab_size is not None:
        check_vocab(tokenizer, model_vocab_size)
    if prepend_bos and tokenizer.bos is None:
        raise ValueError(f"prepend_bos: the {spec.tokenizer_type} tokenizer has no BOS token")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    final = output_prefix_for(output_prefix, json_key)
    existing = [p for p in (final + ".bin", final + ".idx") if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"output {existing[0]} already exists; pass --overwrite to replace it, "
                              f"or choose another --output-prefix")
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    tmp = f"{final}.tmp{os.getpid()}"
    docs = skipped = tokens = done_bytes = 0
    t0 = time.perf_counter()
    initargs = (spec, json_key, append_eod, prepend_bos)
    if workers > 1:  # HF tokenizers would warn about (and disable) threads after fork
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pool = multiprocessing.Pool(workers, _init_worker, initargs) if workers > 1 else None
    builder = None
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        if pool is None:
            _init_worker(*initargs)
            results: Iterator = map(_encode, _lines(input_path))
        else:
            results = pool.imap(_encode, _lines(input_path), chunksize=chunk_size)
        bar = tqdm(total=size, unit="B", unit_scale=True, desc="preprocess", disable=not progress)
        with bar:
            for line_no, nbytes, ids, error in results:
                if error is not None:
                    raise ValueError(f"{input_path}:{line_no}: {error}")
                done_bytes += nbytes
                bar.update(nbytes)
                if not ids:
                    skipped += 1
                    continue
                builder.add_document(ids, [len(ids)])
                docs += 1
                tokens += len(ids)
                if docs % 256 == 0:
                    bar.set_postfix(docs=docs, tokens=tokens, refresh=False)
            bar.set_postfix(docs=docs, tokens=tokens)
        if docs == 0:
            raise ValueError(
                f"no documents in {input_path} (key {json_key!r}): every line was blank or "
                f"tokenized to nothing; nothing written"
            )
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", final + ".bin")
        os.replace(tmp + ".idx", final + ".idx")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for path in (tmp + ".bin", tmp + ".idx"):
            if os.path.exists(path):
                os.remove(path)
    return PreprocessStats(
        output_prefix=final, documents=docs, skipped=skipped, tokens=tokens,
        input_bytes=done_bytes, seconds=time.perf_counter() - t0, dtype=dtype.__name__,
    )
