"""The bundled workflows run through ComfyUI's own executor (`execution.PromptExecutor`, in-process), timed and
measured as users run them.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/comfy_workflow_bench.py --all --out benchmarks/results
    COMFYUI_DIR=... python benchmarks/comfy_workflow_bench.py --quick --device cpu --out /tmp/x   # CPU plumbing

One run = one ComfyUI memory setting (ComfyUI reads its flags at import): `--comfy-args=--lowvram`,
`--comfy-args "--reserve-vram 2"`, `--card-gib 8` (a smaller card: torch.cuda.set_per_process_memory_fraction).
`--all` runs the standard settings each in its own process and writes one report. Per workflow: per-node wall
time, whole-graph peak allocated/reserved VRAM, DiT s/step (median step interval: our sampler's step callback,
or ComfyUI's progress hook for core KSampler graphs), the final latent's relative
difference to the CLI pipeline's for the same settings (basic workflow); then `--queue` generations of the basic
workflow (a new seed each, as a queue of users' prompts) for VRAM/RSS growth. Model files are random full-size
weights in ComfyUI's layout (benchmarks/comfy_model_files.py), written once under --models-dir.
Where the running ComfyUI has its own NewBie model (the 0.4.0 fork), `native_ksampler` runs the core-KSampler
graph with the DiT loaded by ComfyUI's UNETLoader (its native model, same file), beside the same graph on ours.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests" / "integration")]
from comfy_executor import (BenchServer, after_free, allocated_gib, new_executor, object_info,  # noqa: E402
                            rss_mib, run_prompt, start_comfyui, sync)

CORE_KSAMPLER = "newbie_comfyui_template_ksampler"
# the core-KSampler graph again with the DiT loaded by ComfyUI's own UNETLoader: the running ComfyUI's native
# NewBie model (the E-Anlia/ComfyUI-NewBie 0.4.0 fork), same file, same sampler, same run
NATIVE_KSAMPLER = "native_ksampler"
WORKFLOWS = ["newbie_basic_t2i", "newbie_low_vram", "newbie_precision_swap", "newbie_xml_multi_character",
             "newbie_interop_core_nodes", CORE_KSAMPLER, NATIVE_KSAMPLER]
SETTINGS = {"default": [], "lowvram": ["--comfy-args=--lowvram"], "reserve-vram-2": ["--comfy-args=--reserve-vram 2"],
            "card-8gb": ["--card-gib", "8"], "card-6gb": ["--card-gib", "6"]}


def median_step(stamps: list[float]) -> float | None:
    """Median interval between step time stamps, the first interval (warm-up) skipped; None under two steps."""
    d = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return statistics.median_high(d) if d else None


class ProgressClock:
    """Times sampler steps through ComfyUI's progress-bar hook (every sampler reports each step there: core
    KSampler with any model, and ours)."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def hook(self, value, total, *_a, **_k):  # noqa: D102
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def seconds_per_step(self) -> float | None:  # noqa: D102
        return median_step(self.stamps)


def native_prompt(api: dict) -> dict:
    """`api` with each NewBieDiTLoader replaced by ComfyUI's UNETLoader on the same file (the running ComfyUI's
    own model for it, weights in their stored dtype)."""
    out = json.loads(json.dumps(api))
    for node in out.values():
        if node["class_type"] == "NewBieDiTLoader":
            node["class_type"] = "UNETLoader"
            node["inputs"] = {"unet_name": node["inputs"]["dit_name"], "weight_dtype": "default"}
    return out


def api_prompt(name: str, info: dict, args, seed: int, precision: str | None = None) -> dict:
    """A bundled workflow as an API prompt with the benchmark's size/steps/solver/cfg/seed on every sampler (and
    keep_loaded on every node that has it, with --keep-loaded; `precision` on the DiT and text encoder loaders)."""
    from workflow_convert import ui_to_api

    if name == NATIVE_KSAMPLER:
        return native_prompt(api_prompt(CORE_KSAMPLER, info, args, seed, precision))
    api = ui_to_api(json.loads((ROOT / "workflows" / f"{name}.json").read_text()), info)
    for node in api.values():
        if precision and node["class_type"] in ("NewBieDiTLoader", "NewBieTextEncoderLoader"):
            node["inputs"]["precision"] = precision
        if node["class_type"] == "NewBieTextEncoderLoader" and args.text_device:
            node["inputs"]["device"] = args.text_device  # stage placement per node (two GPUs)
        if args.keep_loaded and "keep_loaded" in node["inputs"]:
            node["inputs"]["keep_loaded"] = True  # text encoders and DiT stay on the GPU between prompts
        if "sampling" in info[node["class_type"]].get("category", "").lower():
            ins = node["inputs"]
            ins.update({k: v for k, v in (("width", args.size), ("height", args.size), ("steps", args.steps),
                                           ("cfg", 5.0), ("solver", "euler"), ("seed", seed)) if k in ins})
    return api


class StepClock:
    """Times DiT steps and keeps the last sampled latent and its conditioning (wraps the sampler node's stage
    call)."""

    def __init__(self, pack_sampler):
        self.mod, self.stamps, self.latent, self.conds = pack_sampler, [], None, None
        stages = pack_sampler.stages
        orig = stages.sample

        def sample(host, cond, uncond, settings, on_step=None, **kwargs):
            self.stamps, self.conds = [time.perf_counter()], (cond, uncond)

            def tick(info):
                sync(torch.device(host.device_of("dit")))
                self.stamps.append(time.perf_counter())
                if on_step:
                    on_step(info)
            self.latent = orig(host, cond, uncond, settings, tick, **kwargs)
            return self.latent

        import types

        pack_sampler.stages = types.SimpleNamespace(**{**vars(stages), "sample": sample})  # only `sample` differs

    def seconds_per_step(self) -> float | None:  # noqa: D102
        return median_step(self.stamps)


def _rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Relative L2 difference of `a` to `b` (inf where the shapes differ or only one exists)."""
    if a is None and b is None:
        return 0.0
    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    from newbie_core.bench.measure import parity

    return parity(a, b)["rel_l2_diff"]


def cli_parity(paths: dict, api: dict, args, seed: int, device, clock: StepClock) -> dict:
    """The ComfyUI run's final latent against the CLI pipeline's for the workflow's settings (same files,
    precisions, prompts and sampler inputs), and where a difference comes from: the text stage (conditioning
    against the CLI's) and the DiT stage alone (the CLI sampling the ComfyUI run's conditioning)."""
    from newbie_core.model_paths import ModelPaths
    from newbie_core.pipeline import GenerationSettings, Pipeline
    from newbie_core.text.prompts import resolve_system_prompt

    def inputs(cls):
        return next(n["inputs"] for n in api.values() if n["class_type"] == cls)

    prec = {"dit": inputs("NewBieDiTLoader")["precision"], "text": inputs("NewBieTextEncoderLoader")["precision"],
            "vae": "fp32"}
    pipe = Pipeline(ModelPaths(**{k: paths[k] for k in ("dit", "gemma", "jina", "vae")}), device=str(device),
                    precision=prec)
    smp = inputs("NewBieDiTSampler")
    s = GenerationSettings(width=args.size, height=args.size, steps=args.steps, cfg=5.0, solver="euler", seed=seed,
                           shift=smp["shift"], cfg_trunc=smp["cfg_trunc"], renorm=smp["renorm"])
    te = inputs("NewBieTextEncode")
    cond, uncond = pipe.encode([te["positive"], te["negative"]], resolve_system_prompt(te.get("system_prompt", "auto"),
                                                                                       te["positive"]))
    ref = pipe.sample(cond, uncond, s)
    repeat = _rel(pipe.sample(cond, uncond, s), ref)  # the CLI against itself: 0 unless its sampling is unrepeatable
    ours, (c_cond, c_uncond) = clock.latent, clock.conds
    text = max(_rel(getattr(x, f), getattr(y, f)) for x, y in ((c_cond, cond), (c_uncond, uncond))
               for f in ("cap_feats", "pooled"))
    same_text = pipe.sample(c_cond, c_uncond, s)
    pipe.close() if hasattr(pipe, "close") else None
    return {"latent_rel_l2_vs_cli": _rel(ours, ref), "text_rel_l2_vs_cli": text,
            "latent_rel_l2_vs_cli_same_text": _rel(ours, same_text), "cli_repeat_rel_l2": repeat, "precision": prec}


def run(args) -> dict:
    """One ComfyUI memory setting: every workflow once, CLI parity, then the queue."""
    mm, execution, nodes = start_comfyui(args)
    device = mm.get_torch_device()
    from comfy_model_files import model_files

    paths = model_files(Path(args.models_dir), args.quick, device)
    info = object_info(nodes)
    pack = next(m for k, m in sys.modules.items() if k.endswith(".nodes.sampler") and hasattr(m, "NewBieDiTSampler"))
    clock = StepClock(pack)
    server = BenchServer(device)
    executor = new_executor(execution, server)
    import comfy
    import comfy.model_base
    import comfy.utils

    from newbie_core.bench.report import device_label

    result = {"device": device_label(device),
              "comfyui": getattr(__import__("comfyui_version"), "__version__", "?"), "comfy_args": args.comfy_args,
              "card_gib": args.card_gib, "keep_loaded": args.keep_loaded, "torch": torch.__version__,
              "size": args.size, "steps": args.steps,
              "async_offload": sys.modules[pack.__name__.rsplit(".", 1)[0] + "._comfy_compat"].COMFY_ASYNC_OFFLOAD,
              "workflows": {}}
    progress = ProgressClock(device)
    comfy.utils.set_progress_bar_global_hook(progress.hook)
    for name in args.workflows.split(","):
        if args.quick and name == "newbie_interop_core_nodes":
            continue  # core VAELoader needs the real FLUX VAE architecture (full-size runs only)
        if name == NATIVE_KSAMPLER and (args.quick or not hasattr(comfy.model_base, "NewBieImage")):
            continue  # no native NewBie model in this ComfyUI (and its detection wants the full-size DiT)
        api = api_prompt(name, info, args, seed=1)
        clock.stamps, progress.stamps = [], []
        r = run_prompt(executor, server, api, device, mm)
        r["dit_s_per_step"] = clock.seconds_per_step() or progress.seconds_per_step()
        r["kept_loaded"] = sorted(n["class_type"] for n in api.values() if n["inputs"].get("keep_loaded") is True)
        if name == "newbie_basic_t2i" and r["ok"] and not args.no_cli:
            mm.unload_all_models()
            r.update(cli_parity(paths, api, args, 1, device, clock))
            if r["latent_rel_l2_vs_cli"] != 0.0:  # is either side unrepeatable on its own? (the same graph again)
                first = clock.latent
                again = run_prompt(executor, server, api, device, mm)
                r["comfyui_repeat_rel_l2"] = _rel(clock.latent, first) if again["ok"] else again.get("error")
        runs = sum(k.split(" ")[0] == name for k in result["workflows"])  # a workflow named twice: run again
        key = name if not runs else f"{name} (run {runs + 1})"
        result["workflows"][key] = r
        print(key, json.dumps(r), flush=True)
        mm.unload_all_models()
        comfy.model_management.soft_empty_cache(True)
    if (args.quick or args.parity_fp32) and not args.no_cli:
        # the basic workflow again with the DiT and text encoders in fp32: a difference to the CLI here is a real
        # one (≥ 1e-2 for any changed setting or precision), not bf16 rounding of another kernel's summation order
        api = api_prompt("newbie_basic_t2i", info, args, seed=1, precision="fp32")
        r = run_prompt(executor, server, api, device, mm)
        mm.unload_all_models()
        result["parity_fp32"] = {"ok": r["ok"], **(cli_parity(paths, api, args, 1, device, clock) if r["ok"] else r)}
        print("parity_fp32", json.dumps(result["parity_fp32"]), flush=True)
    result["after_free"] = after_free(executor, mm, device, pack)
    if args.queue:
        api = api_prompt("newbie_basic_t2i", info, args, seed=100)
        rss, vram, per_node = [], [], {}
        t_queue = time.perf_counter()
        base_prompt = {k: n["inputs"].get("positive") for k, n in api.items()}
        for i in range(args.queue):  # each a new prompt and seed: the text stage runs every time (no cache hit)
            for k, n in api.items():
                if "seed" in n["inputs"]:
                    n["inputs"]["seed"] = 100 + i
                if n["class_type"] == "NewBieTextEncode" and isinstance(base_prompt[k], str):
                    n["inputs"]["positive"] = f"{base_prompt[k]}, variation {i}"
            r = run_prompt(executor, server, api, device, mm)
            assert r["ok"], r
            for key, sec in r["node_s"].items():
                per_node.setdefault(key.split(":")[1], []).append(sec)
            rss.append(rss_mib())
            vram.append(allocated_gib(device) * 1024)
        result["queue"] = {"n": args.queue, "rss_growth_mib": round(rss[-1] - rss[0], 1),
                           "vram_growth_mib": round(vram[-1] - vram[0], 1), "rss_mib": [round(x) for x in rss],
                           "images_per_min": round(60 * args.queue / (time.perf_counter() - t_queue), 3),
                           "text_device": args.text_device or "default",
                           "median_node_s": {k: round(statistics.median_high(v), 4) for k, v in per_node.items()},
                           "node_runs": {k: len(v) for k, v in per_node.items()}}  # cached nodes do not run
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="tiny models, 64², 3 steps (CPU plumbing check)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models-dir", default=None, help="where the model files are written once (default: a temp dir)")
    p.add_argument("--workflows", default=",".join(WORKFLOWS), help="comma-separated; one named twice runs twice")
    p.add_argument("--comfy-args", default="",
                   help="ComfyUI flags for this run, written with '=' (the value starts with a dash): "
                        "--comfy-args=--lowvram")
    p.add_argument("--card-gib", type=float, default=0.0, help="simulate a card of this many GiB")
    p.add_argument("--queue", type=int, default=20, help="queued generations for the growth figures (0: none)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--no-cli", action="store_true", help="skip the CLI latent comparison")
    p.add_argument("--parity-fp32", action="store_true",
                   help="also compare the basic workflow with the CLI in fp32 (always on with --quick)")
    p.add_argument("--keep-loaded", action="store_true",
                   help="keep_loaded on in every node that has it (default: the workflows' own, off)")
    p.add_argument("--text-device", default="", help="text encoder loader device, e.g. cuda:1 (two-GPU placement)")
    p.add_argument("--all", action="store_true", help="every standard memory setting, one process each")
    p.add_argument("--json-only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.queue = 64, 3, min(args.queue, 3)
    args.models_dir = args.models_dir or tempfile.mkdtemp(prefix="newbie-comfy-models-")
    if args.all:
        results = []
        for tag, extra in SETTINGS.items():
            tmp = Path(tempfile.mkdtemp()) / f"{tag}.json"
            base = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--all"]
            cmd = [sys.executable, __file__, *base, "--models-dir", args.models_dir, "--json-only", str(tmp), *extra]
            if tag != "default":
                cmd += ["--queue", "0"]
            rc = subprocess.call(cmd)
            results.append(json.loads(tmp.read_text()) if rc == 0 and tmp.is_file() else
                           {"device": "?", "comfyui": "?", "comfy_args": " ".join(extra), "card_gib": 0, "size": args.size,
                            "steps": args.steps, "async_offload": "?", "workflows": {}, "failed": rc})
    else:
        results = [run(args)]
        if args.json_only:
            Path(args.json_only).write_text(json.dumps(results[0], indent=1))
            return 0
    from comfy_workflow_report import markdown
    from newbie_core.bench.report import slug, write_results

    dev = next((r["device"] for r in results if r["device"] != "?"), "unknown")
    ver = next((r["comfyui"] for r in results if r["comfyui"] != "?"), "unknown")
    stem = f"comfy-workflows-{slug(f'{dev}-comfyui-{ver}')}" \
        + ("" if args.all else "".join(f"-{t}" for t in (re.sub(r"[^a-z0-9]+", "", args.comfy_args),
                                                          f"card{args.card_gib:g}gb" if args.card_gib else "") if t)) \
        + (f"-text-{args.text_device.replace(':', '')}" if args.text_device else "") \
        + ("-keeploaded" if args.keep_loaded else "") + ("-quick" if args.quick else "")
    write_results(args.out, stem, results, f"# NewBie workflows inside ComfyUI\n\n{markdown(results)}")
    print(markdown(results))
    return 0 if all(w["ok"] for r in results for w in r["workflows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
