"""data.reset_position_ids / data.reset_attention_mask are wired end to end (GPTDataset ->
sampler -> training step -> every pipeline stage -> attention and both blocks' RoPE): with the
flags on, the losses of a document do not change when the document before it (same length,
other tokens) changes; with them off, they do. Both attention backends that honour the flags,
at PP=3 (a middle stage reads the document layout too)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.launch import torchrun

pytestmark = pytest.mark.distributed
SEQ, EOD, LEN_A = 24, 511, 9  # document A: 9 tokens (EOD last), then document B to the end
BACKENDS = ("sdpa", "local")


def _write(prefix: str, doc_a: np.ndarray, doc_b: np.ndarray) -> None:
    """One indexed document A + B (seq + 1 tokens): the single sample holds both, in order."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(512))
    builder.add_document(torch.from_numpy(np.concatenate([doc_a, doc_b])), [SEQ + 1])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flags")
    rng = np.random.default_rng(0)
    doc_b = np.append(rng.integers(0, EOD, SEQ + 1 - LEN_A - 1), EOD)
    cases = []
    for variant in (1, 2):
        doc_a = np.append(rng.integers(0, EOD, LEN_A - 1), EOD)
        prefix = str(tmp / f"a{variant}")
        _write(prefix, doc_a, doc_b)
        for backend in BACKENDS:
            for reset in (True, False):
                name = f"{backend}_reset{int(reset)}_a{variant}"
                cases.append({"name": name, "prefix": prefix, "seq": SEQ, "backend": backend,
                              "reset": reset, "out": str(tmp / f"{name}.safetensors")})
    (tmp / "spec.json").write_text(json.dumps({"cases": cases}))
    torchrun(3, "tests/distributed/flags_worker.py", tmp / "spec.json", timeout=900)
    return {c["name"]: load_file(c["out"])["loss"][0].double() for c in cases}


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_on_document_b_does_not_see_document_a(losses, backend):
    b1, b2 = (losses[f"{backend}_reset1_a{v}"][LEN_A:] for v in (1, 2))
    assert ((b1 - b2).abs() / b2.abs()).max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_off_document_b_sees_document_a(losses, backend):
    b1, b2 = (losses[f"{backend}_reset0_a{v}"][LEN_A:] for v in (1, 2))
    assert ((b1 - b2).abs() / b2.abs()).max() > 1e-3
    # document A's own losses differ between the variants either way (its tokens differ)
    a1, a2 = (losses[f"{backend}_reset1_a{v}"][:LEN_A - 1] for v in (1, 2))
    assert (a1 - a2).abs().max() > 1e-3
