"""A training curve as a PNG, drawn with Pillow (no plotting library needed).

The raw loss of every step in a light colour, its moving average over
``window`` steps on top; a logarithmic y axis when the loss spans more than
a factor of 8. Optional markers (e.g. a validation mAP) go on a second,
right-hand axis in [0, 1].
"""
import math

import numpy as np

SIZE = (720, 400)
MARGIN = (70, 40, 60, 50)  # left, top, right, bottom


def _ticks(lo, hi, n=5):
    """About ``n`` round numbers spanning [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * step:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo, hi):
    """log10 of the numbers 1, 2, 5 x 10^k within [10^lo, 10^hi]."""
    out = []
    for k in range(math.floor(lo), math.ceil(hi) + 1):
        out += [math.log10(m * 10 ** k) for m in (1, 2, 5) if lo <= math.log10(m * 10 ** k) <= hi]
    return out


def moving_average(values, window):
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return values
    kernel = min(window, len(values))
    csum = np.cumsum(np.concatenate([[0.0], values]))
    out = np.empty(len(values))
    for i in range(len(values)):
        lo = max(0, i + 1 - kernel)
        out[i] = (csum[i + 1] - csum[lo]) / (i + 1 - lo)
    return out


def loss_curve_png(losses, path, title="training loss", first_step=0, window=20, markers=None,
                   marker_label="val mAP@0.5"):
    """Draw ``losses`` (one per step from ``first_step``) to ``path``; ``markers``
    is a list of (step, value in [0, 1]) drawn as points on the right axis."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = MARGIN
    x0, y0, x1, y1 = left, top, SIZE[0] - right, SIZE[1] - bottom
    losses = np.asarray(losses, np.float64)
    finite = losses[np.isfinite(losses) & (losses > 0)]
    draw.text((x0, 12), title, fill="black")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    if len(finite) == 0:
        draw.text((x0 + 10, y0 + 10), "no finite loss to draw", fill="black")
        img.save(path)
        return
    log = finite.max() / finite.min() > 8
    f = np.log10 if log else (lambda v: v)
    lo, hi = float(f(finite.min())), float(f(finite.max()))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    steps = np.arange(first_step, first_step + len(losses))
    smin, smax = steps[0], max(steps[-1], steps[0] + 1)

    def px(step, value):
        return (x0 + (step - smin) / (smax - smin) * (x1 - x0),
                y1 - (f(value) - lo) / (hi - lo) * (y1 - y0))

    for t in (_log_ticks(lo, hi) if log else _ticks(lo, hi)):
        y = px(smin, 10 ** t if log else t)[1]
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.line((x0 + 1, y, x1 - 1, y), fill=(235, 235, 235))
        label = f"{10 ** t:.3g}" if log else f"{t:g}"
        draw.text((x0 - 8 - 6 * len(label), y - 6), label, fill="black")
    for t in _ticks(smin, smax):
        x = px(t, finite.min())[0]
        draw.line((x, y1, x, y1 + 4), fill="black")
        draw.text((x - 3 * len(f"{t:g}"), y1 + 8), f"{t:g}", fill="black")
    draw.text(((x0 + x1) / 2 - 12, y1 + 26), "step", fill="black")
    ok = np.isfinite(losses) & (losses > 0)
    raw = [px(s, v) for s, v in zip(steps[ok], losses[ok])]
    if len(raw) > 1:
        draw.line(raw, fill=(160, 190, 230), width=1)
    smooth = [px(s, v) for s, v in zip(steps[ok], moving_average(losses[ok], window))]
    if len(smooth) > 1:
        draw.line(smooth, fill=(20, 60, 160), width=2)
    draw.text((x1 - 250, y0 + 6), f"loss (moving average of {window})", fill=(20, 60, 160))
    if markers:
        for v in (0.0, 0.5, 1.0):
            y = y1 - v * (y1 - y0)
            draw.line((x1, y, x1 + 4, y), fill=(200, 60, 40))
            draw.text((x1 + 8, y - 6), f"{v:g}", fill=(200, 60, 40))
        for step, value in markers:
            x, y = px(step, finite.min())[0], y1 - float(value) * (y1 - y0)
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(200, 60, 40))
        draw.text((x1 - 250, y0 + 20), marker_label + " (right axis)", fill=(200, 60, 40))
    img.save(path)
