"""``tilec_runtime.ops``-compatible functions backed by generated kernels.

The reference executor and the tail groups take an implementation of the
functions of ``ops`` (``impl``); ``GeneratedOps(module)`` is one whose spatial,
batch-norm and activation functions run the generated kernels, with the
same signatures and results (outputs are new arrays, as in ``ops``), and
whose other functions are those of ``ops``. This is the drop-in path: it
does not fuse layers or plan buffers (``tilec_runtime.fused`` does).
"""
import numpy as np

from tilec_runtime import ops
from tilec_runtime.kernel_set import Kernels, band_rows


def _lastdim(a):
    """``a`` itself when its rows are contiguous (what the kernels need), else a copy."""
    return a if a.strides[-1] == a.itemsize else np.ascontiguousarray(a)


def _half_open(owned, h, w):
    if owned is None:
        return None
    rs, cs = owned
    r0, r1, _ = rs.indices(h)
    c0, c1, _ = cs.indices(w)
    return (r0, r1, c0, c1)


class GeneratedOps:
    """An ``ops`` implementation for the executors; anything not generated is ``ops``'s."""

    def __init__(self, module):
        self.module = module
        self._k = {name: Kernels(module, name) for name in module.DTYPES}

    def __getattr__(self, name):
        return getattr(ops, name)

    def _kern(self, a):
        try:
            return self._k[a.dtype.name]
        except KeyError:
            raise TypeError(f"no generated kernels for {a.dtype} (module has {sorted(self._k)})") from None

    # -- convolution ---------------------------------------------------------

    def conv2d_forward(self, x, w, stride, pads):
        k = self._kern(x)
        x, w = _lastdim(x), np.ascontiguousarray(w, dtype=x.dtype)
        f, c, ks, _ = w.shape
        ho = ops.out_size(x.shape[2], ks, stride, pads[0], pads[1])
        wo = ops.out_size(x.shape[3], ks, stride, pads[2], pads[3])
        band = band_rows(c, ks, ho, wo, x.shape[0])
        z = np.empty((x.shape[0], f, ho, wo), x.dtype)
        ws = np.empty(self.module.workspace_size(c, ks, band, ho, wo, False, 0, f), x.dtype)
        k.conv_forward(x, w, stride, tuple(pads), z, ws, band)
        return z

    def conv2d_backward(self, x, w, stride, pads, dy, dw=None, input_grad=True, weight_grad=True):
        """(dx, dw); with ``dw`` (an accumulator), the kernel adds the weight
        gradient into it: no weight-sized temporary (YOLOv2's 3x3x1024x1024
        layers: 38 MB each). Without ``input_grad`` or ``weight_grad``, that
        one is not computed (None)."""
        k = self._kern(x)
        x, w = _lastdim(x), np.ascontiguousarray(w, dtype=x.dtype)
        dy = np.ascontiguousarray(dy, dtype=x.dtype)
        f, c, ks, _ = w.shape
        band = band_rows(c, ks, dy.shape[2], dy.shape[3], x.shape[0])
        dx = np.zeros(x.shape, x.dtype) if input_grad else None
        out = (np.empty(w.shape, x.dtype) if dw is None else dw) if weight_grad else None
        ws = np.empty(self.module.workspace_size(c, ks, band, dy.shape[2], dy.shape[3], True, 0, f), x.dtype)
        k.conv_backward(x, w, stride, tuple(pads), dy, ws, band, out, dx, accumulate=dw is not None)
        return dx, out

    # -- max-pooling -----------------------------------------------------------

    def maxpool_forward(self, x, size, stride, pads):
        k = self._kern(x)
        x = _lastdim(x)
        ho = ops.out_size(x.shape[2], size, stride, pads[0], pads[1])
        wo = ops.out_size(x.shape[3], size, stride, pads[2], pads[3])
        y = np.empty((x.shape[0], x.shape[1], ho, wo), x.dtype)
        arg = np.empty(y.shape, np.int16)
        k.pool_forward(x, size, stride, tuple(pads), y, arg)
        return y, arg

    def maxpool_backward(self, x_shape, size, stride, pads, arg, dy):
        k = self._kern(dy)
        dx = np.zeros(x_shape, dy.dtype)
        k.pool_backward(np.ascontiguousarray(dy), np.ascontiguousarray(arg, dtype=np.int16), size, stride,
                        tuple(pads), dx)
        return dx

    # -- activation ------------------------------------------------------------

    def act_forward(self, z, kind):
        if kind == "linear":
            return z
        k = self._kern(z)
        y = np.empty(z.shape, z.dtype)
        k.bn_act(_lastdim(z), y, k.pre["none"], k.act[kind])
        return y

    def act_backward(self, y, kind, dy, inplace=False):
        if kind == "linear":
            return dy
        k = self._kern(dy)
        da = dy if inplace and dy.flags.c_contiguous else np.array(dy, order="C")
        k.act_grad(da, np.ascontiguousarray(y), k.pre["none"], k.act[kind], np.zeros(dy.shape[1]))
        return da

    # -- batch norm ------------------------------------------------------------

    def bn_stats(self, z):
        c = z.shape[1]
        if z.size == 0:
            return 0, np.zeros(c), np.zeros(c)
        n, mean, m2 = np.zeros(1), np.zeros(c), np.zeros(c)
        self._kern(z).bn_stats(np.ascontiguousarray(z), n, mean, m2)
        return int(n[0]), mean, m2

    def bn_normalize(self, z, mean, var, gamma, beta):
        k, dt = self._kern(z), z.dtype
        z = _lastdim(z)
        c = z.shape[1]
        inv_std = (1.0 / np.sqrt(var + ops.BN_EPS)).astype(dt)
        mean_t = mean.astype(dt)
        xhat, y = np.empty(z.shape, dt), np.empty(z.shape, dt)
        # xhat is the normalisation with gamma 1 and beta 0 (exact: x*1 + 0 == x)
        k.bn_act(z, xhat, k.pre["bn"], k.act["linear"], mean_t, inv_std, np.ones(c, dt), np.zeros(c, dt))
        k.bn_act(z, y, k.pre["bn"], k.act["linear"], mean_t, inv_std, np.ascontiguousarray(gamma, dt),
                 np.ascontiguousarray(beta, dt))
        return y, xhat, inv_std

    def bn_grad_sums(self, dy, xhat):
        k, c = self._kern(dy), dy.shape[1]
        s1, s2 = np.zeros(c), np.zeros(c)
        dt = dy.dtype
        # a linear activation leaves dy as it is; mean 0 / inv 1 make xhat its own normalisation
        k.act_grad(np.array(dy, order="C"), np.ascontiguousarray(xhat), k.pre["bn"], k.act["linear"], s1, s2,
                   np.zeros(c, dt), np.ones(c, dt), np.ones(c, dt), np.zeros(c, dt))
        return s1, s2

    def bn_backward(self, dy, xhat, gamma, inv_std, mean_dy, mean_dy_xhat, owned=None, inplace=False):
        k, dt = self._kern(dy), dy.dtype
        c = dy.shape[1]
        dz = dy if inplace and dy.flags.c_contiguous else np.array(dy, order="C")
        # the kernel scales by gamma * inv; with inv 1 pass gamma * inv_std as gamma,
        # computed as ops does, so that the scale rounds the same
        k.bn_backward(dz, np.ascontiguousarray(xhat), np.zeros(c, dt), np.ones(c, dt), (gamma * inv_std).astype(dt),
                      mean_dy.astype(dt), mean_dy_xhat.astype(dt), _half_open(owned, dy.shape[2], dy.shape[3]))
        return dz
