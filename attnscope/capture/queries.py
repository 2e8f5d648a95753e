"""Which query positions statistics are averaged over."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnscope.errors import AttnscopeError

DEFAULT_MIN_POSITION = 16


@dataclass(frozen=True)
class QuerySelection:
    """A rule that picks query positions (0-based, within a sequence of real tokens).

    mode "all":      every position from `min_position` on (default 16: the first tokens attend
                     to few keys and would dominate averages with trivially high sink mass);
    mode "last":     the last `n` positions;
    mode "strided":  `n` positions evenly spaced over [min_position, length);
    mode "explicit": the given `positions`.
    """

    mode: str = "all"
    n: int | None = None
    positions: tuple[int, ...] | None = None
    min_position: int = DEFAULT_MIN_POSITION

    @classmethod
    def parse(cls, spec: "str | QuerySelection | list[int] | tuple[int, ...]", *,
              min_position: int = DEFAULT_MIN_POSITION) -> "QuerySelection":
        """Parse `all`, `last:N`, `strided:N`, `i,j,k`, or a list of positions."""
        if isinstance(spec, QuerySelection):
            return spec
        if isinstance(spec, (list, tuple, np.ndarray)):
            return cls("explicit", positions=tuple(int(p) for p in spec), min_position=0)
        text = str(spec).strip()
        if text == "all":
            return cls("all", min_position=min_position)
        for mode in ("last", "strided"):
            if text.startswith(mode + ":"):
                try:
                    n = int(text.split(":", 1)[1])
                except ValueError:
                    n = 0
                if n <= 0:
                    raise AttnscopeError(f"bad query selection {text!r}: {mode}:N needs N >= 1")
                return cls(mode, n=n, min_position=min_position)
        try:
            return cls("explicit", positions=tuple(int(p) for p in text.split(",")), min_position=0)
        except ValueError:
            raise AttnscopeError(
                f"bad query selection {text!r}: use all, last:N, strided:N or explicit "
                "positions like 100,200,300") from None

    def resolve(self, length: int) -> np.ndarray:
        """Query positions for a sequence of `length` real tokens."""
        if self.mode == "explicit":
            pos = np.asarray(self.positions, dtype=np.int64)
            bad = pos[(pos < 0) | (pos >= length)]
            if bad.size:
                raise AttnscopeError(
                    f"query positions {bad.tolist()} are outside the {length}-token input")
            return np.unique(pos)
        if self.mode == "last":
            return np.arange(max(0, length - self.n), length)
        lo = min(self.min_position, length - 1)
        if self.min_position >= length:
            raise AttnscopeError(
                f"the input has {length} tokens but queries start at position {self.min_position}; "
                "use a longer text or a lower min_query_position")
        if self.mode == "all":
            return np.arange(lo, length)
        return np.unique(np.linspace(lo, length - 1, num=min(self.n, length - lo)).round().astype(np.int64))

    def describe(self) -> str:
        if self.mode == "all":
            return f"all>={self.min_position}"
        if self.mode == "explicit":
            return "explicit"
        return f"{self.mode}:{self.n}" + (f">={self.min_position}" if self.mode == "strided" else "")


def query_bins(queries: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-width bins of query position over the selected queries.

    The span [first query, last query + 1) is cut at integer edges lo + floor(b * width / n)
    into `n_bins` bins of equal width (to within one position). Returns (bin index of each query,
    bin start positions [n_bins]). A bin may hold no selected query (strided or explicit
    selections); its statistics are then NaN.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise AttnscopeError(f"query_bins must be a positive integer, not {n_bins!r}")
    lo, hi = int(queries[0]), int(queries[-1]) + 1
    if n_bins > hi - lo:
        raise AttnscopeError(
            f"query_bins={n_bins} is more than the {hi - lo} query positions [{lo}, {hi}); "
            "use fewer bins or a longer text")
    edges = lo + (np.arange(n_bins + 1) * (hi - lo)) // n_bins
    return np.searchsorted(edges, queries, side="right") - 1, edges[:-1]
