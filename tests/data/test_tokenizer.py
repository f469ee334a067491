"""The CLIP tokenizer against open_clip's SimpleTokenizer (same merges file) and the
conventions the text tower relies on (SOT/EOT placement, EOT = largest id, truncation)."""
import json
import os

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES  # noqa: E402

from clip_fast.data.tokenizer import Tokenizer, clean_text  # noqa: E402
from tests.support.processes import run_python  # noqa: E402

# Read from the installed open_clip package; never copied into this repository.
MERGES = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")

EDGE_CASES = [
    "", "   ", "a", "A photo of a CAT.", "it's we've they'll I'd you're don't",
    "Hello,   World!!\t\nnew line", "&amp;lt;b&amp;gt; html &quot;quoted&quot; &#39;x&#39;",
    "naïve café — 東京タワー 🐶🐱 👩‍👩‍👧", "Ünïcödé ΣΊΣΥΦΟΣ ǅemal ﬁne ß İstanbul",
    "arabic مرحبا hindi नमस्ते korean 안녕하세요", "2024-01-01 12:30pm $5.00 50% 3.14159",
    "mojibake â€™ test", "<start_of_text> inside <end_of_text> text", "x" * 500,
    " ".join(["word"] * 200), "snake_case camelCase kebab-case #hashtag @user http://a.b/c?d=e",
    "\u00a0nbsp\u2003em space\u200bzero width", "çàé ñ ø å æ œ ł",
]


def _corpus() -> list[str]:
    rng = np.random.default_rng(0)
    captions = [t(c) for c in IMAGENET_CLASSNAMES for t in OPENAI_IMAGENET_TEMPLATES[:: 16]]
    # Random text over several scripts and punctuation: exercises the split regex and
    # the byte-level fallback on code points the vocabulary has no merges for.
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`") + [
        chr(c) for c in (*range(0xC0, 0x180), *range(0x391, 0x3C9), *range(0x410, 0x44F), *range(0x3041, 0x3096), *range(0x4E00, 0x4E40), 0x1F600, 0x1F431)
    ]
    for _ in range(300):
        n = int(rng.integers(1, 120))
        captions.append("".join(alphabet[i] for i in rng.integers(0, len(alphabet), n)))
    return EDGE_CASES + captions


@pytest.fixture(scope="module")
def openai_tok():
    return Tokenizer.from_merges(MERGES)


@pytest.fixture(scope="module")
def reference():
    return SimpleTokenizer(MERGES)


def test_matches_open_clip_on_corpus(openai_tok, reference):
    corpus = _corpus()
    ours, ref = openai_tok(corpus), reference(corpus)
    assert ours.dtype == torch.long and ours.shape == (len(corpus), 77)
    mismatched = [corpus[i] for i in range(len(corpus)) if not torch.equal(ours[i], ref[i])]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[:3]}"
    assert (openai_tok.vocab_size, openai_tok.sot_token_id, openai_tok.eot_token_id) == (
        reference.vocab_size, reference.sot_token_id, reference.eot_token_id)


@pytest.mark.parametrize("context_length", [5, 16, 77, 100])
def test_truncation_keeps_eot_like_open_clip(openai_tok, reference, context_length):
    texts = ["a b c d e f g h i j k l m n o p q r s t u v w x y z " * 5, "short", ""]
    ours = openai_tok(texts, context_length=context_length)
    assert torch.equal(ours, reference(texts, context_length=context_length))
    assert (ours[:, 0] == openai_tok.sot_token_id).all()
    assert (ours.argmax(-1) == (ours == openai_tok.eot_token_id).int().argmax(-1)).all()


def test_single_string_and_decode(openai_tok):
    ids = openai_tok("A photo of a  cat.")
    assert ids.shape == (1, 77)
    assert openai_tok.decode(ids[0]).strip() == "a photo of a cat ."


def test_json_round_trip(openai_tok, tmp_path):
    corpus = _corpus()[:200]
    again = Tokenizer.from_json(openai_tok.to_json())
    assert torch.equal(again(corpus), openai_tok(corpus))
    openai_tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded.kind == "openai" and torch.equal(loaded(corpus), openai_tok(corpus))


@pytest.fixture(scope="module")
def trained():
    captions = [t(c) for c in IMAGENET_CLASSNAMES[:300] for t in OPENAI_IMAGENET_TEMPLATES[:10]]
    return Tokenizer.train(captions, vocab_size=1500), captions


def test_trained_tokenizer_conventions(trained):
    tok, captions = trained
    assert tok.kind == "trained"
    assert 1000 < tok.vocab_size <= 1500
    # EOT is the largest id, SOT the one below: the text tower pools at argmax(ids).
    assert tok.eot_token_id == tok.vocab_size - 1 and tok.sot_token_id == tok.vocab_size - 2
    ids = tok(captions[:500] + ["zebra-crossing ünseen wörds 🙂 " * 20])
    assert ids.max() < tok.vocab_size and ids.min() >= 0
    eot_pos = (ids == tok.eot_token_id).int().argmax(-1)
    assert torch.equal(ids.argmax(-1), eot_pos)
    assert ((ids == tok.eot_token_id).sum(-1) == 1).all()
    assert (ids[:, 0] == tok.sot_token_id).all()
    # Byte-level: unseen characters still encode, and decoding returns the cleaned text.
    for text in ["a photo of a goldfish.", "Ünseen wörds 🙂 & more"]:
        assert tok.decode(tok(text)[0]).replace(" ", "") == clean_text(text).replace(" ", "")
    # It learned the corpus: frequent words are single tokens, far fewer ids than bytes.
    assert len(tok.encode("a photo of a")) == 4


def _merges_and_vocab(tok):
    model = json.loads(json.loads(tok.to_json())["tokenizer"])["model"]
    return model["merges"], model["vocab"]


def test_training_is_reproducible(trained):
    """Same captions -> same vocabulary, merges and ids: again in this process, with the
    captions in another order, and in a fresh process (another hash seed in Rust)."""
    tok, captions = trained
    merges, vocab = _merges_and_vocab(tok)
    assert len(merges) == tok.vocab_size - 512 - 2  # byte symbols, merges, SOT, EOT
    shuffled = list(captions)
    np.random.default_rng(0).shuffle(shuffled)
    for again in (Tokenizer.train(captions, vocab_size=1500), Tokenizer.train(shuffled, vocab_size=1500)):
        assert _merges_and_vocab(again) == (merges, vocab)
        assert torch.equal(again(captions), tok(captions))
    code = (
        "from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as C, OPENAI_IMAGENET_TEMPLATES as T\n"
        "from clip_fast.data.tokenizer import Tokenizer\n"
        "print(Tokenizer.train([t(c) for c in C[:300] for t in T[:10]], vocab_size=1500).to_json())\n"
    )
    result = run_python(["-c", code], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = Tokenizer.from_json(result.stdout.strip().splitlines()[-1])
    assert _merges_and_vocab(fresh) == (merges, vocab)
    assert torch.equal(fresh(captions), tok(captions))


def test_trained_round_trip(trained, tmp_path):
    tok, captions = trained
    tok.save(tmp_path / "t.json")
    loaded = Tokenizer.load(tmp_path / "t.json")
    assert loaded.vocab_size == tok.vocab_size and loaded.eot_token_id == tok.eot_token_id
    assert torch.equal(loaded(captions[:300]), tok(captions[:300]))


def test_bad_input(openai_tok, tmp_path):
    with pytest.raises(TypeError, match="texts"):
        openai_tok(123)
    with pytest.raises(TypeError, match="texts"):
        openai_tok(["ok", None])
    with pytest.raises(ValueError, match="context_length"):
        openai_tok("x", context_length=1)
    with pytest.raises(FileNotFoundError, match="merges"):
        Tokenizer.from_merges(tmp_path / "missing.txt.gz")
    (tmp_path / "bad.txt").write_text("version\nonly_one_column\n")
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_merges(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["a b c"], vocab_size=10)
    with pytest.raises(TypeError, match="captions"):
        Tokenizer.train("a single string", vocab_size=1000)
    with pytest.raises(ValueError, match="serialised"):
        Tokenizer.from_json('{"format": "something else"}')
