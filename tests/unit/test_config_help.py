"""`--help` of the entry point and the tools: every config key with type, default and meaning,
generated from the config dataclasses' attribute docstrings, fast and without Megatron; and
command-line overrides that keep list-like strings (issue 10, items 1, 5, 6)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import typing

import pytest

from splitllama.config.docs import config_reference, field_docs, section_rows
from splitllama.config.job import JobConfig, load_job_config
from splitllama.config.model import LlamaBlockConfig
from tests.launch import REPO

SECTIONS = {f.name: typing.get_type_hints(JobConfig)[f.name] for f in dataclasses.fields(JobConfig)
            if f.name != "explicit"}
ENTRY_POINTS = ["pretrain_splitllama.py", "tools/plan_pipeline.py", "tools/preprocess_data.py",
                "tools/convert_checkpoint.py"]


@pytest.mark.parametrize("cls", [*SECTIONS.values(), LlamaBlockConfig, JobConfig], ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: fields without an attribute docstring: {missing}"


def test_reference_lists_every_key_with_type_default_and_meaning():
    text = config_reference()
    for section, cls in SECTIONS.items():
        for key, typ, default, doc in section_rows(cls):
            line = next((ln for ln in text.splitlines() if ln.split()[:1] == [f"{section}.{key}"]), None)
            assert line is not None, f"{section}.{key} missing from --help"
            assert typ in line and f"default {default}" in line, line
            assert doc.split()[0] in text
    assert "train.train_iters" in text and "default 100" in text
    assert "default 'cost'" in text  # string defaults are quoted: data.tokenizer_type 'null' != null


def _help_in_subprocess(script: str) -> tuple[str, list[str], float]:
    """Run SCRIPT --help in a fresh interpreter; return (help text, heavy modules imported, seconds)."""
    probe = (f"import sys, runpy; sys.argv = [{script!r}, '--help']\n"
             f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
             f"except SystemExit:\n    pass\n"
             f"print('HEAVY:', [m for m in ('megatron', 'torch', 'transformers') if m in sys.modules])")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    heavy = eval(p.stdout.rsplit("HEAVY:", 1)[1])
    return p.stdout, heavy, seconds


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_is_fast_and_imports_no_megatron(script):
    text, heavy, seconds = _help_in_subprocess(script)
    for _ in range(2):  # best of three: a wall-clock bound on a shared machine
        if seconds < 2.0:
            break
        seconds = min(seconds, _help_in_subprocess(script)[2])
    assert "usage:" in text
    assert "megatron" not in heavy and "torch" not in heavy, heavy
    assert seconds < 2.0, f"{script} --help took {seconds:.2f} s"
    if script in ("pretrain_splitllama.py", "tools/plan_pipeline.py"):  # they take config overrides
        for section, cls in SECTIONS.items():
            for f in dataclasses.fields(cls):
                assert f"{section}.{f.name}" in text, f"{section}.{f.name} not in {script} --help"


def test_list_like_strings_survive_overrides():
    job = load_job_config("configs/tiny.yaml", ["data.split=98,2,0"])
    assert job.data.split == "98,2,0"
    job.data.validate()
    assert load_job_config(None, ["data.split='1,0,0'"]).data.split == "1,0,0"
    # 'null' is a string where the field is a plain str, None where the field is Optional
    assert load_job_config(None, ["data.tokenizer_type=null"]).data.tokenizer_type == "null"
    assert load_job_config(None, ["data.tokenizer_model=null"]).data.tokenizer_model is None
    assert load_job_config(None, ["parallel.pipeline_layout=L2|A,U3"]).parallel.pipeline_layout == "L2|A,U3"


def test_mock_off_with_the_tiny_config_validates():
    job = load_job_config("configs/tiny.yaml", ["data.mock=false", "data.data_path=[data/c_text_document]"])
    assert job.data.mock_pattern  # from the YAML: only read with mock data
    job.data.validate()


def test_verbose_flag_sets_the_config_key():
    from splitllama.config.cli import parse_train_args

    assert parse_train_args(["--config", "configs/tiny.yaml"]).logging.verbose is False
    assert parse_train_args(["--config", "configs/tiny.yaml", "-v"]).logging.verbose is True
