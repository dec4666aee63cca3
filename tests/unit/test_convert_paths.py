"""Conversion outputs under folders that do not exist yet: accepted (created when writing
starts, after the input checks), nothing created by the check itself; a file in the way refused."""
from __future__ import annotations

import os

import pytest

from splitllama.convert.import_hf import prepare_out
from splitllama.errors import UsageError


def test_missing_parents_accepted_and_not_created_by_the_check(tmp_path):
    out = tmp_path / "a" / "b" / "ckpt"
    assert prepare_out(str(out)) == str(out)
    assert os.listdir(tmp_path) == []  # a refused run later writes nothing


def test_file_in_the_way_refused(tmp_path):
    (tmp_path / "a").write_text("x")
    with pytest.raises(UsageError, match=r"a is a file, not a directory"):
        prepare_out(str(tmp_path / "a" / "b" / "ckpt"))
