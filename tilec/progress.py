"""Progress of a training run: a tqdm bar on a terminal (loss, images/s,
ETA) where tqdm is installed, plain lines otherwise (logs, pipes, tests),
one per step."""
import sys


class StepProgress:
    """Call with (step, loss, seconds) after each step; ``close()`` at the end."""

    def __init__(self, total, batch, out=None, first=0, every=1):
        self.total, self.batch, self.first, self.every = total, batch, first, every
        self.out = out or sys.stdout
        self.recent = []
        self.bar = None
        tqdm = None
        if hasattr(self.out, "isatty") and self.out.isatty():
            try:
                from tqdm import tqdm  # optional: not a dependency of tilec
            except ImportError:
                pass
        if tqdm is not None:
            self.bar = tqdm(total=total, initial=first, file=self.out, unit="step", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")

    def __call__(self, step, loss, seconds):
        done = step + 1
        self.recent = (self.recent + [seconds])[-20:]
        eta = sum(self.recent) / len(self.recent) * (self.total - done)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {self.batch / max(seconds, 1e-12):.1f} images/s",
                                     refresh=False)
            self.bar.update(1)
        elif (done - self.first) % self.every == 0 or done == self.total or done == self.first + 1:
            self.out.write(f"step {done:>4}/{self.total}  loss {loss:.6f}  {seconds:.3f} s  "
                           f"{self.batch / max(seconds, 1e-12):.1f} images/s  ETA {clock(eta)}\n")
            self.out.flush()

    def note(self, text):
        """A line that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
