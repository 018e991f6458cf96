"""A1111 prompt syntax: emphasis, prompt editing, chunking, emphasis application.

Expected values marked "A1111 doctest" are copied from the doctests of AUTOMATIC1111
stable-diffusion-webui v1.10 modules/prompt_parser.py; the others are worked out by hand from
the rules in its sd_hijack_clip.py / sd_emphasis.py (the derivation is in each test).
"""

import re

import pytest
import torch

from diffusekit.pipelines.prompts import (
    BREAK,
    Chunk,
    apply_emphasis,
    build_ids,
    build_weights,
    empty_chunk,
    get_schedules,
    pad_chunks,
    parse_emphasis,
    prompt_at_step,
    tokenize_weighted,
)

EOS = 49407
BOS = 49406
COMMA = 267


# ------------------------------------------------------------------------------------ emphasis

@pytest.mark.parametrize("text, expected", [
    # A1111 doctests of parse_prompt_attention
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_parse_emphasis_a1111_doctests(text, expected):
    assert parse_emphasis(text) == expected  # exact floats, same multiplication order as A1111


def test_parse_emphasis_square_nested_and_explicit():
    assert parse_emphasis("[a]") == [("a", 1 / 1.1)]
    assert parse_emphasis("[[a]]") == [("a", 1 / 1.1 / 1.1)]
    assert parse_emphasis("(a:0.5)") == [("a", 0.5)]
    assert parse_emphasis("(a: 1.5 )") == [("a", 1.5)]  # spaces around the weight (A1111 >= 1.6)
    assert parse_emphasis("((a:2))") == [("a", 2 * 1.1)]
    assert parse_emphasis("[a") == [("a", 1 / 1.1)]  # closed at the end


def test_parse_emphasis_escapes_and_stray_characters():
    assert parse_emphasis("a \\\\ b") == [("a \\ b", 1.0)]   # escaped backslash is literal
    assert parse_emphasis("a:b") == [("a:b", 1.0)]           # a colon that closes nothing
    assert parse_emphasis("a) b]") == [("a) b]", 1.0)]       # closers without openers are text
    assert parse_emphasis("") == [("", 1.0)]


def test_parse_emphasis_break():
    assert parse_emphasis("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_emphasis("BREAK b") == [("", 1.0), BREAK, ("b", 1.0)]
    assert parse_emphasis("a BREAKFAST") == [("a BREAKFAST", 1.0)]  # only the whole word
    # inside brackets the -1 is multiplied, so it is no marker any more (A1111 does the same)
    assert parse_emphasis("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


def test_parse_emphasis_bad_weight_teaches():
    with pytest.raises(ValueError, match="not a number"):
        parse_emphasis("(a:1.2.3)")


# ------------------------------------------------------------------------------ prompt editing

@pytest.mark.parametrize("prompt, expected", [
    # A1111 doctests of get_learned_conditioning_prompt_schedules (steps=10)
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    # A1111's doctest for "a [{b|d{:.5] c" ("not handling this right now") predates '|' being
    # excluded from plain text; its code returns the prompt unchanged, as here:
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
])
def test_schedules_a1111_doctests(prompt, expected):
    assert get_schedules(prompt, 10) == expected


def test_schedules_hires_a1111_doctests():
    assert get_schedules("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert get_schedules("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]


def test_schedules_a1111_comment_example():
    # the example at the top of A1111's prompt_parser.py, 100 steps
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]")
    assert get_schedules(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_schedules_number_rules():
    # new rules: a decimal point means a fraction, even >= 1 ("2.0" * 10 = 20, clipped to 10)
    assert get_schedules("a [b:2.0] c", 10) == [(10, "a  c")]
    # old rules (A1111 < 1.8): < 1 is a fraction, anything else a step
    assert get_schedules("a [b:2.0] c", 10, use_old_scheduling=True) == [(2, "a  c"), (10, "a b c")]
    assert get_schedules("a [b:0.3] c", 10, use_old_scheduling=True) == [(3, "a  c"), (10, "a b c")]
    # a switch point that truncates below 1 is not listed, and the "after" text applies throughout
    assert get_schedules("[x:y:0.05]", 10) == [(10, "y")]
    assert get_schedules("[x:y:-1]", 10) == [(10, "y")]
    # a step count past the end is clipped: "before" for the whole run
    assert get_schedules("[x:y:50]", 10) == [(10, "x")]


def test_schedules_nested_in_emphasis_keeps_brackets():
    assert get_schedules("((a [cat:dog:5]:1.2))", 10) == [(5, "((a cat:1.2))"), (10, "((a dog:1.2))")]
    assert get_schedules("([a|b]:1.1), c", 3) == [(1, "(a:1.1), c"), (2, "(b:1.1), c"), (3, "(a:1.1), c")]


def test_schedules_unparsable_prompt_is_kept_whole():
    assert get_schedules("a | [b:c:2]", 10) == [(10, "a | [b:c:2]")]  # '|' outside alternation
    assert get_schedules("[a:b:c]", 10) == [(10, "[a:b:c]")]        # no number: literal brackets


def test_schedules_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        get_schedules("a", 0)


def test_prompt_at_step():
    sched = get_schedules("a [b:c:3]", 10)  # [(3, 'a b'), (10, 'a c')]
    # A1111 compares its 0-based call counter with `<=`: calls 0..3 use the first text
    assert [prompt_at_step(sched, i) for i in range(5)] == ["a b"] * 4 + ["a c"]
    assert prompt_at_step(sched, 99) == "a c"
    with pytest.raises(ValueError):
        prompt_at_step([], 0)


# ------------------------------------------------------------------------------------- chunks

def fake_encode(text: str) -> list[int]:
    """Word `tN` -> id 1000 + N, ',' -> 267 (CLIP's ',</w>'); anything else is an error."""
    ids = []
    for word in re.findall(r"[^\s,]+|,", text):
        if word == ",":
            ids.append(COMMA)
        else:
            assert re.fullmatch(r"t\d+", word), word
            ids.append(1000 + int(word[1:]))
    return ids


def words(a: int, b: int) -> str:
    return " ".join(f"t{i}" for i in range(a, b))


def ids(a: int, b: int) -> list[int]:
    return [1000 + i for i in range(a, b)]


def test_empty_prompt_is_one_padding_chunk():
    (chunk,) = tokenize_weighted("", fake_encode)
    assert chunk == empty_chunk() == Chunk((EOS,) * 75, (1.0,) * 75)


def test_weights_follow_emphasis_segments():
    (chunk,) = tokenize_weighted("t1 (t2) [t3] (t4:1.5)", fake_encode)
    assert list(chunk.tokens[:5]) == [1001, 1002, 1003, 1004, EOS]
    assert list(chunk.weights[:5]) == [1.0, 1.1, 1 / 1.1, 1.5, 1.0]
    assert len(chunk.tokens) == len(chunk.weights) == 75


def test_emphasis_off_encodes_text_as_is():
    (chunk,) = tokenize_weighted("t1 t2", fake_encode, emphasis=False)
    assert chunk.weights == (1.0,) * 75


def test_long_prompt_splits_at_75():
    chunks = tokenize_weighted(words(0, 80), fake_encode)
    assert len(chunks) == 2
    assert list(chunks[0].tokens) == ids(0, 75)
    assert list(chunks[1].tokens) == ids(75, 80) + [EOS] * 70


def test_exactly_75_tokens_is_one_chunk():
    assert len(tokenize_weighted(words(0, 75), fake_encode)) == 1


def test_comma_backtrack_moves_tail_to_next_chunk():
    # 70 words, a comma (index 70), 10 words. When token 76 arrives the chunk is full and the comma
    # is 75 - 70 = 5 <= 20 tokens back: the 4 words after it move on.
    chunks = tokenize_weighted(words(0, 70) + " , (" + words(70, 80) + ")", fake_encode)
    assert list(chunks[0].tokens) == ids(0, 70) + [COMMA] + [EOS] * 4
    assert list(chunks[1].tokens) == ids(70, 80) + [EOS] * 65
    assert chunks[1].weights[:10] == (1.1,) * 10  # moved tokens keep their weights
    assert chunks[0].weights[-4:] == (1.0,) * 4   # padding weight


@pytest.mark.parametrize("comma_at, moves", [(55, True), (54, False)])
def test_comma_backtrack_window_is_20(comma_at, moves):
    text = words(0, comma_at) + " , " + words(comma_at, 90)
    chunks = tokenize_weighted(text, fake_encode)
    if moves:  # 75 - 55 = 20: the comma counts as "within the last 20 tokens"
        assert list(chunks[0].tokens) == ids(0, comma_at) + [COMMA] + [EOS] * (74 - comma_at)
    else:      # 75 - 54 = 21: too far, plain split at 75
        assert list(chunks[0].tokens) == ids(0, comma_at) + [COMMA] + ids(comma_at, 74)
    assert tokenize_weighted(text, fake_encode, comma_backtrack=0)[0].tokens[-1] != EOS


def test_comma_arriving_on_a_full_chunk_starts_the_next():
    # A1111: a comma at a full chunk records its position, the chunk closes (forgetting it) and the
    # comma becomes the first token of the next chunk.
    chunks = tokenize_weighted(words(0, 75) + " , t99", fake_encode)
    assert list(chunks[0].tokens) == ids(0, 75)
    assert list(chunks[1].tokens[:3]) == [COMMA, 1099, EOS]


def test_break_ends_the_chunk():
    chunks = tokenize_weighted("t1 t2 BREAK t3", fake_encode)
    assert [list(c.tokens[:3]) for c in chunks] == [[1001, 1002, EOS], [1003, EOS, EOS]]
    # BREAK first: an empty chunk first; BREAK last: no trailing empty chunk
    assert [c.tokens[0] for c in tokenize_weighted("BREAK t1", fake_encode)] == [EOS, 1001]
    assert len(tokenize_weighted("t1 BREAK", fake_encode)) == 1


def test_pad_chunks_equalizes_counts():
    long = tokenize_weighted(words(0, 100), fake_encode)
    short = tokenize_weighted("t1", fake_encode)
    a, b = pad_chunks(long, short)
    assert len(a) == len(b) == 2 and a == long
    assert b[1] == empty_chunk()
    b2, a2 = pad_chunks(short, long)
    assert (a2, b2) == (a, b)
    with pytest.raises(ValueError, match="different lengths"):
        pad_chunks(long, tokenize_weighted("t1", fake_encode, chunk_len=10))


def test_build_ids_and_weights():
    (chunk,) = tokenize_weighted("t1 (t2)", fake_encode)
    clip_l = build_ids(chunk)
    assert len(clip_l) == 77 and clip_l[:4] == [BOS, 1001, 1002, EOS] and clip_l[-1] == EOS
    open_clip = build_ids(chunk, pad=0)  # OpenCLIP: everything after the first EOS is 0
    assert open_clip[:4] == [BOS, 1001, 1002, EOS] and open_clip[4:] == [0] * 73
    full = tokenize_weighted(words(0, 75), fake_encode)[0]
    assert build_ids(full, pad=0) == [BOS, *ids(0, 75), EOS]
    assert build_weights(chunk) == [1.0, 1.0, 1.1] + [1.0] * 74


def test_real_clip_bpe_long_prompt():
    tok_mod = pytest.importorskip("diffusekit.models.tokenizer")
    bpe = tok_mod.find_bundled_bpe()
    if bpe is None:
        pytest.skip("no bundled CLIP BPE file (open_clip_torch not installed)")
    tok = tok_mod.CLIPTokenizer.from_bpe_gz(bpe)
    assert tok.encoder[",</w>"] == COMMA and tok.bos_id == BOS and tok.eos_id == EOS

    phrase = "a photo of a red apple on a wooden table,"
    phrase_ids = tok.encode(phrase)
    assert len(phrase_ids) == 11 and phrase_ids[-1] == COMMA
    # 10 phrases = 110 tokens. 6 phrases (66 tokens) + 9 tokens of the 7th fill chunk 0; the last
    # comma sits at index 65, 75 - 65 = 10 <= 20 back, so the 9 tokens move to chunk 1.
    chunks = tokenize_weighted(" ".join([phrase] * 10), tok.encode)
    assert len(chunks) == 2
    assert list(chunks[0].tokens) == phrase_ids * 6 + [EOS] * 9
    assert list(chunks[1].tokens) == phrase_ids * 4 + [EOS] * 31

    # emphasis segments are encoded separately: "(red:1.5)" weights exactly the "red" token
    (chunk,) = tokenize_weighted("a (red:1.5) apple", tok.encode)
    assert list(chunk.tokens[:4]) == tok.encode("a") + tok.encode("red") + tok.encode("apple") + [EOS]
    assert list(chunk.weights[:4]) == [1.0, 1.5, 1.0, 1.0]


# --------------------------------------------------------------------------- emphasis on hidden

def test_apply_emphasis_restores_mean():
    hidden = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])  # (1, 3, 2), mean 2
    weights = torch.tensor([[1.0, 2.0, 1.0]])
    # weighted: [[1,1],[4,4],[3,3]], mean 16/6; rescale by 2 / (16/6) = 0.75
    out = apply_emphasis(hidden, weights)
    torch.testing.assert_close(out, torch.tensor([[[0.75, 0.75], [3.0, 3.0], [2.25, 2.25]]]))
    torch.testing.assert_close(out.mean(), hidden.mean())
    no_norm = apply_emphasis(hidden, weights, normalize=False)
    torch.testing.assert_close(no_norm, torch.tensor([[[1.0, 1.0], [4.0, 4.0], [3.0, 3.0]]]))


def test_apply_emphasis_mean_is_over_the_whole_batch():
    hidden = torch.tensor([[[1.0], [1.0]], [[3.0], [3.0]]])  # (2, 2, 1), mean 2
    weights = [[2.0, 2.0], [1.0, 1.0]]
    # weighted: 2, 2, 3, 3 -> mean 2.5 -> factor 0.8 for both rows (not per sample)
    out = apply_emphasis(hidden, weights)
    torch.testing.assert_close(out, torch.tensor([[[1.6], [1.6]], [[2.4], [2.4]]]))


def test_apply_emphasis_unit_weights_are_identity_and_shape_checked():
    hidden = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(apply_emphasis(hidden, torch.ones(2, 77)), hidden)
    with pytest.raises(ValueError, match="do not match"):
        apply_emphasis(hidden, torch.ones(2, 76))


def test_schedules_survive_pathological_nesting():
    deep = "[" * 3000 + "a" + "]" * 3000  # deeper than Python's recursion limit
    assert get_schedules(deep, 10) == [(10, deep)]
    # (A1111's Earley parser would still find the [x:y:2] here; ours gives up on nesting this deep)
    assert get_schedules("([" * 1500 + "[x:y:2]", 10) == [(10, "([" * 1500 + "[x:y:2]")]
    assert get_schedules("([" * 50 + "[x:y:2]", 10)[0] == (2, "([" * 50 + "x")
