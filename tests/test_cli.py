"""The optgqa command line."""

import jax
import pytest

import optgqa_jax as og
from optgqa_jax.cli import main


def test_info_preset(capsys):
    assert main(["info", "llama3-8b"]) == 0
    out = capsys.readouterr().out
    assert "32 query heads / 8 KV heads" in out
    assert "8,030,261,248" in out
    assert "128.0 KiB per token" in out


def test_generate_with_byte_level_preset(capsys):
    assert main(["generate", "--model", "tiny", "--max-tokens", "5", "--ignore-eos", "hi"]) == 0
    assert "### hi" in capsys.readouterr().out


def test_generate_from_checkpoint_directory(tmp_path, capsys):
    cfg = og.ModelConfig.preset("tiny")
    og.save_checkpoint(str(tmp_path / "ck"), cfg, og.init_params(cfg, jax.random.PRNGKey(0)))
    assert main(["generate", "--model", str(tmp_path / "ck"), "--max-tokens", "3",
                 "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "abc"]) == 0
    assert main(["info", str(tmp_path / "ck")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["info", "/no/such/model"], "neither a pretrained name"),
    (["generate", "--model", "llama3-8b-mha", "x"], None),  # no tokenizer for a random 128k vocab
    (["generate", "--model", "tiny", "--top-p", "2", "x"], "top_p must be in"),
])
def test_errors_exit_with_code_2(argv, message, capsys, monkeypatch):
    if argv[2:3] == ["llama3-8b-mha"]:
        # Do not materialise 8B random weights: the tokenizer check must fail first.
        monkeypatch.setattr("optgqa_jax.registry.init_params", lambda cfg, key: None)
        message = "has no tokenizer"
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_generate_default_model(capsys):
    # one token: the engine compiles only its prefill program for the 30-layer model (the
    # decode steps of the CLI are covered on the tiny presets above)
    assert main(["generate", "--max-tokens", "1", "The capital of France is"]) == 0
    assert "Paris" in capsys.readouterr().out
