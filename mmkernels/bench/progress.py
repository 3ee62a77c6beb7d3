"""Progress of the main job: a tqdm bar on a terminal, else one counter line per step.

Both show the step (case, provider, mode) and the estimated time left. The plain
counter's estimate is the mean time per finished step times the steps left. Both
write to stderr, so that stdout (the tables) can be redirected to a file.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    m, s = divmod(seconds, 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class PlainCounter:
    """``[i/n] step  elapsed 12s, ETA 1m05s`` lines, for logs and pipes."""

    def __init__(self, total: int, stream: TextIO):
        self.total, self.stream = total, stream
        self.done = 0
        self.start = time.perf_counter()

    def eta_s(self) -> float | None:
        if self.done == 0:
            return None
        elapsed = time.perf_counter() - self.start
        return elapsed / self.done * (self.total - self.done)

    def step(self, label: str) -> None:
        """Announce the step that starts now (the previous one has finished)."""
        eta = self.eta_s()
        elapsed = time.perf_counter() - self.start
        print(f"[{self.done + 1}/{self.total}] {label}  elapsed {_fmt_s(elapsed)}, ETA "
              f"{'?' if eta is None else _fmt_s(eta)}", file=self.stream, flush=True)

    def advance(self) -> None:
        self.done += 1

    def write(self, text: str) -> None:
        print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        pass


class TqdmBar:
    """A tqdm bar whose description is the current step; tables are written above it."""

    def __init__(self, total: int, stream: TextIO):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, file=stream, dynamic_ncols=True, unit="step",
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    def step(self, label: str) -> None:
        self.bar.set_description_str(label, refresh=True)

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, text: str) -> None:
        self._tqdm.write(text, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


class Silent:
    """No progress output (``--no-progress``)."""

    def __init__(self, total: int = 0, stream: TextIO | None = None):
        pass

    def step(self, label: str) -> None:
        pass

    def advance(self) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


def make_progress(total: int, stream: TextIO | None = None, enabled: bool = True):
    """A tqdm bar when ``stream`` (default stderr) is a terminal and tqdm is installed,
    else a :class:`PlainCounter`; :class:`Silent` when not ``enabled``."""
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return Silent()
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        try:
            return TqdmBar(total, stream)
        except ImportError:
            pass
    return PlainCounter(total, stream)
