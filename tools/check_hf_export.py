"""Dev-only: transformers loads moejax's exports to the fixtures' reference logits.

    .venv/bin/python tools/check_hf_export.py export /tmp/hfexport      # moejax side
    /tmp/hfref/bin/python tools/check_hf_export.py check /tmp/hfexport  # torch side

`export` re-imports each fixture under tests/fixtures/hf with moejax.hf.load and writes it
back with moejax.hf.save; `check` loads every export with transformers'
AutoModelForCausalLM and compares its float32 logits with the fixture's reference.npz,
writing benchmarks/results/hf_export_check.json. tests/test_hf.py re-runs this live when
torch and transformers are installed.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")


def export(out: str) -> None:
  sys.path.insert(0, ROOT)
  import moejax.hf as hf  # pylint: disable=g-import-not-at-top
  for name in sorted(os.listdir(FIXTURES)):
    model, variables = hf.load(os.path.join(FIXTURES, name))
    hf.save(model, variables, os.path.join(out, name))
    print(f"exported {name}")


def check(out: str) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  rows = {}
  for name in sorted(os.listdir(out)):
    ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
    tm = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, name)).eval()
    with torch.no_grad():
      got = tm(torch.tensor(ref["input_ids"], dtype=torch.long)).logits.float().numpy()
    err = float(np.abs(got - ref["logits"]).max() / np.abs(ref["logits"]).max())
    rows[name] = {"class": type(tm).__name__, "max_abs_err_over_max_abs_logit": err,
                  "ok": err < 1e-4}
    print(f"{name}: {type(tm).__name__} relative error {err:.2e}")
  result = {"transformers": transformers.__version__, "torch": torch.__version__,
            "families": rows, "all_ok": all(r["ok"] for r in rows.values())}
  path = os.path.join(ROOT, "benchmarks", "results", "hf_export_check.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  {"export": export, "check": check}[sys.argv[1]](sys.argv[2])
