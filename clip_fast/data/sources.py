"""open_clip's data source strings -> a list of local files.

    expand_urls("a/shard-{000..009}.tar::b/*.tar::c/", flag="--train-data")

A spec is one or more sources joined by '::'. Each source is, after brace expansion
(`{000..009}` zero-padded ranges, `{a,b}` alternatives, nested), one of

  - an existing file: taken as it is;
  - a glob (`*`, `?`, `[...]`): its matches in sorted order (a matched folder counts as a
    folder, below);
  - an existing folder: every `*.tar` directly inside it, sorted (a `make_shards` output
    folder, whose .idx and manifest files sit next to the tars).

The order of the sources is kept. Nothing is downloaded: a source that names no existing
file is an error (ValueError naming the flag and the source).
"""
from __future__ import annotations

import glob
import os
import re

_GLOB_CHARS = "*?["
_SHOWN_MISSING = 3


def expand_urls(spec: str, flag: str = "--train-data") -> list[str]:
    """Every file named by `spec` (see the module docstring), in order.

    Raises ValueError naming `flag` and the part of `spec` that matches nothing, or the
    paths of a brace expansion that do not exist.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"{flag}: expected a path, glob or '::'-joined list of them, got {type(spec).__name__}")
    spec = os.fspath(spec)
    sources = [s for s in spec.split("::")]
    if not spec.strip() or any(not s.strip() for s in sources):
        raise ValueError(f"{flag}: empty data source in {spec!r}")
    files: list[str] = []
    for source in sources:
        files.extend(_expand_source(source, flag))
    return files


def _expand_source(source: str, flag: str) -> list[str]:
    """Files of one '::'-separated source."""
    try:
        candidates = brace_expand(source) if "{" in source or "}" in source else [source]
    except ValueError as e:
        raise ValueError(f"{flag}: {source!r}: {e}") from None
    files: list[str] = []
    missing: list[str] = []
    for candidate in candidates:
        found = _expand_path(candidate)
        if found is None:
            missing.append(candidate)
        else:
            files.extend(found)
    if missing:
        if len(candidates) == 1:
            raise ValueError(f"{flag}: {source!r} matches no file, glob result or folder")
        shown = ", ".join(missing[:_SHOWN_MISSING]) + (f" (+{len(missing) - _SHOWN_MISSING} more)" if len(missing) > _SHOWN_MISSING else "")
        raise ValueError(f"{flag}: {len(missing)} of the {len(candidates)} paths of {source!r} do not exist: {shown}")
    if not files:
        raise ValueError(f"{flag}: {source!r} names no file (a folder must hold .tar shards)")
    return files


def _expand_path(path: str) -> list[str] | None:
    """Files of one brace-free path; None when it names nothing that exists."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
    if os.path.isfile(path):
        return [path]
    if any(c in path for c in _GLOB_CHARS):
        matches = sorted(glob.glob(path))
        if not matches:
            return None
        files: list[str] = []
        for match in matches:
            files.extend(_expand_path(match) or [])
        return files
    return None


def brace_expand(pattern: str) -> list[str]:
    """Bash-style brace expansion: 'a{1..3}b' -> a1b a2b a3b, '{x,y}' -> x y.

    Uses the `braceexpand` package when it is installed, else `expand_braces`.
    """
    try:
        from braceexpand import braceexpand
    except ImportError:
        return expand_braces(pattern)
    return list(braceexpand(pattern))


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def expand_braces(pattern: str) -> list[str]:
    """Own brace expander (no escapes): numeric ranges `{lo..hi[..step]}`, zero-padded to
    the wider bound when a bound has a leading zero, descending when lo > hi; comma lists
    `{a,b}`; nesting; the leftmost group first, so results come in bash's order.
    A group without a ',' or '..' is kept literally; unbalanced braces are a ValueError."""
    start, end = _first_group(pattern)
    if start < 0:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"unbalanced braces in {pattern!r}")
        return [pattern]
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    options = _group_options(body)
    if options is None:  # a literal '{...}': keep it, expand what follows
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [head + opt + rest for option in options for opt in expand_braces(option) for rest in expand_braces(tail)]


def _first_group(pattern: str) -> tuple[int, int]:
    """(index of the first '{', index of its matching '}'), or (-1, -1)."""
    start = pattern.find("{")
    if start < 0 or "}" in pattern[:start]:
        return -1, -1
    depth = 0
    for i in range(start, len(pattern)):
        if pattern[i] == "{":
            depth += 1
        elif pattern[i] == "}":
            depth -= 1
            if depth == 0:
                return start, i
    return -1, -1


def _group_options(body: str) -> list[str] | None:
    """The alternatives of one brace group's body, or None when it is not a group."""
    m = _RANGE.match(body)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        step = abs(int(m.group(3) or 1)) or 1
        width = max(len(m.group(1)), len(m.group(2))) if _padded(m.group(1)) or _padded(m.group(2)) else 0
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [f"{v:0{width}d}" if width else str(v) for v in values]
    parts, depth, last = [], 0, 0
    for i, c in enumerate(body):
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    if not parts:
        return None
    return parts + [body[last:]]


def _padded(number: str) -> bool:
    digits = number.lstrip("-")
    return len(digits) > 1 and digits.startswith("0")
