"""The `newbie` command: generate with tiny fallback models, explicit models, make-tiny, errors."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from newbie_core.cli import main


def test_generate_without_models_falls_back_to_tiny_and_says_so(tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = main(["generate", "--prompt", "1girl", "--out", str(out), "--width", "64", "--height", "64",
               "--steps", "3", "--solver", "euler", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0
    assert "TINY RANDOM-WEIGHT" in cap.err
    assert "text" in cap.out and "dit" in cap.out and "vae" in cap.out, "the stage ledger is printed"
    img = Image.open(out)
    assert img.size == (64, 64) and json.loads(img.text["newbie"])["random_weights"] is True


def test_generate_with_model_dir_and_json_ledger(tiny_models, tmp_path, capsys):
    out = tmp_path / "b.png"
    rc = main(["generate", "--prompt", "<character_1><n>a</n></character_1>", "--out", str(out),
               "--model-dir", str(tiny_models["root"] / "comfyui"), "--width", "32", "--height", "48",
               "--steps", "2", "--batch", "2", "--precision", "dit=fp32,text=fp32,vae=fp32", "--device", "cpu",
               "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in report["ledger"]] == ["text", "dit", "vae"]
    assert len(report["outputs"]) == 2 and all(Image.open(p).size == (32, 48) for p in report["outputs"])


def test_bad_size_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    rc = main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--width", "100", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "16" in err and "Traceback" not in err


def test_make_tiny_prints_every_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "newbie_core.cli", "make-tiny", str(tmp_path / "t")],
                       capture_output=True, text=True, check=True)
    for name in ("dit_hf", "dit_comfyui", "gemma_hf", "gemma_comfyui", "jina_hf", "jina_comfyui", "vae_hf", "vae_comfyui"):
        assert name in r.stdout
    assert (tmp_path / "t" / "comfyui" / "diffusion_models" / "NewBie-Image-Exp0.1.safetensors").is_file()


def test_lowvram_flag_streams_blocks_and_decodes_in_tiles(tiny_models, tmp_path, capsys):
    out = tmp_path / "low.png"
    rc = main(["generate", "--prompt", "1girl", "--out", str(out), "--model-dir", str(tiny_models["root"]),
               "--width", "64", "--height", "64", "--steps", "3", "--device", "cpu", "--lowvram", "--json"])
    assert rc == 0 and out.is_file()
    ledger = json.loads(capsys.readouterr().out)["ledger"]
    assert ledger[-1]["stage"] == "vae" and "tiled" in ledger[-1]["notes"]


def test_bench_is_its_own_command_with_its_own_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
