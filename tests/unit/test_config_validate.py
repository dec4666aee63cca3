"""ModelConfig / ParallelConfig / job config: each validation error names the problem."""
from __future__ import annotations

import dataclasses
import json

import pytest

from splitllama.config.job import load_job_config, normalize_argv
from splitllama.config.model import PRESETS, LlamaBlockConfig, ModelConfig
from splitllama.config.parallel import ParallelConfig


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"lower": "tiny_lower", "upper": "tiny_upper", **kw})


@pytest.mark.parametrize("kw, msg", [
    ({"num_layers_lower": 0}, r"num_layers_lower=0 out of range: the source model has 4 layers"),
    ({"num_layers_lower": 5}, r"num_layers_lower=5 out of range"),
    ({"num_layers_upper": 7}, r"num_layers_upper=7 out of range: the source model has 6 layers"),
    ({"upper": dataclasses.replace(PRESETS["tiny_upper"], vocab_size=1024)},
     r"vocab sizes differ: lower 512 vs upper 1024"),
    ({"lower": dataclasses.replace(PRESETS["tiny_lower"], rope_scaling={"rope_type": "yarn", "factor": 4})},
     r"model.lower: unsupported rope type 'yarn'"),
    ({"upper": dataclasses.replace(PRESETS["tiny_upper"], hidden_size=130)},
     r"model.upper: hidden_size 130 not divisible by num_attention_heads 8"),
    ({"transformer_impl": "cuda"}, r"transformer_impl must be auto\|local\|transformer_engine"),
])
def test_model_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        cfg(**kw).validate()


@pytest.mark.parametrize("tp, msg", [
    (3, r"tensor_model_parallel_size 3 does not divide model.lower.num_attention_heads=4"),
    (4, r"tensor_model_parallel_size 4 does not divide model.lower.num_key_value_heads=2"),
])
def test_tp_must_divide_heads_and_groups(tp, msg):
    with pytest.raises(ValueError, match=msg):
        cfg().validate(tensor_model_parallel_size=tp)


def test_tp_must_divide_ffn_and_vocab():
    lo = dataclasses.replace(PRESETS["tiny_lower"], intermediate_size=161)
    with pytest.raises(ValueError, match=r"does not divide model.lower.intermediate_size=161"):
        cfg(lower=lo).validate(tensor_model_parallel_size=2)
    lo = dataclasses.replace(PRESETS["tiny_lower"], vocab_size=513)
    up = dataclasses.replace(PRESETS["tiny_upper"], vocab_size=513)
    with pytest.raises(ValueError, match=r"does not divide model.lower.vocab_size=513"):
        cfg(lower=lo, upper=up).validate(tensor_model_parallel_size=2)


def test_valid_configs_pass():
    cfg().validate(tensor_model_parallel_size=2)
    ModelConfig(lower="llama3_8b", upper="llama3_70b", num_layers_lower=32, num_layers_upper=8).validate(8)


def test_parallel_errors():
    with pytest.raises(ValueError, match="sequence_parallel=true needs tensor_model_parallel_size > 1"):
        ParallelConfig(sequence_parallel=True).validate()
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*pp = 4"):
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).validate(6)


def test_llama3_presets_match_hf_param_counts():
    def layer_params(b: LlamaBlockConfig) -> int:
        kv = b.num_key_value_heads * b.kv_channels
        return b.hidden_size * (2 * b.hidden_size + 2 * kv) + 3 * b.hidden_size * b.intermediate_size + 2 * b.hidden_size
    b8, b70 = PRESETS["llama3_8b"], PRESETS["llama3_70b"]
    total8 = 32 * layer_params(b8) + 2 * 128256 * 4096 + 4096
    total70 = 80 * layer_params(b70) + 2 * 128256 * 8192 + 8192
    assert (total8, total70) == (8_030_261_248, 70_553_706_496)


def test_seed_schema_round_trip(tmp_path):
    c = cfg(num_layers_lower=3, num_layers_upper=2, mlp=True, path_lower="/m/8b", path_upper="/m/70b")
    d = c.to_seed_dict()
    assert d["architectures"] == ["CustomSplitLLamaForCausalLM"]
    for k in ("path8b", "path70b", "num_layers_8", "num_layers_70", "mlp", "vocab_size", "rms_norm_eps"):
        assert k in d
    (tmp_path / "config.json").write_text(json.dumps(d))
    back = ModelConfig.from_seed_dict(json.loads((tmp_path / "config.json").read_text()))
    assert (back.lower, back.upper, back.num_layers_lower, back.num_layers_upper, back.mlp) == \
        (c.lower, c.upper, 3, 2, True)
    with pytest.raises(ValueError, match="is not \\['CustomSplitLLamaForCausalLM'\\]"):
        ModelConfig.from_seed_dict({**d, "architectures": ["LlamaForCausalLM"]})


def test_seed_schema_reads_paths(tmp_path):
    for name, preset in (("a", "tiny_lower"), ("b", "tiny_upper")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(PRESETS[preset].to_hf_dict()))
    d = {"architectures": ["CustomSplitLLamaForCausalLM"], "path8b": str(tmp_path / "a"),
         "path70b": str(tmp_path / "b"), "num_layers_8": 2, "num_layers_70": 1, "mlp": False,
         "vocab_size": 512, "rms_norm_eps": 1e-5}
    c = ModelConfig.from_seed_dict(d)
    assert c.lower == PRESETS["tiny_lower"] and c.upper == PRESETS["tiny_upper"]


def test_non_llama_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ValueError, match=r"config.json: not a LLaMA-style config, missing fields"):
        ModelConfig(lower=str(tmp_path))


def test_job_overrides_and_errors(tmp_path):
    job = load_job_config("configs/tiny.yaml", normalize_argv(["--train.train_iters", "7", "optimizer.lr=0.5",
                                                               "parallel.sequence_parallel=true"]))
    assert (job.train.train_iters, job.optimizer.lr, job.parallel.sequence_parallel) == (7, 0.5, True)
    with pytest.raises(ValueError, match=r"unknown config key 'train.iters'"):
        load_job_config(None, ["train.iters=3"])
    with pytest.raises(ValueError, match=r"train.train_iters: expected an integer, got 'abc'"):
        load_job_config(None, ["train.train_iters=abc"])
    with pytest.raises(ValueError, match=r"unknown config section 'trian'"):
        load_job_config(None, ["trian.train_iters=3"])
    # a saved resolved config loads back to the same values
    p = tmp_path / "job.yaml"
    p.write_text(job.to_yaml())
    again = load_job_config(str(p))
    assert again.to_dict() == job.to_dict()


def test_list_overrides():
    assert load_job_config(None, ["data.data_path=[data/a_text_document]"]).data.data_path == ["data/a_text_document"]
    assert load_job_config(None, ["data.data_path=0.3,a,0.7,b"]).data.data_path == ["0.3", "a", "0.7", "b"]
    assert load_job_config(None, ['data.data_path=["x", "y", "z"]']).data.data_path == ["x", "y", "z"]
