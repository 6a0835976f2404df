"""The functions of a generated kernel module for one dtype, and the band
rule that sizes a convolution's im2col workspace (shared by the planner's
lowering and the runtime's drop-in kernels)."""
import numpy as np

_SUFFIX = {"float32": "f32", "float64": "f64"}
FUNCTIONS = ("conv_forward", "conv_backward", "bn_act", "act_grad", "pool_forward", "pool_backward", "bn_stats",
             "bn_constants", "bn_grad_constants", "bn_backward", "add_sums", "sse", "sgd", "scale", "zero_rows",
             "copy_rows")


# im2col band of a conv: whole output rows adding up to about BAND_POSITIONS
# columns of the GEMM (fewer and BLAS runs below speed on small matrices),
# and at most BAND_ELEMENTS elements (C*k*k x positions) so that a band stays
# in cache between im2col and the GEMM. Measured on x86 (a sweep over
# YOLOv2-tiny's layers at 416x416): 1024 positions is within 5% of the best
# band for every layer. A map smaller than half a band takes whole images
# instead, several per GEMM (a band of more rows than the map): one image of
# tiny416's 3x3 layers at 96x96, batch 16, is a GEMM 9 columns wide, which
# packs the weights afresh for every image: layer 10's forward + backward ran
# 2.7-3.2x slower than with 16 images per GEMM (benchmarks/conv_images.py).
# Not a 1x1 conv: its GEMM reads the input planes themselves, and grouping
# would add the copy im2col makes (tiny416's last layer, 512 -> 8 on 3x3:
# 2.6x slower grouped). The planner's lowering uses the same rule.
BAND_POSITIONS = 1024
BAND_ELEMENTS = 1 << 20


def band_rows(c, k, ho, wo, batch=1):
    """Output rows per im2col band of a conv with c input channels, k x k, on
    ``batch`` images of ho x wo: more than ho when whole images share a GEMM
    (a multiple of ho: band // ho images per GEMM)."""
    rows = min(BAND_POSITIONS // wo, BAND_ELEMENTS // (c * k * k * wo))
    images = min(batch, rows // ho) if k > 1 else 1
    if images >= 2:
        return images * ho
    return max(1, min(ho, rows))


# Filters a thread takes at least where a conv's threads split its filters
# (``filter_split``): fewer and each thread's GEMM is too short to run at
# speed. The generated module is rendered with this value.
FILTER_SPLIT_MIN = 16


def filter_split(rows, wo, band, filters, threads):
    """Whether a conv's ``threads`` split its filters (forward, weight
    gradient) and input channels (input gradient) rather than its output
    rows: a band of its ``rows`` x ``wo`` map has fewer positions than it
    has filters (the generated kernels' ``filter_split``, which says why;
    the planner's workspace sizes follow it: one band, no private weight
    gradients)."""
    return threads > 1 and filters >= min(band, rows) * wo and filters >= FILTER_SPLIT_MIN * threads


class Kernels:
    """The functions of a generated module for one dtype, by short name."""

    def __init__(self, module, dtype):
        name = np.dtype(dtype).name
        if name not in _SUFFIX or name not in module.DTYPES:
            raise ValueError(f"kernel module {module.__name__} has no {name} kernels (it has {module.DTYPES})")
        for fn in FUNCTIONS:
            setattr(self, fn, getattr(module, f"{fn}_{_SUFFIX[name]}"))
        self.pre, self.act = module.PRE_CODES, module.ACT_CODES
        self.module = module

    def set_threads(self, n):
        """Threads of every kernel of the module (process-wide: one module per dtype)."""
        self.module.set_threads(n)
