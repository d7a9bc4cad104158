import pytest

import optgqa_jax as og


def test_byte_tokenizer_round_trip_unicode():
    tok = og.ByteTokenizer()
    text = "héllo, 世界 🙂"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode("a", add_bos=True) == [tok.bos_id, 97]
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id]) == "hi"


def test_byte_tokenizer_errors():
    tok = og.ByteTokenizer()
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([300])


def test_bpe_from_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["grouped query attention " * 20, "paged memory " * 20],
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders
    tk.decoder = decoders.ByteLevel()
    path = tmp_path / "tokenizer.json"
    tk.save(str(path))
    tok = og.BPETokenizer.from_file(str(path), eos_token="<eos>")
    assert tok.eos_id == 0
    assert tok.decode(tok.encode("paged query memory")) == "paged query memory"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        og.BPETokenizer.from_file(str(tmp_path / "missing.json"))
