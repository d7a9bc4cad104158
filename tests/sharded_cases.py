"""Sharded params on several devices against one device (run by ``test_sharding.py`` in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``; skipped with fewer
devices, so a plain ``pytest tests`` never runs it in the single-device process).

References: the same function on the unsharded params on one device (float32). Tolerance:
relative max error 1e-5 of the output's scale (collectives reorder float32 sums).
"""

import shutil

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

import optgqa_jax as og
from optgqa_jax import quant, sharding, train_log
from optgqa_jax.train import next_token_loss

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices")


def model(kind: str, seed: int):
    if kind == "mha":
        cfg = og.ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=4,
                             head_dim=12, ffn_dim=64)
    elif kind == "gqa-kv2":            # KV heads fewer than a TP degree of 4: replicated
        cfg = og.ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2,
                             head_dim=12, ffn_dim=64, position="alibi")
    else:                              # unequal groups in layer 0, contiguous in layer 1
        cfg = og.ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2,
                             head_dim=12, ffn_dim=64,
                             kv_head_map=((0, 1, 1, 1), (0, 0, 1, 1)))
    return cfg, og.init_params(cfg, jax.random.PRNGKey(seed))


def close(a, b, what, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), f"{what}: non-finite"
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("kind", ["mha", "gqa-kv2", "unequal"])
@pytest.mark.parametrize("data,model_deg,fsdp", [(1, 2, False), (1, 4, False), (2, 2, True)])
def test_sharded_forward_matches_one_device(kind, data, model_deg, fsdp):
    cfg, params = model(kind, seed=data * 10 + model_deg)
    tokens = jax.random.randint(jax.random.PRNGKey(model_deg), (4, 9), 0, cfg.vocab_size)
    want = og.forward(cfg, params, tokens, attention_impl="reference")
    mesh = sharding.make_mesh(data, model_deg)
    sp = sharding.shard_params(cfg, params, mesh, fsdp=fsdp)
    q = sp["layer_0"]["attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == data * model_deg
    got = og.forward(cfg, sp, sharding.shard_batch(tokens, mesh), attention_impl="reference")
    close(got, want, f"{kind} data={data} model={model_deg}")


def test_rules_split_heads_and_replicate_small_kv():
    cfg, params = model("gqa-kv2", 0)
    specs = sharding.partition_specs(cfg, params, sharding.make_mesh(1, 4))
    attn, mlp = specs["layer_0"]["attn"], specs["layer_0"]["mlp"]
    P = jax.sharding.PartitionSpec
    assert attn["q_proj"]["kernel"] == P(None, "model")
    assert attn["k_proj"]["kernel"] == P(None, None)          # K=2 < tp=4: replicated
    assert attn["o_proj"]["kernel"] == P("model", None)
    assert mlp["down_proj"]["kernel"] == P("model", None)
    assert specs["embed"]["embedding"] == P("model", None)
    specs2 = sharding.partition_specs(cfg, params, sharding.make_mesh(1, 2))
    assert specs2["layer_1"]["attn"]["k_proj"]["kernel"] == P(None, "model")
    cfg_u, params_u = model("unequal", 0)
    s_u = sharding.partition_specs(cfg_u, params_u, sharding.make_mesh(1, 2))
    # layer 0 maps query head 1 (device 0) to KV head 1 (device 1): replicated
    assert s_u["layer_0"]["attn"]["k_proj"]["kernel"] == P(None, None)
    assert s_u["layer_1"]["attn"]["k_proj"]["kernel"] == P(None, "model")


@pytest.mark.parametrize("spec,o_rows_split", [("w4g8", True), ("w8", True),
                                                ("w4g16", False)])   # 3 groups of o: whole
def test_sharded_quantized_forward(spec, o_rows_split):
    cfg, params = model("mha", 3)
    qp = quant.random_quantize(params, quant.parse_spec(spec), seed=1)
    if spec == "w8":  # the token table too (stored [D, V]): split over V, as the LM head
        qp["embed"] = {"embedding": quant.rtn(params["embed"]["embedding"].T,
                                              quant.QuantConfig(bits=8, group_size=-1))}
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 7), 0, cfg.vocab_size)
    want = og.forward(cfg, qp, tokens, attention_impl="reference")
    mesh = sharding.make_mesh(1, 2)
    sp = sharding.shard_params(cfg, qp, mesh)
    o = sp["layer_0"]["attn"]["o_proj"]["kernel"]
    want_spec = ("model", None) if o_rows_split else (None, None)
    assert tuple(o.qweight.sharding.spec) == want_spec
    if spec == "w8":
        assert tuple(sp["embed"]["embedding"].qweight.sharding.spec) == (None, "model")
    close(og.forward(cfg, sp, tokens, attention_impl="reference"), want, spec)


@pytest.mark.parametrize("data,model_deg,fsdp", [(4, 1, False), (4, 1, True), (2, 2, True)])
def test_sharded_training_step_matches_one_device(data, model_deg, fsdp):
    cfg, params = model("gqa-kv2", 7)
    tokens = jax.random.randint(jax.random.PRNGKey(11), (8, 10), 0, cfg.vocab_size)
    opt = optax.sgd(0.5, momentum=0.9)   # linear in the gradients: differences stay small

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(cfg, p, tokens))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    step = jax.jit(step)
    p1, _, loss1, g1 = step(params, opt.init(params), tokens)
    mesh = sharding.make_mesh(data, model_deg)
    sp = sharding.shard_params(cfg, params, mesh, fsdp=fsdp)
    p2, _, loss2, g2 = step(sp, opt.init(sp), sharding.shard_batch(tokens, mesh))
    close(loss2, loss1, "loss")
    for what, t2, t1 in (("gradients", g2, g1), ("updated params", p2, p1)):
        for a, b in zip(jax.tree_util.tree_leaves(t2), jax.tree_util.tree_leaves(t1)):
            close(a, b, what, tol=1e-5)
    if fsdp:
        emb = sp["embed"]["embedding"]
        assert "data" in tuple(emb.sharding.spec)


def test_bad_meshes_raise_before_moving_weights():
    cfg, params = model("mha", 0)
    with pytest.raises(ValueError, match="needs 8 devices"):
        sharding.make_mesh(4, 2)
    cfg3 = og.ModelConfig(vocab_size=32, d_model=24, n_layers=1, n_heads=12, n_kv_heads=4,
                          head_dim=4, ffn_dim=36)
    with pytest.raises(ValueError, match="divides neither the KV heads"):
        sharding.check_tensor_parallel(cfg3, 6)   # 6 divides 12 query heads, not 4 KV heads
    with pytest.raises(ValueError, match="must divide the query heads"):
        sharding.partition_specs(cfg, params, sharding.make_mesh(1, 3))
    other = jax.sharding.Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2), ("x", "y"))
    with pytest.raises(ValueError, match="mesh axes"):
        sharding.partition_specs(cfg, params, other)
    with pytest.raises(ValueError, match="does not split"):
        sharding.shard_batch(jnp.zeros((3, 4), jnp.int32), sharding.make_mesh(2, 1))


# data parallel alone is checked step by step in test_sharded_training_step_matches_one_device
@pytest.mark.parametrize("data,model_deg,fsdp", [(2, 2, True)])
def test_train_loop_on_a_mesh_follows_one_device(data, model_deg, fsdp, tmp_path):
    """train(mesh=...) (data parallel, tensor parallel, FSDP) against train() on one device:
    the same loss at every step, 1e-5 relative; a resumed sharded run continues the same."""
    from optgqa_jax.train import TrainConfig, train
    cfg, params = model("gqa-kv2", 13)
    windows = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (16, 12), 0,
                                            cfg.vocab_size))
    tc = TrainConfig(steps=4, batch_size=8, grad_accum=2, peak_lr=1e-3, warmup_steps=1,
                     compute_dtype="float32", attention_impl="reference", log_every=1,
                     checkpoint_every=2)
    one = train(cfg, params, windows, tc, progress=False)
    mesh = sharding.make_mesh(data, model_deg)
    sh = train(cfg, params, windows, tc, progress=False, mesh=mesh, fsdp=fsdp,
               out_dir=str(tmp_path))
    close(sh.history["train"]["loss"], one.history["train"]["loss"], "losses")
    leaf = sh.params["layer_0"]["mlp"]["down_proj"]["kernel"]
    assert len(leaf.sharding.device_set) == data * model_deg
    # Drop the last checkpoint: the rerun resumes from step 2 and places the restored state.
    shutil.rmtree(train_log._step_path(str(tmp_path), 4))
    again = train(cfg, params, windows, tc, progress=False, mesh=mesh, fsdp=fsdp,
                  out_dir=str(tmp_path))
    close(again.history["train"]["loss"], one.history["train"]["loss"], "resumed losses")
    close(again.params["embed"]["embedding"], one.params["embed"]["embedding"], "final params",
          tol=1e-4)


# Two cases for CI time: 2-way GQA with ALiBi (KV heads split, slopes split), and 4-way unequal
# groups (the hardest split: KV heads replicated, unequal query groups). Plain MHA splits are
# covered by test_sharded_forward_matches_one_device.
@pytest.mark.parametrize("tp,kind", [(2, "gqa-kv2"), (4, "unequal")])
def test_tensor_parallel_engine_same_greedy_tokens(kind, tp):
    """EngineConfig(tensor_parallel_size=tp) against tp=1: same greedy tokens with a roomy
    pool and with a pool small enough to preempt, prefix hits included (shared prompts)."""
    cfg, params = model(kind, seed=tp)
    rng = np.random.default_rng(tp)
    shared = list(rng.integers(0, cfg.vocab_size, 20))
    prompts = [shared + list(rng.integers(0, cfg.vocab_size, n)) for n in (1, 5, 9, 3)]
    prompts += [list(rng.integers(0, cfg.vocab_size, n)) for n in (1, 12)]
    sp = og.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    seen = {"preempted": 0, "cached": 0}
    ec = dict(page_size=8, max_num_seqs=4, max_num_batched_tokens=64, attention_impl="reference")
    # greedy tokens do not depend on the pool (preemption recomputes), so one reference run
    one = og.Engine(cfg, params, og.EngineConfig(**ec, num_pages=64)).generate(prompts, sp)
    for pages in (64, 10):
        eng = og.Engine(cfg, params, og.EngineConfig(**ec, num_pages=pages,
                                                     tensor_parallel_size=tp))
        many = eng.generate(prompts, sp)
        assert [o.token_ids for o in many] == [o.token_ids for o in one], (kind, tp, pages)
        leaf = eng.runner.params["layer_0"]["mlp"]["down_proj"]["kernel"]
        assert len(leaf.sharding.device_set) == tp
        seen["preempted"] += sum(o.num_preemptions for o in many)
        seen["cached"] += sum(o.num_cached_tokens for o in many)
    assert seen["preempted"] > 0 and seen["cached"] > 0, seen   # both paths were exercised


# --------------------------------------------------------------------------- kernels per device
def _paged_case(rng, N, K, decode, H=16, Z=8, pages=24):
    """Random pool, three sequences (decode: one token each; else 3, 2 and 5 new tokens)."""
    from optgqa_jax.kv_layers import PagedBatch
    kp = jnp.asarray(rng.standard_normal((K, pages, Z, H)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((K, pages, Z, H)), jnp.float32)
    ctx = np.array([17, 5, 40])
    qlens = [1, 1, 1] if decode else [3, 2, 5]
    tables = jnp.asarray(rng.permutation(pages)[:24].reshape(3, 8), jnp.int32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(qlens)]), jnp.int32)
    seq = jnp.asarray(np.repeat(np.arange(3), qlens), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(c - n, c) for c, n in zip(ctx, qlens)]),
                      jnp.int32)
    batch = PagedBatch(jnp.zeros(len(pos), jnp.int32), seq, tables, jnp.asarray(ctx, jnp.int32),
                       cu, max(qlens), decode)
    q = jnp.asarray(rng.standard_normal((len(pos), N, H)), jnp.float32)
    return q, kp, vp, batch, pos


@pytest.mark.parametrize("N,K,tp,plan", [(8, 4, 2, "split"), (8, 4, 4, "split"),
                                         (8, 2, 4, "replicated"), (4, 1, 2, "replicated")])
@pytest.mark.parametrize("decode,alibi", [(True, False), (False, True)])
def test_attention_kernels_run_per_device(N, K, tp, plan, decode, alibi):
    """On a tensor-parallel mesh the paged kernels run on each device's heads under shard_map
    (KV heads split, or the whole pool with each device slicing its one KV head) and give the
    one-device kernels' output (to float32 rounding: XLA may fuse the sharded program's
    elementwise work differently); an unequal grouping falls back to XLA's partitioning."""
    import pallas_kernels as pk
    from optgqa_jax.attention import kernel_shard_plan, paged_batch_attention
    rng = np.random.default_rng(N * 10 + K + tp)
    q, kp, vp, batch, pos = _paged_case(rng, N, K, decode)
    slopes = pk.alibi_slopes(N) if alibi else None
    mesh = sharding.make_mesh(1, tp)
    assert kernel_shard_plan(mesh, N, K) == plan
    one = paged_batch_attention(q, kp, vp, batch, pos, alibi_slopes=slopes, impl="pallas")
    ref = paged_batch_attention(q, kp, vp, batch, pos, alibi_slopes=slopes, impl="reference")
    fn = jax.jit(lambda q, kp, vp: paged_batch_attention(q, kp, vp, batch, pos,
                                                         alibi_slopes=slopes, impl="pallas",
                                                         mesh=mesh))
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, kp, vp))
    got = fn(q, kp, vp)
    close(got, one, f"{plan} tp={tp} against one device", tol=1e-6)
    close(got, ref, f"{plan} tp={tp}")
    unequal = [0] + [1] * (N - 1)
    assert kernel_shard_plan(mesh, N, 2, unequal) is None


@pytest.mark.parametrize("name,want", [("attn/q_proj", "columns"), ("attn/o_proj", "rows"),
                                       ("mlp/down_proj", "rows"), ("lm_head", "columns")])
@pytest.mark.parametrize("impl", ["pallas", "dequantize_kernel"])
def test_quantized_layers_multiply_per_device(name, want, impl):
    """Inside sharding.kernel_mesh a quantized layer multiplies each device's shard under
    shard_map (columns: output split; rows: x split and one psum) and matches the whole
    layer's product, with the fused kernel and with the Pallas dequantize + product (the
    route above KERNEL_MAX_ROWS rows)."""
    from optgqa_jax.quant.linear import matmul
    cfg, params = model("mha", 7)
    qp = quant.random_quantize(params, quant.parse_spec("w4g8+head"), seed=2)
    mesh = sharding.make_mesh(1, 2)
    specs = sharding.partition_specs(cfg, qp, mesh)
    path = ("lm_head",) if name == "lm_head" else ("layer_0", *name.split("/"))
    node_q, node_s = qp, specs
    for key in (path if name == "lm_head" else (*path, "kernel")):   # a leaf, or a module's
        node_q, node_s = node_q[key], node_s[key]
    split = tuple(node_s.qweight) + (None,) * 2
    assert {"columns": split[1], "rows": split[0]}[want] == "model"
    x = jax.random.normal(jax.random.PRNGKey(3), (5, node_q.shape[0]), jnp.float32)
    want_y = matmul(x, node_q, "pallas")

    def run(x, ql):
        with sharding.kernel_mesh(mesh, specs):
            return sharding.quantized_matmul_per_device(
                x, ql, path, lambda xx, qq: matmul(xx, qq, impl))

    assert "shard_map" in str(jax.make_jaxpr(run)(x, node_q))
    close(jax.jit(run)(x, node_q), want_y, name)
    assert sharding.quantized_matmul_per_device(x, node_q, path, matmul) is None  # no mesh


def test_tensor_parallel_engine_on_pallas_kernels():
    """A TP=2 engine on the Pallas kernels (interpret mode here) with quantized weights gives
    the one-device engine's greedy tokens. (Float weights on the kernels add nothing: their
    attention is the same per-device kernel call, checked here beside the quantized layers.)"""
    cfg = og.ModelConfig(vocab_size=96, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                         head_dim=16, ffn_dim=64, position="alibi")
    params = og.init_params(cfg, jax.random.PRNGKey(11))
    qp = quant.random_quantize(params, quant.parse_spec("w4g16"), seed=3)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (5, 11, 2)]
    sp = og.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    ec = dict(page_size=8, num_pages=32, max_num_seqs=4, max_num_batched_tokens=32,
              attention_impl="pallas")
    one = og.Engine(cfg, qp, og.EngineConfig(**ec)).generate(prompts, sp)
    eng = og.Engine(cfg, qp, og.EngineConfig(**ec, tensor_parallel_size=2))
    two = eng.generate(prompts, sp)
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    # per layer: attention and each of the 7 quantized projections per device; the quantized
    # row splits (o, down) end in one all-reduce each
    text = eng.runner.lower(eng.runner._empty(True, 4), True, 4).as_text()
    manual = text.count("manual_computation") + text.count("SPMDFullToShardShape")
    assert manual == 8 * cfg.n_layers, manual
    assert text.count("all_reduce") == 2 * cfg.n_layers
