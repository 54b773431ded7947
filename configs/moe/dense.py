"""Dense baseline with the same active FFN FLOPs per token as the tiny MoE configs.

tiny: d_ff 384 (= switch's one expert, gshard's two of 192, deepseek's 7+1 of 48).
Args: "" / "tiny", "runlocal", "large".
"""

from moejax.config import base_config
from moejax.presets import apply_size


def get_config(arg: str = ""):
  config = base_config()
  size = apply_size(config, arg)
  config.name = f"dense_{size}"
  return config
