"""JSONL -> Megatron IndexedDataset (``PREFIX_<key>_document.bin/.idx``).

One JSON object per line; the text under ``json_key`` becomes one document (a list of ints
there is taken as the document's token ids, unchanged). Lines are tokenized in a
``multiprocessing.Pool`` (``imap`` keeps input order, so any worker count gives identical
files) and written with megatron.core's ``IndexedDatasetBuilder``. Output goes to temporary
names (``PREFIX.tmpPID.bin/.idx``) that are renamed only on success: a failed run leaves no
``.bin``/``.idx`` behind, SIGTERM / Ctrl-C included (SIGTERM unwinds while the run lasts; the
previous handler is back afterwards). A run killed outright (SIGKILL, power loss) leaves its
temporary files; the next run on the same prefix removes those whose PID is no longer alive on
this host, and says so.

Critic (value-model) data: with ``values_key`` each line also carries regression targets, and
a second IndexedDataset of float32, ``PREFIX_<key>_document_values.bin/.idx``, holds one target
per token (same documents, same lengths; NaN = no target, masked out of the loss):

    {"text": "...", "values": [0.0, null, 0.5, ...]}  # per token: one entry per token of the text
                                                      # (null: no target at that token)
    {"text": "...", "values": 0.7}                    # per sequence: the target of the last token

The target at token i is what the critic's value at token i (having read tokens 0..i) is
trained towards. BOS / EOD tokens added here get no target.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from splitllama.data.tokenizers import Tokenizer, check_vocab, make_tokenizer
from splitllama.platform.lifecycle import default_signals_in_child, pid_alive, sigterm_blocked, terminate_unwinds


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
    value_targets: int | None = None  # tokens with a value target (None: no values written)
    stale_removed: tuple[str, ...] = ()  # temporary files of killed runs removed before writing

    def summary(self) -> str:
        mb_s = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
        values = "" if self.value_targets is None else (
            f"; {values_prefix(self.output_prefix)}.bin/.idx: {self.value_targets} value targets")
        stale = "".join(f"removed {p} (partial output of a killed run)\n" for p in self.stale_removed)
        return stale + (
            f"wrote {self.output_prefix}.bin/.idx: {self.documents} documents, {self.tokens} "
            f"tokens ({self.dtype}), {self.skipped} empty skipped{values}, "
            f"{self.input_bytes / 1e6:.2f} MB in {self.seconds:.2f} s ({mb_s:.2f} MB/s)"
        )


def output_prefix_for(output_prefix: str, json_key: str) -> str:
    """Megatron's naming: ``{prefix}_{key}_document``."""
    return f"{output_prefix}_{json_key}_document"


def values_prefix(token_prefix: str) -> str:
    """The float32 value-target dataset written next to token dataset ``token_prefix``."""
    return f"{token_prefix}_values"


_TMP_RE = re.compile(r"\.tmp(\d+)(_values)?\.(bin|idx)$")


def stale_temporaries(final: str) -> list[str]:
    """Temporary files (``final.tmpPID[_values].bin/.idx``) of runs whose PID is not alive here."""
    out = []
    for path in sorted(glob.glob(glob.escape(final) + ".tmp*")):
        m = _TMP_RE.fullmatch(path[len(final):])
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            out.append(path)
    return out


def parse_targets(value: object, n_tokens: int, key: str) -> list[float]:
    """One float per token (NaN: no target) from a line's ``key`` entry: a number (the target
    of the last token) or a list of numbers / nulls, one per token. ValueError if neither."""
    nan = float("nan")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [nan] * (n_tokens - 1) + [float(value)]
    if isinstance(value, list):
        if len(value) != n_tokens:
            raise ValueError(f"{key!r} has {len(value)} entries but the document has {n_tokens} tokens")
        bad = [v for v in value if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))]
        if bad:
            raise ValueError(f"{key!r} entries must be numbers or null, found {bad[0]!r}")
        return [nan if v is None else float(v) for v in value]
    raise ValueError(f"{key!r} must be a number (per-sequence target) or a list with one number or "
                     f"null per token, got {type(value).__name__}")


# --------------------------------------------------------------------------- worker side
_WORKER: dict[str, object] = {}


def _init_worker(spec: TokenizerSpec, json_key: str, append_eod: bool, prepend_bos: bool,
                 values_key: str | None = None) -> None:
    tok = spec.build()
    _WORKER.update(tok=tok, key=json_key, eod=append_eod, bos=prepend_bos, values=values_key)


def _ids(tok: Tokenizer, doc: object, key: str) -> list[int]:
    """A document's token ids: the text tokenized, or a list of ids taken as they are."""
    if isinstance(doc, str):
        return tok.tokenize(doc)
    if isinstance(doc, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in doc):
        bad = [i for i in doc if not 0 <= i < tok.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} in {key!r} outside [0, {tok.vocab_size})")
        return list(doc)
    raise ValueError(f"value of {key!r} is {type(doc).__name__}, not str (text) or a list of token ids")


Encoded = tuple[int, int, "list[int] | None", "list[float] | None", "str | None"]


def _encode(item: tuple[int, bytes]) -> Encoded:
    """(line number, raw line) -> (line number, bytes, ids or None for blank, value targets
    (one per id; None without values_key), error or None)."""
    line_no, raw = item
    if not raw.strip():
        return line_no, len(raw), None, None, None
    tok: Tokenizer = _WORKER["tok"]  # type: ignore[assignment]
    key: str = _WORKER["key"]  # type: ignore[assignment]
    vkey: str | None = _WORKER["values"]  # type: ignore[assignment]
    targets = None
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict) or key not in obj:
            return line_no, len(raw), None, None, f"no key {key!r} in the JSON object"
        ids = _ids(tok, obj[key], key)
        if vkey is not None and ids:
            if vkey not in obj:
                return line_no, len(raw), None, None, f"no key {vkey!r} (value targets) in the JSON object"
            targets = parse_targets(obj[vkey], len(ids), vkey)
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        return line_no, len(raw), None, None, str(err)
    if _WORKER["bos"] and ids:
        if tok.bos is None:
            return line_no, len(raw), None, None, "prepend_bos: the tokenizer has no BOS token"
        ids = [tok.bos] + ids
        targets = None if targets is None else [float("nan")] + targets
    if _WORKER["eod"] and ids:
        ids.append(tok.eod)
        if targets is not None:
            targets.append(float("nan"))
    return line_no, len(raw), ids, targets, None


def _init_pool_worker(*initargs) -> None:
    default_signals_in_child()  # Pool.terminate's SIGTERM ends the worker, whatever the parent installed
    _init_worker(*initargs)


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
    values_key: str | None = None,
    overwrite: bool = False,
) -> PreprocessStats:
    """Tokenize ``input_path`` into ``output_prefix_for(output_prefix, json_key)``.bin/.idx
    (and, with ``values_key``, its value targets into ``values_prefix(...)``.bin/.idx).

    Token dtype is ``DType.optimal_dtype(vocab_size)``: uint16 below 65500 ids, else int32.
    Raises FileNotFoundError/ValueError (empty input, no documents, a bad line, a tokenizer
    larger than ``model_vocab_size``) and then leaves no output files. An existing output
    (.bin or .idx) is refused unless ``overwrite``.
    """
    from megatron.core.datasets.indexed_dataset import DType

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
    stale = values_prefix(final) + ".idx"
    if values_key is None and os.path.exists(stale):
        raise ValueError(f"{stale} exists: value targets of an earlier run would pair with the new "
                         f"tokens; pass values_key (--values-key) or move it away")
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    with terminate_unwinds():
        return _write(input_path, final, spec, dtype, size, json_key=json_key, workers=workers,
                      append_eod=append_eod, prepend_bos=prepend_bos, chunk_size=chunk_size,
                      progress=progress, values_key=values_key)


def _write(input_path: str, final: str, spec: TokenizerSpec, dtype, size: int, *,
           json_key: str, workers: int, append_eod: bool, prepend_bos: bool, chunk_size: int,
           progress: bool, values_key: str | None) -> PreprocessStats:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    stale = stale_temporaries(final)
    for path in stale:
        os.remove(path)
    tmp = f"{final}.tmp{os.getpid()}"
    docs = skipped = tokens = done_bytes = 0
    t0 = time.perf_counter()
    initargs = (spec, json_key, append_eod, prepend_bos, values_key)
    vtmp = values_prefix(tmp)
    targets = 0
    if workers > 1:  # HF tokenizers would warn about (and disable) threads after fork
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pool = builder = vbuilder = None
    try:
        if workers > 1:
            with sigterm_blocked():
                pool = multiprocessing.Pool(workers, _init_pool_worker, initargs)
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        if values_key is not None:
            import numpy

            vbuilder = IndexedDatasetBuilder(vtmp + ".bin", dtype=numpy.float32)
        if pool is None:
            _init_worker(*initargs)
            results: Iterator = map(_encode, _lines(input_path))
        else:
            results = pool.imap(_encode, _lines(input_path), chunksize=chunk_size)
        bar = tqdm(total=size, unit="B", unit_scale=True, desc="preprocess", disable=not progress)
        with bar:
            for line_no, nbytes, ids, values, error in results:
                if error is not None:
                    raise ValueError(f"{input_path}:{line_no}: {error}")
                done_bytes += nbytes
                bar.update(nbytes)
                if not ids:
                    skipped += 1
                    continue
                builder.add_document(ids, [len(ids)])
                if vbuilder is not None:
                    vbuilder.add_document(values, [len(values)])
                    targets += sum(v == v for v in values)  # NaN != NaN
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
        if vbuilder is not None:  # values first: tokens without their values never look done
            vbuilder.finalize(vtmp + ".idx")
            os.replace(vtmp + ".bin", values_prefix(final) + ".bin")
            os.replace(vtmp + ".idx", values_prefix(final) + ".idx")
        os.replace(tmp + ".bin", final + ".bin")
        os.replace(tmp + ".idx", final + ".idx")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for b in (builder, vbuilder):
            if b is not None and not b.data_file.closed:
                b.data_file.close()
        for path in (tmp + ".bin", tmp + ".idx", vtmp + ".bin", vtmp + ".idx"):
            if os.path.exists(path):
                os.remove(path)
    return PreprocessStats(
        output_prefix=final, documents=docs, skipped=skipped, tokens=tokens,
        input_bytes=done_bytes, seconds=time.perf_counter() - t0, dtype=dtype.__name__,
        value_targets=targets if values_key is not None else None, stale_removed=tuple(stale),
    )
