"""CLIP text tokenizer: OpenAI's BPE (same ids as open_clip) or a BPE trained on your captions.

Both kinds run on the Rust `tokenizers` library, so a batch of captions is encoded in
parallel and the whole tokenizer serialises to one JSON string that a checkpoint can carry.

Conventions shared by both kinds (they are what the CLIP text tower relies on):
  - text is cleaned like OpenAI's: ftfy (when installed), HTML unescaped twice, whitespace
    collapsed, lower-cased; then split with OpenAI's regex and mapped to byte-level symbols
    (GPT-2's byte -> unicode table); a word's last symbol carries the suffix `</w>`.
  - a row is `[SOT] tokens [EOT] 0 0 ...` of length `context_length` (77). Captions that
    are too long are truncated and the EOT is kept in the last position.
  - the EOT id is the largest id of the vocabulary (SOT is the one below it). The text
    tower pools features at `tokens.argmax(-1)`, which finds the EOT only because nothing
    in a row can exceed it; padding (id 0) is a real token id but sits after the EOT, where
    the causal mask makes it invisible to the pooled position.

    tok = Tokenizer.from_merges(".../bpe_simple_vocab_16e6.txt.gz")   # OpenAI's vocabulary
    tok = Tokenizer.train(captions, vocab_size=4096)                  # or learn one
    ids = tok(["a photo of a cat."])                                  # (1, 77) int64
    tok.save("tokenizer.json"); tok = Tokenizer.load("tokenizer.json")
"""
from __future__ import annotations

import gzip
import html
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

# OpenAI CLIP's pre-tokenisation pattern: contractions, runs of letters, single digits,
# runs of other non-space characters. Whitespace between matches is dropped.
_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
DEFAULT_CONTEXT_LENGTH = 77
_FORMAT = "clip_fast.tokenizer/1"
# OpenAI's file holds more merges than its vocabulary uses: 49,152 ids = 512 byte symbols
# (with and without `</w>`) + 48,894 merges + SOT + EOT.
_OPENAI_NUM_MERGES = 49152 - 256 - 2

try:  # ftfy repairs mojibake exactly as OpenAI's tokenizer does; optional dependency.
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None


def clean_text(text: str) -> str:
    """OpenAI's text normalisation: ftfy, HTML unescape (twice), collapse whitespace, lower."""
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode table (the byte-level alphabet).

    Printable latin-1 bytes map to themselves; the other 68 bytes are shifted to code
    points 256.. so that no symbol is whitespace or a control character. The dict order
    (printable bytes first, then the shifted ones) is the order of OpenAI's first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _pipeline(model):
    """A `tokenizers.Tokenizer` around `model` with OpenAI's pre-tokenisation."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers import pre_tokenizers

    tok = _RustTokenizer(model)
    # Keep the regex matches (invert=True) and drop what lies between them (whitespace),
    # then map every byte of a match to its byte-level symbol (no prefix space, no
    # second regex: the split above already is OpenAI's).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tok


class Tokenizer:
    """Callable CLIP tokenizer: `tok(texts, context_length=77) -> LongTensor (N, context_length)`.

    Build it with `from_merges` (OpenAI vocabulary, ids identical to open_clip's
    SimpleTokenizer), `train` (byte-level BPE learned from captions) or `load`/`from_json`.
    """

    def __init__(self, rust_tokenizer, kind: str, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        if kind not in ("openai", "trained"):
            raise ValueError(f"kind must be 'openai' or 'trained', got {kind!r}")
        self._tok = rust_tokenizer
        self.kind = kind
        self.context_length = _check_context_length(context_length)
        self.sot_token_id = rust_tokenizer.token_to_id(SOT_TOKEN)
        self.eot_token_id = rust_tokenizer.token_to_id(EOT_TOKEN)
        self.vocab_size = rust_tokenizer.get_vocab_size(with_added_tokens=True)
        if self.sot_token_id is None or self.eot_token_id is None:
            raise ValueError(f"tokenizer has no {SOT_TOKEN} / {EOT_TOKEN} tokens")
        if self.eot_token_id != self.vocab_size - 1:
            # The text tower finds the EOT with argmax over ids: it must be the largest.
            raise ValueError(
                f"EOT id must be the largest id ({self.vocab_size - 1}), got {self.eot_token_id}"
            )

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_merges(cls, path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """OpenAI's BPE from its merges file (`bpe_simple_vocab_16e6.txt.gz`, gzip or plain)."""
        from tokenizers.models import BPE

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"merges file not found: {path}")
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        lines = raw.decode("utf-8").split("\n")
        # Line 0 is a version header; then one "a b" merge per line, best first.
        merges = [tuple(line.split()) for line in lines[1 : 1 + _OPENAI_NUM_MERGES]]
        if len(merges) < 1 or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is not an OpenAI BPE merges file (lines must be 'a b')")
        # Vocabulary order defines the ids: byte symbols, byte symbols + </w>, one token per
        # merge in rank order, then SOT and EOT (49406, 49407 for the full file).
        symbols = list(_bytes_to_unicode().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"{path}: merges produce duplicate tokens")
        # unk is never produced (every byte has a symbol); tokenizers wants one declared.
        model = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=None, fuse_unk=False)
        tok = _pipeline(model)
        tok.add_special_tokens([SOT_TOKEN, EOT_TOKEN])
        return cls(tok, "openai", context_length)

    @classmethod
    def from_hf(cls, path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """The BPE of a Hugging Face CLIP tokenizer: a folder holding `tokenizer.json` or
        `vocab.json` + `merges.txt`, or a `tokenizer.json` file. Ids are HF's (for OpenAI's
        vocabulary also open_clip's); HF's `<|startoftext|>` / `<|endoftext|>` become the
        SOT / EOT, and rows are padded with 0 like every clip_fast tokenizer's."""
        from tokenizers.models import BPE

        vocab, merges = _read_hf_bpe(Path(path))
        for hf_name, name in (("<|startoftext|>", SOT_TOKEN), ("<|endoftext|>", EOT_TOKEN)):
            if hf_name not in vocab:
                raise ValueError(f"{path}: the vocabulary has no {hf_name} token (not a CLIP tokenizer)")
            vocab[name] = vocab.pop(hf_name)
        model = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=None, fuse_unk=False)
        tok = _pipeline(model)
        tok.add_special_tokens([SOT_TOKEN, EOT_TOKEN])  # already in the vocabulary: their ids stay
        return cls(tok, "openai", context_length)

    @classmethod
    def train(
        cls,
        captions: Iterable[str],
        vocab_size: int = 8192,
        min_frequency: int = 2,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> "Tokenizer":
        """Learn a byte-level BPE from `captions` (same cleaning, split and conventions).

        `vocab_size` counts everything: the 256 byte symbols (always present, so any text
        encodes), merges, SOT and EOT. A small corpus may stop early: read the final size
        from `.vocab_size` and build the text tower with it.
        """
        from tokenizers import trainers
        from tokenizers.models import BPE

        if isinstance(captions, str):
            raise TypeError("captions must be an iterable of strings, not one string")
        min_size = 256 + 2 * 256 + 2
        if not isinstance(vocab_size, int) or vocab_size < min_size:
            raise ValueError(f"vocab_size must be an int >= {min_size} (merges beyond the 512 byte symbols, SOT, EOT), got {vocab_size!r}")
        symbols = list(_bytes_to_unicode().values())
        base = symbols + [sym + "</w>" for sym in symbols]  # OpenAI's first 512 ids, in its order
        tok = _pipeline(BPE(end_of_word_suffix="</w>", unk_token=None, fuse_unk=False))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 2,  # room for SOT and EOT
            min_frequency=min_frequency,
            show_progress=False,
            # Determinism: the trainer gives ids 0.. to its special tokens, then to the
            # alphabet in code-point order, but it creates a word-final symbol ("x</w>")
            # when it first meets a word ending in "x", walking a Rust HashMap of words
            # whose order is seeded randomly per process. Those ids break ties between
            # equally frequent pairs, so the merges changed from call to call. Declaring
            # all 512 byte symbols up front fixes every id before training. It also puts
            # every word-final symbol in the vocabulary, seen in training or not: without
            # one, a one-byte word (an "&", a digit) would have no id and vanish.
            special_tokens=base,
            initial_alphabet=symbols,
            end_of_word_suffix="</w>",
        )
        tok.train_from_iterator((clean_text(c) for c in captions), trainer=trainer)
        model = json.loads(tok.to_str())["model"]
        vocab, merges = model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        if [vocab.get(t) for t in base] != list(range(len(base))):
            raise RuntimeError("tokenizers' BpeTrainer did not put the byte symbols first: unsupported version?")
        # Rebuilt from vocab and merges alone: the byte symbols become plain vocabulary
        # entries, not special tokens of the trained tokenizer.
        tok = _pipeline(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=None, fuse_unk=False))
        # Added tokens take the next free ids, so SOT = V-2 and EOT = V-1: EOT is the
        # largest id, as in OpenAI's vocabulary.
        tok.add_special_tokens([SOT_TOKEN, EOT_TOKEN])
        return cls(tok, "trained", context_length)

    # -------------------------------------------------------------- serialisation
    def to_json(self) -> str:
        """JSON string holding everything needed to rebuild this tokenizer."""
        return json.dumps(
            {"format": _FORMAT, "kind": self.kind, "context_length": self.context_length, "tokenizer": self._tok.to_str()}
        )

    @classmethod
    def from_json(cls, s: str) -> "Tokenizer":
        from tokenizers import Tokenizer as _RustTokenizer

        try:
            obj = json.loads(s)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a serialised clip_fast tokenizer: {e}") from None
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
            raise ValueError(f"not a serialised clip_fast tokenizer (expected format {_FORMAT!r})")
        return cls(_RustTokenizer.from_str(obj["tokenizer"]), obj["kind"], obj["context_length"])

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    # ------------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, without SOT/EOT and without truncation."""
        return self._tok.encode(clean_text(text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (special tokens and padding after the EOT are dropped)."""
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        symbols = "".join(self._tok.id_to_token(i) for i in ids if i != self.sot_token_id)
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        words = symbols.split("</w>")
        data = b" ".join(bytes(to_byte[c] for c in w) for w in words)
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenise `texts` into a (N, context_length) int64 tensor, rows `[SOT] ids [EOT] 0...`."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a str or a list of str")
        n_ctx = self.context_length if context_length is None else _check_context_length(context_length)
        # encode_batch runs on all cores in Rust; cleaning (ftfy) stays in Python.
        encodings = self._tok.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        out = np.zeros((len(texts), n_ctx), dtype=np.int64)
        out[:, 0] = self.sot_token_id
        for row, enc in zip(out, encodings):
            ids = enc.ids[: n_ctx - 2]  # room for SOT and EOT: truncation keeps the EOT
            row[1 : 1 + len(ids)] = ids
            row[1 + len(ids)] = self.eot_token_id
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, context_length={self.context_length})"


def _read_hf_bpe(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a HF tokenizer.json, or of a folder with it or vocab.json + merges.txt."""
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            model = json.loads(path.read_text(encoding="utf-8"))["model"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json") from None
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
            raise ValueError(f"{path}: not a CLIP BPE tokenizer (model type {model.get('type')!r}, "
                             f"end_of_word_suffix {model.get('end_of_word_suffix')!r})")
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        return dict(model["vocab"]), merges
    vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        raise ValueError(f"{path}: expected a Hugging Face tokenizer folder (tokenizer.json, or vocab.json + merges.txt)")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{merges_file}: merge lines must be 'a b'")
    return vocab, merges


def _check_context_length(context_length: int) -> int:
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
    return context_length
