import json
import random
import sys

import pytest
from tokenizers import Tokenizer

from jvlm.testing import qwen_tokenizer as qt


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_str(qt.build_tokenizer_json())


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def test_hello_world_matches_qwen(tok):
    assert ids(tok, "Hello, world!") == [9707, 11, 1879, 0]


def test_multilingual_round_trip(tok):
    text = (
        "Grüße aus München, Ärger über Öl!\n"
        "你好，世界。こんにちは、世界！カタカナ\n"
        "مرحبا بالعالم 🤖🚀👍🏽 家族: 👨‍👩‍👧\r\n"
        "multiple     spaces\t\ttabs\n\n\ntrailing   "
    )
    assert tok.decode(ids(tok, text)) == text


def test_digits_are_split_one_per_token(tok):
    enc = tok.encode("12345", add_special_tokens=False)
    assert enc.tokens == ["1", "2", "3", "4", "5"]
    assert tok.decode(enc.ids) == "12345"


def test_base_tokens_map_back_to_their_bytes(tok):
    ranks = qt.load_ranks()
    assert len(ranks) == qt.NUM_BASE_TOKENS
    unicode_to_byte = {c: b for b, c in qt.bytes_to_unicode().items()}
    for token_bytes, rank in ranks.items():
        assert bytes(unicode_to_byte[c] for c in tok.id_to_token(rank)) == token_bytes, rank
    # The decoder path too, on a sample of tokens that are whole UTF-8 strings.
    random.seed(0)
    sample = random.sample(sorted(ranks.items(), key=lambda kv: kv[1]), 3000)
    for token_bytes, rank in sample:
        try:
            expected = token_bytes.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert tok.decode([rank]) == expected, rank


def test_chat_special_tokens_are_single_ids(tok):
    assert ids(tok, "<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert tok.token_to_id("<|endoftext|>") == 151643
    assert tok.token_to_id("</think>") == 151668


def test_image_tokens_keep_their_ids_across_the_gap(tok):
    for content, i in qt.IMAGE_TOKENS.items():
        assert tok.token_to_id(content) == i
        assert tok.id_to_token(i) == content
    assert qt.IMAGE_TOKENS["<|image|>"] == 151940
    assert ids(tok, "a<|image|>b") == [64, 151940, 65]
    assert ids(tok, "<im_start><im_patch><im_col><im_end><im_slice>") == [
        151936,
        151938,
        151939,
        151937,
        151941,
    ]
    assert tok.get_vocab_size() == 151942
    assert tok.id_to_token(151669) == "<|jvlm_unused_151669|>"


def test_special_flags_mirror_qwen3():
    data = json.loads(qt.build_tokenizer_json())
    flags = {t["id"]: t["special"] for t in data["added_tokens"]}
    non_special = {151657, 151658, 151665, 151666, 151667, 151668}
    assert {i for i, special in flags.items() if not special} == non_special
    assert all(flags[i] for i in qt.IMAGE_TOKENS.values())
    assert not any(t["normalized"] for t in data["added_tokens"])


def test_write_tokenizer_files(tmp_path):
    qt.write_tokenizer_files(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text(encoding="utf-8") == qt.build_tokenizer_json()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] is None
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["model_max_length"] == 40960
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    decoder = config["added_tokens_decoder"]
    assert decoder["151940"]["content"] == "<|image|>"
    assert decoder["151644"] == {
        "content": "<|im_start|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    assert decoder["151667"]["special"] is False


def test_transformers_loads_the_same_ids(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    qt.write_tokenizer_files(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["Hello, world!", "<|im_start|>user\n你好<|im_end|>", "x<|image|><im_patch>y 12345"]:
        expected = ids(tok, text)
        assert fast(text, add_special_tokens=False)["input_ids"] == expected
        assert auto(text, add_special_tokens=False)["input_ids"] == expected
    assert auto.eos_token_id == auto.pad_token_id == 151643


def test_disk_and_memory_cache(tmp_path, monkeypatch):
    reference = qt.build_tokenizer_json()
    assert qt.build_tokenizer_json() is reference  # in-process cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    qt.build_tokenizer_json.cache_clear()
    try:
        assert qt.build_tokenizer_json() == reference  # cold build into an empty cache dir
        cached = list((tmp_path / "jvlm").iterdir())
        assert [p.suffix for p in cached] == [".json"]  # no temp files left behind
        assert cached[0].read_text(encoding="utf-8") == reference

        def no_rebuild(ranks):
            raise AssertionError("should have been served from the disk cache")

        monkeypatch.setattr(qt, "_build", no_rebuild)
        qt.build_tokenizer_json.cache_clear()
        assert qt.build_tokenizer_json() == reference
    finally:
        qt.build_tokenizer_json.cache_clear()


def test_cache_key_tracks_format_version(monkeypatch):
    data = qt.ranks_path().read_bytes()
    before = qt.cache_file(data)
    monkeypatch.setattr(qt, "FORMAT_VERSION", qt.FORMAT_VERSION + 1)
    assert qt.cache_file(data) != before
    assert qt.cache_file(data + b"x") != qt.cache_file(data)


def test_missing_dashscope_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dashscope", None)
    with pytest.raises(ImportError, match=r"pip install dashscope==2\.0\.2"):
        qt.ranks_path()
