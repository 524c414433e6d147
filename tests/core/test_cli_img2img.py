"""`newbie generate --init-image/--denoise/--mask`: img2img and inpainting from the command line (tiny models)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from newbie_core.cli import main


def _picture(path, w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _run(tiny_models, tmp_path, *extra):
    out = tmp_path / "o.png"
    rc = main(["generate", "--prompt", "1girl", "--out", str(out), "--model-dir", str(tiny_models["root"] / "comfyui"),
               "--steps", "3", "--solver", "euler", "--device", "cpu", "--precision", "dit=fp32,text=fp32,vae=fp32",
               "--json", "--overwrite", *extra])
    return rc, out


def test_init_image_sets_size_and_denoise_is_recorded(tiny_models, tmp_path, capsys):
    src = _picture(tmp_path / "in.png", 70, 50)  # centre-cropped to 64×48
    rc, out = _run(tiny_models, tmp_path, "--init-image", str(src), "--denoise", "0.5")
    assert rc == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in report["ledger"]] == ["text", "vae", "dit", "vae"]  # encode, sample, decode
    img = Image.open(out)
    assert img.size == (64, 48)
    assert json.loads(img.text["newbie"])["settings"]["denoise"] == 0.5


def test_denoise_zero_gives_back_the_encoded_picture(tiny_models, tmp_path, capsys):
    src = _picture(tmp_path / "in.png")
    rc, out = _run(tiny_models, tmp_path, "--init-image", str(src), "--denoise", "0")
    assert rc == 0
    zero = np.asarray(Image.open(out)).astype(int)
    rc, out2 = _run(tiny_models, tmp_path, "--init-image", str(src), "--denoise", "0.9", "--seed", "3")
    assert rc == 0
    full = np.asarray(Image.open(out2)).astype(int)
    # the tiny VAE does not reconstruct; denoise 0 is VAE encode → decode, which differs from any sampled result
    assert np.abs(zero - full).mean() > 1


def test_mask_keeps_the_black_region(tiny_models, tmp_path, capsys):
    from newbie_core.cli_img2img import prepare
    from newbie_core.model_paths import ModelPaths
    from newbie_core.pipeline import GenerationSettings, Pipeline

    src = _picture(tmp_path / "in.png", 64, 64)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255  # repaint the right half
    Image.fromarray(mask).save(tmp_path / "m.png")
    rc, out = _run(tiny_models, tmp_path, "--init-image", str(src), "--mask", str(tmp_path / "m.png"), "--denoise", "1")
    assert rc == 0 and Image.open(out).size == (64, 64)
    # The latents behind it (the decoder mixes neighbouring latents, so the check is on them): the kept half is
    # the encoded picture's exactly, whatever the seed; the repainted half is not.
    args = type("A", (), {"init_image": str(src), "mask": str(tmp_path / "m.png"), "denoise": 1.0, "width": None,
                          "height": None})()
    extra = prepare(args)
    assert extra["mask"].shape == (64, 64) and float(extra["mask"][:, :32].max()) == 0.0
    pipe = Pipeline(ModelPaths.from_dir(tiny_models["root"] / "comfyui"), device="cpu",
                    precision={"dit": "fp32", "text": "fp32", "vae": "fp32"})
    init = pipe.encode_image(extra["init_image"])
    runs = [pipe.generate("1girl", settings=GenerationSettings(width=64, height=64, steps=3, solver="euler", seed=s,
                                                               denoise=1.0), **extra).latents for s in (1, 2)]
    for lat in runs:
        assert torch.equal(lat[..., :4], init[..., :4])
    assert not torch.equal(runs[0][..., 4:], runs[1][..., 4:])


@pytest.mark.parametrize("args, words", [
    (["--mask", "m.png"], "--mask needs --init-image"),
    (["--denoise", "0.5"], "needs --init-image"),
    (["--init-image", "missing.png"], "does not exist"),
    (["--init-image", "bad.png"], "not a readable picture"),
])
def test_img2img_mistakes_are_clear_errors(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    rc = main(["generate", "--prompt", "x", "--out", "x.png", "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err
