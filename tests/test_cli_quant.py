"""``optgqa quantize`` and ``optgqa eval`` end to end on the tiny preset and a text corpus."""

import json
import re

import jax
import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax import data
from optgqa_jax.cli import main
from optgqa_jax.evaluate import windows_perplexity
from optgqa_jax.registry import load_model

WORDS = ("attention grouped query paged memory kernel block cache token window split "
         "calibration layer head value key softmax").split()
SEQLEN = 32


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """`text:<file>` of 400 paragraphs of random words (~20 KB: every split holds windows)."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    paragraphs = [f"{i}: " + " ".join(rng.choice(WORDS, size=8)) for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return f"text:{path}"


def quantize_argv(corpus, out, *extra):
    return ["quantize", "--model", "tiny", "--corpus", corpus, "--nsamples", "4", "--seqlen",
            str(SEQLEN), "--out", str(out), *extra]


def eval_ppl(model, corpus, tmp_path):
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", model, "--corpus", corpus, "--seqlen", str(SEQLEN),
                 "--max-windows", "16", "--json", str(result)]) == 0
    return json.loads(result.read_text())


def float_ppl(corpus):
    model = load_model("tiny")
    windows = data.corpus_windows(model.tokenizer, corpus, "test", SEQLEN)[:16]
    return windows_perplexity(model.cfg, model.params, windows)


@pytest.mark.parametrize("extra", [[], ["--quantize-embedding", "--quantize-lm-head"]])
def test_rtn_w8_checkpoint_evaluates_within_one_percent_of_float(corpus, tmp_path, capsys,
                                                                 extra):
    out = tmp_path / "w8"
    assert main(quantize_argv(corpus, out, "--method", "rtn", "--bits", "8",
                              "--group-size", "32", *extra)) == 0
    printed = capsys.readouterr().out
    assert "mean relative layer-output error" in printed and "bytes quantized" in printed
    report = json.loads((out / "quant_report.json").read_text())
    assert report["method"] == "rtn" and report["qc"]["bits"] == 8
    assert report["calibration_shape"] == [4, SEQLEN]
    # tiny: 2 blocks of q, k, v, o, gate, up, down (and the token table, the LM head)
    assert len(report["layers"]) == 2 * 7 + len(extra)
    assert (report["layers"][0]["name"] == "embed/embedding") == bool(extra)
    assert report["quantized_bytes"] < report["float_bytes"] / 3  # int8 codes + g32 scales

    result = eval_ppl(str(out), corpus, tmp_path)
    assert result["tokens"] == 16 * (SEQLEN - 1)
    assert "perplexity" in capsys.readouterr().out
    reference = float_ppl(corpus)
    assert np.isfinite(result["perplexity"])
    assert abs(result["perplexity"] / reference - 1) < 0.01


def test_gptq_w4_act_order_hf_gptq_output_loads_with_load_hf_llama(corpus, tmp_path):
    out = tmp_path / "hf"
    assert main(quantize_argv(corpus, out, "--bits", "4", "--group-size", "32", "--act-order",
                              "--format", "hf-gptq")) == 0
    assert (out / "quant_report.json").is_file()
    cfg, params = og.load_hf_llama(str(out))
    leaves = jax.tree_util.tree_leaves(params, is_leaf=og.quant.is_quantized)
    assert sum(og.quant.is_quantized(x) for x in leaves) == 2 * 7
    windows = data.corpus_windows(og.ByteTokenizer(), corpus, "test", SEQLEN)[:16]
    ppl = windows_perplexity(cfg, params, windows)
    # random weights: every model sits near the uniform 258; 4 bits moves it by well under 5%
    assert np.isfinite(ppl) and abs(ppl / float_ppl(corpus) - 1) < 0.05


@pytest.fixture
def no_model(monkeypatch):
    """Errors that must come before any work: loading the model fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr("optgqa_jax.cli.load_model", refuse)


@pytest.mark.parametrize("extra, flag", [
    (["--bits", "5"], "--bits"),
    (["--nsamples", "0"], "--nsamples"),
    (["--seqlen", "1"], "--seqlen"),
    (["--group-size", "0"], "--group-size"),
    (["--corpus", "text:/no/such/corpus.txt"], "--corpus"),
    (["--quantize-embedding", "--format", "hf-gptq"], "--quantize-embedding"),
])
def test_quantize_bad_arguments_exit_2_before_loading(corpus, tmp_path, capsys, no_model,
                                                      extra, flag):
    assert main(quantize_argv(corpus, tmp_path / "out", *extra)) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quantize_missing_corpus_and_existing_out_exit_2(tmp_path, capsys, no_model, monkeypatch,
                                                         corpus):
    monkeypatch.setenv(data.PYTHON_DOCS_ENV, str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    assert main(quantize_argv("python-docs", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "--corpus python-docs" in err and "python3.11-doc" in err
    (tmp_path / "out").mkdir()
    assert main(quantize_argv(corpus, tmp_path / "out")) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_quantize_group_size_must_divide_every_input_dimension(corpus, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setattr("optgqa_jax.quant.quantize", lambda *a, **k: pytest.fail("quantized"))
    assert main(quantize_argv(corpus, tmp_path / "out", "--group-size", "48")) == 2
    err = capsys.readouterr().err
    assert "--group-size 48" in err and "D_in=64" in err


@pytest.mark.parametrize("extra, flag", [
    (["--seqlen", "1"], "--seqlen"),
    (["--seqlen", "1000"], "--seqlen"),  # the tiny preset's max_seq_len is 256
    (["--max-windows", "0"], "--max-windows"),
])
def test_eval_bad_arguments_exit_2(corpus, capsys, extra, flag):
    assert main(["eval", "--model", "tiny", "--corpus", corpus, *extra]) == 2
    assert flag in capsys.readouterr().err


# ----------------------------------------------------------------------------- windows_perplexity
# (the library function the eval command runs; kept here, beside its only caller's tests)


@pytest.mark.parametrize("batch_size", [1, 2, 8])  # 2: the last batch of 5 windows is padded
def test_windows_perplexity_is_exp_mean_nll_of_every_predicted_token(rng, batch_size):
    model = load_model("tiny")
    windows = rng.integers(0, model.cfg.vocab_size, size=(5, 12))
    nll = np.concatenate([og.token_nll(model.cfg, model.params, w) for w in windows])
    assert nll.shape == (5 * 11,)
    ppl = windows_perplexity(model.cfg, model.params, windows, batch_size=batch_size)
    np.testing.assert_allclose(ppl, np.exp(nll.mean()), rtol=1e-5)


@pytest.mark.parametrize("windows, message", [
    (np.zeros((0, 8), np.int32), "at least one window"),
    (np.zeros((3, 1), np.int32), "at least one window"),
    (np.zeros(8, np.int32), "[n, T]"),
    (np.zeros((2, 8), np.float32), "integer"),
    (np.full((2, 8), 258), "vocab_size=258"),
    (np.zeros((1, 257), np.int32), "max_seq_len=256"),
])
def test_windows_perplexity_rejects_malformed_windows(windows, message):
    model = load_model("tiny")
    with pytest.raises(ValueError, match=re.escape(message)):
        windows_perplexity(model.cfg, model.params, windows)
