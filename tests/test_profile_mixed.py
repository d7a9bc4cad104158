"""experiments/profile_mixed.py: the mixed step it builds is a real engine step (the prompts'
greedy next tokens equal the model's own), and its command line checks its arguments."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import profile_mixed as PM  # noqa: E402

import optgqa_jax as og  # noqa: E402
from optgqa_jax.engine.runner import ModelRunner  # noqa: E402


@pytest.mark.parametrize("decodes", [0, 3])
def test_mixed_step_prompts_match_forward(decodes):
    cfg = og.ModelConfig.preset("tiny").replace(max_seq_len=64)
    params = og.init_params(cfg, jax.random.PRNGKey(3))
    rng = np.random.default_rng(5)
    contexts = rng.integers(2, 30, size=decodes)
    prompts, L, Z = 2, 11, 8
    seqs = prompts + decodes
    runner = ModelRunner(cfg, params, num_pages=PM.pages_needed(prompts, L, contexts, Z),
                         page_size=Z, max_num_seqs=seqs, max_num_batched_tokens=64,
                         max_model_len=64, impl="reference", seq_buckets=(seqs,),
                         token_buckets=(64,))
    x, real, pages = PM.mixed_inputs(runner, rng, prompts=prompts, prompt_len=L,
                                     decode_contexts=contexts, size=64)
    assert real == prompts * L + decodes and pages == runner.num_pages
    assert x.cu_q_lens[seqs] == real and (x.cu_q_lens[seqs:] == real).all()
    tokens = np.asarray(runner.dispatch(x, False, 64)[0])
    for p in range(prompts):
        ids = x.tokens[decodes + p * L: decodes + (p + 1) * L]
        logits = og.forward(cfg, params, jnp.asarray(ids)[None])
        assert tokens[decodes + p] == int(jnp.argmax(logits[0, -1]))


def test_flops_and_bad_arguments(tmp_path):
    cfg = og.ModelConfig.preset("llama3-8b")
    # Llama-3-8B: about 6.98e9 parameters in the layers' linear products
    assert PM.linear_flops_per_token(cfg) == pytest.approx(2 * 6.98e9, rel=0.01)
    for bad in (["--prompts", "0", "--decodes", "0"], ["--prompt-len", "0"],
                ["--context", "9", "3"], ["--tokens", "8", "--prompts", "1", "--prompt-len", "9",
                                          "--decodes", "0"]):
        with pytest.raises(SystemExit) as e:
            PM.main(["--model", "tiny", "--out", str(tmp_path), *bad])
        assert e.value.code == 2
