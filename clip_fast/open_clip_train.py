"""`python -m clip_fast.open_clip_train <open_clip_train flags>`: open_clip's trainer
(open_clip_train.main) with clip_fast's losses (clip_fast.apply_to_open_clip), with
every flag passed to open_clip unchanged."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Apply clip_fast's losses to open_clip, then run open_clip_train.main.main(argv)
    (argv defaults to the command line's arguments)."""
    try:
        from open_clip_train.main import main as open_clip_main
    except ImportError as exc:
        sys.exit(f"clip_fast.open_clip_train needs open_clip's trainer (pip install 'open_clip_torch[training]'): {exc}")
    from clip_fast.open_clip_patch import apply_to_open_clip

    apply_to_open_clip()
    open_clip_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
