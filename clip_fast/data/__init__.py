"""Data: webdataset shards, DALI / torch loaders, the CLIP tokenizer, the demo dataset.

  clip_fast.data.make_shards  `python -m clip_fast.data.make_shards SRC OUT` shard writer
  clip_fast.data.shards       shard + DALI index format, validation, cached scans
  clip_fast.data.loader       build_loader(...): DALI (GPU or CPU decode) or torch + PIL;
                              csv=CsvColumns(...) reads open_clip's csv datasets directly
  clip_fast.data.csv_dataset  CsvColumns, read_csv_rows, CsvDataset: a CSV file's usable rows
  clip_fast.data.sources      expand_urls(...): open_clip's '::' / glob / {a..b} / folder data specs
  clip_fast.data.images       to_8bit, pil_transform, ...: decoding fixes, open_clip's transforms
  clip_fast.data.tokenizer    Tokenizer: OpenAI BPE (open_clip ids) or a trained byte-level BPE
  clip_fast.data.demo         ensure_demo_dataset(): captioned synthetic shapes, cached

Submodules are imported explicitly (none is imported here: DALI and tokenizers load only
when used).
"""
