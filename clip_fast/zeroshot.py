"""Zero-shot classification with a CLIP model (Radford et al. 2021, section 3.1.4).

Each class name goes through every prompt template ("a photo of a {}."); the text
embeddings of one class are L2-normalised, averaged over the templates (ensembling in
embedding space) and normalised again, giving one column of the classifier (D, C). An
image is assigned the classes with the largest cosine similarity.

    from clip_fast.zeroshot import build_classifier, evaluate, IMAGENET_TEMPLATES
    W = build_classifier(model, tokenizer, ["cat", "dog"], IMAGENET_TEMPLATES, "cuda")
    evaluate(model, W, loader)          # {"top1": 0.71, "top5": 0.90, "n": 50000}

Command line (DIR in ImageFolder layout: one subfolder per class, named after it,
underscores read as spaces):

    python -m clip_fast.zeroshot --checkpoint CKPT --data DIR --templates "a photo of a {}."
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

# The 80 prompt templates the CLIP paper used for ImageNet.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The short set of 7 templates selected in OpenAI's ImageNet zero-shot notebook.
SIMPLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATE_SETS = {"imagenet": IMAGENET_TEMPLATES, "simple": SIMPLE_TEMPLATES}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

Template = str | Callable[[str], str]


def _fill(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


def _check_templates(templates: Sequence[Template]) -> None:
    if isinstance(templates, str) or not templates:
        raise ValueError("templates must be a non-empty list of strings with one '{}' (or callables)")
    for t in templates:
        if not callable(t) and (not isinstance(t, str) or t.count("{}") != 1):
            raise ValueError(f"template {t!r} must be a string with exactly one '{{}}' placeholder")


def _tokenize(tokenizer: Callable, texts: list[str], context_length: int) -> torch.Tensor:
    try:
        return tokenizer(texts, context_length=context_length)
    except TypeError:  # a plain callable list[str] -> LongTensor
        return tokenizer(texts)


@torch.no_grad()
def build_classifier(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot weights (D, C): per class, the normalised mean over templates of the
    normalised text embeddings. `device` defaults to the model's."""
    if isinstance(classnames, str) or not classnames or not all(isinstance(c, str) for c in classnames):
        raise ValueError("classnames must be a non-empty list of strings")
    _check_templates(templates)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    texts = [_fill(t, c) for c in classnames for t in templates]  # class-major: (C * T)
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for i in range(0, len(texts), batch_size):
            tokens = _tokenize(tokenizer, texts[i : i + batch_size], model.context_length).to(device)
            chunks.append(model.encode_text(tokens, normalize=True).float())
    finally:
        model.train(was_training)
    emb = torch.cat(chunks).view(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(emb.mean(dim=1), dim=-1).T.contiguous()  # (D, C)


def _batches(data, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        images, labels = data
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in count")
        for i in range(0, images.shape[0], batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]
    else:
        yield from data


@torch.no_grad()
def evaluate(
    model,
    classifier: torch.Tensor,
    data,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy of `classifier` (D, C) on `data`: an iterable of
    (images, labels) batches (a DataLoader) or one (images, labels) tuple of tensors.

    With fewer than 5 classes "top5" is the top-C accuracy (1.0)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if classifier.dim() != 2:
        raise ValueError(f"classifier must be (D, C), got shape {tuple(classifier.shape)}")
    classifier = classifier.to(device, torch.float32)
    k = min(5, classifier.shape[1])
    correct1 = correct5 = n = 0
    was_training = model.training
    model.eval()
    try:
        for images, labels in _batches(data, batch_size):
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                features = model.encode_image(images, normalize=True)
            logits = features.float() @ classifier  # (B, C) cosine similarities
            topk = logits.topk(k, dim=-1).indices  # (B, k)
            hits = topk == labels[:, None]
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=-1).sum().item()
            n += labels.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("no images to evaluate")
    return {"top1": correct1 / n, "top5": correct5 / n, "n": n}


# ----------------------------------------------------------------------------- ImageFolder + CLI


class ImageFolder(torch.utils.data.Dataset):
    """DIR/<class name>/<image>: classes are the sorted subfolder names with underscores
    read as spaces; images are resized (shorter side), centre-cropped and normalised as
    CLIP's evaluation transform does."""

    def __init__(self, root: str | os.PathLike, image_size: int):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data directory not found: {root}")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"{root} has no class subfolders (expected DIR/<class>/<image>)")
        self.classnames = [f.name.replace("_", " ") for f in folders]
        self.samples = [
            (str(path), label)
            for label, folder in enumerate(folders)
            for path in sorted(folder.rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        from clip_fast.data.images import pil_transform
        from clip_fast.data.loader import normalize

        path, label = self.samples[i]
        with Image.open(path) as img:
            pixels = pil_transform(img, self.image_size, train=False)  # uint8 (S, S, 3)
        return normalize(torch.tensor(pixels)[None])[0], label


def _load_tokenizer(path: str | None, checkpoint: dict):
    from clip_fast.data.tokenizer import Tokenizer

    if path is not None:
        p = Path(path)
        if p.name.endswith((".txt", ".txt.gz", ".gz")):
            return Tokenizer.from_merges(p)
        return Tokenizer.load(p)
    if isinstance(checkpoint.get("tokenizer"), str):
        return Tokenizer.from_json(checkpoint["tokenizer"])
    raise ValueError("the checkpoint holds no tokenizer: pass --tokenizer (a tokenizer JSON or OpenAI's merges file)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip_fast.zeroshot", description="Zero-shot top-1/top-5 on an ImageFolder.")
    parser.add_argument("--checkpoint", required=True, help="clip_fast / open_clip / OpenAI checkpoint file")
    parser.add_argument("--data", required=True, help="ImageFolder directory: DIR/<class name>/<image>")
    parser.add_argument("--templates", action="append", default=None, help="prompt template with '{}' (repeatable)")
    parser.add_argument("--templates-file", default=None, help="file with one template per line")
    parser.add_argument("--template-set", choices=sorted(TEMPLATE_SETS), default="imagenet",
                        help="templates used when neither --templates nor --templates-file is given")
    parser.add_argument("--tokenizer", default=None, help="tokenizer JSON or OpenAI merges file (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="zeroshot.json", help="where the results are written as JSON")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))  # a one-line message and exit status 2, no traceback


def _run(args: argparse.Namespace) -> int:
    from clip_fast.model.loading import from_checkpoint, read_checkpoint

    templates: list[str] = list(args.templates or [])
    if args.templates_file:
        templates += [line.strip() for line in Path(args.templates_file).read_text().splitlines() if line.strip()]
    if not templates:
        templates = list(TEMPLATE_SETS[args.template_set])
    _check_templates(templates)

    ckpt = read_checkpoint(args.checkpoint)
    model = from_checkpoint(ckpt).to(args.device)
    tokenizer = _load_tokenizer(args.tokenizer, ckpt)

    dataset = ImageFolder(args.data, model.config.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    classifier = build_classifier(model, tokenizer, dataset.classnames, templates, args.device)
    autocast = torch.bfloat16 if torch.device(args.device).type == "cuda" else None
    result = evaluate(model, classifier, loader, args.device, autocast_dtype=autocast)
    result.update(classes=len(dataset.classnames), templates=len(templates), checkpoint=str(args.checkpoint),
                  data=str(args.data))
    print(f"top-1: {100 * result['top1']:.2f}%  top-5: {100 * result['top5']:.2f}%  "
          f"({result['n']} images, {result['classes']} classes, {len(templates)} templates)")
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
