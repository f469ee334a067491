"""One-time warnings: a fallback (a missing extension, a kernel that does not apply)
announces itself once per process and never crashes."""
from __future__ import annotations

import functools
import warnings


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """Emit `message` as a RuntimeWarning once per process."""
    warnings.warn(f"clip_fast: {message}", RuntimeWarning, stacklevel=3)
