"""moejax.data: tokenizers, sources, preparation into shards, streaming windows, mixtures.

Every corpus here is written by the test itself (small random text files, JSONL, Parquet,
an arrow folder laid out as `datasets.save_to_disk` writes it, a TFDS builder).
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections
import numpy as np
import pytest

from moejax import config as config_lib
from moejax.data import corpus
from moejax.data import pipeline
from moejax.data import prepare as prepare_lib
from moejax.data import shards
from moejax.data import tokenizers

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega é ü ∑ 🙂").split()


def make_texts(n: int, seed: int = 0, lo: int = 60, hi: int = 180) -> list[str]:
  rng = np.random.default_rng(seed)
  return [f"# doc {i}\n" + " ".join(rng.choice(WORDS, int(rng.integers(lo, hi)))) + "\n"
          for i in range(n)]


def make_corpus(root, num_files: int = 24, seed: int = 0) -> list[str]:
  """Writes `num_files` .py files of 300-900 bytes under root/corp; returns their paths."""
  folder = root / "corp"
  paths = []
  for i, text in enumerate(make_texts(num_files, seed)):
    sub = folder / (f"pkg{i % 3}" if i % 2 else "")
    sub.mkdir(parents=True, exist_ok=True)
    p = sub / f"mod{i:02d}.py"
    p.write_text(text, encoding="utf-8")
    paths.append(str(p))
  return paths


def data_cfg(tmp_path, **overrides) -> ml_collections.ConfigDict:
  d = config_lib.base_config().data
  d.cache_dir = str(tmp_path / "cache")
  d.seq_len, d.batch_size = 16, 4
  d.val_fraction = 0.25
  d.prepare_workers = 1
  for k, v in overrides.items():
    d[k] = v
  return d


def byte_stream(texts) -> np.ndarray:
  """[BOS] doc [BOS] doc ... with the byte tokenizer: the reference for prepared splits."""
  out = []
  for t in texts:
    out += [256] + list(t.encode("utf-8"))
  return np.asarray(out, np.int64)


def split_texts(texts, keys, frac):
  val = [t for t, k in zip(texts, keys) if corpus.path_hash_fraction(k) < frac]
  train = [t for t, k in zip(texts, keys) if corpus.path_hash_fraction(k) >= frac]
  return train, val


def whole_split(folder, split, tok=None) -> np.ndarray:
  sp = shards.open_prepared(folder, tok or tokenizers.ByteTokenizer()).splits[split]
  return sp.read(0, sp.num_tokens).astype(np.int64)


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


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> str:
  """A byte-level BPE tokenizer.json (GPT-2 style) with a tokenizer_config.json beside it."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tmp = tmp_path_factory.mktemp("hf")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(make_texts(200, seed=5), trainer)
  tok.save(str(tmp / "tokenizer.json"))
  (tmp / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  return str(tmp)


# ------------------------------------------------------------------ tokenizers

def test_byte_tokenizer_round_trip():
  tok = tokenizers.ByteTokenizer()
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (257, 256, -1)
  text = "héllo wörld ∑ 🙂\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
  assert tok.decode(np.concatenate([[256], ids[:3], [256], ids[3:]])) == text
  assert tok.decode([104, 0xC3, 105]) == "h\ufffdi"
  assert tok.token_bytes()[ids].sum() == len(text.encode()) and tok.token_bytes()[256] == 0


def test_sentencepiece_round_trip(spm_model):
  tok = tokenizers.SentencePieceTokenizer(spm_model)
  assert tok.vocab_size == 100 and tok.bos_id == 1
  text = "the quick brown fox jumps over the lazy dog near über café 12."
  ids = tok.encode(text)
  assert ids.max() < 100 and len(ids) < 0.7 * len(text) and tok.decode(ids) == text
  assert tok.identity.startswith("spm-") and not tok.bytes_exact
  # Pieces count their decoded bytes; the dummy-prefix space of the first piece is extra.
  assert tok.token_bytes()[ids].sum() == len(text.encode()) + 1


def test_hf_tokenizer_round_trip_and_exact_bytes(hf_tokenizer):
  tok = tokenizers.HFTokenizer(hf_tokenizer)
  eot = tok._tok.token_to_id("<|endoftext|>")
  assert tok.bos_id == eot and tok.eos_id == -1  # no BOS: EOS separates documents
  text = "alpha beta é ü ∑ 🙂 zeta\n"
  ids = tok.encode(text)
  assert tok.decode(ids) == text and tok.bytes_exact
  assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))  # byte-level: exact
  assert tok.token_bytes()[eot] == 0
  assert [x.tolist() for x in tok.encode_batch([text, "mu"])] == [ids.tolist(),
                                                                  tok.encode("mu").tolist()]
  with pytest.raises(ValueError, match="bos_token = '<nope>' is not a token"):
    tokenizers.HFTokenizer(hf_tokenizer, bos_token="<nope>")


def test_make_tokenizer_selection(tmp_path, spm_model, hf_tokenizer):
  d = data_cfg(tmp_path)
  assert isinstance(tokenizers.make_tokenizer(d), tokenizers.ByteTokenizer)
  d.tokenizer, d.spm_model = "sentencepiece", spm_model
  assert tokenizers.make_tokenizer(d).vocab_size == 100
  d.tokenizer, d.hf_tokenizer = "hf", hf_tokenizer
  assert isinstance(tokenizers.make_tokenizer(d), tokenizers.HFTokenizer)
  d.tokenizer = "wordpiece"
  with pytest.raises(ValueError, match="data.tokenizer.*wordpiece"):
    tokenizers.make_tokenizer(d)


# ------------------------------------------------------------------ sources and splits

def test_split_deterministic_and_disjoint():
  rel = [f"pkg{i % 7}/mod{i}.py" for i in range(400)]
  train, val = corpus.split_files(rel, 0.2)
  assert set(train).isdisjoint(val) and sorted(train + val) == list(range(400))
  assert val == [i for i, r in enumerate(rel)
                 if int(hashlib.sha256(r.encode()).hexdigest()[:8], 16) / 2**32 < 0.2]
  _, val2 = corpus.split_files(rel[:100], 0.2)
  assert val2 == [i for i in val if i < 100]  # a file's split depends on its path only
  _, val3 = corpus.split_files(rel, 1e-12)  # never empty: the smallest hash
  assert val3 == [int(np.argmin([corpus.path_hash_fraction(r) for r in rel]))]


def test_embedded_prepare_equals_reference_stream(tmp_path, capsys):
  root = tmp_path / "corp"
  (root / "sub").mkdir(parents=True)
  (root / "__pycache__").mkdir()
  texts = make_texts(12, seed=1)
  for i, t in enumerate(texts):
    (root / ("sub" if i % 2 else "") / f"m{i:02d}.py").write_text(t, encoding="utf-8")
  (root / "b.txt").write_text("not a .py file\n")
  (root / "__pycache__" / "x.py").write_text("cached\n")
  (root / "latin1.py").write_bytes("é = 1\n".encode("latin-1"))
  (root / "empty.py").write_text("")
  d = data_cfg(tmp_path, paths=(str(root),), val_fraction=0.3)
  b = pipeline.build_data(d)
  out = capsys.readouterr()
  assert "moejax.data.prepare: embedded" in out.out and "train / " in out.out
  files = {f"corp/{'sub/' if i % 2 else ''}m{i:02d}.py": t for i, t in enumerate(texts)}
  rels = sorted(files)
  train, val = corpus.split_files(rels, 0.3)
  folder = b.info["prepared"][0]
  np.testing.assert_array_equal(whole_split(folder, "train"),
                                byte_stream([files[rels[i]] for i in train]))
  np.testing.assert_array_equal(whole_split(folder, "validation"),
                                byte_stream([files[rels[i]] for i in val]))
  m = prepare_lib.read_manifest(folder)
  assert m["source"]["skipped_not_utf8"] == 1 and m["source"]["skipped_empty"] == 1
  assert m["splits"]["validation"]["bytes"] == sum(len(files[rels[i]].encode()) for i in val)
  # Reused: the second build prepares nothing.
  pipeline.build_data(d)
  assert "prepare:" not in capsys.readouterr().out
  # A changed file is a new source: prepared afresh into another folder.
  (root / "m00.py").write_text(texts[0] + "# changed\n", encoding="utf-8")
  assert pipeline.build_data(d, verbose=False).info["prepared"][0] != folder


def test_jsonl_parquet_and_hf_disk_sources(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  texts = make_texts(40, seed=2)
  (tmp_path / "j").mkdir()
  with open(tmp_path / "j" / "part.jsonl", "w") as f:
    for t in texts:
      f.write(json.dumps({"id": 1, "content": t}) + "\n")
  pq.write_table(pa.table({"content": texts}), tmp_path / "part.parquet", row_group_size=7)
  keys_j = [f"j/part.jsonl:{n + 1}" for n in range(40)]  # relpath:line (1-based)
  keys_p = [f"part.parquet:{n}" for n in range(40)]  # relpath:row
  for source, path, keys in (("jsonl", tmp_path / "j", keys_j),
                             ("parquet", tmp_path / "part.parquet", keys_p)):
    d = data_cfg(tmp_path, source=source, paths=(str(path),), text_key="content")
    b = pipeline.build_data(d, verbose=False)
    train, val = split_texts(texts, keys, 0.25)
    np.testing.assert_array_equal(whole_split(b.info["prepared"][0], "train"),
                                  byte_stream(train))
    np.testing.assert_array_equal(whole_split(b.info["prepared"][0], "validation"),
                                  byte_stream(val))
    d.text_key = "body"
    with pytest.raises(ValueError, match=f"{path.name if source == 'parquet' else 'part'}.*"
                       "text_key = 'body'.*(fields|columns).*content"):
      pipeline.build_data(d, verbose=False)
  # A DatasetDict as datasets' save_to_disk writes it: a folder per split with state.json
  # and arrow stream files.
  hf = tmp_path / "hf"
  for split, part in (("train", texts[:30]), ("validation", texts[30:])):
    (hf / split).mkdir(parents=True)
    table = pa.table({"text": part, "n": list(range(len(part)))})
    with pa.OSFile(str(hf / split / "data-00000-of-00001.arrow"), "wb") as sink:
      with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=8)
    (hf / split / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
  (hf / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
  b = pipeline.build_data(data_cfg(tmp_path, source="hf_disk", paths=(str(hf),)),
                          verbose=False)
  np.testing.assert_array_equal(whole_split(b.info["prepared"][0], "train"),
                                byte_stream(texts[:30]))
  np.testing.assert_array_equal(whole_split(b.info["prepared"][0], "validation"),
                                byte_stream(texts[30:]))
  with pytest.raises(ValueError, match="splits \\['train', 'validation'\\], not 'test'"):
    pipeline.build_data(data_cfg(tmp_path, source="hf_disk", paths=(str(hf),),
                                 val_split="test"), verbose=False)


def test_tfds_source(tmp_path):
  import tensorflow_datasets as tfds

  texts = make_texts(30, seed=3)

  class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text()}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(texts[:24]),
              "validation": self._generate_examples(texts[24:])}

    def _generate_examples(self, part):
      for i, t in enumerate(part):
        yield i, {"text": t}

  data_dir = str(tmp_path / "tfds")
  TinyText(data_dir=data_dir, file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  d = data_cfg(tmp_path, source="tfds", tfds_name="tiny_text", tfds_data_dir=data_dir)
  b = pipeline.build_data(d, verbose=False)
  np.testing.assert_array_equal(whole_split(b.info["prepared"][0], "train"),
                                byte_stream(texts[:24]))
  np.testing.assert_array_equal(whole_split(b.info["prepared"][0], "validation"),
                                byte_stream(texts[24:]))
  d.text_key = "body"
  with pytest.raises(ValueError, match="text_key = 'body'.*fields \\['text'\\]"):
    pipeline.build_data(d, verbose=False)
  d.tfds_name, d.tfds_data_dir = "tiny_shakespeare", str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="(?s)'tiny_shakespeare' is not prepared.*tfds build "
                     "tiny_shakespeare --data_dir .*nowhere --file_format array_record"):
    pipeline.build_data(d, verbose=False)


# ------------------------------------------------------------------ prepare: resume, workers

def test_prepare_resumes_and_workers_agree(tmp_path, monkeypatch):
  make_corpus(tmp_path, num_files=30)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),))
  out = str(tmp_path / "prep")
  plan = corpus.plan_source(d)
  # A unit per file (data.shard_mb groups small files; these are far below a megabyte).
  items = [x for u in plan.units for x in u.items]
  plan.units = [corpus.Unit(i, "embedded", [x], 1) for i, x in enumerate(items)]
  m1 = prepare_lib.prepare(d, out, verbose=False, plan=plan)
  assert len(m1["splits"]["train"]["shards"]) + len(m1["splits"]["validation"]["shards"]) == 30
  ref = {s: whole_split(out, s) for s in ("train", "validation")}
  # A crash after some units: the manifest and three units' files are gone.
  os.remove(os.path.join(out, "manifest.json"))
  kept = {f: os.path.getmtime(os.path.join(out, "units", f))
          for f in sorted(os.listdir(os.path.join(out, "units")))}
  for unit in (3, 11, 20):
    os.remove(os.path.join(out, "units", f"{unit:05d}.json"))
  m2 = prepare_lib.prepare(d, out, verbose=False, plan=plan)
  redone = [f for f in os.listdir(os.path.join(out, "units"))
            if os.path.getmtime(os.path.join(out, "units", f)) != kept.get(f)]
  assert sorted(redone) == ["00003.json", "00011.json", "00020.json"]
  assert m2["splits"] == m1["splits"]
  for s in ref:
    np.testing.assert_array_equal(whole_split(out, s), ref[s])
  # Two worker processes write the same shards.
  out2 = str(tmp_path / "prep2")
  prepare_lib.prepare(d, out2, workers=2, verbose=False, plan=plan)
  for s in ref:
    np.testing.assert_array_equal(whole_split(out2, s), ref[s])
  # Random windows across many small shards (with at most 2 readers open) equal the
  # stream's slices.
  monkeypatch.setattr(shards, "MAX_OPEN_SHARDS", 2)
  sp = shards.open_prepared(out2, tokenizers.make_tokenizer(d)).splits["train"]
  starts = np.random.default_rng(0).integers(0, sp.num_tokens - 1500, 40)
  got = sp.read_many(starts, 1500)
  np.testing.assert_array_equal(got, np.stack([ref["train"][a:a + 1500] for a in starts]))
  assert len(sp._readers) == 2  # pylint: disable=protected-access
  # Another tokenizer may not reuse the folder.
  d2 = data_cfg(tmp_path, paths=d.paths, append_eos=True)
  with pytest.raises(ValueError, match="append_eos"):
    prepare_lib.prepare(d2, out, verbose=False, plan=plan)


def test_prepare_cli(tmp_path):
  make_corpus(tmp_path)
  out = tmp_path / "cli"
  rc = prepare_lib.main(["--config", "configs/quickstart.py", "--out", str(out),
                         f"--config.data.paths=('{tmp_path / 'corp'}',)",
                         "--config.data.prepare_workers=1"])
  assert rc == 0 and (out / "manifest.json").exists()
  m = json.loads((out / "manifest.json").read_text())
  assert m["tokenizer"] == "byte" and m["splits"]["train"]["docs"] > 0
  rc = prepare_lib.main(["--config", "configs/quickstart.py", "--out", str(out),
                         "--config.data.paths=('/does/not/exist',)"])
  assert rc == 2


# ------------------------------------------------------------------ streaming

def test_windows_iterator_state_and_epochs(tmp_path):
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),))
  b = pipeline.build_data(d, seed=3, verbose=False)
  stream = whole_split(b.info["prepared"][0], "train")
  n = b.info["num_train_windows"]
  assert n == (len(stream) - 1) // 16
  windows = sorted(tuple(stream[i * 16:i * 16 + 17]) for i in range(n))

  def rows(batch):
    return [tuple(np.concatenate([i, t[-1:]])) for i, t in zip(batch["inputs"],
                                                                batch["targets"])]

  seen = [w for _ in range(3 * n // 4 + 1) for w in rows(next(b.train_iter))]
  for e in range(3):  # every epoch is a permutation of all windows, reshuffled
    assert sorted(seen[e * n:(e + 1) * n]) == windows
  assert seen[:n] != seen[n:2 * n]
  assert b.progress(2 * n) == {"epoch": pytest.approx(2.0)}
  state = json.loads(json.dumps(b.train_iter.get_state()))
  expected = [next(b.train_iter) for _ in range(5)]
  it = pipeline.build_data(d, seed=3, verbose=False).train_iter
  it.set_state(state)
  for e in expected:
    g = next(it)
    assert set(g) == {"inputs", "targets"}
    np.testing.assert_array_equal(g["inputs"], e["inputs"])
    np.testing.assert_array_equal(g["targets"], e["targets"])
  other = pipeline.build_data(d, seed=4, verbose=False).train_iter
  assert not all(np.array_equal(next(other)["inputs"], e["inputs"]) for e in expected[:3])


def test_val_batches_and_exact_bytes(tmp_path):
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),))
  b = pipeline.build_data(d, verbose=False)
  ((name, (batches, nbytes)),) = b.val_batches(3).items()
  stream = whole_split(b.info["prepared"][0], "validation")
  inputs = np.concatenate([x["inputs"] for x in batches]).reshape(-1)
  np.testing.assert_array_equal(inputs, stream[:3 * 4 * 16])
  targets = np.concatenate([x["targets"] for x in batches])
  assert nbytes == int((targets != 256).sum())  # bytes of exactly these targets
  assert len(b.val_batches(10**6)[name][0]) == b.info["num_val_windows"] // 4
  with pytest.raises(ValueError, match=r"fewer than one batch of config\.data\.batch_size=4"):
    pipeline.build_data(data_cfg(tmp_path, paths=d.paths, seq_len=4096),
                        verbose=False).val_batches(1)


def test_processes_read_disjoint_slices_whose_union_is_the_epoch(tmp_path):
  """2 processes (each feeding 4 devices: 8 of the 16 rows of a global batch)."""
  make_corpus(tmp_path, num_files=40)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),), batch_size=16)
  glob = pipeline.build_data(d, seed=1, verbose=False)
  procs = [pipeline.build_data(d, seed=1, process_index=p, process_count=2, verbose=False)
           for p in range(2)]
  n = glob.info["num_train_windows"]
  rows = {p: [] for p in range(2)}
  for _ in range(-(-n // 16)):
    g = next(glob.train_iter)
    parts = [next(s.train_iter) for s in procs]
    assert parts[0]["inputs"].shape == (8, 16)
    np.testing.assert_array_equal(np.concatenate([x["inputs"] for x in parts]), g["inputs"])
    for p in range(2):
      rows[p] += [tuple(r) for r in parts[p]["inputs"]]
  stream = whole_split(glob.info["prepared"][0], "train")
  epoch = [tuple(stream[i * 16:(i + 1) * 16]) for i in range(n)]
  first = [r for k in range(len(rows[0]) // 8) for p in range(2)
           for r in rows[p][k * 8:(k + 1) * 8]][:n]
  assert sorted(first) == sorted(epoch)  # the union of the slices is the epoch, once
  gv, pv = glob.val_batches(2), [s.val_batches(2) for s in procs]
  (name,) = gv
  for k in range(2):
    np.testing.assert_array_equal(np.concatenate([pv[0][name][0][k]["inputs"],
                                                  pv[1][name][0][k]["inputs"]]),
                                  gv[name][0][k]["inputs"])
  assert pv[0][name][1] == pv[1][name][1] == gv[name][1]  # bytes of the global batches
  with pytest.raises(ValueError, match="batch_size = 16.*divisible.*3"):
    pipeline.build_data(d, process_index=0, process_count=3, verbose=False)


def _prepared_pair(tmp_path):
  """Two prepared folders with disjoint alphabets (source A: lowercase, B: digits)."""
  out = []
  for name, alphabet in (("a", "abcdefgh \n"), ("b", "0123456789\n")):
    rng = np.random.default_rng(len(name) + ord(name))
    root = tmp_path / f"src_{name}"
    root.mkdir()
    for i in range(16):
      (root / f"f{i}.txt").write_text("".join(rng.choice(list(alphabet), 400)))
    d = data_cfg(tmp_path, paths=(str(root),), extensions=())
    prepare_lib.prepare(d, str(tmp_path / f"prep_{name}"), verbose=False)
    out.append(str(tmp_path / f"prep_{name}"))
  return out


def test_mixture_proportions_and_resume(tmp_path):
  a, b = _prepared_pair(tmp_path)
  sched = pipeline.MixtureSchedule([0.7, 0.3], seed=5)
  src, idx = sched.lookup(np.arange(10_000))
  assert abs((src == 0).mean() - 0.7) < 0.02
  for s in range(2):  # each source's indices run 0, 1, 2, ... in order
    np.testing.assert_array_equal(idx[src == s], np.arange((src == s).sum()))
  np.testing.assert_array_equal(sched.rows_per_source(10_000), np.bincount(src))
  np.testing.assert_array_equal(sched.rows_per_source(4321), np.bincount(src[:4321]))
  d = data_cfg(tmp_path, mixture=(f"{a}:0.7", f"{b}:0.3"), batch_size=8)
  bundle = pipeline.build_data(d, seed=2, verbose=False)
  digits = 0
  for _ in range(40):
    x = next(bundle.train_iter)["inputs"]
    digits += int(((x >= 48) & (x <= 57)).any(axis=1).sum())
  assert abs(digits / 320 - 0.3) < 0.05
  prog = bundle.progress(320)
  assert prog["prep_a/tokens_seen"] + prog["prep_b/tokens_seen"] == 320 * 16
  assert prog["prep_a/epoch"] == pytest.approx(2.2 * prog["prep_b/epoch"], rel=0.1)  # same size
  state = bundle.train_iter.get_state()
  expected = [next(bundle.train_iter)["inputs"] for _ in range(4)]
  it = pipeline.build_data(d, seed=2, verbose=False).train_iter
  it.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it)["inputs"], e)
  assert set(bundle.val_batches(1)) == {"prep_a", "prep_b"}
  with pytest.raises(ValueError, match="every weight must be >= 1/1000"):
    pipeline.MixtureSchedule([1.0, 1e-5], seed=0)


def test_document_fields():
  x = np.asarray([[5, 256, 7, 8, 256, 256, 9]])
  f = pipeline.document_fields(x, 256)
  assert f["segment_ids"].tolist() == [[0, 1, 1, 1, 2, 3, 3]]
  assert f["positions"].tolist() == [[0, 0, 1, 2, 0, 0, 1]]


# ------------------------------------------------------------------ bad input

def test_bad_inputs_raise_clear_errors(tmp_path, spm_model):
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),))
  folder = pipeline.build_data(d, verbose=False).info["prepared"][0]
  # A missing path, a missing prepared folder: config validation names the field.
  for field, value in (("data.paths", ("/no/such/dir",)), ("data.prepared", "/no/such/prep"),
                       ("data.mixture", ("/no/such/prep:1.0",)), ("data.mixture", ("x",))):
    c = config_lib.base_config()
    c.data[field.split(".")[1]] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.{field}"):
      config_lib.validate(c)
  # An empty source.
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "e.py").write_text("")
  with pytest.raises(ValueError, match="gave no train documents"):
    pipeline.build_data(data_cfg(tmp_path, paths=(str(tmp_path / "empty"),)), verbose=False)
  (tmp_path / "none").mkdir()
  with pytest.raises(ValueError, match="none.*holds no files"):
    pipeline.build_data(data_cfg(tmp_path, paths=(str(tmp_path / "none"),)), verbose=False)
  # A folder that is not prepared, and one prepared with another tokenizer.
  with pytest.raises(ValueError, match="no readable manifest.json"):
    pipeline.build_data(data_cfg(tmp_path, prepared=str(tmp_path / "none")), verbose=False)
  with pytest.raises(ValueError, match="prepared with tokenizer 'byte'.*spm-"):
    pipeline.build_data(data_cfg(tmp_path, prepared=folder, tokenizer="sentencepiece",
                                 spm_model=spm_model), verbose=False)
  # A truncated shard, then one corrupted in place (same size).
  shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.startswith("train"))[0])
  raw = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(raw[:len(raw) // 2])
  with pytest.raises(ValueError, match="train-00000.arrayrecord has .* bytes, the manifest "
                     "says .*truncated"):
    pipeline.build_data(data_cfg(tmp_path, prepared=folder), verbose=False)
  with open(shard, "wb") as f:
    f.write(raw[:64] + bytes(len(raw) - 64))
  bundle = pipeline.build_data(data_cfg(tmp_path, prepared=folder), verbose=False)
  with pytest.raises(ValueError, match="corrupt"):
    next(bundle.train_iter)


# ------------------------------------------------------------------ the default corpus

def test_stdlib_default_corpus(tmp_path):
  d = config_lib.base_config().data
  d.cache_dir = str(tmp_path / "cache")
  b = pipeline.build_data(d, verbose=False)
  info = b.info
  m = prepare_lib.read_manifest(info["prepared"][0])
  assert m["source"]["num_files"] > 400  # ~650 on 3.11, ~600 on 3.12
  assert 0.01 < info["num_val_docs"] / m["source"]["num_files"] < 0.12
  assert info["num_train_tokens"] > 5_000_000 and info["num_val_tokens"] > 100_000
  files = [f.relpath for f in corpus.list_corpus_files((), (".py",))]
  assert not any(r.startswith(("test/", "idlelib/", "site-packages/")) for r in files)
  assert "os.py" in files and "json/__init__.py" in files
  x = next(b.train_iter)
  assert x["inputs"].shape == (16, 256) and x["inputs"].max() <= 256
  ((batches, _),) = b.val_batches(2).values()
  assert batches[0]["inputs"][0, 0] == 256  # the stream starts with BOS


def test_max_documents_and_sentencepiece_pipeline(tmp_path, spm_model):
  make_corpus(tmp_path)
  d = data_cfg(tmp_path, paths=(str(tmp_path / "corp"),), tokenizer="sentencepiece",
               spm_model=spm_model, max_documents=5)
  b = pipeline.build_data(d, verbose=False)
  assert b.info["num_train_docs"] == 5 and b.info["tokenizer"].startswith("spm-")
  tok = tokenizers.SentencePieceTokenizer(spm_model)
  rels = [f.relpath for f in corpus.list_corpus_files(d.paths, d.extensions)]
  train, _ = corpus.split_files(rels, d.val_fraction)
  paths = {f.relpath: f.path for f in corpus.list_corpus_files(d.paths, d.extensions)}
  expected = []
  for i in train[:5]:
    expected += [tok.bos_id] + tok.encode(open(paths[rels[i]], encoding="utf-8").read()).tolist()
  np.testing.assert_array_equal(whole_split(b.info["prepared"][0], "train", tok), expected)
  assert next(b.train_iter)["inputs"].max() < 100
