"""The benchmark's outputs: machine facts, end-to-end ratios, the Markdown table and the PNG chart."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("sdrt", "numpy", "onnxruntime", "openvino", "torch", "diffusers", "transformers", "optimum",
            "optimum-intel", "optimum-onnx", "matplotlib")
COLUMNS = ("load s", "text enc ms", "UNet step s", "VAE dec s", "VAE enc s", "e2e s", "peak RSS GB")
# columns shown only when some system measured them: SDXL's second text encoder, the tiny autoencoder's decoder
OPTIONAL = {"text enc 2 ms": ("text_encoder_2", 1000.0, "{:.0f}"), "TAESD dec s": ("vae_decoder_tiny", 1.0, "{:.3f}")}


def machine() -> dict:
    """CPU model, cores, memory, OS and the versions of the packages in this (the sdrt) environment."""
    info = {"cpu": _cpu_model(), "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg": list(os.getloadavg()), "versions": {}}
    try:
        import psutil
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name in PACKAGES:
        try:
            info["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ratios(systems: list[dict]) -> dict[str, dict[str, float]]:
    """For every measured system, each measured peer's end-to-end time divided by the system's own
    (above 1: the system is faster than that peer)."""
    ok = {s["name"]: s["e2e"]["median_s"] for s in systems if s.get("status") == "ok"}
    peers = [s["name"] for s in systems if s.get("kind") == "peer" and s["name"] in ok]
    return {name: {p: ok[p] / e2e for p in peers if p != name} for name, e2e in ok.items()}


def row(system: dict, optional: tuple[str, ...] = ()) -> list[str]:
    """The table cells of one measured system, in COLUMNS order then the ``optional`` columns; '–' where not
    measured."""
    c = system.get("components", {})

    def sec(key, scale=1.0, fmt="{:.2f}"):
        return fmt.format(c[key]["median_s"] * scale) if key in c else "–"
    return [f"{system['load_s']:.2f}", sec("text_encoder", 1000.0, "{:.0f}"), sec("unet_step", fmt="{:.3f}"),
            sec("vae_decoder"), sec("vae_encoder"), f"{system['e2e']['median_s']:.2f}",
            f"{system['peak_rss_bytes'] / 2**30:.2f}", *(sec(*OPTIONAL[name]) for name in optional)]


def optional_columns(systems: list[dict]) -> tuple[str, ...]:
    """The OPTIONAL columns some measured system has a figure for."""
    return tuple(name for name, (key, *_) in OPTIONAL.items()
                 if any(key in s.get("components", {}) for s in systems if s.get("status") == "ok"))


def markdown(results: dict) -> str:
    """A heading with the settings, one table row per system with the ratios against each peer, and notes."""
    s, systems, ratio = results["settings"], results["systems"], results["ratios"]
    peers = [x["name"] for x in systems if x.get("kind") == "peer" and x.get("status") == "ok"]
    optional = optional_columns(systems)
    head = ["system", *COLUMNS, *optional, *(f"vs {p}" for p in peers)]
    schedule = f" ({s['scheduler']})" if s.get("scheduler") else ""
    vae = ", tiny VAE (TAESD)" if s.get("vae") == "tiny" else ""
    lines = [f"{Path(s['source']).name or s['folder']} ({s.get('family', 'sd1')}): {s['width']}x{s['height']}, "
             f"{s['steps']} steps, {s['sampler']}{schedule}, CFG {s['guidance']:g}{vae}, batch {s['batch']}, "
             f"{s['threads'] or 'default'} threads, "
             f"median of {s['runs']} runs after {s['warmup']} warm-up; {results['machine']['cpu']}, "
             f"{results['machine']['logical_cores']} cores", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system in systems:
        if system.get("status") == "ok":
            cells = row(system, optional) + [f"{ratio[system['name']][p]:.2f}×" if p != system["name"] else "1×"
                                   for p in peers]
        else:
            cells = [f"{system.get('status', 'failed')}: {system.get('error', '')}".replace("|", "/")]
            cells += [""] * (len(head) - 2)
        lines.append("| " + " | ".join([system["name"], *cells]) + " |")
    return "\n".join(lines + [""] + _notes(systems, s)) + "\n"


def _notes(systems: list[dict], settings: dict | None = None) -> list[str]:
    unet = {s["components"]["unet_step"].get("batch") for s in systems
            if s.get("kind") == "sdrt" and "unet_step" in s.get("components", {})}
    unet = "/".join(str(b) for b in sorted(unet - {None})) or "2"
    notes = ["vs P: P's end-to-end time ÷ this row's (above 1: this row is faster). e2e: txt2img, prompt "
             "to PIL image. load: the system's first load and compile of the model. peak RSS: the system's "
             "own process.",
             "sdrt rows: each component called directly with the shapes the pipeline uses (text encoders: one "
             f"77-token chunk each; UNet: batch {unet}, i.e. [uncond; cond] rows only with guidance > 1; VAE and "
             "TAESD: one image). Peer rows: time spent inside each part during the end-to-end runs (text "
             "encoders: all their calls of one image, prompt and negative prompt; UNet: per step), VAE encode "
             "called directly."]
    if settings and settings.get("vae") == "tiny":
        notes.append("--vae tiny: every system decodes with the tiny autoencoder in e2e (sdrt: the export's "
                     "vae_decoder_tiny; diffusers: AutoencoderTiny in torch; Optimum-Intel: the same AutoencoderTiny "
                     "decoder converted to OpenVINO); the VAE dec column is the full decoder, called directly "
                     "(sdrt) or not measured (peers).")
    exports = [f"{s['name']} {s['export_s']:.1f} s" for s in systems if s.get("export_s")]
    if exports:
        notes.append("One-time conversion of the diffusers folder before loading (not in load): "
                     + ", ".join(exports) + ".")
    peers = [s for s in systems if s.get("kind") == "peer" and s.get("status") == "ok"]
    if peers:
        notes.append("Peers: " + "; ".join(f"{s['name']} {s.get('scheduler', '?')}, computes in "
                                           f"{s.get('precision', '?')}" for s in peers) + ".")
    diffs = [f"{s['name']} {s['image_diff']['mean']:.1f} (max {s['image_diff']['max']})" for s in systems
             if s.get("image_diff") and s["name"] != s["image_diff"]["vs"]]
    if diffs:
        reference = next(s["image_diff"]["vs"] for s in systems if s.get("image_diff"))
        notes.append(f"Same image? Mean |pixel difference| (0-255) of each system's last image from {reference}'s: "
                     + "; ".join(diffs) + " (near 0: the same computation; a few units: another precision).")
    computes = [f"{s['name']} in {s['precision']}" for s in systems
                if s.get("kind") == "sdrt" and s.get("status") == "ok" and s.get("precision")]
    if computes:
        notes.append("sdrt OpenVINO computes (read back from the compiled UNet): " + "; ".join(computes) + ".")
    return [f"- {n}" for n in notes]


def chart(results: dict, path: Path) -> str | None:
    """A PNG with end-to-end seconds and UNet step seconds per system; a note instead without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"(no chart written to {path}: matplotlib is not installed; `pip install matplotlib`)"
    ok = [s for s in results["systems"] if s.get("status") == "ok"]
    names = [s["name"] for s in ok]
    panels = (("end to end, s", [s["e2e"]["median_s"] for s in ok]),
              ("UNet step, s", [s["components"].get("unet_step", {}).get("median_s", 0.0) for s in ok]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(ok) + 1.6), sharey=True)
    for ax, (title, values) in zip(axes, panels):
        bars = ax.barh(names, values, color=["#1f77b4" if n.startswith("sdrt") else "#999999" for n in names])
        ax.bar_label(bars, fmt="{:.3g}", padding=3)
        ax.set_title(title)
        ax.margins(x=0.2)
    axes[0].invert_yaxis()                          # shared: first system on top
    s = results["settings"]
    fig.suptitle(f"{s['width']}x{s['height']}, {s['steps']} steps, {s['sampler']}, "
                 f"{s['threads'] or 'default'} threads (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
