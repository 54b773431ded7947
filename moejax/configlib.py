"""Validation helpers shared by every config section (moejax/config.py composes them).

Each package owns its section: `defaults()` and `validate(config)` sit beside the
dataclass that uses the fields (moejax/moe/config.py, moejax/recursion/config.py).
Every failure is a `ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
  """A config value that is not allowed. The message names field, value, allowed."""


def fail(field: str, value: Any, allowed: str):
  raise ConfigError(f"config.{field} = {value!r} is not allowed: {allowed}")


def get(c, field):
  node = c
  for p in field.split("."):
    node = node[p]
  return node


def pos_int(c, field):
  v = get(c, field)
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    fail(field, v, "must be a positive integer")


def nonneg_int(c, field):
  v = get(c, field)
  if not isinstance(v, int) or isinstance(v, bool) or v < 0:
    fail(field, v, "must be an integer >= 0")


def choice(c, field, allowed):
  v = get(c, field)
  if v not in allowed:
    fail(field, v, f"must be one of {list(allowed)}")


def boolean(c, field):
  v = get(c, field)
  if not isinstance(v, bool):
    fail(field, v, "must be True or False")


def float_range(c, field, lo, hi, lo_open=False, hi_open=False):
  v = get(c, field)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    fail(field, v, "must be a finite number")
  bad = (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi)
  if bad:
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    fail(field, v, f"must lie in {lb}{lo}, {hi}{rb}")


def floats(c, field, lo, hi, length):
  """() or a tuple of `length` numbers, each in (lo, hi]."""
  v = get(c, field)
  if isinstance(v, str) or not isinstance(v, (tuple, list)) or (v and len(v) != length):
    fail(field, v, f"must be () or a tuple of {length} numbers (one per loop)")
  for x in v:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not lo < x <= hi:
      fail(field, v, f"every entry must lie in ({lo}, {hi}]")
