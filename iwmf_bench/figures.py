"""Figures for the README: FAR per threat model per defense, and example images."""

from __future__ import annotations

from pathlib import Path

import torch

from .suite import Suite


def far_plot(suite: Suite, records: list[dict], path: str | Path) -> Path | None:
    """Grouped bars: FAR (single-shot, with 95% intervals) per threat model and defense,
    one panel per model. Returns None when no cell finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    models = list(dict.fromkeys(r["cell"]["model"] for r in ok))
    if not models:
        return None
    threats = [t for t in suite.threat_models if any(r["cell"]["threat"] == t for r in ok)]
    defenses = [d for d in suite.defenses if any(r["cell"]["defense"] == d for r in ok)]
    fig, axes = plt.subplots(len(models), 1, figsize=(1.6 + 1.3 * len(threats), 3.2 * len(models)), squeeze=False)
    width = 0.8 / max(1, len(defenses))
    for ax, model in zip(axes[:, 0], models):
        for j, d in enumerate(defenses):
            xs, ys, lo, hi = [], [], [], []
            for i, t in enumerate(threats):
                r = next((r for r in ok if r["cell"]["model"] == model and r["cell"]["defense"] == d
                          and r["cell"]["threat"] == t), None)
                if r is None:
                    continue
                far = r["metrics"]["far"]
                xs.append(i + (j - (len(defenses) - 1) / 2) * width)
                ys.append(100 * far["value"])
                lo.append(max(0.0, 100 * (far["value"] - far["ci95"][0])))
                hi.append(max(0.0, 100 * (far["ci95"][1] - far["value"])))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=d)
        ax.set_xticks(range(len(threats)), threats, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("FAR %")
        ax.set_ylim(0, 105)
        ax.set_title(f"{model} ({suite.name} suite)", fontsize=10)
        ax.legend(fontsize=7, ncols=min(4, len(defenses)))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def example_grid(columns: dict[str, torch.Tensor], path: str | Path, rows: int = 4, pad: int = 4) -> Path:
    """A grid image: one column per entry of ``columns`` (NCHW in [0,1], same size), one
    row per sample, with the column names written above."""
    from PIL import Image, ImageDraw

    from .data import to_uint8

    names = list(columns)
    arrays = [to_uint8(columns[n][:rows]).numpy() for n in names]
    n, h, w = arrays[0].shape[0], arrays[0].shape[1], arrays[0].shape[2]
    header = 16
    canvas = Image.new("RGB", (len(names) * (w + pad) + pad, header + n * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (name, arr) in enumerate(zip(names, arrays)):
        x = pad + j * (w + pad)
        draw.text((x, 2), name, fill="black")
        for i in range(n):
            canvas.paste(Image.fromarray(arr[i]), (x, header + pad + i * (h + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
