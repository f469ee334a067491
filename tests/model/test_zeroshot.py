"""Zero-shot classification: templates, classifier weights against open_clip's
build_zero_shot_classifier on the same weights, top-k accuracy against a brute-force
count, and the command line on an ImageFolder with a trainer-style checkpoint."""
import dataclasses
import json

import numpy as np
import open_clip
import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

import clip_fast.model as cm
from clip_fast.data.tokenizer import Tokenizer
from clip_fast.zeroshot import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, ImageFolder, build_classifier, evaluate
from tests.support.processes import run_python

TOKENIZE = open_clip.get_tokenizer("ViT-B-32")
CLASSES = ["cat", "dog", "golden retriever", "car", "red apple", "tree", "airplane"]


def test_templates_are_the_papers():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert [t.format("x") for t in IMAGENET_TEMPLATES] == [t("x") for t in OPENAI_IMAGENET_TEMPLATES]
    assert [t.format("x") for t in SIMPLE_TEMPLATES] == [t("x") for t in SIMPLE_IMAGENET_TEMPLATES]


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    theirs = open_clip.CLIP(
        embed_dim=128,
        vision_cfg=dict(image_size=64, layers=2, width=128, patch_size=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
    ).eval()
    ours = cm.from_state_dict(theirs.state_dict(), quick_gelu=False)
    return theirs, ours


def test_classifier_matches_open_clip(tiny_pair):
    theirs, ours = tiny_pair
    templates = SIMPLE_TEMPLATES[:5]
    want = build_zero_shot_classifier(theirs, TOKENIZE, CLASSES, [lambda c, t=t: t.format(c) for t in templates],
                                      num_classes_per_batch=3, device="cpu")
    got = build_classifier(ours, TOKENIZE, CLASSES, templates, "cpu", batch_size=7)  # batches cut across classes
    assert got.shape == (128, len(CLASSES))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=0), torch.ones(len(CLASSES)))
    # a plain callable (no context_length keyword) works as the tokenizer, and so do callables as templates
    plain = build_classifier(ours, lambda texts: TOKENIZE(texts), CLASSES, [lambda c: f"a photo of a {c}."])
    single = build_classifier(ours, TOKENIZE, CLASSES, ["a photo of a {}."])
    torch.testing.assert_close(plain, single)


def test_evaluate_counts_topk(tiny_pair):
    _, ours = tiny_pair
    torch.manual_seed(1)
    classifier = build_classifier(ours, TOKENIZE, CLASSES, ["a photo of a {}."])
    images = torch.randn(23, 3, 64, 64)
    labels = torch.randint(0, len(CLASSES), (23,))
    with torch.no_grad():
        logits = ours.encode_image(images, normalize=True) @ classifier
    rank = (logits > logits.gather(1, labels[:, None])).sum(1)  # classes scoring above the label
    want1, want5 = (rank == 0).float().mean().item(), (rank < 5).float().mean().item()
    for data in ((images, labels), [(images[i : i + 5], labels[i : i + 5]) for i in range(0, 23, 5)]):
        result = evaluate(ours, classifier, data, batch_size=4)
        assert result["n"] == 23
        assert result["top1"] == pytest.approx(want1) and result["top5"] == pytest.approx(want5)
    # fewer than 5 classes: top-5 is top-C
    assert evaluate(ours, classifier[:, :3], (images, labels.clamp(max=2)))["top5"] == 1.0
    assert not ours.training


def test_bad_input(tiny_pair):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match="exactly one"):
        build_classifier(ours, TOKENIZE, CLASSES, ["a photo of a cat."])
    with pytest.raises(ValueError, match="non-empty list"):
        build_classifier(ours, TOKENIZE, CLASSES, "a photo of a {}.")
    with pytest.raises(ValueError, match="classnames"):
        build_classifier(ours, TOKENIZE, [], ["{}"])
    with pytest.raises(ValueError, match="differ in count"):
        evaluate(ours, torch.randn(128, 3), (torch.randn(2, 3, 64, 64), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(FileNotFoundError):
        ImageFolder("/nonexistent/dir", 64)


def _write_image_folder(root, classes, per_class, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        folder = root / c.replace(" ", "_")
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(60, 120)), int(rng.integers(60, 120)))
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "notes.txt").write_text("not a class")


def test_cli_on_image_folder(tmp_path, tiny_pair):
    _, ours = tiny_pair
    classes = ["golden retriever", "tabby cat", "red car"]
    _write_image_folder(tmp_path / "data", classes, per_class=3)
    tok = Tokenizer.train([f"a photo of a {c}." for c in classes] * 20 + ["a bad photo of the thing."] * 5, vocab_size=800)
    torch.manual_seed(2)
    model = cm.create("tiny-vit", vocab_size=tok.vocab_size)
    ckpt = {"model": model.state_dict(), "config": dataclasses.asdict(model.config), "tokenizer": tok.to_json()}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    (tmp_path / "templates.txt").write_text("a bad photo of the {}.\n\n")
    out = tmp_path / "result.json"
    proc = run_python(["-m", "clip_fast.zeroshot", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data",
                       str(tmp_path / "data"), "--templates", "a photo of a {}.", "--templates-file",
                       str(tmp_path / "templates.txt"), "--output", str(out), "--workers", "0", "--batch-size", "4"],
                      timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "top-1:" in proc.stdout and "top-5:" in proc.stdout
    result = json.loads(out.read_text())
    assert (result["n"], result["classes"], result["templates"]) == (9, 3, 2)
    # the same numbers computed in-process from the same pieces
    dataset = ImageFolder(tmp_path / "data", 64)
    assert dataset.classnames == sorted(classes)  # folder names, underscores read as spaces
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([label for _, label in dataset.samples])
    classifier = build_classifier(model.eval(), tok, dataset.classnames, ["a photo of a {}.", "a bad photo of the {}."])
    want = evaluate(model, classifier, (images, labels))
    assert result["top1"] == pytest.approx(want["top1"]) and result["top5"] == pytest.approx(want["top5"])


def test_cli_needs_a_tokenizer(tmp_path):
    model = cm.create("tiny-vit")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    _write_image_folder(tmp_path / "data", ["a", "b"], per_class=1)
    proc = run_python(["-m", "clip_fast.zeroshot", "--checkpoint", str(tmp_path / "bare.pt"), "--data",
                       str(tmp_path / "data"), "--output", str(tmp_path / "r.json"), "--workers", "0"], timeout=300)
    assert proc.returncode != 0 and "--tokenizer" in proc.stderr
