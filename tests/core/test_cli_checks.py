"""`newbie generate` refuses bad input before it works: exit 2, one `error:` line, < 2 s, no temp folder left."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from newbie_core.cli import main


@pytest.fixture
def no_tiny_left(monkeypatch, tmp_path):
    """Point the temp folder at a fresh directory; after the test it must hold no newbie-tiny-* folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    assert not list(tmp.glob("newbie-tiny-*")), "a tiny-model folder was left in the temp folder"


def _refused(argv, capsys, match: str, budget: float = 2.0):
    t0 = time.perf_counter()
    rc = main(["generate", *argv])
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and "Traceback" not in err
    assert match.lower() in err.lower(), err
    assert took < budget, f"refusal took {took:.2f} s"
    return err


BASE = ["--prompt", "1girl", "--device", "cpu", "--width", "64", "--height", "64", "--steps", "3"]


@pytest.mark.parametrize("extra,match", [
    (["--steps", "100000"], "--steps"), (["--batch", "65"], "--batch"), (["--batch", "0"], "--batch"),
    (["--width", "2147483648"], "position table"), (["--height", "8192"], "position table"),
    (["--cfg", "nan"], "cfg"), (["--cfg-trunc", "nan"], "cfg_trunc"), (["--renorm", "inf"], "renorm"),
    (["--shift", "-1"], "shift"), (["--device", "garbage"], "device"), (["--device", "cuda:99"], "device"),
    (["--precision", "dit=fp7"], "precision"), (["--prompt", "<character_1><n>x</b></character_1>"], "XML prompt error"),
    (["--prompt", "<character_1><n>x</n>"], "never closed"), (["--vram-budget", "nan", "--lowvram"], "vram-budget"),
])
def test_bad_arguments_are_refused_before_anything_loads(tmp_path, capsys, no_tiny_left, monkeypatch, extra, match):
    import newbie_core.tiny as tiny

    monkeypatch.setattr(tiny, "make_tiny", lambda *a, **k: pytest.fail("models were built before the check"))
    _refused([*BASE, "--out", str(tmp_path / "o.png"), *extra], capsys, match)
    assert not (tmp_path / "o.png").exists()


def test_cuda_on_a_machine_without_cuda(tmp_path, capsys, no_tiny_left, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    _refused([*BASE, "--out", str(tmp_path / "o.png"), "--device", "cuda"], capsys, "CUDA")


def test_out_is_checked_first(tmp_path, capsys, no_tiny_left):
    (tmp_path / "exists.png").write_bytes(b"old")
    (tmp_path / "adir.png").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, match in ((tmp_path / "exists.png", "--overwrite"), (tmp_path / "adir.png", "directory"),
                       (tmp_path, "directory"), (tmp_path / "o.jpg", ".png"),
                       (tmp_path / "afile" / "o.png", "is a file"), (Path("/proc/newbie-test.png"), "cannot write")):
        _refused([*BASE, "--out", str(out)], capsys, match)
    assert (tmp_path / "exists.png").read_bytes() == b"old"
    (tmp_path / "b_1.png").write_bytes(b"old")  # batch: every numbered file is checked
    _refused([*BASE, "--batch", "2", "--out", str(tmp_path / "b.png")], capsys, "b_1.png")


def test_wrong_model_file_is_found_before_the_first_stage(tiny_models, tmp_path, capsys, monkeypatch):
    import newbie_core.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "generate", lambda *a, **k: pytest.fail("a stage ran"))
    models = tmp_path / "models"
    shutil.copytree(tiny_models["root"] / "comfyui", models)
    shutil.copy(models / "text_encoders" / "gemma_3_4b_it_bf16.safetensors", models / "vae" / "ae.safetensors")
    _refused([*BASE, "--out", str(tmp_path / "o.png"), "--model-dir", str(models)], capsys, "not a FLUX VAE")
    (models / "vae" / "ae.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    _refused([*BASE, "--out", str(tmp_path / "o.png"), "--model-dir", str(models)], capsys, "Git LFS")


def test_explicit_names_use_the_resolver(tiny_models, tmp_path, capsys):
    models = tiny_models["root"] / "comfyui"
    _refused([*BASE, "--out", str(tmp_path / "o.png"), "--model-dir", str(models), "--vae", "../../secret.png"],
             capsys, "refused")


def test_tiny_folder_is_removed_on_success_and_failure(tmp_path, capsys, no_tiny_left, monkeypatch):
    rc = main(["generate", *BASE, "--out", str(tmp_path / "ok.png"), "--solver", "euler"])
    assert rc == 0 and (tmp_path / "ok.png").is_file()
    capsys.readouterr()
    import newbie_core.pipeline as pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline.Pipeline, "generate", boom)
    with pytest.raises(KeyboardInterrupt):
        main(["generate", *BASE, "--out", str(tmp_path / "ko.png")])


def test_warnings_for_flags_that_do_nothing(tmp_path, capsys, no_tiny_left):
    rc = main(["generate", *BASE, "--out", str(tmp_path / "w.png"), "--vram-budget", "2", "--lowvram",
               "--solver", "euler", "--json"])
    err = capsys.readouterr().err
    assert rc == 0 and "--lowvram" in err and "on the CPU" in err
    rc = main(["generate", *BASE, "--out", str(tmp_path / "w2.png"), "--vram-budget", "2", "--solver", "euler"])
    out, err = capsys.readouterr()
    assert rc == 0 and "only applies with --lowvram" in err
    assert "precision: text fp32" in out or "precision: text" in out


def test_json_shows_the_precision_each_stage_ran_in(tmp_path, capsys, no_tiny_left):
    import json

    rc = main(["generate", *BASE, "--out", str(tmp_path / "j.png"), "--solver", "euler", "--json",
               "--precision", "dit=fp32,text=bf16,vae=fp32"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert {r["stage"]: r["precision"] for r in report["ledger"]} == {"text": "bf16", "dit": "fp32", "vae": "fp32"}
    assert {m["name"]: m["ran_in"] for m in report["models"]}["dit"] == "fp32"


def test_help_shows_every_default():
    r = subprocess.run([sys.executable, "-m", "newbie_core.cli", "generate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for default in ("(default 1024, or the init image's)", "(default: 18)", "(default: 5.0)", "(default: midpoint)",
                    "(default: 0.25)"):
        assert default in text, default


def test_refusal_in_a_subprocess_exits_2_and_leaves_no_temp_folder(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    r = subprocess.run([sys.executable, "-m", "newbie_core.cli", "generate", *BASE, "--out", str(tmp_path / "x.png"),
                        "--steps", "5000"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert not glob.glob(str(tmp / "newbie-tiny-*"))
