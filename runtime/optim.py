"""SGD with momentum, as torch.optim.SGD(lr, momentum, dampening=0,
nesterov=False), with weight decay on conv and connected weights only."""
import numpy as np

from tilec_runtime.program import decays


class SGD:
    def __init__(self, lr, momentum=0.0, decay=0.0):
        self.lr, self.momentum, self.decay = lr, momentum, decay
        self.velocity = {}

    def step(self, params, grads):
        """Update ``params`` in place from ``grads`` (same keys, same shapes)."""
        for key, g in grads.items():
            p = params[key]
            d = g + p.dtype.type(self.decay) * p if self.decay and decays(key) else g
            if self.momentum:
                v = self.velocity.get(key)
                if v is None:
                    # torch starts the buffer at the first gradient, which is
                    # momentum * 0 + d: the same number.
                    v = self.velocity[key] = np.zeros_like(p)
                v *= p.dtype.type(self.momentum)
                v += d
                d = v
            p -= p.dtype.type(self.lr) * d

    def state(self):
        return {f"momentum.{k}": v for k, v in self.velocity.items()}

    def load_state(self, state):
        self.velocity = {k[len("momentum."):]: v.copy() for k, v in state.items() if k.startswith("momentum.")}
