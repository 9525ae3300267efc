"""Config loading, overrides, and every layout validation with the message it must give."""

from __future__ import annotations

import pytest

from conftest import run_heft
from heft.launcher.config import ConfigError, load_config, validate


def cfg(*overrides, world_size=None):
    c = load_config(None, list(overrides))
    if world_size is not None:
        validate(c, world_size)
    return c


def test_presets_fill_fields_and_overrides_win():
    c = cfg("model.preset=1.4b", "model.num_layers=12", "optim.lr=1e-3")
    assert (c.model.hidden_size, c.model.num_layers, c.model.num_attention_heads) == (2048, 12, 16)
    assert c.optim.lr == 1e-3 and isinstance(c.optim.lr, float)


def test_yaml_file_and_nested_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel: {tensor: 2}\ndata: {proportions: {a: 1, b: 3}}\n")
    c = load_config(path, ["data.proportions.a=2"])
    assert c.parallel.tensor == 2 and c.data.proportions == {"a": 2.0, "b": 3.0}


@pytest.mark.parametrize("overrides, world_size, message", [
    (["parallel.tensor=2", "parallel.data=2"], 6,
     "world size 6 != TP*PP*CP*DP = 2*1*1*2 = 4"),
    (["parallel.pipeline=4"], 6, "world size 6 is not divisible by TP*PP*CP = 1*4*1 = 4"),
    (["parallel.tensor=8"], None,
     "model.num_attention_heads=4 is not divisible by parallel.tensor=8"),
    (["parallel.tensor=4"], None,
     "model.num_query_groups=2 is not divisible by parallel.tensor=4"),
    (["parallel.pipeline=3"], None,
     "model.num_layers=4 is not divisible by PP*VPP = 3*1 = 3"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=4"], None,
     "model.num_layers=4 is not divisible by PP*VPP = 2*4 = 8"),
    (["parallel.data=2", "train.global_batch_size=6", "train.micro_batch_size=2"], None,
     "train.global_batch_size=6 is not divisible by train.micro_batch_size*DP = 2*2 = 4"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.batch_p2p_comm=true"], None,
     "silently computes wrong gradients"),
    (["parallel.virtual_pipeline=2"], None, "needs parallel.pipeline >= 2"),
    (["model.preset=13b"], None, "known presets: tiny, 125m, 1b, 1.4b, 7b"),
    (["train.precision=fp16"], None, "train.precision must be auto, fp32 or bf16"),
    (["model.hidden_size=big"], None, "model.hidden_size: expected an integer"),
    (["parallel.tensr=2"], None, "unknown key(s) parallel.tensr"),
    (["trian.steps=2"], None, "unknown section(s) trian"),
])
def test_invalid_layouts_name_the_numbers(overrides, world_size, message):
    with pytest.raises(ConfigError) as err:
        cfg(*overrides, world_size=world_size)
    assert message in str(err.value)


def test_large_presets_fit_their_usual_layouts():
    cfg("model.preset=7b", "parallel.tensor=8", "parallel.pipeline=4", "parallel.virtual_pipeline=2",
        "train.global_batch_size=512", "train.micro_batch_size=1", world_size=256)
    cfg("model.preset=1.4b", "parallel.tensor=2", "train.global_batch_size=256", world_size=64)
    cfg("model.preset=1b", "parallel.tensor=4", "parallel.pipeline=2", "train.global_batch_size=64",
        world_size=16)


def test_cli_rejects_bad_layout_before_launching(tiny_train_config):
    proc = run_heft(["train", str(tiny_train_config), "parallel.tensor=3"], check=False, timeout=60)
    assert proc.returncode == 2
    assert "model.num_attention_heads=4 is not divisible by parallel.tensor=3" in proc.stderr
    assert "launching" not in proc.stdout  # failed before torchrun started


def _has_transformer_engine() -> bool:
    from heft.model.build import Backends

    return Backends.detect().transformer_engine


@pytest.mark.skipif(_has_transformer_engine(), reason="Transformer Engine present: CP is supported here")
def test_cli_rejects_context_parallel_without_transformer_engine(tiny_train_config):
    proc = run_heft(["train", str(tiny_train_config), "parallel.context=2"], check=False, timeout=60)
    assert proc.returncode == 2
    assert "parallel.context=2 needs Transformer Engine on CUDA" in proc.stderr


def test_cli_rejects_data_mismatch(tiny_train_config, small_corpus):
    proc = run_heft(["train", str(tiny_train_config), "model.seq_length=128"], check=False, timeout=60)
    assert proc.returncode == 2
    assert f"model.seq_length=128 but {small_corpus} was prepared with seq_length=64" in proc.stderr
    proc = run_heft(["train", str(tiny_train_config), "data.proportions={wiki: 1.0}"], check=False, timeout=60)
    assert proc.returncode == 2 and "unknown domain(s) ['wiki']" in proc.stderr
    proc = run_heft(["train", str(tiny_train_config), "data.path=/nonexistent"], check=False, timeout=60)
    assert proc.returncode == 2 and "is not a prepared dataset; run `heft prepare" in proc.stderr


@pytest.mark.parametrize("name, world_size", [("demo", 4), ("125m", 8), ("1b", 16), ("1.4b", 64), ("7b", 128)])
def test_shipped_configs_are_valid(name, world_size):
    from conftest import REPO

    validate(load_config(REPO / "configs" / f"{name}.yaml"), world_size)
