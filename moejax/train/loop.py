"""The training loop: the only place with effects (data, checkpoints, metrics, signals).

    python -m moejax.train --config configs/quickstart.py --workdir runs/q \
        [--config.train.num_steps=500 ...]

Resumes from the newest good checkpoint in `workdir/checkpoints` with the data
iterator and RNG state, so an interrupted run continues bit-identically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import signal
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax import config as config_lib
from moejax import distributed
from moejax import flops as flops_lib
from moejax import parallel
from moejax.data.pipeline import build_data
from moejax.data.tokenizers import make_tokenizer
from moejax.models.lm import LM, STATE_COLLECTIONS, LMConfig
from moejax.train import checkpoint as ckpt_lib
from moejax.train import init_from as init_from_lib
from moejax.train.metrics import MetricsWriter, read_metrics
from moejax.train.optimizer import make_optimizer
from moejax.train.steps import TrainState, make_eval_step, make_train_step

log = logging.getLogger("moejax")

EXIT_NAN = 3


class NonFiniteLoss(RuntimeError):
  pass


def _fmt_time(s: float) -> str:
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def build_model(config, vocab_size: int) -> tuple[LM, LMConfig]:
  mc = LMConfig.from_config(config.model, seq_len=config.data.seq_len, vocab_size=vocab_size)
  mesh_cfg = config.get("mesh")
  if mc.moe is not None and mesh_cfg is not None:
    mode = mesh_cfg.expert_dispatch
    mode = "all_to_all" if mode == "auto" else mode  # used only when the mesh has experts
    mc = dataclasses.replace(mc, moe=dataclasses.replace(
        mc.moe, expert_dispatch=mode, ep_exchange=mesh_cfg.get("ep_exchange", "auto")))
  return LM(mc), mc


def init_state(model: LM, tx, seed: int, seq_len: int) -> TrainState:
  key = jax.random.PRNGKey(seed)
  variables = nn.unbox(model.init(jax.random.fold_in(key, 0),
                                  jnp.zeros((1, min(seq_len, 8)), jnp.int32)))
  model_state = {k: v for k, v in variables.items() if k in STATE_COLLECTIONS}
  return TrainState.create(variables["params"], tx, jax.random.fold_in(key, 1), model_state)


def abstract_like(tree):
  """ShapeDtypeStructs that keep each leaf's sharding (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def state_shardings(model: LM, tx, seed: int, seq_len: int, mesh, rules) -> TrainState:
  """NamedShardings of every TrainState leaf: parameters by their logical axes and the
  rules, optimizer moments like their parameters, everything else replicated."""
  rep = parallel.replicated(mesh)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                            jnp.zeros((1, min(seq_len, 8)), jnp.int32)))
  param_sh = parallel.logical_shardings(boxed["params"], mesh, rules)
  shapes = jax.eval_shape(lambda: init_state(model, tx, seed, seq_len))
  parallel.check_divisible(shapes.params, param_sh)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, shapes.opt_state, param_sh,
                                 transform_non_params=lambda _: rep)
  return shapes.replace(step=rep, params=param_sh, opt_state=opt_sh, rng=rep,
                        model_state=jax.tree.map(lambda _: rep, shapes.model_state))


def abstract_train_state(config, vocab_size: int, mesh=None) -> TrainState:
  """Shapes, dtypes and shardings of the TrainState (on `mesh`, default: the config's)."""
  model, _ = build_model(config, vocab_size)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  mesh_cfg = config.get("mesh")
  mesh = mesh if mesh is not None else parallel.make_mesh(mesh_cfg)
  rules = parallel.rules_from_config(mesh_cfg)
  sh = state_shardings(model, tx, config.seed, config.data.seq_len, mesh, rules)
  shapes = jax.eval_shape(lambda: init_state(model, tx, config.seed, config.data.seq_len))
  return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                      shapes, sh)


class Sharded:
  """A jitted function called under the mesh and the logical-axis rules, so the model's
  activation constraints resolve to mesh axes when it is traced."""

  def __init__(self, fn, mesh, rules, **jit_kwargs):
    self.fn, self.mesh, self.rules = jax.jit(fn, **jit_kwargs), mesh, rules

  def __call__(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn.lower(*args)


def evaluate(eval_step, params, model_state, val_sets: dict[str, tuple[list, int]]) -> dict:
  """Loss per token and bits per byte over exactly the evaluated windows.

  `val_sets`: {source: (global batches, UTF-8 bytes of their target tokens)}. With
  several sources the row also has "<source>/loss" and "<source>/bpb"; the overall bpb
  is the summed loss over the summed bytes."""
  out, total_all, count_all, bytes_all = {}, 0.0, 0.0, 0
  for name, (batches, nbytes) in val_sets.items():
    total, count = 0.0, 0.0
    for b in batches:
      r = eval_step(params, model_state, b)
      total += float(r["loss_sum"])
      count += float(r["count"])
    if len(val_sets) > 1:
      out[f"{name}/loss"] = total / max(count, 1.0)
      out[f"{name}/bpb"] = total / math.log(2) / max(nbytes, 1)
    total_all, count_all, bytes_all = total_all + total, count_all + count, bytes_all + nbytes
  return {"loss": total_all / max(count_all, 1.0),
          "bpb": total_all / math.log(2) / max(bytes_all, 1), "tokens": count_all, **out}


class _Signals:
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.received: int | None = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: give up at once
    self.received = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def train(config, workdir: str) -> dict:
  """Train (or resume) the run in `workdir`. Returns the final summary dict."""
  config_lib.validate(config)  # before anything is built or compiled
  if config.train.init_from:
    init_from_lib.kind_of(os.path.abspath(os.path.expanduser(config.train.init_from)))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  t_start = time.time()
  tc = config.train

  n_dev = jax.device_count()
  try:
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.rules_from_config(config.mesh)
  except parallel.MeshError as e:
    raise config_lib.ConfigError(str(e)) from None
  dp = parallel.data_parallel_size(mesh, rules)
  if config.data.batch_size % dp:
    raise config_lib.ConfigError(
        f"config.data.batch_size = {config.data.batch_size} is not allowed: must be divisible "
        f"by the data-parallel size {dp} (mesh {dict(mesh.shape)}; the batch is split over "
        f"{parallel.batch_axes(mesh, rules)})")
  data = build_data(config.data, seed=config.seed, process_index=jax.process_index(),
                    process_count=jax.process_count())
  model, mc = build_model(config, data.tokenizer.vocab_size)
  acct = flops_lib.account(mc, config.data.seq_len)
  tx, schedule = make_optimizer(config.optim, tc.num_steps)

  try:
    state_sh = state_shardings(model, tx, config.seed, config.data.seq_len, mesh, rules)
  except parallel.MeshError as e:
    raise config_lib.ConfigError(str(e)) from None
  state = Sharded(lambda: init_state(model, tx, config.seed, config.data.seq_len), mesh, rules,
                  out_shardings=state_sh)()
  peak = tc.peak_flops or flops_lib.measure_matmul_peak()

  meta = {
      "name": config.name, "accounting": acct.as_dict(), "model": dataclasses.asdict(mc),
      "data": {"fingerprint": data.fingerprint, **data.info},
      "peak_flops_per_device": peak, "devices": n_dev, "mesh": dict(mesh.shape),
      "backend": jax.default_backend(),
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "flax": flax.__version__},
  }
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "run.json"), "w") as f:
      json.dump(meta, f, indent=2, default=str)
    print(f"[moejax] {config.name}: {acct.summary()}", flush=True)
    print(f"[moejax] data: {data.info.get('source')} fingerprint {data.fingerprint[:12]}, "
          f"{data.info.get('num_train_tokens', 0) / 1e6:.2f}M train / "
          f"{data.info.get('num_val_tokens', 0) / 1e6:.2f}M val tokens; "
          f"{n_dev} {jax.default_backend()} device(s), mesh "
          f"{' x '.join(f'{a}={n}' for a, n in mesh.shape.items() if n > 1) or 'single'}; "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s/device",
          flush=True)
    if jax.process_count() > 1:
      print(f"[moejax] {jax.process_count()} processes x {jax.local_device_count()} devices; "
            "each feeds its slice of every batch; if one process dies the others abort "
            "(JAX coordination service / collective error) instead of hanging",
          flush=True)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                               async_save=tc.async_checkpoint)
  writer = MetricsWriter(workdir, tensorboard=tc.tensorboard, enabled=is_main)
  restored = ckpt.restore_latest(abstract_like(state))
  if restored is not None:
    ckpt.quarantine([s for s in ckpt.bad_steps if s > int(restored[2]["step"])])
    payload, data_state, cmeta = restored
    state = state.replace(**payload)
    if data_state:  # {} in a checkpoint written by `moejax.convert from-hf`
      data.train_iter.set_state(data_state)
    writer.truncate_after(int(cmeta["step"]))
    if is_main:
      print(f"[moejax] resumed from checkpoint at step {int(cmeta['step'])}", flush=True)
  elif tc.init_from:
    def source_state(src_config):
      return abstract_train_state(src_config, make_tokenizer(src_config.data).vocab_size, mesh)
    params = init_from_lib.initial_params(config, mc, abstract_like(state.params), source_state,
                                          verbose=is_main)
    state = state.replace(params=params)
  start = int(state.step)

  batch_sharding = parallel.batch_sharding(mesh, rules)
  train_model = LM(mc, deterministic=False)
  train_step = Sharded(make_train_step(
      train_model, bias_update_rate=mc.moe.bias_update_rate if mc.moe else 0.0,
      debug_nan_step=tc.debug_nan_step,
      mor_bias_rate=(mc.recursion.bias_update_rate
                     if mc.recursion and mc.recursion.balance == "bias" else 0.0)),
      mesh, rules, in_shardings=(state_sh, batch_sharding), out_shardings=(state_sh, None),
      donate_argnums=(0,))
  eval_step = Sharded(make_eval_step(model), mesh, rules,
                      in_shardings=(state_sh.params, state_sh.model_state, batch_sharding))
  val_sets = {name: ([_to_global(b, batch_sharding) for b in batches], nbytes)
              for name, (batches, nbytes) in data.val_batches(tc.eval_batches).items()} \
      if tc.eval_batches else {}
  tokens_per_step = config.data.batch_size * config.data.seq_len
  evals: list[dict] = []

  def run_eval(step):
    if not val_sets:
      return None
    ev = evaluate(eval_step, state.params, state.model_state, val_sets)
    writer.write(step, "eval", {k: v for k, v in ev.items() if k != "tokens"})
    evals.append({"step": step, **ev})
    return ev

  pbar = None
  if is_main and tc.progress_bar:
    from tqdm.auto import tqdm
    pbar = tqdm(total=tc.num_steps, initial=start, desc=config.name, unit="step",
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30,
                file=sys.stderr)
  say = (pbar.write if pbar is not None else print) if is_main else (lambda *_: None)

  status = "completed"
  exit_signal = None
  step = start
  if start == 0:
    ev = run_eval(0)
    if ev:
      say(f"step 0 | val loss {ev['loss']:.4f} | val bpb {ev['bpb']:.3f}")
  t_window, n_window = time.time(), 0
  train_time = 0.0
  with _Signals() as sig:
    while step < tc.num_steps:
      batch = _to_global(next(data.train_iter), batch_sharding)
      state, metrics = train_step(state, batch)
      step += 1
      n_window += 1
      if step == start + 1:  # exclude compilation from the throughput window
        jax.block_until_ready(metrics)
        t_window, n_window = time.time(), 0
      if not bool(metrics["finite"]):
        msg = (f"non-finite loss/gradient at step {step} (loss={float(metrics['loss'])}, "
               f"grad_norm={float(metrics['grad_norm'])}); the update was not applied")
        if tc.nan_policy == "stop":
          status = "nan"
          say(f"[moejax] {msg}. Stopping; state and checkpoints are intact. "
              "Set --config.train.nan_policy=skip to skip such updates instead.")
          break
        say(f"[moejax] {msg}; skipped (train.nan_policy=skip)")
      if pbar is not None:
        pbar.update(1)
      if step % tc.log_every == 0 or step == tc.num_steps:
        loss = float(metrics["loss"])  # syncs
        row = {"loss": loss, "grad_norm": float(metrics["grad_norm"]),
               "lr": float(schedule(step - 1)), "tokens_seen": step * tokens_per_step,
               **data.progress(step * config.data.batch_size)}
        if "moe_stats" in metrics:
          row.update(moe_metrics(metrics))
        if "mor_stats" in metrics:
          row.update(mor_metrics(metrics))
        if n_window:  # throughput over the window (compilation excluded)
          dt = time.time() - t_window
          train_time += dt
          tps = tokens_per_step * n_window / dt
          mfu = acct.train_flops_per_token * tps / (peak * n_dev)
          row.update(tokens_per_s=tps, step_time_s=dt / n_window, mfu=mfu)
          if pbar is not None:
            pbar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps / 1e3:.1f}k", mfu=f"{mfu:.0%}",
                             refresh=False)
        writer.write(step, "train", row)
        t_window, n_window = time.time(), 0
      t_other = time.time()  # eval and checkpoint time is not step time
      if step % tc.eval_every == 0 or step == tc.num_steps:
        ev = run_eval(step)
        if ev:
          say(f"step {step} | val loss {ev['loss']:.4f} | val bpb {ev['bpb']:.3f}")
      if step % tc.checkpoint_every == 0 or step == tc.num_steps:
        ckpt.save(step, state, data.train_iter.get_state(), {"config": config.name})
      t_window += time.time() - t_other
      if sig.received is not None:
        exit_signal = sig.received
        ckpt.save(step, state, data.train_iter.get_state(), {"config": config.name}, wait=True)
        status = f"interrupted by {signal.Signals(exit_signal).name}"
        say(f"[moejax] {signal.Signals(exit_signal).name}: saved checkpoint at step {step}; "
            "run the same command to resume.")
        break
  if pbar is not None:
    pbar.close()
  ckpt.close()

  if is_main:  # the whole curve, including evaluations from before a resume
    evals = [{"step": r["step"], "loss": r["loss"], "bpb": r["bpb"]}
             for r in read_metrics(workdir) if r["split"] == "eval"]
  summary = {
      "status": status, "step": step, "num_steps": tc.num_steps,
      "tokens_seen": step * tokens_per_step, "wall_time_s": time.time() - t_start,
      "train_time_s": train_time, "evals": evals,
      "final_val_loss": evals[-1]["loss"] if evals else None,
      "final_val_bpb": evals[-1]["bpb"] if evals else None,
      "accounting": acct.as_dict(),
  }
  if is_main:
    writer.close()
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    _print_summary(summary, workdir)
  if status == "nan":
    raise NonFiniteLoss(f"non-finite loss at step {step}")
  if exit_signal is not None:
    summary["exit_signal"] = exit_signal
  return summary


def moe_metrics(metrics: dict) -> dict:
  """Per-layer routing telemetry and losses as JSON-able values (lists over MoE layers)."""
  out = {"ce_loss": float(metrics["ce_loss"]), "aux_loss": float(metrics["aux_loss"])}
  for name, v in metrics["moe_losses"].items():
    v = np.asarray(v)
    out[f"moe/{name}_loss"] = float(v.sum())
    out[f"moe/{name}_loss_per_layer"] = v.tolist()
  for name, v in metrics["moe_stats"].items():
    v = np.asarray(v)
    if v.ndim == 1:  # one scalar per layer
      out[f"moe/{name}"] = float(v.mean())
      out[f"moe/{name}_per_layer"] = v.tolist()
    else:  # load histograms / bias values: [layers, E]
      out[f"moe/{name}_per_layer"] = v.tolist()
  return out


def mor_metrics(metrics: dict) -> dict:
  """Mixture-of-Recursions telemetry: per-token depth histogram, active fraction per step,
  mean depth, depth load and bias (token router), and the router losses."""
  out = {"ce_loss": float(metrics["ce_loss"]), "aux_loss": float(metrics["aux_loss"])}
  for name, v in metrics["mor_losses"].items():
    out[f"mor/{name}_loss"] = float(v)
  for name, v in metrics["mor_stats"].items():
    v = np.asarray(v)
    out[f"mor/{name}"] = float(v) if v.ndim == 0 else v.tolist()
  return out


def _to_global(batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def _print_summary(s: dict, workdir: str) -> None:
  print(f"[moejax] {s['status']} at step {s['step']}/{s['num_steps']} in "
        f"{_fmt_time(s['wall_time_s'])} ({s['tokens_seen'] / 1e6:.2f}M tokens)", flush=True)
  if s["evals"]:
    curve = "  ".join(f"{e['step']}:{e['bpb']:.3f}" for e in s["evals"])
    print(f"[moejax] validation bits/byte by step: {curve}", flush=True)
    print(f"[moejax] final validation loss {s['final_val_loss']:.4f} nats/token, "
          f"{s['final_val_bpb']:.3f} bits/byte", flush=True)
  print(f"[moejax] checkpoints, metrics.jsonl and TensorBoard logs in {workdir}", flush=True)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  p = argparse.ArgumentParser(prog="moejax.train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/quickstart.py",
                 help="config file, optionally with :arg (e.g. configs/quickstart.py:runlocal)")
  p.add_argument("--workdir", required=True)
  args = p.parse_args(rest)
  logging.basicConfig(level=logging.WARNING, format="[moejax] %(levelname)s %(message)s")
  try:
    config = config_lib.load_config(args.config, overrides)
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    print(f"moejax: invalid config: {e}", file=sys.stderr)
    return 2
  try:
    distributed.initialize(config.dist)
  except ValueError as e:
    print(f"moejax: invalid config: {e}", file=sys.stderr)
    return 2
  try:
    summary = train(config, args.workdir)
  except config_lib.ConfigError as e:  # checks that need the devices or data
    print(f"moejax: invalid config: {e}", file=sys.stderr)
    return 2
  except FileNotFoundError as e:  # e.g. a TFDS dataset that is not prepared
    print(f"moejax: {e}", file=sys.stderr)
    return 1
  except NonFiniteLoss:
    return EXIT_NAN
  sig = summary.get("exit_signal")
  return 128 + sig if sig else 0


if __name__ == "__main__":
  sys.exit(main())
