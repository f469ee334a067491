"""Small demo datasets and tokenizers for the trainer tests (made on disk by the test)."""
from clip_fast.data.demo import DemoDataset, ensure_demo_dataset
from clip_fast.data.tokenizer import Tokenizer


def small_demo(tmp_path_factory, num_train: int) -> DemoDataset:
    """A demo dataset of `num_train` training captions in shards of 32, 32 validation
    pairs and 2 zero-shot images per class."""
    root = tmp_path_factory.mktemp("demo")
    return ensure_demo_dataset(root, num_train=num_train, num_val=32, num_zeroshot_per_class=2, shard_size=32)


def trained_tokenizer_file(demo: DemoDataset, tmp_path_factory) -> str:
    """One BPE tokenizer trained on the demo captions, saved once, for runs that are
    compared with each other (the `tokenizers` library breaks ties between equally
    frequent merges differently from call to call)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(demo.captions, vocab_size=800).save(path)
    return str(path)
