"""Small PNG figures drawn with PIL alone: scatter panels of 2-D samples and line plots with error bars.

Paper: Wang et al. 2025, arXiv:2502.17099v1; nothing here is from the paper. The experiment scripts use it to
       draw their results (the project uses no matplotlib, so that requirements.txt stays torch/numpy/pillow/tqdm).
Uses: nothing from this repo.     Used by: experiments/toy_experiment.py, experiments/robustness.py,
      experiments/claim_images.py.
Run: python experiments/figures.py --out demo.png   (a demo figure; the experiment tests check the real ones)

A figure is a white PIL image; each panel is drawn into a box (left, top, right, bottom) in pixels.
"""
import argparse
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# One colour per method: the Okabe-Ito colour-blind-safe palette (Wong 2011, Nature Methods 8:441), then five more
# distinct colours (not chosen for colour blindness) for plots with many series.
COLORS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0),
          (140, 140, 140), (140, 80, 20), (120, 40, 160), (0, 120, 120), (170, 170, 0)]


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)  # a scalable font, Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def new_figure(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), "white")


def title(image: Image.Image, xy, text: str, size: int = 12, anchor: str = "la") -> None:
    ImageDraw.Draw(image).text(xy, text, fill="black", font=font(size), anchor=anchor)


def scatter_panel(image: Image.Image, box, points: np.ndarray, label: str = "", lim: float = 1.0,
                  color=(0, 0, 0)) -> None:
    """Points (N, 2) in [-lim, lim]^2 as single pixels in a square box, with a frame and a label on top."""
    left, top, right, bottom = box
    draw = ImageDraw.Draw(image)
    size = min(right - left, bottom - top)
    cols = np.round((points[:, 0] + lim) / (2 * lim) * (size - 1)).astype(int)
    rows = np.round((lim - points[:, 1]) / (2 * lim) * (size - 1)).astype(int)
    keep = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    pixels = np.asarray(image)[top:top + size, left:left + size].copy()
    pixels[rows[keep], cols[keep]] = color
    image.paste(Image.fromarray(pixels), (left, top))
    draw.rectangle([left, top, left + size - 1, top + size - 1], outline=(160, 160, 160))
    if label:
        title(image, (left + size // 2, top - 2), label, 11, anchor="md")


def image_panel(image: Image.Image, xy, images: np.ndarray, ncol: int, label: str = "") -> None:
    """uint8 images (N, H, W, 3) as a grid of ncol columns with 1-pixel gaps, top-left at xy, a label on top."""
    n, h, w, _ = images.shape
    left, top = xy
    for i in range(n):
        image.paste(Image.fromarray(images[i]), (left + (i % ncol) * (w + 1), top + (i // ncol) * (h + 1)))
    if label:
        title(image, (left + ncol * (w + 1) // 2, top - 2), label, 11, anchor="md")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick positions covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def _format(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.0e}"


def line_panel(image: Image.Image, box, series: list[dict], label: str = "", xlabel: str = "", ylabel: str = "",
               xlog: bool = False, hline: float | None = None, xticks: list[float] | None = None) -> None:
    """Lines with markers and error bars in a box. Each series: dict(name, x, y, err (or None), color).

    xlog plots log10(x); hline draws a dashed reference level (e.g. ratio 1, or the data-vs-data floor).
    """
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    plot = (left + 48, top + 18, right - 8, bottom - 34)  # room for tick labels, axis labels and the title
    tx = (lambda v: math.log10(v)) if xlog else (lambda v: v)
    xs = [tx(v) for s in series for v in s["x"]]
    ys = [v + sign * (e or 0) for s in series for v, e in zip(s["y"], s.get("err") or [0] * len(s["y"]))
          for sign in (-1, 1)] + ([hline] if hline is not None else [])
    ys = [v for v in ys if math.isfinite(v)] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    pad = 0.05 * (max(ys) - min(ys) or 1.0)
    y_lo, y_hi = min(ys) - pad, max(ys) + pad
    yticks = nice_ticks(y_lo, y_hi)
    y_lo, y_hi = min(y_lo, yticks[0]), max(y_hi, yticks[-1])
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    x_pad = 0.04 * (x_hi - x_lo)
    x_lo, x_hi = x_lo - x_pad, x_hi + x_pad

    def px(x, y):
        return (plot[0] + (tx(x) - x_lo) / (x_hi - x_lo) * (plot[2] - plot[0]),
                plot[3] - (y - y_lo) / (y_hi - y_lo) * (plot[3] - plot[1]))

    draw.rectangle(plot, outline="black")
    small = font(10)
    for v in yticks:
        y = px(10 ** x_lo if xlog else x_lo, v)[1]
        draw.line([plot[0] - 3, y, plot[0], y], fill="black")
        draw.line([plot[0] + 1, y, plot[2] - 1, y], fill=(235, 235, 235))
        draw.text((plot[0] - 5, y), _format(v), fill="black", font=small, anchor="rm")
    for v in xticks or sorted({x for s in series for x in s["x"]}):
        x = px(v, y_lo)[0]
        draw.line([x, plot[3], x, plot[3] + 3], fill="black")
        draw.text((x, plot[3] + 5), _format(v), fill="black", font=small, anchor="ma")
    if hline is not None:
        y = px(10 ** x_lo if xlog else x_lo, hline)[1]
        for x in range(int(plot[0]), int(plot[2]), 8):
            draw.line([x, y, min(x + 4, plot[2]), y], fill=(110, 110, 110))
    for s in series:
        points = [px(x, y) for x, y in zip(s["x"], s["y"])]
        draw.line(points, fill=s["color"], width=2)
        for (x, y), e, v in zip(points, s.get("err") or [None] * len(points), s["y"]):
            if e:
                y_top, y_bot = px(s["x"][0], v + e)[1], px(s["x"][0], v - e)[1]
                draw.line([x, y_top, x, y_bot], fill=s["color"])
                draw.line([x - 3, y_top, x + 3, y_top], fill=s["color"])
                draw.line([x - 3, y_bot, x + 3, y_bot], fill=s["color"])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=s["color"])
    draw.text(((plot[0] + plot[2]) / 2, bottom - 2), xlabel, fill="black", font=small, anchor="md")
    draw.text((left + 2, top + 4), ylabel, fill="black", font=small, anchor="la")
    if label:
        title(image, ((plot[0] + plot[2]) / 2, top + 2), label, 12, anchor="ma")


def legend(image: Image.Image, xy, entries: list[tuple[str, tuple]], width: int | None = None) -> int:
    """Rows of coloured markers with names, starting at xy and wrapping at width pixels (default: the image's right
    edge); returns the number of rows."""
    draw = ImageDraw.Draw(image)
    x, y = xy
    right = xy[0] + width if width else image.width - 10
    rows = 1
    for name, color in entries:
        step = 30 + int(draw.textlength(name, font=font(12)))
        if x > xy[0] and x + step - 8 > right:
            x, y, rows = xy[0], y + 18, rows + 1
        draw.line([x, y + 6, x + 18, y + 6], fill=color, width=2)
        draw.ellipse([x + 6, y + 3, x + 12, y + 9], fill=color)
        draw.text((x + 22, y), name, fill="black", font=font(12))
        x += step
    return rows


def _demo(path: str) -> None:
    rng = np.random.default_rng(0)
    image = new_figure(520, 260)
    scatter_panel(image, (10, 30, 230, 250), 0.3 * rng.standard_normal((3000, 2)), "N(0, 0.3^2 I)")
    nfe = [5, 10, 20, 50]
    series = [dict(name=f"method {i}", x=nfe, y=[1 / n + 0.02 * i for n in nfe], err=[0.01] * 4, color=COLORS[i])
              for i in range(2)]
    line_panel(image, (250, 20, 510, 230), series, "error vs NFE", "NFE", "error", xlog=True, hline=0.02)
    legend(image, (260, 236), [(s["name"], s["color"]) for s in series])
    image.save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures_demo.png", help="PNG to write")
    _demo(parser.parse_args().out)
