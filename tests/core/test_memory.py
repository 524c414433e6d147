"""StagedModel, Ledger and EmbeddingCache: the memory behaviour every stage relies on."""
import gc
import weakref

import pytest
import torch
from torch import nn

from newbie_core.memory import EmbeddingCache, Ledger, StagedModel, file_identity
from newbie_core.fp8 import Fp8Linear, make_fp8_capable
from newbie_core.precision import parse_precision


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("inv_freq", torch.arange(4, dtype=torch.float32) / 7, persistent=False)
        self.register_buffer("table", torch.ones(4))

    def forward(self, x):
        return self.norm(self.lin(x)) * self.inv_freq.to(x.dtype) + self.table.to(x.dtype)


def test_acquire_casts_and_release_frees_the_device_copy():
    m = Toy()
    staged = StagedModel("toy", m)
    pristine = m.lin.weight.data
    staged.acquire("cpu", parse_precision("bf16", "dit"))
    assert m.lin.weight.dtype == torch.bfloat16 and m.table.dtype == torch.bfloat16
    assert m.inv_freq.dtype == torch.float32, "non-persistent buffers keep their dtype"
    copy_ref = weakref.ref(m.lin.weight.data)
    staged.release()
    gc.collect()
    assert copy_ref() is None, "the cast copy must be freed after release"
    assert m.lin.weight.data.data_ptr() == pristine.data_ptr(), "released weights alias the pristine CPU copy"
    assert staged.precision is None


def test_precision_change_recasts_from_the_kept_copy_without_drift():
    m = Toy()
    ref = m.lin.weight.detach().clone()
    staged = StagedModel("toy", m)
    staged.acquire("cpu", parse_precision("fp16", "dit"))
    staged.acquire("cpu", parse_precision("fp32", "dit"))
    assert torch.equal(m.lin.weight, ref), "fp32 after fp16 must come from the pristine copy, not the fp16 one"


def test_fp8_storage_keeps_linear_weights_in_fp8_and_computes_in_bf16():
    torch.manual_seed(0)
    m = Toy()
    x = torch.randn(3, 8)
    ref = m(x)
    assert make_fp8_capable(m) == 1  # a plain nn.Linear becomes an Fp8Linear (same Parameters) once, at load
    staged = StagedModel("toy", m)
    staged.acquire("cpu", parse_precision("fp8_e4m3fn", "dit"))
    assert m.lin.weight.dtype == torch.float8_e4m3fn and isinstance(m.lin, Fp8Linear)
    assert m.lin.weight_scale.shape == (m.lin.out_features,)
    assert m.lin.bias.dtype == torch.bfloat16 and m.norm.weight.dtype == torch.bfloat16
    out = m(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.25
    staged.release()
    assert m.lin.weight.dtype == torch.float32 and m.lin.weight_scale is None
    assert torch.equal(m(x), ref), "released: the pristine fp32 weights again"
    assert staged.nbytes() == sum(t.numel() * 4 for t in list(m.parameters()) + list(m.buffers()))


def test_cpu_only_submodules_stay_pristine():
    m = Toy()
    staged = StagedModel("toy", m, cpu_only=("norm",))
    staged.acquire("cpu", parse_precision("bf16", "dit"))
    assert m.norm.weight.dtype == torch.float32 and m.lin.weight.dtype == torch.bfloat16


def test_describe_reports_device_dtype_and_size():
    staged = StagedModel("toy", Toy(), source="/x/toy.safetensors")
    staged.acquire("cpu", parse_precision("bf16", "dit"))
    d = staged.describe()
    assert d["name"] == "toy" and d["device"] == "cpu" and d["dtypes"] == ["bfloat16", "float32"]
    assert d["precision"] == "bf16" and d["bytes"] > 0 and d["source"] == "/x/toy.safetensors"


def test_ledger_records_each_stage_and_renders_a_table():
    led = Ledger()
    with led.stage("text", "cpu") as rec:
        rec.notes.append("2 encoded")
    with pytest.raises(RuntimeError):
        with led.stage("dit", "cpu"):
            raise RuntimeError("boom")
    assert [r.stage for r in led.records] == ["text", "dit"], "a failing stage is still recorded"
    assert led.records[0].rss_after > 0
    table = led.table()
    assert "text" in table and "2 encoded" in table and "dit" in table
    assert led.as_list()[0]["notes"] == ["2 encoded"]


def test_embedding_cache_is_lru():
    c = EmbeddingCache(max_entries=2)
    c.put(("a",), 1)
    c.put(("b",), 2)
    assert c.get(("a",)) == 1
    c.put(("c",), 3)  # evicts b, the least recently used
    assert c.get(("b",)) is None and c.get(("a",)) == 1 and c.get(("c",)) == 3
    assert (c.hits, c.misses) == (3, 1)


def test_file_identity_changes_with_the_file(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"12")
    a = file_identity(f)
    f.write_bytes(b"1234")
    assert file_identity(f) != a
