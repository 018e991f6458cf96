"""CLIP tokenizer: id-for-id parity with transformers' CLIPTokenizer on the real CLIP vocab.

The reference files (vocab.json, merges.txt) are built (tests/conftest.py) from open_clip's
bpe_simple_vocab_16e6.txt.gz with the recipe of OpenAI's simple_tokenizer.py, written out
independently of the code under test.
"""

import subprocess
import sys
import unicodedata

import pytest
import torch

from diffusekit.models.tokenizer import CLIPTokenizer, find_bundled_bpe

BPE_GZ = find_bundled_bpe()
pytestmark = pytest.mark.skipif(BPE_GZ is None, reason="needs open_clip's bpe_simple_vocab_16e6.txt.gz")

CORPUS = [
    "a photo of a cat",
    "",
    "   ",
    "A Photo OF a CAT, masterpiece, best quality, 8k, highly detailed!!!",
    "((red:1.3)) car, [blue|green] sky, (((dramatic lighting))), [[bad]]",
    r"\(escaped\) brackets \[not emphasis\] and a \\ backslash",
    "portrait BREAK landscape BREAK, BREAKfast",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines\r\n end  ",
    "html &amp; entities &lt;b&gt; &quot;quoted&quot; &#39;apos&#39; &amp;amp;",
    "café naïve résumé Ærøskøbing Straße ΟΔΟΣ İstanbul",
    "cafe\u0301 (combining accent, NFC composes it)",
    "emoji 🎉👍🏽👨‍👩‍👧 ❤️ 🇫🇷 ☃",
    "日本語のテキスト 中文提示词 한국어 프롬프트",
    "numbers 1234567890 3.14159 1e-5 -42 ½ ² ٣ ⅷ",
    "it's, they're, we've, I'm, you'll, he'd, don't, 'quoted' IT'S",
    "punctuation!?...,;:--__==++**&&||~~^^%%$$##@@ <>/\\",
    "tokens <|startoftext|> inside<|endoftext|>text and <|ENDOFTEXT|> upper",
    "fullwidth ＡＢＣ１２３ curly “quotes” ‘single’ ligature ﬁ dash — ellipsis …",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic space\u2003em",
    "<lora:add_detail:0.7> embedding:EasyNegative, (worst quality:1.4)",
    "[from:to:0.5] [to:10] [from::3] (a AND b:1.2) AND c",
    "long " + "very " * 120 + "prompt",
    "Ünïcödé ÀÉÎÕÜ ÿ ı ǅ ẞ Ω ℃ ™ ©",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, clip_vocab_files):
    """vocab.json + merges.txt as OpenAI CLIP's SimpleTokenizer builds them."""
    folder = clip_vocab_files(tmp_path_factory.mktemp("clip_tok"))
    return folder / "vocab.json", folder / "merges.txt"


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.from_bpe_gz(BPE_GZ)


@pytest.fixture(scope="module")
def ref(files):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(files[0].parent))


def test_vocab_size_and_special_ids(ours):
    assert ours.vocab_size == 49408
    assert (ours.bos_id, ours.eos_id) == (49406, 49407)


def test_known_ids(ours):
    # the ids of "a photo of a cat" that the CLIP / transformers docs print
    assert ours("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_from_files_equals_from_bpe_gz(files, ours):
    tok = CLIPTokenizer.from_files(*files)
    assert tok.encoder == ours.encoder
    assert tok.merge_ranks == ours.merge_ranks


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(ours, ref, text):
    assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]


def test_batch_matches_transformers(ours, ref):
    got = ours(CORPUS)  # SD1: pad with EOS
    want = ref(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert got.dtype == torch.long and got.shape == (len(CORPUS), 77)
    assert torch.equal(got, want)


def test_openclip_padding_with_zero(ours, ref):
    got = ours(CORPUS, pad_id=0)
    for row, text in zip(got.tolist(), CORPUS):
        ids = ref(text, max_length=77, truncation=True)["input_ids"]
        assert row == ids + [0] * (77 - len(ids))


@pytest.mark.parametrize("text", CORPUS)
def test_decode_matches_transformers(ours, ref, text):
    ids = ours(text)[0].tolist()
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_every_bmp_code_point_matches_transformers(ours, ref):
    """Each assigned BMP character alone and between letters/digits/spaces. Characters unassigned
    in Python's Unicode database are skipped: the libraries' Unicode versions differ there."""
    chars = [chr(c) for c in range(0x10000)
             if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    texts = [f"A{c}b {c}9{c}" for c in chars]
    want = [e.ids for e in ref.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    bad = [(hex(ord(c)), ours.encode(t), w) for c, t, w in zip(chars, texts, want) if ours.encode(t) != w]
    assert not bad, bad[:10]


@pytest.mark.slow
def test_every_code_point_matches_transformers(ours, ref):
    chars = [chr(c) for c in range(0x10000, 0x110000) if unicodedata.category(chr(c)) != "Cn"]
    texts = [f"A{c}b {c}9{c}" for c in chars]
    want = [e.ids for e in ref.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    bad = [(hex(ord(c)), t) for c, t, w in zip(chars, texts, want) if ours.encode(t) != w]
    assert not bad, bad[:10]


def test_truncation_keeps_bos_first_and_eos_last(ours):
    text = "word " * 200
    ids = ours(text)[0]
    assert ids[0] == 49406 and ids[76] == 49407
    assert ids[1:76].tolist() == ours.encode(text)[:75]
    with pytest.raises(ValueError, match="200 tokens"):
        ours(text, truncate=False)
    assert ours("a b c", max_length=4).tolist() == [[49406, 320, 321, 49407]]
    assert ours("a b", max_length=6, pad_id=0).tolist() == [[49406, 320, 321, 49407, 0, 0]]


def test_encode_is_not_truncated(ours):
    assert len(ours.encode("word " * 200)) == 200


def test_fix_text_unescapes_html_like_openai_clip():
    tok = CLIPTokenizer.from_bpe_gz(BPE_GZ, fix_text=True)
    assert tok.encode("salt &amp; pepper &amp;amp; &lt;3") == tok.encode("salt & pepper & <3")
    plain = CLIPTokenizer.from_bpe_gz(BPE_GZ)
    assert plain.encode("salt &amp; pepper") != plain.encode("salt & pepper")


def test_bad_inputs_raise_teaching_errors(ours):
    with pytest.raises(TypeError, match="one str"):
        ours.encode(["a", "b"])
    with pytest.raises(ValueError, match="not in the vocab"):
        ours.decode([49408])
    with pytest.raises(ValueError, match="pad_id=49408"):
        ours("a", pad_id=49408)
    with pytest.raises(ValueError, match="max_length=1"):
        ours("a", max_length=1)
    with pytest.raises(ValueError, match="not a pair"):
        CLIPTokenizer(ours.encoder, ["a b"])
    with pytest.raises(ValueError, match="special token"):
        CLIPTokenizer({"a": 0}, [])


def test_find_bundled_bpe_does_not_import_open_clip():
    code = ("import sys; from diffusekit.models.tokenizer import find_bundled_bpe; p = find_bundled_bpe(); "
            "assert p.name == 'bpe_simple_vocab_16e6.txt.gz', p; assert 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_is_bounded_and_per_instance():
    tok = CLIPTokenizer.from_bpe_gz(BPE_GZ, cache_size=4)
    first = tok.encode("one two three four five six seven")
    assert len(tok._cache) <= 4
    assert tok.encode("one two three four five six seven") == first
    assert CLIPTokenizer.from_bpe_gz(BPE_GZ)._cache == {}
