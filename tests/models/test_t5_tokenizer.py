"""T5 tokenizer ids equal transformers' T5Tokenizer on an awkward corpus (same tokenizer.json)."""
import pytest
import torch

from diffusekit.models.t5_tokenizer import T5Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "a red circle on a blue square",
    "",
    "   ",
    "  leading and trailing spaces  ",
    "double  spaces   and\ttabs\nand\r\nnewlines",
    "Ünïcödé café naïve résumé ÀÉÎÕÜ",
    "東京の夜景 and 北京, 한국어 텍스트",
    "emoji 🙂🎨 and ZWJ 👩‍💻 and flags 🇯🇵",
    "fullwidth ＡＢＣ１２３ and ligature ﬁ and ½",
    "specials inline: x </s> y <pad> z <unk> <extra_id_0><extra_id_99> <extra_id_100>",
    "the metaspace char ▁ itself, and ▁▁",
    "(masterpiece:1.2), [blurry], {hat}, <lora:foo:0.8>, a \\(literal\\)",
    "numbers 1234 56.78 -3e5 and 3/4, 100%",
    "zzzz qqq xqxq unknownword ÿ",
    " ".join(f"word{i} red circle" for i in range(120)),     # > 256 tokens: truncated, EOS kept last
]


@pytest.fixture(scope="module")
def tokenizers_pair(t5_tokenizer_dir):
    return T5Tokenizer.from_file(t5_tokenizer_dir), transformers.AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))


def test_ids_equal_transformers_t5_tokenizer(tokenizers_pair):
    ours, ref = tokenizers_pair
    assert type(ref).__name__.startswith("T5Tokenizer")
    for text in CORPUS:
        want = ref(text, padding="max_length", max_length=256, truncation=True).input_ids
        assert ours(text)[0].tolist() == want, text
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids, text


def test_layout_eos_pad_truncation(tokenizers_pair):
    ours, _ = tokenizers_pair
    assert (ours.pad_id, ours.eos_id) == (0, 1)
    ids = ours(["a red circle", CORPUS[-1]], max_length=16)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    row = ids[0].tolist()
    n = row.index(1)
    assert n > 0 and row[n + 1:] == [0] * (15 - n)          # pieces, </s>, then <pad>
    assert ids[1, -1] == 1 and 0 not in ids[1].tolist()      # truncated: 15 pieces + </s>
    assert ours.encode("<extra_id_0>") == [ours.vocab_size - 1]   # sentinels are the last ids, in reverse


def test_missing_file_teaches(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="spiece.model only"):
        T5Tokenizer.from_file(tmp_path)
