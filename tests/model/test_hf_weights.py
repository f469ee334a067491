"""Hugging Face CLIPModel folders/files -> clip_fast (features equal to transformers' own
forward), HF tokenizers -> clip_fast's Tokenizer (same ids), hub names rejected."""
import gzip
import json
import os

import pytest
import torch

import clip_fast.model as cm
from clip_fast.data.tokenizer import Tokenizer, _bytes_to_unicode

transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT, BOS = 99, 16, 97


def tiny_hf_clip(act: str, eos: int, seed: int):
    """A random CLIPModel of a tiny config; every parameter redrawn (HF initialises
    LayerNorms to (1, 0) and biases to 0, which would hide a swapped or dropped mapping)."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=CONTEXT, bos_token_id=BOS, eos_token_id=eos, pad_token_id=0, hidden_act=act),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                           num_attention_heads=3, hidden_act=act),
        projection_dim=24,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        model.logit_scale.fill_(2.5)
    return model


def token_rows(seed: int) -> torch.Tensor:
    """[BOS, random ids, EOT = VOCAB - 1, 0 ...] rows of varying lengths (the last fills all positions)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [0, 3, 7, 11, CONTEXT - 2]
    rows = torch.zeros(len(lengths), CONTEXT, dtype=torch.long)
    for row, n in zip(rows, lengths):
        row[0] = BOS
        row[1 : 1 + n] = torch.randint(1, BOS, (n,), generator=g)
        row[1 + n] = VOCAB - 1
    return rows


def features(output):
    return output.pooler_output if hasattr(output, "pooler_output") else output  # transformers 5 returns an output object


def assert_same_features(ours, theirs, seed):
    torch.manual_seed(seed)
    images, ids = torch.randn(3, 3, 32, 32), token_rows(seed)
    with torch.no_grad():
        ref_img = features(theirs.get_image_features(pixel_values=images))
        ref_txt = features(theirs.get_text_features(input_ids=ids))
        img, txt = ours.encode_image(images), ours.encode_text(ids)
    # fp32, the same operations in a different order (fused qkv, SDPA vs eager softmax):
    # a few ulp per op over 2 layers; features here are O(1) (measured max error 2e-7).
    torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt, ref_txt, rtol=1e-5, atol=1e-5)
    assert ours.logit_scale.item() == pytest.approx(2.5)


@pytest.mark.parametrize("act,eos", [("quick_gelu", VOCAB - 1), ("gelu", VOCAB - 1), ("quick_gelu", 2)])
def test_hf_folder_features_match_transformers(tmp_path, act, eos):
    theirs = tiny_hf_clip(act, eos, seed=1)
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = cm.load(str(tmp_path))
    cfg = ours.config
    assert cfg.quick_gelu == (act == "quick_gelu") and cfg.embed_dim == 24
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.patch_size, cfg.vision.num_heads, cfg.image_size) == (48, 2, 8, 3, 32)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.context_length, cfg.vocab_size) == (32, 2, 2, CONTEXT, VOCAB)
    assert_same_features(ours, theirs, seed=2)


def test_hf_weight_files_and_pytorch_bin(tmp_path):
    theirs = tiny_hf_clip("quick_gelu", VOCAB - 1, seed=3)
    theirs.save_pretrained(tmp_path / "st")
    assert_same_features(cm.load(str(tmp_path / "st" / "model.safetensors")), theirs, seed=4)
    # The older pickle format, as a folder and as a file.
    (tmp_path / "bin").mkdir()
    theirs.config.save_pretrained(tmp_path / "bin")
    torch.save(theirs.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert_same_features(cm.load(str(tmp_path / "bin")), theirs, seed=5)
    assert_same_features(cm.load(str(tmp_path / "bin" / "pytorch_model.bin")), theirs, seed=6)


@pytest.mark.parametrize("name", ["openai", "laion2b_s34b_b79k", "openai/clip-vit-base-patch32", "hf-hub:timm/ViT-B-16"])
def test_hub_names_are_one_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"pretrained weights '{name}': no such file or folder .*nothing is downloaded"):
        cm.load(name)


def test_hf_bad_inputs(tmp_path):
    theirs = tiny_hf_clip("quick_gelu", VOCAB - 1, seed=7)
    theirs.save_pretrained(tmp_path / "ok")
    with pytest.raises(ValueError, match="quick_gelu=False contradicts .*config.json"):
        cm.load(str(tmp_path / "ok"), quick_gelu=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Hugging Face CLIPModel folder with config.json"):
        cm.load(str(tmp_path / "empty"))
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    for key, value, message in [("hidden_act", "gelu_new", "hidden_act must be one of"),
                                ("eos_token_id", 5, "eos_token_id must be the largest id 98"),
                                ("layer_norm_eps", 1e-6, "layer_norm_eps must be 1e-05")]:
        bad = json.loads(json.dumps(config))
        bad["text_config"][key] = value
        (tmp_path / "ok" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            cm.load(str(tmp_path / "ok"))
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "model_type": "siglip"}))
    with pytest.raises(ValueError, match="model_type must be 'clip'"):
        cm.load(str(tmp_path / "ok" / "model.safetensors"))
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    (tmp_path / "ok" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        cm.load(str(tmp_path / "ok"))


# ------------------------------------------------------------------------------ tokenizer
CAPTIONS = ["a photo of a cat.", "Two DOGS playing in the snow!", "the number 1234 and a co-op's t-shirt",
            "a   spaced\tcaption with tabs", "émigré café, naïve résumé"]


@pytest.fixture(scope="module")
def hf_tokenizer_files(tmp_path_factory):
    """OpenAI's vocabulary (open_clip's bundled merges) in HF's vocab.json + merges.txt form,
    and the tokenizer.json transformers' CLIPTokenizer saves from them."""
    open_clip = pytest.importorskip("open_clip")
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = [tuple(line.split()) for line in gzip.decompress(open(bpe, "rb").read()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    root = tmp_path_factory.mktemp("hf_tok")
    (root / "slow").mkdir()
    (root / "slow" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "slow" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    hf = transformers.CLIPTokenizer(vocab=str(root / "slow" / "vocab.json"), merges=str(root / "slow" / "merges.txt"))
    hf.save_pretrained(root / "fast")
    assert (root / "fast" / "tokenizer.json").is_file()
    return root, hf


@pytest.mark.parametrize("source", ["slow", "fast", "fast/tokenizer.json"])
def test_hf_tokenizer_same_ids(hf_tokenizer_files, source):
    root, hf = hf_tokenizer_files
    ours = Tokenizer.from_hf(root / source)
    assert (ours.sot_token_id, ours.eot_token_id, ours.vocab_size) == (49406, 49407, 49408)
    rows = ours(CAPTIONS)
    for caption, row, ref in zip(CAPTIONS, rows.tolist(), hf(CAPTIONS)["input_ids"]):
        n = row.index(ours.eot_token_id) + 1
        assert row[:n] == ref, caption
        assert set(row[n:]) <= {0}
    # And open_clip's ids for the same vocabulary.
    import open_clip

    assert torch.equal(rows, open_clip.tokenize(CAPTIONS, context_length=77))


def test_hf_tokenizer_bad_input(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json, or vocab.json \\+ merges.txt"):
        Tokenizer.from_hf(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="not a CLIP BPE tokenizer"):
        Tokenizer.from_hf(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "end_of_word_suffix": "</w>",
                                                                   "vocab": {"a": 0, "b": 1}, "merges": []}}))
    with pytest.raises(ValueError, match="no <\\|startoftext\\|> token"):
        Tokenizer.from_hf(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_safetensors_reader_matches_the_safetensors_package(tmp_path, dtype):
    st = pytest.importorskip("safetensors.torch")
    from clip_fast.model.hf_convert import read_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": (torch.randn(7, 5, generator=g) * 100).to(dtype), "scalar": torch.tensor(3).to(dtype),
               "empty": torch.zeros(0, 4, dtype=dtype), "b": torch.arange(11).to(dtype)}
    st.save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    ours, ref = read_safetensors(str(tmp_path / "t.safetensors")), st.load_file(str(tmp_path / "t.safetensors"))
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and torch.equal(ours[name], ref[name]), name
