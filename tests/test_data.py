"""Tests of moejax.data: tokenizers, the embedded TFDS corpus, tfds sources, the grain pipeline."""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections
import numpy as np
import pytest

from moejax import config as config_lib
from moejax import data
from moejax.data import corpus as corpus_lib
from moejax.data import pipeline

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega é ü ∑ 🙂").split()


def make_corpus(root, num_files: int = 24, seed: int = 0) -> list[str]:
  """Writes `num_files` text files (.py) of 300-900 bytes under root/corp; returns paths."""
  rng = np.random.default_rng(seed)
  folder = root / "corp"
  paths = []
  for i in range(num_files):
    sub = folder / (f"pkg{i % 3}" if i % 2 else "")
    sub.mkdir(parents=True, exist_ok=True)
    n = int(rng.integers(60, 180))
    text = f"# file {i}\n" + " ".join(rng.choice(WORDS, n)) + "\n"
    p = sub / f"mod{i:02d}.py"
    p.write_text(text, encoding="utf-8")
    paths.append(str(p))
  return paths


def data_cfg(tmp_path, **overrides) -> ml_collections.ConfigDict:
  d = config_lib.base_config().data
  d.cache_dir = str(tmp_path / "cache")
  d.seq_len, d.batch_size = 16, 4
  d.val_fraction = 0.25
  for k, v in overrides.items():
    d[k] = v
  return d


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
  import sentencepiece as spm

  tmp = tmp_path_factory.mktemp("spm")
  rng = np.random.default_rng(0)
  words = ("the quick brown fox jumps over lazy dog and cat runs with über café a sleepy "
           "river flows under old stone bridge while children play near green trees").split()
  lines = [" ".join(rng.choice(words, 12)) + f" {i}." for i in range(400)]
  (tmp / "train.txt").write_text("\n".join(lines), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(tmp / "train.txt"), model_prefix=str(tmp / "m"), vocab_size=100,
      model_type="bpe", character_coverage=1.0, minloglevel=2)
  return str(tmp / "m.model")


# ------------------------------------------------------------------ tokenizers

def test_byte_tokenizer_round_trip():
  tok = data.ByteTokenizer()
  assert (tok.vocab_size, tok.bos_id) == (257, 256)
  text = "héllo wörld ∑ 🙂\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(text.encode("utf-8"))
  assert len(ids) == len(text) + 1 + 1 + 2 + 3 == 23  # é,ö: 2 bytes; ∑: 3; 🙂: 4
  assert ids[1:3].tolist() == [0xC3, 0xA9]  # é
  assert tok.decode(ids) == text
  # BOS is skipped; broken UTF-8 is replaced, not raised.
  assert tok.decode(np.concatenate([[256], ids[:3], [256], ids[3:]])) == text
  assert tok.decode([104, 0xC3, 105]) == "h\ufffdi"
  assert tok.decode(iter(ids.tolist())) == tok.decode(ids[None, :]) == text
  assert tok.encode("").shape == (0,)


def test_sentencepiece_round_trip(spm_model):
  tok = data.SentencePieceTokenizer(spm_model)
  assert tok.vocab_size == 100
  assert tok.bos_id == 1  # the trainer's default bos id
  text = "the quick brown fox jumps over the lazy dog near über café 12."
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 100 and len(ids) < 0.7 * len(text)
  assert tok.decode(ids) == text
  assert tok.decode(np.concatenate([[tok.bos_id], ids])) == text
  assert [x.tolist() for x in tok.encode_batch([text, "dog"])] == [
      ids.tolist(), tok.encode("dog").tolist()]
  assert tok.identity.startswith("spm-") and len(tok.identity) == 16


def test_make_tokenizer_selection(tmp_path, spm_model):
  d = data_cfg(tmp_path)
  assert isinstance(data.make_tokenizer(d), data.ByteTokenizer)
  d.tokenizer, d.spm_model = "sentencepiece", spm_model
  tok = data.make_tokenizer(d)
  assert isinstance(tok, data.SentencePieceTokenizer) and tok.vocab_size == 100
  d.spm_model = ""
  with pytest.raises(ValueError, match="spm_model"):
    data.make_tokenizer(d)
  d.tokenizer = "wordpiece"
  with pytest.raises(ValueError, match="data.tokenizer.*wordpiece"):
    data.make_tokenizer(d)


# ------------------------------------------------------------------ the embedded corpus

def test_split_deterministic_and_disjoint():
  rel = [f"pkg{i % 7}/mod{i}.py" for i in range(400)]
  train, val = data.split_files(rel, 0.2)
  assert (train, val) == data.split_files(list(rel), 0.2)
  assert set(train).isdisjoint(val) and sorted(train + val) == list(range(400))
  expect = [i for i, r in enumerate(rel)
            if int(hashlib.sha256(r.encode()).hexdigest()[:8], 16) / 2**32 < 0.2]
  assert val == expect
  assert 40 < len(val) < 120
  # A file's split depends on its own path only, not on the other files.
  train2, val2 = data.split_files(rel[:100], 0.2)
  assert val2 == [i for i in val if i < 100]
  # Validation is never empty: the smallest hash is taken.
  _, val3 = data.split_files(rel, 1e-12)
  fr = [corpus_lib.path_hash_fraction(r) for r in rel]
  assert val3 == [int(np.argmin(fr))]


def test_user_folder_extension_filter(tmp_path):
  root = tmp_path / "corp"
  (root / "sub").mkdir(parents=True)
  (root / "__pycache__").mkdir()
  (root / "a.py").write_text("print('a')\n")
  (root / "b.txt").write_text("bee\n")
  (root / "sub" / "c.py").write_text("x = 'ç'\n")
  (root / "__pycache__" / "x.py").write_text("cached\n")
  (root / "latin1.py").write_bytes("é = 1\n".encode("latin-1"))
  (root / "empty.py").write_text("")
  single = tmp_path / "notes.md"
  single.write_text("# notes\n")
  files = data.list_corpus_files([str(root)], (".py",))
  assert [f.relpath for f in files] == ["corp/a.py", "corp/empty.py", "corp/latin1.py",
                                       "corp/sub/c.py"]
  c = data.read_corpus([str(root)], (".py",), 0.5)
  assert c.relpaths == ["corp/a.py", "corp/sub/c.py"]
  assert (c.skipped_not_utf8, c.skipped_empty) == (1, 1)
  assert c.texts == ["print('a')\n", "x = 'ç'\n"]
  all_files = data.list_corpus_files([str(root), str(single)], ())
  assert [f.relpath for f in all_files] == [
      "corp/a.py", "corp/b.txt", "corp/empty.py", "corp/latin1.py", "corp/sub/c.py",
      "notes.md"]


def test_fingerprint_tracks_contents(tmp_path):
  paths = make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),))
  fp = data.read_corpus(d.paths, d.extensions, d.val_fraction).fingerprint
  assert fp == data.read_corpus(d.paths, d.extensions, d.val_fraction).fingerprint
  src1 = data.load_source(d, verbose=False)
  assert src1.fingerprint == fp and src1.name == f"moejax_text/fp-{fp[:12]}"
  original = open(paths[3], encoding="utf-8").read()
  with open(paths[3], "a", encoding="utf-8") as f:
    f.write("# changed\n")
  fp2 = data.read_corpus(d.paths, d.extensions, d.val_fraction).fingerprint
  assert fp2 != fp
  src2 = data.load_source(d, verbose=False)
  assert src2.cache_dir != src1.cache_dir and os.path.isdir(src1.cache_dir)
  docs = list(src2.documents("train")) + list(src2.documents("validation"))
  assert sum(doc.endswith("# changed\n") for doc in docs) == 1
  with open(paths[3], "w", encoding="utf-8") as f:
    f.write(original)
  assert data.read_corpus(d.paths, d.extensions, d.val_fraction).fingerprint == fp
  assert data.read_corpus(d.paths, d.extensions, 0.3).fingerprint != fp


def test_prepare_once_and_documents_in_order(tmp_path, capsys):
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),))
  c = data.read_corpus(d.paths, d.extensions, d.val_fraction)
  b1 = data.build_data(d)
  out1 = capsys.readouterr().out
  assert "preparing embedded corpus (24 files" in out1 and "tokenized" in out1
  b2 = data.build_data(d)
  assert capsys.readouterr().out == ""  # prepared dataset and token cache reused
  assert b1.fingerprint == b2.fingerprint == c.fingerprint
  src = data.load_source(d, verbose=False)
  assert list(src.documents("train")) == [c.texts[i] for i in c.train]
  assert list(src.documents("validation")) == [c.texts[i] for i in c.val]
  assert [r["path"] for r in src.splits["validation"].__getitems__(range(len(c.val)))] == [
      c.relpaths[i].encode() for i in c.val]
  info = b1.info
  assert (info["num_train_docs"], info["num_val_docs"]) == (len(c.train), len(c.val))
  val_bytes = sum(len(c.texts[i].encode()) for i in c.val)
  assert info["val_bytes"] == val_bytes
  assert info["num_val_tokens"] == val_bytes + len(c.val)  # bytes + one BOS per document
  assert info["val_bytes_per_token"] == pytest.approx(val_bytes / (val_bytes + len(c.val) - 1))


# ------------------------------------------------------------------ packing and iteration

def test_packing_windows():
  tokens = np.arange(100, dtype=np.uint16)
  assert pipeline.num_windows(100, 10) == 9
  b = data.gather_windows(tokens, np.arange(9), 10)
  assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (9, 10)
  np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  np.testing.assert_array_equal(b["inputs"].reshape(-1), np.arange(90))
  np.testing.assert_array_equal(b["targets"].reshape(-1), np.arange(1, 91))
  stream = data.tokenize_documents(data.ByteTokenizer(), ["ab", "", "çd"])
  assert stream.tokens.dtype == np.uint16
  assert stream.tokens.tolist() == [256, 97, 98, 256, 256, 0xC3, 0xA7, 100]
  assert (stream.num_docs, stream.num_bytes) == (3, 5)


def test_packing_matches_stream(tmp_path):
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),))
  b = data.build_data(d, verbose=False)
  c = data.read_corpus(d.paths, d.extensions, d.val_fraction)
  tok = data.ByteTokenizer()
  val_stream = data.tokenize_documents(tok, [c.texts[i] for i in c.val]).tokens
  n = pipeline.num_windows(len(val_stream), d.seq_len)
  batches = b.val_batches(10**6)
  assert len(batches) == n // d.batch_size > 0
  inputs = np.concatenate([x["inputs"] for x in batches])
  targets = np.concatenate([x["targets"] for x in batches])
  covered = len(batches) * d.batch_size * d.seq_len
  np.testing.assert_array_equal(inputs.reshape(-1), val_stream[:covered])
  np.testing.assert_array_equal(targets.reshape(-1), val_stream[1:covered + 1])
  # Train batches are windows of the train stream starting at multiples of seq_len.
  train_stream = data.tokenize_documents(tok, [c.texts[i] for i in c.train]).tokens
  assert b.info["num_train_tokens"] == len(train_stream)
  x = next(b.train_iter)
  assert x["inputs"].shape == (4, 16) and x["inputs"].dtype == np.int32
  for row_in, row_tg in zip(x["inputs"], x["targets"]):
    starts = [s for s in range(0, len(train_stream) - 16, 16)
              if np.array_equal(train_stream[s:s + 16], row_in)]
    assert starts and any(np.array_equal(train_stream[s + 1:s + 17], row_tg) for s in starts)


def test_iterator_state_restore(tmp_path):
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),))
  b = data.build_data(d, seed=3, verbose=False)
  for _ in range(5):
    next(b.train_iter)
  state = b.train_iter.get_state()
  state_json = json.loads(json.dumps(state))
  expected = [next(b.train_iter) for _ in range(6)]
  # A fresh iterator of the same dataset, and one of a freshly built bundle.
  for it in (iter(b.train_dataset), data.build_data(d, seed=3, verbose=False).train_iter):
    it.set_state(state_json)
    got = [next(it) for _ in range(6)]
    for g, e in zip(got, expected):
      np.testing.assert_array_equal(g["inputs"], e["inputs"])
      np.testing.assert_array_equal(g["targets"], e["targets"])
  # The same iterator restored to an earlier state replays too.
  b.train_iter.set_state(state)
  np.testing.assert_array_equal(next(b.train_iter)["inputs"], expected[0]["inputs"])
  # Another seed gives another order.
  other = data.build_data(d, seed=4, verbose=False).train_iter
  assert not all(np.array_equal(next(other)["inputs"], e["inputs"]) for e in expected[:3])


def test_epochs_reshuffle_same_windows():
  seq_len, n, bsz = 8, 12, 4
  tokens = np.arange(n * seq_len + 1, dtype=np.uint16)
  it = iter(pipeline.train_dataset(tokens, seq_len, bsz, seed=0))
  epochs = []
  for _ in range(3):
    ids = np.concatenate([next(it)["inputs"][:, 0] // seq_len for _ in range(n // bsz)])
    epochs.append(ids.tolist())
  for e in epochs:
    assert sorted(e) == list(range(n))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_val_batches_deterministic(tmp_path):
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),))
  b1 = data.build_data(d, seed=0, verbose=False)
  b2 = data.build_data(d, seed=7, verbose=False)
  v1, v2 = b1.val_batches(3), b2.val_batches(3)
  assert len(v1) == 3
  for x, y in zip(v1, v2):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  np.testing.assert_array_equal(b1.val_batches(1)[0]["targets"], v1[0]["targets"])
  available = b1.info["num_val_windows"] // d.batch_size
  assert len(b1.val_batches(available + 50)) == available
  assert b1.val_batches(0) == []
  d_big = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),), seq_len=4096)
  with pytest.raises(ValueError, match=r"fewer than one batch of config\.data\.batch_size=4"):
    data.build_data(d_big, verbose=False).val_batches(1)


def test_process_sharding(tmp_path):
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),))
  glob = data.build_data(d, seed=1, verbose=False)
  shards = [data.build_data(d, seed=1, process_index=p, process_count=2, verbose=False)
            for p in range(2)]
  for _ in range(4):
    g = next(glob.train_iter)
    parts = [next(s.train_iter) for s in shards]
    assert parts[0]["inputs"].shape == (2, 16)
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), g["inputs"])
    np.testing.assert_array_equal(np.concatenate([p["targets"] for p in parts]), g["targets"])
    rows = {tuple(r) for p in parts for r in p["inputs"]}
    assert len(rows) == 4  # disjoint slices
  gv = glob.val_batches(2)
  pv = [s.val_batches(2) for s in shards]
  for k in range(2):
    np.testing.assert_array_equal(
        np.concatenate([pv[0][k]["inputs"], pv[1][k]["inputs"]]), gv[k]["inputs"])
  with pytest.raises(ValueError, match="batch_size = 4.*divisible.*3"):
    data.build_data(d, process_index=0, process_count=3, verbose=False)


def test_max_documents_and_sentencepiece_pipeline(tmp_path, spm_model):
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),), tokenizer="sentencepiece",
               spm_model=spm_model, max_documents=5)
  b = data.build_data(d, verbose=False)
  c = data.read_corpus(d.paths, d.extensions, d.val_fraction)
  assert b.info["num_train_docs"] == 5 and b.info["tokenizer"].startswith("spm-")
  tok = data.SentencePieceTokenizer(spm_model)
  expected = data.tokenize_documents(tok, [c.texts[i] for i in c.train[:5]]).tokens
  assert b.info["num_train_tokens"] == len(expected)
  x = next(b.train_iter)
  assert x["inputs"].max() < 100


# ------------------------------------------------------------------ tfds sources

def prepare_tfds_dir(tmp_path) -> tuple[str, str]:
  """Prepares the MoejaxText builder into a fresh data_dir; returns (name, data_dir)."""
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),), cache_dir=str(tmp_path / "tfds"))
  src = data.load_source(d, verbose=False)
  return src.name, str(tmp_path / "tfds")


def test_tfds_source_reads_prepared_dataset(tmp_path):
  name, data_dir = prepare_tfds_dir(tmp_path)
  emb = data.build_data(data_cfg(tmp_path, paths=(str(tmp_path / "corp"),)), verbose=False)
  d = data_cfg(tmp_path, source="tfds", tfds_name=name, tfds_data_dir=data_dir)
  b = data.build_data(d, verbose=False)
  assert name.startswith("moejax_text/fp-") and b.info["source"] == f"tfds:{name}/1.0.0"
  for key in ("num_train_docs", "num_val_docs", "num_train_tokens", "num_val_tokens"):
    assert b.info[key] == emb.info[key], key
  np.testing.assert_array_equal(b.val_batches(1)[0]["inputs"], emb.val_batches(1)[0]["inputs"])
  # The token stream is cached beside the prepared dataset.
  assert any(f.startswith("tokens-train-byte") for f in os.listdir(b.info["cache_dir"]))
  d.text_key = "body"
  with pytest.raises(ValueError, match="text_key = 'body'.*fields.*path.*text"):
    data.build_data(d, verbose=False)


def test_tfds_not_prepared_error(tmp_path):
  empty = str(tmp_path / "nowhere")
  d = data_cfg(tmp_path, source="tfds", tfds_name="tiny_shakespeare", tfds_data_dir=empty)
  with pytest.raises(FileNotFoundError) as e:
    data.build_data(d, verbose=False)
  msg = str(e.value)
  assert "'tiny_shakespeare' is not prepared" in msg and empty in msg
  assert (f"tfds build tiny_shakespeare --data_dir {empty} --file_format array_record"
          in msg)
  # Prepared, but as TFRecord (needs TensorFlow): a clear error too.
  info_dir = tmp_path / "tfr" / "tiny_shakespeare" / "1.0.0"
  info_dir.mkdir(parents=True)
  (info_dir / "dataset_info.json").write_text(json.dumps({"fileFormat": "tfrecord"}))
  d.tfds_data_dir = str(tmp_path / "tfr")
  with pytest.raises(ValueError, match="(?s)prepared only as \\['tfrecord'\\].*--file_format "
                     "array_record"):
    data.build_data(d, verbose=False)


# ------------------------------------------------------------------ the default corpus

def test_stdlib_default_corpus(tmp_path):
  d = config_lib.base_config().data
  d.cache_dir = str(tmp_path / "cache")
  b = data.build_data(d, verbose=False)
  info = b.info
  assert info["source_num_files"] > 400  # ~650 on 3.11, ~600 on 3.12
  assert info["num_train_docs"] + info["num_val_docs"] == info["source_num_files"]
  assert 0.01 < info["num_val_docs"] / info["source_num_files"] < 0.12
  assert info["num_train_tokens"] > 5_000_000 and info["num_val_tokens"] > 100_000
  assert 0.999 < info["val_bytes_per_token"] < 1.0
  c = data.read_corpus((), (".py",), d.val_fraction)
  assert not any(r.startswith(("test/", "idlelib/", "site-packages/")) for r in c.relpaths)
  assert "os.py" in c.relpaths and "json/__init__.py" in c.relpaths
  x = next(b.train_iter)
  assert x["inputs"].shape == (16, 256) and x["targets"].shape == (16, 256)
  assert x["inputs"].max() <= 256
  v = b.val_batches(2)
  assert len(v) == 2 and v[0]["inputs"][0, 0] == 256  # the stream starts with BOS
