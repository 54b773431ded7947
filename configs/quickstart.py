"""Quickstart: a ~1.6M-parameter byte-level decoder LM on the embedded corpus.

Trains on this laptop-class CPU in about three minutes and reaches ~2.4 bits per
byte on the held-out split of the Python standard library sources.

    python -m moejax.train --config configs/quickstart.py --workdir runs/quickstart
    python -m moejax.train --config configs/quickstart.py:runlocal --workdir /tmp/q

`arg` presets (big_vision style): "" (default), "runlocal" (seconds, for smoke tests).
"""

from moejax.config import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.name = "quickstart"

  m = config.model
  m.d_model = 192
  m.num_layers = 4
  m.num_heads = 6
  m.num_kv_heads = 2
  m.head_dim = 32
  m.d_ff = 512
  m.tie_embeddings = True

  config.data.seq_len = 128
  config.data.batch_size = 32

  o = config.optim
  o.lr = 4e-3
  o.schedule = "cosine"
  o.warmup_steps = 100
  o.min_lr_ratio = 0.05
  o.weight_decay = 0.05

  t = config.train
  t.num_steps = 1800
  t.eval_every = 300
  t.eval_batches = 16
  t.log_every = 50
  t.checkpoint_every = 600

  if arg == "runlocal":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = 32, 2, 4, 2, 8, 64
    config.data.seq_len, config.data.batch_size = 32, 4
    o.warmup_steps = 2
    t.num_steps, t.eval_every, t.eval_batches, t.log_every, t.checkpoint_every = 20, 10, 2, 5, 10
  elif arg:
    raise ValueError(f"configs/quickstart.py: unknown arg {arg!r}; allowed: '', 'runlocal'")
  return config
