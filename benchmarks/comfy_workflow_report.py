"""The markdown report of benchmarks/comfy_workflow_bench.py: one table per ComfyUI memory setting."""
from __future__ import annotations


def markdown(results: list[dict]) -> str:
    """One table per setting: workflow, ok, wall, peaks, s/step, latent diff; plus the queue line."""
    lines = []
    for r in results:
        lines += [f"### {r['device']}, ComfyUI {r['comfyui']}, flags `{r['comfy_args'] or '-'}`"
                  f"{', card ' + str(r['card_gib']) + ' GiB' if r['card_gib'] else ''}"
                  f"{', keep_loaded on' if r.get('keep_loaded') else ''} "
                  f"(async offload: {r['async_offload']}; {r['size']}², {r['steps']} euler steps, CFG 5)", "",
                  "| workflow | ok | wall s | peak alloc GiB (at node) | peak resv GiB | DiT s/step | latent rel. diff vs CLI "
                  "| slowest nodes |", "|---|---|---|---|---|---|---|---|"]
        for name, w in r["workflows"].items():
            slow = ", ".join(f"{k.split(':')[1]} {v:.2f}" for k, v in sorted(w.get("node_s", {}).items(),
                                                                           key=lambda kv: -kv[1])[:3])
            sps = w.get("dit_s_per_step")
            at = max(w.get("node_peak_alloc_gib", {}).items(), key=lambda kv: kv[1], default=None)
            at = f" ({at[0].split(':')[1]})" if at else ""
            lines.append(f"| {name} | {'yes' if w['ok'] else 'NO: ' + w.get('error', '')[:80]} | {w.get('wall_s', '–')} | "
                         f"{w.get('peak_alloc_gib', '–')}{at} | "
                         f"{w.get('peak_resv_gib', '–')} | "
                         f"{'–' if sps is None else f'{sps:.4f}'} | {w.get('latent_rel_l2_vs_cli', '–')} | {slow} |")
        for label, c in (("as the workflow sets it", r["workflows"].get("newbie_basic_t2i", {})),
                         ("DiT and text encoders in fp32", r.get("parity_fp32", {}))):
            if "latent_rel_l2_vs_cli" in c:
                lines.append(f"\nBasic workflow vs the CLI pipeline, {label}: final latent rel. diff "
                             f"{c['latent_rel_l2_vs_cli']:.3g} (text conditioning {c['text_rel_l2_vs_cli']:.3g}; the "
                             f"DiT stage alone on the same conditioning {c['latent_rel_l2_vs_cli_same_text']:.3g}).")
        peaks = {n: w["node_peak_alloc_gib"] for n, w in r["workflows"].items() if w.get("node_peak_alloc_gib")}
        if peaks:
            lines.append("\nPeak allocated GiB while each node ran (models other nodes left loaded included): "
                         + "; ".join(f"{n}: " + ", ".join(f"{k.split(':')[1]} {v:.2f}" for k, v in p.items())
                                     for n, p in peaks.items()) + ".")
        if "after_free" in r:
            f = r["after_free"]
            lines.append(f"\nAfter /free: {f['free_alloc_gib']} GiB allocated, {f.get('free_resv_gib', '–')} GiB reserved, "
                         f"RSS {f['free_rss_mib']} MiB; after NewBie Memory Purge: {f['purge_alloc_gib']} GiB allocated.")
        if "queue" in r:
            q = r["queue"]
            lines.append(f"\n{q['n']} queued generations (text encoders on {q['text_device']}): "
                         f"{q['images_per_min']} images/min, VRAM growth {q['vram_growth_mib']} MiB, "
                         f"RSS growth {q['rss_growth_mib']} MiB; median seconds of each node over the runs it "
                         "executed in (not served from ComfyUI's cache): "
                         + ", ".join(f"{k} {v:.2f} ({q.get('node_runs', {}).get(k, '?')}×)" for k, v in
                                     sorted(q.get("median_node_s", {}).items(), key=lambda kv: -kv[1])))
        lines.append("")
    return "\n".join(lines)
