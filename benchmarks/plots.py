"""PNG plots of a ``benchmarks.run`` result: ``python -m benchmarks.plots RESULT.json OUTDIR``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from benchmarks.libraries import FLOOR

OURS = "asyncckpt"


# one fixed colour per method in every plot: asyncckpt warm, the alternatives cool or grey
_COLORS = {
    "torch.save": "#4c72b0",
    "dcp.save": "#1f3b73",
    "dcp.async_save (thread)": "#55a868",
    "dcp.async_save (process)": "#2d6a3e",
    "dcp.async_save + reused stager": "#8172b2",
    "Lightning AsyncCheckpointIO": "#64b5cd",
    "torchsnapshot": "#8c8c8c",
    "asyncckpt": "#dd5500",
    "asyncckpt (process)": "#c44e52",
    "asyncckpt (overlap)": "#f0a30a",
    "asyncckpt (skip)": "#8b1a1a",
    "asyncckpt (queue 2)": "#e377c2",
}


def _color(lib: str) -> str:
    return _COLORS.get(lib, "#444444")


def _style(lib: str) -> dict[str, Any]:
    if lib == FLOOR:
        return {"color": "black", "linestyle": ":", "marker": ""}
    if lib.startswith(OURS):
        return {"color": _color(lib), "linewidth": 2.5, "marker": "o"}
    return {"color": _color(lib), "linewidth": 1.2, "marker": "s", "alpha": 0.85}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str, title: str, bottom: float = 0.0) -> str:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _ref_key(stall: dict[str, Any]) -> str | None:
    """The 1 GiB, 100-tensor case (or the first) for the single-size plots."""
    return next((k for k in stall if k.startswith("1GiB/100")), next(iter(stall), None))


def stall_vs_size(res: dict[str, Any], path: str, title: str) -> str | None:
    stall = res.get("stall") or {}
    sized = {k: v for k, v in stall.items() if k.endswith("/100")}
    if not sized:
        return None
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    libs = list(next(iter(sized.values())))
    for lib in libs:
        pts = sorted(
            (float(k.split("GiB")[0]), v[lib]["median_stall_s"] * 1e3)
            for k, v in sized.items()
            if "median_stall_s" in v.get(lib, {})
        )
        if pts:
            ax.plot(*zip(*pts), label=lib, **_style(lib))
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="state size (GiB, 100 fp32 tensors)",
        ylabel="median stall per save (ms)",
    )
    sizes = sorted({float(k.split("GiB")[0]) for k in sized})
    ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
    ax.minorticks_off()
    ax.set_title("Trainer-visible stall per save")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    shapes = [k for k in stall if not k.endswith("/100")]
    ref = next((k for k in sized if k.split("/")[0] == (shapes[0].split("/")[0] if shapes else "")), None)
    cols = [c for c in (shapes[:1] + ([ref] if ref else []) + shapes[1:])]
    width = 0.8 / max(1, len(cols))
    names = [lib for lib in libs if lib != FLOOR]
    for i, key in enumerate(cols):
        vals = [stall[key].get(lib, {}).get("median_stall_s", float("nan")) * 1e3 for lib in names]
        bx.barh(
            [j + i * width for j in range(len(names))],
            vals,
            height=width,
            label=f"{key.split('/')[1]} tensors",
        )
    bx.set_yticks([j + width * (len(cols) - 1) / 2 for j in range(len(names))], names, fontsize=8)
    bx.invert_yaxis()
    bx.set(xscale="log", xlabel="median stall (ms)")
    bx.set_title(f"Tensor count at {cols[0].split('/')[0] if cols else ''}")
    bx.legend(fontsize=8)
    bx.grid(True, axis="x", which="both", alpha=0.3)
    return _save(fig, path, title)


def overhead_vs_interval(res: dict[str, Any], path: str, title: str) -> str | None:
    """Loop-time overhead per method, one bar per save interval, one panel per step kind."""
    ov = {k: v for k, v in (res.get("overhead") or {}).items() if "/every" in k}
    if not ov:
        return None
    plt = _plt()
    kinds = sorted({k.split("/")[0] for k in ov}, reverse=True)
    cfg = res["overhead"].get("config", {})
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 6.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        keys = sorted((k for k in ov if k.startswith(kind + "/")), key=lambda k: int(k.split("every")[1]))
        libs = [lib for lib in ov[keys[0]] if lib != "none"]
        width = 0.8 / len(keys)
        shades = ["#bbbbbb", "#555555", "#222222"]
        for i, key in enumerate(keys):
            vals = [max(ov[key].get(lib, {}).get("overhead", float("nan")) * 100, 0.1) for lib in libs]
            ys = [j + i * width for j in range(len(libs))]
            every = key.split("every")[1]
            ax.barh(ys, vals, height=width, color=[_color(lib) for lib in libs], alpha=1 - 0.45 * i,
                    edgecolor=shades[i % 3], label=f"save every {every} steps")  # fmt: skip
            for y, v, lib in zip(ys, vals, libs):
                r = ov[key].get(lib, {})
                note = f"{v:.1f}%" + (f", {r['skipped']} skipped" if r.get("skipped") else "")
                ax.text(v * 1.08, y, note, va="center", fontsize=6.5)
        ax.set_yticks([j + width * (len(keys) - 1) / 2 for j in range(len(libs))], libs, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(0.3, 2000)
        ax.set_xlabel("loop time over the loop without checkpoints (%, log)")
        step = "sleep: a GPU-bound step" if kind == "sleep" else "CPU-bound: matmuls on every core"
        ax.set_title(
            f"{step}\n{cfg.get('step_s', 0) * 1e3:.0f} ms step, {cfg.get('size_gib', 0):g} GiB state"
        )
        ax.grid(True, axis="x", which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=len(labels),
        fontsize=9,
        title="darker: the shorter interval",
    )
    return _save(fig, path, title, bottom=0.09)


def throughput_bars(res: dict[str, Any], path: str, title: str) -> str | None:
    """Write throughput until durable per library (stall scenario), plus raw disk and S3."""
    stall = res.get("stall") or {}
    key = _ref_key(stall)
    bars: list[tuple[str, float, str]] = []
    if key:
        for lib, r in stall[key].items():
            if "median_durable_s" in r and lib != FLOOR:
                bars.append((lib, r["state_bytes"] / r["median_durable_s"] / 1e9, "local write"))
    tp = res.get("throughput") or {}
    bw = tp.get("bench_write", {})
    raw = None
    for name, v in (bw.get("writes") or {}).items():
        if name.startswith("raw"):
            raw = v.get("GBps")
    for name, v in (bw.get("loads") or {}).items():
        if "GBps" in v:
            bars.append((name, v["GBps"], "local load"))
    s3 = tp.get("bench_s3", {})
    for group, label in (("uploads", "S3 upload"), ("loads", "S3 load")):
        for name, v in (s3.get(group) or {}).items():
            if "MBps" in v:
                bars.append((name, v["MBps"] / 1e3, label))
    if not bars:
        return None
    plt = _plt()
    groups = list(dict.fromkeys(g for _, _, g in bars))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 5), squeeze=False)
    for ax, g in zip(axes[0], groups):
        rows = [(n, v) for n, v, gg in bars if gg == g]
        colors = [
            _color(n) if n in _COLORS else ("#dd5500" if n.startswith(OURS) else "#8c8c8c") for n, _ in rows
        ]
        ax.barh([n for n, _ in rows], [v for _, v in rows], color=colors)
        ax.invert_yaxis()
        if raw and g == "local write":
            ax.axvline(raw, color="black", linestyle=":", label=f"raw disk write {raw:.2f} GB/s")
            ax.legend(fontsize=8)
        ax.set_xlabel("GB/s of state" + (" (moto on loopback)" if g.startswith("S3") else ""))
        ax.set_title(
            g + (f" ({key.replace('/', ', ')} tensors, until durable)" if g == "local write" else "")
        )
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path, title)


def memory_bars(res: dict[str, Any], path: str, title: str) -> str | None:
    stall = res.get("stall") or {}
    key = _ref_key(stall)
    if not key:
        return None
    rows = [
        (lib, r["peak_extra_host"] / r["state_bytes"])
        for lib, r in stall[key].items()
        if "peak_extra_host" in r
    ]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.barh(
        [n for n, _ in rows],
        [v for _, v in rows],
        color=[_color(n) for n, _ in rows],
    )
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linestyle=":", label="one copy of the state")
    ax.set_xlabel("peak host memory above the trainer's, in state sizes (PSS, writer processes included)")
    ax.set_title(f"Peak extra host memory, {key.replace('/', ', ')} tensors, {len(rows)} libraries")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path, title)


def save_cost_bars(res: dict[str, Any], path: str, title: str) -> str | None:
    """A ``bench_save_cost`` result: time to durable against the raw ``O_DIRECT`` write, CPU
    per GiB against the memcpy floor, and the page cache each method leaves behind."""
    summary = res.get("summary") or {}
    rows = [(n, r) for n, r in summary.items() if n != "memcpy floor"]
    if not rows:
        return None
    panels = (
        ("speed_x_raw_direct", "time to durable, as speed × raw O_DIRECT write (higher is better)", 0.9),
        ("cpu_x_memcpy", "CPU (trainer + writer) per GiB × memcpy floor (lower is better)", 2.0),
        ("cached_mib", "page cache left behind, MiB", None),
    )
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    names = [n for n, _ in rows]
    colors = [
        "#dd5500" if n.startswith(OURS) else ("black" if n.startswith("raw") else "#8c8c8c") for n in names
    ]
    for ax, (key, label, goal) in zip(axes, panels):
        vals = [float(r.get(key) or 0.0) for _, r in rows]
        ax.barh(names, vals, color=colors)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.2f}" if key != "cached_mib" else f" {v:.0f}", va="center", fontsize=7)
        if goal is not None:
            ax.axvline(goal, color="#c44e52", linestyle="--", label=f"goal {goal:g}×")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_title(label, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    axes[0].invert_yaxis()
    return _save(
        fig, path, f"Whole cost of a {res.get('mib')} MiB save, median of {res.get('reps')}: {title}"
    )


def render(res: dict[str, Any], outdir: str, prefix: str = "bench_") -> list[str]:
    os.makedirs(outdir, exist_ok=True)
    m = res.get("machine", {})
    title = (
        f"{m.get('cpu_count')} CPUs, {m.get('mem_total_gib')} GiB RAM, torch {m.get('torch_version')}, "
        f"{res.get('started', '')}{' (quick smoke run)' if res.get('quick') else ''}"
    )
    out = []
    if "summary" in res:  # a bench_save_cost result
        load = (res.get("load_avg") or [0.0])[0]
        sub = f"{res.get('tensors')} tensors, load average {load:.1f} at the start"
        p = save_cost_bars(res, os.path.join(outdir, f"{prefix}save_cost.png"), sub)
        return [p] if p else []
    for name, fn in (
        ("stall", stall_vs_size),
        ("overhead", overhead_vs_interval),
        ("throughput", throughput_bars),
        ("memory", memory_bars),
    ):
        p = fn(res, os.path.join(outdir, f"{prefix}{name}.png"), title)
        if p:
            out.append(p)
    gpu = res.get("gpu") or {}
    if "stall" in gpu:
        p = stall_vs_size(
            {"stall": gpu["stall"]},
            os.path.join(outdir, f"{prefix}gpu_stall.png"),
            f"{gpu['device']}: {title}",
        )
        if p:
            out.append(p)
    return out


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def _of_runs(n: int) -> str:
    return "the slower of 2 runs" if n == 2 else f"the median of {n} runs"


def markdown(res: dict[str, Any]) -> str:
    """The result's tables, for docs/benchmarks.md."""
    out: list[str] = []
    for key, libs in (res.get("stall") or {}).items():
        floor = libs.get(FLOOR, {}).get("median_stall_s")
        ours = libs.get(OURS, {}).get("median_stall_s")
        size, n = key.split("/")
        out += [
            f"\n**Stall, {size} in {n} tensors** (median of {len(next(iter(libs.values())).get('stall_s', []))} saves)\n",
            "| method | stall ms | × floor | × asyncckpt | write GB/s until durable | peak extra host memory × state |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for lib, r in libs.items():
            if "median_stall_s" not in r:
                out.append(f"| {lib} | error: {r.get('error', '?').splitlines()[-1][:80]} | | | | |")
                continue
            st = r["median_stall_s"]
            name = f"**{lib}**" if lib.startswith(OURS) else lib
            gbps = "-" if lib == FLOOR else f"{r['state_bytes'] / r['median_durable_s'] / 1e9:.2f}"
            gbps += " †" if r.get("durable_from_rerun") else ""
            out.append(
                f"| {name} | {_fmt_ms(st)} | {st / floor:.2f} | {st / ours:.2f} | {gbps} | "
                f"{r['peak_extra_host'] / r['state_bytes']:.2f} |"
                if floor and ours
                else f"| {name} | {_fmt_ms(st)} | | | {gbps} | |"
            )
    ov = res.get("overhead") or {}
    cfg = ov.get("config", {})
    for key, libs in ov.items():
        if key == "config":
            continue
        kind, every = key.split("/")
        out += [
            f"\n**Overhead, {kind} step of {cfg.get('step_s', 0) * 1e3:.0f} ms, save {every.replace('every', 'every ')} "
            f"steps, {cfg.get('size_gib')} GiB state, {cfg.get('steps')} steps** ({_of_runs(cfg.get('reps', 1))})\n",
            "| method | loop overhead | saves | skipped | staleness mean / max (steps) | when busy |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for lib, r in libs.items():
            if lib == "none":
                continue
            if "loop_s" not in r:
                out.append(f"| {lib} | error | | | | |")
                continue
            name = f"**{lib}**" if lib.startswith(OURS) else lib
            out.append(
                f"| {name} | {r.get('overhead', 0) * 100:+.1f}% | {r['saves']} | {r['skipped']} | "
                f"{r['stale_mean']:.1f} / {r['stale_max']} | {r['behaviour']} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = json.load(f)
    if "--markdown" in sys.argv:
        print(markdown(result))
    else:
        print("\n".join(render(result, sys.argv[2])))
