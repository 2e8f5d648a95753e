"""Checks on what a user passes in, shared by the Python API and the CLI (docs/refusals.md).

Each check raises an AttnscopeError whose message is one line: what is wrong and what to do.
They depend on values only (no model, no store), so the CLI runs them before any model loads and
the API runs the same ones before any compute. It imports nothing of attnscope but errors.py, so
every layer may use it.
"""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from attnscope.errors import AttnscopeError, MemoryGuardError, ProbeBuildError, SpecError, TextSourceError

__all__ = ["one_line", "check_device", "check_count", "read_text_file", "text_prefixes", "regular_file",
           "has_utf8_bom", "check_metrics", "check_sink_tokens",
           "check_edit_layers", "check_seeds", "is_out_of_memory", "out_of_memory_error"]


def one_line(message: str) -> str:
    """A message as one line (newlines and runs of spaces folded)."""
    return " ".join(str(message).split())


def check_device(device, *, here: bool = True) -> str:
    """`device` names a device this torch can use (cpu, cuda[:N], mps, ...); returns it as given.
    With `here=False` (Ray workers on other machines) it only has to be a device torch knows."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device))
        except (RuntimeError, TypeError, ValueError):
            raise AttnscopeError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "meta":
        raise AttnscopeError("device 'meta' holds no data: use cpu, cuda, cuda:N or mps")
    if dev.type == "cpu" or not here:
        return str(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise AttnscopeError(f"device {str(device)!r}: this torch {torch.__version__} has no CUDA device "
                                 f"({build}); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise AttnscopeError(f"device {str(device)!r}: there are {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return str(device)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise AttnscopeError(f"device {str(device)!r}: Apple's MPS is not available in this torch "
                                 f"{torch.__version__}; use --device cpu")
        return str(device)
    available = getattr(getattr(torch, dev.type, None), "is_available", None)
    if callable(available) and available():
        return str(device)
    raise AttnscopeError(f"device {str(device)!r} cannot run models in this torch {torch.__version__}; "
                         "use cpu, cuda, cuda:N or mps")


def check_count(name: str, value, *, minimum: int = 1, none_ok: bool = True):
    """An integer option that must be >= minimum (None allowed where it means 'no limit')."""
    if value is None and none_ok:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AttnscopeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def regular_file(path, what: str = "text file") -> Path:
    """`path` as a Path: it must exist and be a regular file. A device (/dev/zero), a FIFO or a
    socket is refused before any byte is read: it may never end."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TextSourceError(f"no such {what}: {p}")
    if p.is_dir():
        raise TextSourceError(f"{what} {p} is a folder; pass a UTF-8 text file")
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise TextSourceError(f"cannot read {what} {p} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise TextSourceError(f"{what} {p} is not a regular file (a device, pipe or socket, which may never "
                              "end); save the text to a file and pass that")
    return p


def has_utf8_bom(path) -> bool:
    """Whether a file starts with the UTF-8 byte order mark (EF BB BF), which the readers strip."""
    with open(path, "rb") as fh:
        return fh.read(3) == codecs.BOM_UTF8


def text_prefixes(path, what: str = "text file", *, first: int = 1 << 16) -> Iterator[tuple[str, bool]]:
    """Ever longer prefixes of a UTF-8 text file: yields (text so far, complete) after reading
    `first` bytes, then twice as many each time, the last one the whole file (complete=True).
    A caller that needs only the start (the first N tokens) stops early: a 40 MB file with
    --max-tokens 64 is read 64 KB at a time, not whole. Each part read is checked as
    `read_text_file` checks the whole file (binary, not UTF-8); a UTF-8 byte order mark is
    stripped."""
    p = regular_file(path, what)
    decoder = codecs.getincrementaldecoder("utf-8")()
    so_far = ""
    consumed = 0  # bytes handed to the decoder so far
    size = first
    try:
        fh = open(p, "rb")
    except OSError as exc:
        raise TextSourceError(f"cannot read {what} {p} ({exc.strerror or exc})") from None
    with fh:
        while True:
            try:
                chunk = fh.read(size - consumed)
            except OSError as exc:
                raise TextSourceError(f"cannot read {what} {p} ({exc.strerror or exc})") from None
            complete = len(chunk) < size - consumed  # a regular file reads short only at its end
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise TextSourceError(f"{what} {p} looks binary (a NUL byte at offset {consumed + nul}); "
                                      "pass UTF-8 text")
            pending = len(decoder.getstate()[0])
            try:
                so_far += decoder.decode(chunk, final=complete)
            except UnicodeDecodeError as exc:
                at = consumed - pending + exc.start
                raise TextSourceError(f"{what} {p} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                                      f"{at}); convert it first, e.g. `iconv -f latin1 -t utf-8`") from None
            consumed += len(chunk)
            text = so_far[1:] if so_far.startswith("\ufeff") else so_far
            if complete:
                if not text.strip():
                    raise TextSourceError(f"{what} {p} is empty" + (" (only whitespace)" if text else ""))
                yield text, True
                return
            if text.strip():
                yield text, False
            size *= 2


def read_text_file(path, what: str = "text file") -> str:
    """The whole file as text: it must exist, be a regular file, be UTF-8 (no NUL bytes) and hold
    text. A UTF-8 byte order mark is stripped (`has_utf8_bom` says whether there was one)."""
    for text, complete in text_prefixes(path, what):
        if complete:
            return text
    raise AssertionError("text_prefixes ends with the whole file")


def check_metrics(names: Iterable[str], known: Sequence[str]) -> tuple[str, ...]:
    """A non-empty list of known metric names."""
    names = tuple(names)
    if not names:
        raise AttnscopeError(f"no metrics requested; choose from {', '.join(known)}")
    unknown = [m for m in names if m not in known]
    if unknown:
        raise AttnscopeError(f"unknown metric(s) {unknown}; known: {', '.join(known)}")
    return names


def check_sink_tokens(sink_tokens, n_tokens: int, *, flag: str | None = None) -> None:
    """The sink must be a proper prefix of the input, or every key is a sink and sink_mass is 1.
    `flag`: the CLI option that set it (the message then names it, not the keyword)."""
    check_count(flag or "sink_tokens", sink_tokens)
    if n_tokens < 2:
        raise AttnscopeError(f"the input has {n_tokens} token: attention on a sink needs at least one token after "
                             "it; use a longer input")
    if sink_tokens >= n_tokens:
        given, fewer = (f"{flag} {sink_tokens}", f"{flag} {n_tokens - 1}") if flag else \
            (f"sink_tokens={sink_tokens}", f"sink_tokens={n_tokens - 1}")
        raise AttnscopeError(f"{given} covers the whole {n_tokens}-token input (sink_mass would be 1 by "
                             f"construction); use {fewer} or fewer (default 4), or a longer input")


def check_edit_layers(layers: Sequence[int] | None, n_layers: int, what: str = "the attention edit") -> None:
    """Layers an edit names must exist in the model (layers are numbered from 0)."""
    if not layers:
        return
    beyond = [i for i in layers if i >= n_layers]
    if beyond:
        raise SpecError(f"{what} names layer(s) {_ranges(beyond)} but the model has {n_layers} layers "
                        f"(0-{n_layers - 1})")


def _ranges(values: Sequence[int]) -> str:
    values = sorted(values)
    return f"{values[0]}-{values[-1]}" if len(values) > 2 else ",".join(map(str, values))


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds of a probe grid: integers >= 0, no repeats (a repeat would measure the same prompt twice)."""
    seeds = list(seeds)
    if not seeds:
        raise ProbeBuildError("no seeds given")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ProbeBuildError(f"seeds must be integers >= 0, got {bad}")
    if len(set(seeds)) != len(seeds):
        raise ProbeBuildError(f"seeds {seeds} repeat a value")
    return seeds


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, MPS) or the CPU allocator's failure."""
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower()
                                              or "can't allocate memory" in str(exc).lower())


def out_of_memory_error(n_tokens: int, device) -> MemoryGuardError:
    """The one-line error for a forward pass that ran out of memory."""
    return MemoryGuardError(f"out of memory on {device} at {n_tokens} tokens: lower the length (--max-tokens, "
                            "--lengths or the probe's grid), use --dtype bfloat16, or fewer queries/layers")


def env_seconds(name: str, default: float) -> float:
    """A timeout from the environment (seconds > 0), else the default."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        raise AttnscopeError(f"{name} must be a number of seconds, got {os.environ[name]!r}") from None
    if value <= 0:
        raise AttnscopeError(f"{name} must be > 0 seconds, got {value:g}")
    return value
