"""One process of the two-process ``jax.distributed`` test (``test_sharding.py`` starts two,
each with one CPU device, and reads the JSON line each prints).

Each process: join through ``sharding.initialize_distributed`` (settings from the
environment), compute the single-device references on its own device, then the same on a
(data=2, model=1) mesh spanning both processes: a sharded forward, and two steps of
``train(mesh=..., fsdp=True)``.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from optgqa_jax import sharding  # noqa: E402

sharding.initialize_distributed()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import optgqa_jax as og  # noqa: E402
from optgqa_jax.train import TrainConfig, train  # noqa: E402

cfg = og.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                     head_dim=8, ffn_dim=48)
params = og.init_params(cfg, jax.random.PRNGKey(0))
tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 8), 0, cfg.vocab_size))
windows = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (8, 10), 0, cfg.vocab_size))
tc = TrainConfig(steps=2, batch_size=4, peak_lr=1e-3, warmup_steps=1, compute_dtype="float32",
                 attention_impl="reference", log_every=1)

want_logits = np.asarray(og.forward(cfg, params, tokens, attention_impl="reference"))
want_loss = train(cfg, params, windows, tc, progress=False).history["train"]["loss"]

mesh = sharding.make_mesh(2, 1)
sp = sharding.shard_params(cfg, params, mesh, fsdp=True)
logits = og.forward(cfg, sp, sharding.shard_batch(tokens, mesh), attention_impl="reference")
got = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
loss = train(cfg, params, windows, tc, progress=False, mesh=mesh,
             fsdp=True).history["train"]["loss"]
scale = np.abs(want_logits).max()
print(json.dumps(dict(process=jax.process_index(), devices=len(jax.devices()),
                      logits_err=float(np.abs(got - want_logits).max() / scale),
                      want_loss=want_loss, loss=loss)), flush=True)
