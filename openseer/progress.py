"""Progress for every long step: a live bar on a terminal, one plain line every few seconds in a file.

Pretraining, feature extraction, fine-tunes, embedding, sharding and curation all report through
:func:`progress`, so a log piped to a file reads as text (what, how far, rate, ETA) instead of
thousands of carriage-return frames, and a terminal still gets a tqdm bar. Time spent compiling is
announced and left out of the rate and the ETA (:meth:`Progress.compiling`).

``OPENSEER_PROGRESS`` forces a style (``bar``, ``lines`` or ``off``); ``OPENSEER_PROGRESS_EVERY`` sets
the seconds between plain lines (default 10).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

STYLES = ("bar", "lines", "off")


def format_seconds(s: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``: short enough for one log line."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _number(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def choose_style(stream: IO[str], enabled: bool = True) -> str:
    """The style a stream gets: ``OPENSEER_PROGRESS`` if set, else a bar on a terminal, lines elsewhere."""
    if not enabled:
        return "off"
    forced = os.environ.get("OPENSEER_PROGRESS", "").strip().lower()
    if forced:
        if forced not in STYLES:
            raise ValueError(f"OPENSEER_PROGRESS={forced!r}: expected one of {', '.join(STYLES)}")
        return forced
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


class Progress:
    """Counts work towards ``total`` (None: unknown) and reports it in the chosen style.

    ``update(n)`` adds, ``set(n)`` moves to an absolute position (a time budget counts seconds),
    ``postfix(**values)`` shows the latest numbers (loss, images/s), ``write(text)`` prints a message
    without breaking the bar, ``close()`` prints one final line with the total time.
    """

    def __init__(self, desc: str, total: float | None = None, unit: str = "it", initial: float = 0,
                 enabled: bool = True, stream: IO[str] | None = None, every_s: float | None = None,
                 leave: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.style = choose_style(self.stream, enabled)
        self.every_s = every_s if every_s is not None else float(os.environ.get("OPENSEER_PROGRESS_EVERY", "10"))
        self.n = float(initial)
        self.values: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._base_t, self._base_n = self._start, self.n  # the rate counts from here (moved past compiles)
        self._excluded_s = 0.0
        self._last_line = self._start
        self._last_values = 0.0
        self._closed = False
        self._bar = None
        if self.style == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, leave=leave, smoothing=0.1)

    # -- counting ---------------------------------------------------------------------------------
    def update(self, n: float = 1) -> None:
        self.set(self.n + n)

    def set(self, n: float) -> None:
        if self.total is not None:
            n = min(n, self.total)
        delta, self.n = n - self.n, n
        if self._bar is not None:
            if delta:
                self._bar.update(delta)
        elif self.style == "lines" and time.perf_counter() - self._last_line >= self.every_s:
            self._line()

    def due(self) -> bool:
        """Whether the next ``update``/``set`` will show the values (a plain line is due, or the bar has
        not had new values for a second): read costly values (a loss on the GPU) only then."""
        if self.style == "lines":
            return time.perf_counter() - self._last_line >= self.every_s
        if self._bar is not None:
            return time.perf_counter() - self._last_values >= 1.0
        return False

    def postfix(self, **values: Any) -> None:
        self._last_values = time.perf_counter()
        self.values.update(values)
        if self._bar is not None:
            self._bar.set_postfix({k: _number(v) for k, v in self.values.items()}, refresh=False)

    def rate(self) -> float | None:
        """Units per second since the start or the last compile, compile time excluded."""
        dt = time.perf_counter() - self._base_t
        dn = self.n - self._base_n
        return dn / dt if dt > 0 and dn > 0 else None

    def eta_s(self) -> float | None:
        r = self.rate()
        if self.total is None or r is None:
            return None
        return max(0.0, (self.total - self.n) / r)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start

    # -- messages ---------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        if self.style == "off":
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def status(self) -> str:
        """One plain line: what, how far, rate, ETA and the latest values."""
        n = _number(round(self.n, 1) if isinstance(self.n, float) and not self.n.is_integer() else int(self.n))
        how_far = f"{n}/{_number(self.total)} {self.unit}" if self.total is not None else f"{n} {self.unit}"
        if self.total:
            how_far += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc}: {how_far}"]
        r = self.rate()
        if r is not None and self.unit != "s":  # a bar that counts seconds (a time budget) runs at 1 s/s
            parts.append(f"{r:.3g} {self.unit}/s" if r >= 1 else f"{format_seconds(1 / r)}/{self.unit}")
        eta = self.eta_s()
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        if self.values:
            parts.append(" ".join(f"{k}={_number(v)}" for k, v in self.values.items()))
        return ", ".join(parts)

    def _line(self) -> None:
        self._last_line = time.perf_counter()
        print(self.status(), file=self.stream, flush=True)

    @contextmanager
    def compiling(self, what: str = "compiling the model (torch.compile)",
                  left_out: str = "the rate and ETA") -> Iterator[None]:
        """Say that a compile is under way; its time (and the work counted inside) leaves the rate."""
        self.write(f"{self.desc}: {what}; the first step waits for it and is left out of {left_out}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self._excluded_s += dt
            self._base_t, self._base_n = time.perf_counter(), self.n
            if self._bar is not None:
                # move tqdm's clocks past the compile so its rate and ETA ignore it
                self._bar.start_t += dt
                self._bar.last_print_t = time.perf_counter()
                self._bar.last_print_n = self._bar.n
            self.write(f"{self.desc}: compiled in {format_seconds(dt)}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.style == "lines":
            took = format_seconds(self.elapsed_s())
            extra = f" (of which compiling {format_seconds(self._excluded_s)})" if self._excluded_s else ""
            print(f"{self.status()}; done in {took}{extra}", file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(desc: str, total: float | None = None, unit: str = "it", **kw: Any) -> Progress:
    """The one way a long step reports: ``with progress("embed", total=n, unit="img") as p: p.update()``."""
    return Progress(desc, total=total, unit=unit, **kw)
