"""open_clip-style data source strings: files, globs, braces, '::' lists, make_shards folders."""
import os

import pytest

from clip_fast.data import sources
from clip_fast.data.sources import brace_expand, expand_braces, expand_urls


@pytest.fixture
def tree(tmp_path):
    """a/shard-000..011.tar (+ .idx and a manifest, as make_shards writes), b/x.tar, c/ (no tars)."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    for i in range(12):
        (a / f"shard-{i:03d}.tar").write_bytes(b"")
        (a / f"shard-{i:03d}.idx").write_text("v1.2 0\n")
    (a / "clip_fast_shards.json").write_text("{}")
    (b / "x.tar").write_bytes(b"")
    (c / "notes.txt").write_text("")
    return tmp_path


def shard(tree, i):
    return str(tree / "a" / f"shard-{i:03d}.tar")


def test_single_file_glob_and_brace_range(tree):
    assert expand_urls(shard(tree, 3)) == [shard(tree, 3)]
    assert expand_urls(str(tree / "a" / "shard-00[2-4].tar")) == [shard(tree, i) for i in (2, 3, 4)]
    assert expand_urls(str(tree / "a" / "*.tar")) == [shard(tree, i) for i in range(12)]
    assert expand_urls(str(tree / "a" / "shard-{000..011}.tar")) == [shard(tree, i) for i in range(12)]
    assert expand_urls(str(tree / "a" / "shard-{009..010}.tar")) == [shard(tree, 9), shard(tree, 10)]
    assert expand_urls(str(tree / "a" / "shard-{001,007}.tar")) == [shard(tree, 1), shard(tree, 7)]


def test_directory_gives_its_tars_only(tree):
    # A make_shards output folder: the .idx files and the manifest are not data sources.
    expected = [shard(tree, i) for i in range(12)]
    assert expand_urls(str(tree / "a")) == expected
    assert expand_urls(str(tree / "a") + os.sep) == [os.path.join(str(tree / "a") + os.sep, os.path.basename(p)) for p in expected]
    assert expand_urls(str(tree / "*")) == expected + [str(tree / "b" / "x.tar")]  # a glob matching folders


def test_double_colon_keeps_source_order(tree):
    spec = "::".join([str(tree / "b"), str(tree / "a" / "shard-{010..011}.tar"), shard(tree, 0)])
    assert expand_urls(spec) == [str(tree / "b" / "x.tar"), shard(tree, 10), shard(tree, 11), shard(tree, 0)]


@pytest.mark.parametrize("flag", ["--train-data", "--val-data"])
def test_errors_name_flag_and_source(tree, flag):
    missing = str(tree / "nope.tar")
    with pytest.raises(ValueError, match=f"^{flag}: '{missing}' matches no file"):
        expand_urls(f"{shard(tree, 0)}::{missing}", flag=flag)
    with pytest.raises(ValueError, match=f"^{flag}: .*matches no file"):
        expand_urls(str(tree / "a" / "*.jpg"), flag=flag)
    # A brace range reaching past the last shard names the paths that are missing.
    with pytest.raises(ValueError, match=rf"^{flag}: 3 of the 15 paths .* do not exist: .*shard-012.tar, .*shard-013.tar, .*shard-014.tar$"):
        expand_urls(str(tree / "a" / "shard-{000..014}.tar"), flag=flag)
    with pytest.raises(ValueError, match=rf"^{flag}: .*c'.* names no file \(a folder must hold .tar shards\)"):
        expand_urls(str(tree / "c"), flag=flag)
    with pytest.raises(ValueError, match=f"^{flag}: empty data source"):
        expand_urls(f"{shard(tree, 0)}::", flag=flag)
    with pytest.raises(ValueError, match=f"^{flag}: empty data source"):
        expand_urls("", flag=flag)
    with pytest.raises(ValueError, match=f"^{flag}: .*nbalanced braces"):
        expand_urls(str(tree / "a" / "shard-{000..011.tar"), flag=flag)
    with pytest.raises(ValueError, match=f"^{flag}: expected a path"):
        expand_urls(None, flag=flag)


@pytest.mark.parametrize("pattern", [
    "a{000..009}.tar", "s{09..11}", "s{9..11}", "{3..1}", "{00..10..3}", "{-2..02}", "x{1..3}y{a,b}",
    "{a,b{1..2}}c", "{a,{1..2}}", "lit{x}z{1..2}", "x{a}{b,c}", "{}", "{1..a}", "plain", "{0001..3}",
])
def test_own_brace_expander_matches_braceexpand(pattern):
    braceexpand = pytest.importorskip("braceexpand")
    assert expand_braces(pattern) == list(braceexpand.braceexpand(pattern))


@pytest.mark.parametrize("pattern", ["a{b", "a}b", "x{1,2}}"])
def test_unbalanced_braces_raise_in_both_expanders(pattern):
    braceexpand = pytest.importorskip("braceexpand")
    with pytest.raises(ValueError):
        list(braceexpand.braceexpand(pattern))
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces(pattern)


def test_brace_expand_falls_back_without_braceexpand(tree, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_braceexpand(name, *args, **kwargs):
        if name == "braceexpand":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_braceexpand)
    assert brace_expand("s{09..11}") == ["s09", "s10", "s11"]
    assert sources.expand_urls(str(tree / "a" / "shard-{000..002}.tar")) == [shard(tree, i) for i in range(3)]


def test_loader_reads_a_make_shards_output_folder(tmp_path, monkeypatch):
    """`python -m clip_fast.data.make_shards SRC OUT`, then OUT as the data source."""
    import torch
    from PIL import Image

    from clip_fast.data.loader import build_loader
    from clip_fast.data.make_shards import make_shards

    monkeypatch.setenv("CLIP_FAST_CACHE", str(tmp_path / "cache"))
    (tmp_path / "src").mkdir()
    for i in range(7):
        Image.new("RGB", (12, 12), (i * 30, 0, 0)).save(tmp_path / "src" / f"{i}.png")
        (tmp_path / "src" / f"{i}.txt").write_text(f"red {i}")
    make_shards(tmp_path / "src", tmp_path / "out", shard_size=3, progress=False)
    tokenize = lambda caps: torch.tensor([[int(c.split()[-1])] for c in caps])  # noqa: E731
    for spec in (expand_urls(str(tmp_path / "out")), str(tmp_path / "out")):
        loader = build_loader(spec, batch_size=2, image_size=8, tokenize=tokenize, train=False, num_workers=0)
        assert len(loader.shards) == 3 and sorted(i for _, t in loader for i in t[:, 0].tolist()) == list(range(7))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shard in folder"):
        build_loader(str(tmp_path / "empty"), batch_size=2, image_size=8, tokenize=tokenize)
