"""Quickstart: a ~0.82M-parameter byte-level decoder LM on the embedded corpus.

Trains on a 2-core laptop-class CPU in about three minutes (600 steps of 16 x 128
tokens, 1.2M tokens) and reaches about 2.1 bits per byte on the held-out split of the
Python standard library sources.

    python -m moejax.train --config configs/quickstart.py --workdir runs/quickstart
    python -m moejax.train --config configs/quickstart.py:runlocal --workdir /tmp/q

`arg` presets (big_vision style): "" (default), "runlocal" (seconds, for smoke tests).
"""

from moejax.config import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.name = "quickstart"

  m = config.model
  m.d_model = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32
  m.d_ff = 384
  m.tie_embeddings = True

  config.data.seq_len = 128
  config.data.batch_size = 16

  o = config.optim
  o.lr = 5e-3
  o.schedule = "cosine"
  o.warmup_steps = 50
  o.min_lr_ratio = 0.05
  o.weight_decay = 0.05

  t = config.train
  t.num_steps = 600
  t.eval_every = 150
  t.eval_batches = 16
  t.log_every = 20
  t.checkpoint_every = 300

  if arg == "runlocal":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = 32, 2, 4, 2, 8, 64
    config.data.seq_len, config.data.batch_size = 32, 4
    o.warmup_steps = 2
    t.num_steps, t.eval_every, t.eval_batches, t.log_every, t.checkpoint_every = 20, 10, 2, 5, 10
  elif arg:
    raise ValueError(f"configs/quickstart.py: unknown arg {arg!r}; allowed: '', 'runlocal'")
  return config
