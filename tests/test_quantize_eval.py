"""experiments/quantize_eval.py on saved token ids (``--tokens``): the path that evaluates the
project's own checkpoints, which carry no tokenizer of their own."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location(
        "quantize_eval", os.path.join(ROOT, "experiments", "quantize_eval.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quantize_eval"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _tokens_dir(path, vocab, rng, corpus="shakespeare"):
    for split, n in (("calibration", 700), ("validation", 300), ("test", 333)):
        np.save(path / f"{corpus}-{split}.npy", rng.integers(0, vocab, n).astype(np.int32))
    (path / "tokens.json").write_text(json.dumps(
        {"tokenizer": "test-ids", "vocab_size": vocab, "corpus": corpus, "corpus_hash": "abc"}))
    return str(path)


@pytest.fixture
def checkpoint(tmp_path):
    cfg = og.ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=3, n_kv_heads=3,
                         head_dim=16, ffn_dim=64, dtype="float32", max_seq_len=32)
    path = str(tmp_path / "ckpt")
    og.save_checkpoint(path, cfg, og.init_params(cfg, jax.random.PRNGKey(1)))
    return path


def test_saved_windows_are_cut_like_corpus_windows(tmp_path):
    qe = _module()
    rng = np.random.default_rng()
    tokens = _tokens_dir(tmp_path, 97, rng)
    study = qe.Study(nsamples=5, seqlen=16, eval_seqlen=24, seed=3)
    calib, test, meta = qe.saved_windows(study, tokens, 97)
    cal_ids = np.load(os.path.join(tokens, "shakespeare-calibration.npy"))
    np.testing.assert_array_equal(calib, data.ids_windows(cal_ids, 16, n=5, seed=3))
    assert test.shape == (333 // 24, 24)  # every consecutive window, the short tail dropped
    test_ids = np.load(os.path.join(tokens, "shakespeare-test.npy"))
    np.testing.assert_array_equal(test[1], test_ids[24:48])
    assert meta["tokenizer"] == "test-ids"


def test_saved_windows_refuse_another_vocabulary_or_corpus(tmp_path):
    qe = _module()
    tokens = _tokens_dir(tmp_path, 97, np.random.default_rng())
    with pytest.raises(ValueError, match="vocabulary 97"):
        qe.saved_windows(qe.Study(), tokens, 128)
    with pytest.raises(ValueError, match="holds corpus 'shakespeare', not 'python-docs'"):
        qe.saved_windows(qe.Study(corpus="python-docs"), tokens, 97)
    with pytest.raises(FileNotFoundError, match="--save-tokens"):
        qe.saved_windows(qe.Study(), str(tmp_path / "missing"), 97)


def test_checkpoint_study_from_saved_tokens(tmp_path, checkpoint):
    qe = _module()
    tokens = _tokens_dir(tmp_path, 97, np.random.default_rng())
    out = str(tmp_path / "out")
    qe.main(["--model", checkpoint, "--tokens", tokens, "--nsamples", "4", "--seqlen", "16",
             "--eval-seqlen", "16", "--max-eval-windows", "6", "--bits", "4",
             "--group-sizes", "16", "--methods", "rtn,gptq", "--out", out])
    res = json.load(open(os.path.join(out, "quantize_eval.json")))
    assert [r["method"] for r in res["runs"]] == ["float", "rtn", "gptq"]
    assert all(np.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in res["runs"])
    assert res["meta"]["tokenizer"] == "test-ids" and res["meta"]["eval_windows"] == 6
    assert "| gptq | " in open(os.path.join(out, "quantize_eval.md")).read()


def test_markdown_takes_a_full_precision_measured_elsewhere():
    qe = _module()
    rng = np.random.default_rng()
    ppl, fp = rng.uniform(50, 60, 2)
    settings = {k: v for k, v in qe.Study().settings().items()}
    meta = dict(device="cpu", jax="x", commit="abc", eval_windows=3, eval_tokens=30,
                float_perplexity=dict(perplexity=float(fp), source="by the training run"))
    run = dict(method="gptq", bits=4, group_size=64, perplexity=float(ppl), quant_seconds=1.0)
    md = qe.markdown(dict(settings=settings, runs=[run], meta=meta))
    assert f"Full precision: **{fp:.3f}** (by the training run)." in md
    assert f"| gptq | {ppl:.2f} (1 s) |" in md
    del meta["float_perplexity"]
    assert "Full precision" not in qe.markdown(dict(settings=settings, runs=[run], meta=meta))
