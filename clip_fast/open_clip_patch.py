"""Run open_clip's own trainer on clip_fast's losses: `apply_to_open_clip()`.

open_clip_train builds its loss with `open_clip.create_loss(args)`, which instantiates
the `ClipLoss` / `SigLipLoss` names it finds in `open_clip.factory`. Rebinding those two
names to clip_fast's ContrastiveLoss and SigLipLoss (same constructor keywords, same
forward) is all it takes; nothing else in open_clip changes. Distillation and CoCa
losses (subclasses of open_clip's ClipLoss, bound when open_clip was imported) keep
open_clip's implementation.
"""
from __future__ import annotations

import importlib

# name in open_clip.factory -> (clip_fast module, class)
_REPLACEMENTS = {
    "ClipLoss": ("clip_fast.loss", "ContrastiveLoss"),
    "SigLipLoss": ("clip_fast.siglip", "SigLipLoss"),
}

# name in open_clip.factory -> the class it held before apply_to_open_clip replaced it
_ORIGINALS: dict[str, type] = {}


def apply_to_open_clip(contrastive: bool = True, siglip: bool = True) -> dict[str, type]:
    """Make `open_clip.create_loss` build clip_fast's losses: ContrastiveLoss where it
    would build ClipLoss (`contrastive`), SigLipLoss for `--siglip` (`siglip`).

    Idempotent: a second call changes nothing. Returns every name of
    `open_clip.factory` currently replaced, mapped to the clip_fast class now bound
    to it. `revert_open_clip_patch()` restores open_clip's classes.

    Example:
        import clip_fast
        clip_fast.apply_to_open_clip()
        from open_clip_train.main import main
        main(["--model", "ViT-B-32", "--train-data", ...])
    """
    import open_clip.factory as factory

    wanted = {"ClipLoss": contrastive, "SigLipLoss": siglip}
    for name, enabled in wanted.items():
        if not enabled or name in _ORIGINALS:
            continue
        module_name, class_name = _REPLACEMENTS[name]
        _ORIGINALS[name] = getattr(factory, name)
        setattr(factory, name, getattr(importlib.import_module(module_name), class_name))
    return {name: getattr(factory, name) for name in _ORIGINALS}


def revert_open_clip_patch() -> dict[str, type]:
    """Undo apply_to_open_clip: open_clip.factory's names get their original classes
    back. Returns what was restored (name -> open_clip class); empty if nothing was
    patched."""
    import open_clip.factory as factory

    restored = dict(_ORIGINALS)
    for name, original in restored.items():
        setattr(factory, name, original)
    _ORIGINALS.clear()
    return restored


__all__ = ["apply_to_open_clip", "revert_open_clip_patch"]
