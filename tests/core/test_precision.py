"""Precision policy: names, per-stage rules, the CLI spec, and the NaN/inf check."""
import pytest
import torch

from newbie_core.errors import InputError, NumericalError
from newbie_core.precision import check_finite, parse_precision, parse_precision_spec


def test_names_resolve_to_storage_and_compute_dtypes():
    p = parse_precision("fp8_e4m3fn", "dit")
    assert (p.storage, p.compute, p.is_fp8) == (torch.float8_e4m3fn, torch.bfloat16, True)
    assert parse_precision("bf16", "vae").compute == torch.bfloat16
    assert parse_precision("float32", "text").storage == torch.float32


def test_fp8_is_weight_storage_for_dit_and_gemma_only():
    assert parse_precision("fp8", "gemma").is_fp8
    assert parse_precision("fp8", "jina").name == "bf16"
    assert parse_precision("fp8", "vae").name == "bf16"


def test_auto_is_fp32_where_bf16_is_not_native():
    assert parse_precision("auto", "vae", "cpu").compute == torch.float32


def test_unknown_precision_names_the_choices():
    with pytest.raises(InputError, match="bf16, fp16, fp32, fp8_e4m3fn"):
        parse_precision("int4", "dit")


def test_precision_spec():
    assert parse_precision_spec("dit=fp8_e4m3fn,vae=fp32") == {"dit": "fp8_e4m3fn", "text": "bf16", "vae": "fp32"}
    with pytest.raises(InputError, match="STAGE=NAME"):
        parse_precision_spec("bf16")
    with pytest.raises(InputError, match="unknown"):
        parse_precision_spec("unet=bf16")


def test_check_finite_names_stage_and_recommends_bf16_for_fp16():
    with pytest.raises(NumericalError, match=r"DiT sampling.*fp16.*bf16"):
        check_finite(torch.tensor([1.0, float("nan")]), "DiT sampling", parse_precision("fp16", "dit"))
    x = torch.ones(3)
    assert check_finite(x, "vae") is x
