"""Hostile and careless input (issue 15), core level: model names, numbers, choices, devices, latents, text,
weights of the wrong dtype/shape, unparsable metadata. Every refusal is one NewBieError naming the input."""
from __future__ import annotations

import builtins
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from newbie_core.errors import InputError, ModelFileError, NewBieError
from newbie_core.model_names import ALLOW_LINKS_ENV, UnsafeModelName, resolve_model_name
from newbie_core.validate import (check_attention, check_latent, check_number, check_sampler_settings, check_text,
                                  metadata_value, parse_device)


# ------------------------------------------------------------------------------------------- model names
@pytest.fixture
def folders(tmp_path, monkeypatch):
    """models/vae with a file and a HF folder, an extra folder, and a secret file outside both."""
    monkeypatch.delenv(ALLOW_LINKS_ENV, raising=False)
    base, extra, outside = tmp_path / "models" / "vae", tmp_path / "extra" / "vae", tmp_path / "outside"
    for d in (base / "sub", base / "hf_vae", extra, outside / "hf"):
        d.mkdir(parents=True)
    (base / "ae.safetensors").write_bytes(b"x")
    (base / "sub" / "nested.safetensors").write_bytes(b"x")
    (base / "hf_vae" / "config.json").write_text("{}")
    (extra / "other.safetensors").write_bytes(b"x")
    (outside / "secret.safetensors").write_text('{"_class_name": "SECRET-CONTENT"}')
    (outside / "hf" / "config.json").write_text('{"_class_name": "SECRET-CONTENT"}')
    return base, extra, outside


def test_plain_names_resolve_inside_the_folders(folders):
    base, extra, _ = folders
    assert resolve_model_name("ae.safetensors", [base, extra]) == base / "ae.safetensors"
    assert resolve_model_name("sub/nested.safetensors", [base, extra]) == base / "sub" / "nested.safetensors"
    assert resolve_model_name("other.safetensors", [base, extra]) == extra / "other.safetensors"
    assert resolve_model_name("hf_vae/", [base, extra]) == base / "hf_vae"


@pytest.mark.parametrize("name", [
    "/etc/passwd", "../outside/secret.safetensors", "../../outside/hf/", "sub/../../outside/secret.safetensors",
    "..\\outside\\secret.safetensors", "C:\\Windows\\x.safetensors", "./ae.safetensors", "sub//nested.safetensors",
    "ae.safetensors\x00.png", "", "/", "a" * 5000, None, 7,
])
def test_traversal_names_are_refused_without_touching_the_disk(folders, name, monkeypatch):
    base, extra, outside = folders
    touched = []
    for fn in ("stat", "lstat", "open"):
        real = getattr(os, fn)
        monkeypatch.setattr(os, fn, lambda *a, _r=real, **k: touched.append(a[0]) or _r(*a, **k))
    with pytest.raises(UnsafeModelName) as e:
        resolve_model_name(name, [base, extra])
    assert touched == []
    assert "SECRET" not in str(e.value)


def test_absolute_path_into_the_folder_is_refused_too(folders):
    base, extra, _ = folders
    with pytest.raises(UnsafeModelName, match="absolute"):
        resolve_model_name(str(base / "ae.safetensors"), [base, extra])


def test_symlink_out_is_refused_unless_allowed(folders, monkeypatch):
    base, extra, outside = folders
    (base / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (base / "linkdir").symlink_to(outside / "hf", target_is_directory=True)
    (base / "hf_vae" / "weights.safetensors").symlink_to(outside / "secret.safetensors")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    for name in ("link.safetensors", "linkdir/", "hf_vae/"):
        with pytest.raises(UnsafeModelName, match="symbolic link") as e:
            resolve_model_name(name, [base, extra])
        assert "SECRET" not in str(e.value)
    assert not any("outside" in o for o in opened)
    # ComfyUI's own rule, on request: links placed inside the folder are followed
    monkeypatch.setenv(ALLOW_LINKS_ENV, "1")
    assert resolve_model_name("link.safetensors", [base, extra]) == base / "link.safetensors"
    assert resolve_model_name("linkdir/", [base, extra]) == base / "linkdir"


def test_symlink_to_another_model_folder_is_allowed(folders):
    base, extra, _ = folders
    (base / "alias.safetensors").symlink_to(extra / "other.safetensors")
    assert resolve_model_name("alias.safetensors", [base, extra]) == base / "alias.safetensors"


def test_missing_name_lists_close_matches(folders):
    base, extra, _ = folders
    with pytest.raises(ModelFileError, match="Close matches: 'ae.safetensors'"):
        resolve_model_name("ae.safetensor", [base, extra], candidates=lambda: ["ae.safetensors", "(no files found)"])
    with pytest.raises(ModelFileError, match="not found"):  # a file named as a folder, and the reverse
        resolve_model_name("ae.safetensors/", [base, extra])
    with pytest.raises(ModelFileError, match="not found"):
        resolve_model_name("hf_vae", [base, extra])


# ------------------------------------------------------------------------------------------- numbers, choices
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "5", None, True])
def test_numbers_refuse_nan_inf_and_non_numbers(bad):
    with pytest.raises(InputError, match="cfg_trunc"):
        check_number(bad, "cfg_trunc")


@pytest.mark.parametrize("field", ["steps", "cfg", "shift", "cfg_trunc", "renorm"])
def test_sampler_settings_refuse_nan(field):
    good = dict(steps=4, cfg=5.0, shift=6.0, cfg_trunc=0.25, renorm=0.0, solver="euler")
    check_sampler_settings(**good)
    with pytest.raises(InputError, match=field):
        check_sampler_settings(**{**good, field: float("nan")})


def test_guided_velocity_refuses_nan_cfg_trunc_and_renorm():
    from newbie_core.sampling import GuidedVelocity, sample

    for kw in ({"cfg_trunc": float("nan")}, {"renorm": float("nan")}, {"cfg": float("inf")}):
        with pytest.raises(InputError):
            GuidedVelocity(lambda x, t, g: x, **kw)
    with pytest.raises(InputError, match="shift"):
        sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), 3, "euler", float("inf"))


def test_unknown_choices_are_refused():
    with pytest.raises(InputError, match="solver"):
        check_sampler_settings(4, 5.0, 6.0, 0.25, 0.0, "rk45")
    with pytest.raises(InputError, match="attention"):
        check_attention("sage")
    assert check_attention("comfyui", extra=("comfyui",)) == "comfyui"
    from newbie_core.attention import attention

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(InputError, match="attention backend"):  # no silent fallback to SDPA
        attention(q, q, q, backend="bogus")


# ------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("value", ["garbage", "cuda:99", "cpu:3", "tpu", "cuda:-1", "CUDA:0 ; rm"])
def test_bad_devices_are_input_errors(value):
    with pytest.raises(InputError, match="device"):
        parse_device(value)


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for value in ("cuda", "cuda:0"):
        with pytest.raises(InputError, match="CUDA"):
            parse_device(value)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(InputError, match="built without CUDA"):
        parse_device("cuda")


def test_good_devices():
    assert parse_device("default") is None and parse_device(None) is None
    assert parse_device(" cpu ") == torch.device("cpu")


# ------------------------------------------------------------------------------------------- tensors, text
def test_latent_rank_is_checked():
    check_latent(torch.zeros(1, 16, 4, 4), channels=16)
    for bad in (torch.zeros(1, 16, 2, 4, 4), torch.zeros(16, 4, 4), torch.zeros(1, 4, 4, 4), "x"):
        with pytest.raises(InputError, match="latent"):
            check_latent(bad, channels=16)


def test_text_refuses_lone_surrogates_and_bad_utf8_with_position():
    with pytest.raises(InputError, match=r"character 9 \(line 2, column 3\)"):
        check_text("1girl\nab\ud800c")
    with pytest.raises(InputError, match="byte 2"):
        check_text(b"ab\xff")
    assert check_text(b"caf\xc3\xa9") == "café"
    assert check_text(None) == ""


def test_encode_refuses_surrogates_before_the_tokenizer():
    from newbie_core.text.encode import encode_prompts

    with pytest.raises(InputError, match="surrogate"):
        encode_prompts(None, None, ["ok", "bad \udfff"])


# ------------------------------------------------------------------------------------------- weights
def _rewrite(src: Path, dst: Path, change) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(src))
    change(sd, meta)
    save_file(sd, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_dit_weight_of_wrong_dtype_is_named(tiny_models, tmp_path, dtype):
    from newbie_core.dit import load_dit

    key = "model.diffusion_model.layers.0.attention.out.weight"

    def change(sd, meta):
        sd[key] = sd[key].to(dtype)
    bad = _rewrite(tiny_models["dit_comfyui"], tmp_path / "dit.safetensors", change)
    with pytest.raises(ModelFileError, match=r"layers\.0\.attention\.out\.weight.*stored as (int8|bool)"):
        load_dit(bad, dtype=torch.float32)


def test_dit_weight_of_wrong_shape_is_named(tiny_models, tmp_path):
    from newbie_core.dit import load_dit

    key = "model.diffusion_model.layers.1.feed_forward.w2.weight"

    def change(sd, meta):
        sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
    bad = _rewrite(tiny_models["dit_comfyui"], tmp_path / "dit.safetensors", change)
    with pytest.raises(ModelFileError, match=r"feed_forward\.w2\.weight has shape .* expects"):
        load_dit(bad, dtype=torch.float32)


def test_vae_and_gemma_weights_of_wrong_dtype_are_named(tiny_models, tmp_path):
    from newbie_core.text.gemma import load_gemma
    from newbie_core.vae import load_vae

    def to_int8(match):
        def change(sd, meta):
            key = next(k for k in sorted(sd) if match in k and sd[k].is_floating_point())
            sd[key] = sd[key].to(torch.int8)
        return change
    vae = _rewrite(tiny_models["vae_comfyui"], tmp_path / "ae.safetensors", to_int8("decoder.conv_in.weight"))
    with pytest.raises(ModelFileError, match="stored as int8"):
        load_vae(vae)
    gemma = _rewrite(tiny_models["gemma_comfyui"], tmp_path / "gemma.safetensors", to_int8("mlp.down_proj"))
    with pytest.raises(ModelFileError, match="stored as int8"):
        load_gemma(gemma, dtype=torch.float32)


@pytest.mark.parametrize("value", ["not json", "[1, 2]", "[4, 6, 7]", "{\"a\": 1}", "[1e309, 1, 1]"])
def test_unparsable_dit_metadata_falls_back_to_defaults(tiny_models, tmp_path, value):
    from newbie_core.dit import load_dit

    good = load_dit(tiny_models["dit_comfyui"], dtype=torch.float32)

    def change(sd, meta):
        meta.update({"newbie.axes_dims": value, "newbie.axes_lens": value, "newbie.rope_theta": value})
    bad = _rewrite(tiny_models["dit_comfyui"], tmp_path / "dit.safetensors", change)
    model = load_dit(bad, dtype=torch.float32)
    assert model.config.axes_dims == good.config.axes_dims
    assert model.config.rope_theta == 10000.0


@pytest.mark.parametrize("value", ["0", "-3", "x", "99999999999"])
def test_unparsable_vae_metadata_falls_back(tiny_models, tmp_path, value):
    from newbie_core.vae import NORM_GROUPS_METADATA_KEY, load_vae

    def change(sd, meta):
        meta[NORM_GROUPS_METADATA_KEY] = value
    bad = _rewrite(tiny_models["vae_comfyui"], tmp_path / "ae.safetensors", change)
    try:
        load_vae(bad)  # default 32 groups may not fit the tiny widths: then a named ModelFileError, never a raw one
    except NewBieError:
        pass


def test_metadata_value_rules():
    assert metadata_value({"k": "[1]"}, "k", 5, lambda v: isinstance(v, list)) == [1]
    assert metadata_value({"k": "oops"}, "k", 5, lambda v: True) == 5
    assert metadata_value({}, "k", 5, lambda v: True) == 5


def test_vae_folder_message_never_echoes_config_fields(tiny_models, tmp_path):
    from newbie_core.vae import load_vae

    folder = tmp_path / "vae"
    shutil.copytree(tiny_models["vae_hf"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    for field, value in (("_class_name", "root:x:0:0:SECRET"), ("latent_channels", "SECRET")):
        (folder / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ModelFileError) as e:
            load_vae(folder)
        assert "SECRET" not in str(e.value)
    (folder / "config.json").write_bytes(b"SECRET \xff not json")
    with pytest.raises(ModelFileError, match="damaged") as e:
        load_vae(folder)
    assert "SECRET" not in str(e.value)
    assert math.isfinite(1.0)


# ------------------------------------------------------------------------------------------- stale cache
def test_fingerprint_changes_with_header_size_or_mtime(tmp_path):
    from newbie_core.files import content_fingerprint

    f = tmp_path / "g.safetensors"
    save_file({"a.weight": torch.zeros(4, 4)}, str(f))
    fp = content_fingerprint(f)
    assert content_fingerprint(f) == fp  # reading changes nothing
    st = f.stat()
    save_file({"b.weight": torch.zeros(4, 4)}, str(f))  # same size, same mtime, another tensor name
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and content_fingerprint(f) != fp
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: new mtime_ns
    assert len({fp, content_fingerprint(f)}) == 2
    (tmp_path / "config.json").write_text("{}")
    assert content_fingerprint(tmp_path) != content_fingerprint(f)


def test_replaced_encoder_file_is_not_served_from_the_cache(tmp_path):
    """A Gemma replaced under the same path: the next pipeline (same embedding cache) encodes anew."""
    from newbie_core.memory import EmbeddingCache
    from newbie_core.model_paths import ModelPaths
    from newbie_core.pipeline import Pipeline
    from newbie_core.tiny import make_tiny

    make_tiny(tmp_path / "a", seed=0)
    make_tiny(tmp_path / "b", seed=7)
    paths = ModelPaths.from_dir(tmp_path / "a")
    cache = EmbeddingCache()
    first = Pipeline(paths, device="cpu", precision={"text": "fp32"}, cache=cache).encode(["1girl"])[0]
    again = Pipeline(paths, device="cpu", precision={"text": "fp32"}, cache=cache)
    assert torch.equal(again.encode(["1girl"])[0].cap_feats, first.cap_feats)
    shutil.rmtree(paths.gemma)
    shutil.copytree(tmp_path / "b" / "hf" / "text_encoder", paths.gemma)
    fresh = Pipeline(paths, device="cpu", precision={"text": "fp32"}, cache=cache).encode(["1girl"])[0]
    assert not torch.equal(fresh.cap_feats, first.cap_feats)


def test_pipeline_refuses_a_device_this_machine_lacks(tiny_models):
    from newbie_core.model_paths import ModelPaths
    from newbie_core.pipeline import Pipeline

    for device in ("cuda:7", "garbage"):
        with pytest.raises(InputError, match="device"):
            Pipeline(ModelPaths.from_dir(tiny_models["root"]), device=device)


def test_dangling_link_is_not_found_not_refused(folders):
    base, extra, outside = folders
    (base / "gone.safetensors").symlink_to(outside / "missing.safetensors")
    with pytest.raises(ModelFileError, match="not found") as e:
        resolve_model_name("gone.safetensors", [base, extra])
    assert not isinstance(e.value, UnsafeModelName)
