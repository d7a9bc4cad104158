"""generate_simple and on-device sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optgqa_jax as og


@pytest.fixture(scope="module", params=["tiny", "tiny-alibi"])
def model(request):
    cfg = og.ModelConfig.preset(request.param)
    return cfg, og.init_params(cfg, jax.random.PRNGKey(7))


def _greedy_by_recompute(cfg, params, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits = og.forward(cfg, params, np.asarray([seq], np.int32))
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


def test_greedy_equals_argmax_of_forward_over_growing_sequence(model, rng):
    cfg, params = model
    prompts = [list(rng.integers(0, cfg.vocab_size, size=n)) for n in (1, 5, 12)]
    batch = og.generate_simple(cfg, params, prompts, 8)
    for prompt, out in zip(prompts, batch):
        assert out == _greedy_by_recompute(cfg, params, prompt, 8)
    # A single prompt gives a flat list and the same tokens as inside the batch.
    assert og.generate_simple(cfg, params, prompts[1], 8) == batch[1]


def test_eos_stops_a_row_and_is_included(model, rng):
    cfg, params = model
    prompt = list(rng.integers(0, cfg.vocab_size, size=4))
    free = og.generate_simple(cfg, params, prompt, 6)
    eos = free[2]
    stopped = og.generate_simple(cfg, params, prompt, 6, eos_id=eos)
    assert stopped == free[:free.index(eos) + 1]


def test_same_seed_same_tokens_different_seed_different(model, rng):
    cfg, params = model
    prompt = list(rng.integers(0, cfg.vocab_size, size=5))
    kw = dict(temperature=1.5, top_p=1.0)
    a = og.generate_simple(cfg, params, prompt, 24, seed=11, **kw)
    b = og.generate_simple(cfg, params, prompt, 24, seed=11, **kw)
    c = og.generate_simple(cfg, params, prompt, 24, seed=12, **kw)
    assert a == b
    assert a != c


def test_sampling_does_not_depend_on_batch_neighbours(model, rng):
    cfg, params = model
    p1 = list(rng.integers(0, cfg.vocab_size, size=3))
    p2 = list(rng.integers(0, cfg.vocab_size, size=9))
    alone = og.generate_simple(cfg, params, p1, 10, temperature=1.0, seed=5)
    batched = og.generate_simple(cfg, params, [p2, p1], 10, temperature=1.0, seed=5)
    assert batched[1] == alone


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
])
def test_invalid_sampling_parameters(model, kwargs, match):
    cfg, params = model
    args = dict(max_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        og.generate_simple(cfg, params, [1, 2, 3], args.pop("max_tokens"), **args)


def test_invalid_prompts(model):
    cfg, params = model
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        og.generate_simple(cfg, params, [], 4)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        og.generate_simple(cfg, params, [[1], []], 4)
    with pytest.raises(ValueError, match="contains id 999, outside the vocabulary"):
        og.generate_simple(cfg, params, [1, 999], 4)
    with pytest.raises(ValueError, match="exceeds max_seq_len=256"):
        og.generate_simple(cfg, params, [1] * 250, 7)


def test_sample_rules(rng):
    V = 50
    logits = jnp.asarray(rng.standard_normal((4, V)), jnp.float32)
    keys = og.row_keys(jnp.arange(4), jnp.zeros(4, jnp.int32))
    argmax = jnp.argmax(logits, -1)
    ones = jnp.ones(4)
    # temperature 0 is greedy whatever top-k/top-p say
    greedy = og.sample(logits, keys, jnp.zeros(4), jnp.full(4, 3), ones * 0.5)
    np.testing.assert_array_equal(greedy, argmax)
    # top_k = 1 and a tiny top_p both leave only the most likely token
    np.testing.assert_array_equal(og.sample(logits, keys, ones, jnp.ones(4, jnp.int32), ones), argmax)
    np.testing.assert_array_equal(og.sample(logits, keys, ones, jnp.zeros(4, jnp.int32), ones * 1e-6),
                                  argmax)
    # top_k = 3: over many keys only the three most likely tokens ever appear
    top3 = set(np.argsort(-np.asarray(logits[0]))[:3])
    seen = set()
    for s in range(200):
        k = og.row_keys(jnp.full(1, s), jnp.zeros(1, jnp.int32))
        seen.add(int(og.sample(logits[:1], k, jnp.ones(1), jnp.full(1, 3), jnp.ones(1))[0]))
    assert seen <= top3 and len(seen) > 1


def test_sample_static_branch_matches_device_branch(rng):
    # the engine passes stochastic= from the host; it must pick what lax.cond would
    V, B = 40, 32
    logits = jnp.asarray(rng.standard_normal((B, V)), jnp.float32)
    keys = og.row_keys(jnp.asarray(rng.integers(0, 2**31, B)), jnp.arange(B))
    temps = jnp.asarray(np.where(np.arange(B) < 4, 0.0, rng.uniform(0.8, 2.0, B)), jnp.float32)
    top_k = jnp.asarray(rng.choice([0, 5, 10], B))
    top_p = jnp.asarray(rng.uniform(0.7, 1.0, B), jnp.float32)
    on_device = og.sample(logits, keys, temps, top_k, top_p)
    np.testing.assert_array_equal(og.sample(logits, keys, temps, top_k, top_p, stochastic=True),
                                  on_device)
    argmax = np.asarray(jnp.argmax(logits, -1))
    np.testing.assert_array_equal(np.asarray(on_device)[:4], argmax[:4])  # greedy rows
    assert (np.asarray(on_device)[4:] != argmax[4:]).sum() >= 3  # the others really sampled
    zeros = jnp.zeros(B)
    np.testing.assert_array_equal(og.sample(logits, keys, zeros, top_k, top_p, stochastic=False),
                                  jnp.argmax(logits, -1))


def test_top_p_keeps_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps the first two only
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
    seen = set()
    for s in range(300):
        k = og.row_keys(jnp.full(1, s), jnp.zeros(1, jnp.int32))
        seen.add(int(og.sample(logits, k, jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.full(1, 0.75))[0]))
    assert seen == {1, 3}
