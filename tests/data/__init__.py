"""Data: shards, loaders (torch and DALI), csv, source strings, tokenizer, faults."""
