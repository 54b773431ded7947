"""Data: sources, tokenizers, preparation into token shards, and the streaming pipeline.

Import the modules themselves (this package imports nothing, so `moejax.config` can use
`moejax.data.config` without loading grain or array_record):
  moejax.data.config      the config.data section (defaults, validation)
  moejax.data.tokenizers  byte, SentencePiece and Hugging Face tokenizers
  moejax.data.corpus      document sources (files, JSONL, Parquet, TFDS, HF datasets)
  moejax.data.prepare     tokenize once into array_record shards + manifest (a CLI)
  moejax.data.shards      random access into a prepared folder
  moejax.data.pipeline    windows, mixtures, per-process slices: build_data()
"""
