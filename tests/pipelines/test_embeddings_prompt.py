"""Textual-inversion embeddings in prompts: closed-form checks of the injection (an embedding made of
a word's own token embeddings conditions exactly like the word), A1111's chunk placement, emphasis,
the image, the negative prompt, `TI hashes`, skipping and the CLI flag."""
import pytest
import torch
from safetensors.torch import save_file

from diffusekit import GenerationParams, Pipeline
from diffusekit.pipelines import prompts as P
from diffusekit.pipelines.infotext import parse_infotext


@pytest.fixture(scope="module")
def ti_pipe(tiny_sd1, tmp_path_factory):
    pipe = Pipeline.from_pretrained(tiny_sd1)
    folder = tmp_path_factory.mktemp("embeddings")
    enc, tok = pipe.parts.text_encoders[0], pipe.text.tokenizer
    with torch.no_grad():
        def rows(word):
            return enc.token_embeddings(torch.tensor([tok.encode(word)]))[0].clone()   # (N, 32)
        torch.save({"string_to_param": {"*": rows("cat")}, "name": "zqxcat", "step": 3}, folder / "zqxcat.pt")
        save_file({"emb_params": rows("red circle")}, folder / "myartist.safetensors")
    g = torch.Generator().manual_seed(0)
    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=g)}}, folder / "easynegative.pt")
    save_file({"emb_params": torch.randn(1, 768, generator=g)}, folder / "sd1big.safetensors")  # real SD1 width
    pipe.embeddings_dir = folder
    return pipe


def _cond(pipe, text):
    return pipe.text.encode_chunks(pipe.text.chunks(text)).context


def test_library_of_the_pipeline(ti_pipe):
    lib = ti_pipe.embeddings
    assert set(lib.loaded) == {"zqxcat", "myartist", "easynegative"}
    assert set(lib.skipped) == {"sd1big"} and "768 wide" in lib.skipped["sd1big"][1]
    assert lib.loaded["myartist"].count == 2 and lib.loaded["zqxcat"].step == 3


def test_embedding_of_a_words_rows_equals_the_word(ti_pipe):
    assert len(ti_pipe.text.tokenizer.encode("red circle")) == 2
    assert len(ti_pipe.text.tokenizer.encode("zqxcat")) > 1          # the name's tokens collapse to 1 vector
    torch.testing.assert_close(_cond(ti_pipe, "a zqxcat on grass"), _cond(ti_pipe, "a cat on grass"), rtol=0, atol=0)
    torch.testing.assert_close(_cond(ti_pipe, "photo, by myartist"), _cond(ti_pipe, "photo, by red circle"),
                               rtol=0, atol=0)
    # emphasis weights apply to the vectors like to the word's tokens (A1111: the segment's weight)
    torch.testing.assert_close(_cond(ti_pipe, "a (myartist:1.3) and [zqxcat]"),
                               _cond(ti_pipe, "a (red circle:1.3) and [cat]"), rtol=0, atol=0)
    assert not torch.equal(_cond(ti_pipe, "a (myartist:1.3)"), _cond(ti_pipe, "a myartist"))


def test_unknown_words_are_untouched(ti_pipe, sd1_pipe):
    for text in ("a dog, zqx cat", "myartists", "zqxca"):
        assert ti_pipe.text.chunks(text)[0].fixes == ()
        assert torch.equal(_cond(ti_pipe, text), _cond(sd1_pipe, text))


def test_a1111_chunk_placement(ti_pipe):
    """74 tokens then a 2-vector embedding: it does not fit in chunk 1, so chunk 1 closes (padding) and
    the embedding opens chunk 2 at offset 0: the same as "74 words BREAK red circle"."""
    words = " ".join(["a"] * 74)
    chunks = ti_pipe.text.chunks(words + " myartist")
    assert [c.fixes for c in chunks] == [(), ((0, "myartist"),)]
    assert chunks[0].tokens[74] == P.EOS_ID and chunks[1].tokens[:3] == (0, 0, P.EOS_ID)
    torch.testing.assert_close(_cond(ti_pipe, words + " myartist"), _cond(ti_pipe, words + " BREAK red circle"),
                               rtol=0, atol=0)
    # 73 tokens: it fits exactly at positions 73, 74 of chunk 1
    chunks = ti_pipe.text.chunks(" ".join(["a"] * 73) + " myartist")
    assert len(chunks) == 1 and chunks[0].fixes == ((73, "myartist"),)
    torch.testing.assert_close(_cond(ti_pipe, " ".join(["a"] * 73) + " myartist"),
                               _cond(ti_pipe, " ".join(["a"] * 73) + " red circle"), rtol=0, atol=0)


def test_comma_backtracking_moves_the_embedding_along():
    match = P.EmbeddingMatcher({"emb": 3}, lambda s: [7] if s == "emb" else [int(w) for w in s.split()])
    # 70 plain tokens, a comma, "emb" (3 vectors) -> 74, one more token -> 75: one full chunk
    enc = lambda s: [1] * 70 + [P.COMMA_ID, 7, 2] if s == "x" else []  # noqa: E731
    chunks = P.tokenize_weighted("x", enc, find_embedding=match)
    assert [c.fixes for c in chunks] == [((71, "emb"),)]
    # a further token finds the chunk full with a comma 5 back: everything after the comma moves to
    # chunk 2, the embedding with it (offset 0)
    enc = lambda s: [1] * 70 + [P.COMMA_ID, 7, 2, 3, 4] if s == "x" else []  # noqa: E731
    chunks = P.tokenize_weighted("x", enc, find_embedding=match)
    assert [c.fixes for c in chunks] == [(), ((0, "emb"),)]
    assert chunks[0].tokens[70] == P.COMMA_ID and chunks[1].tokens[:6] == (0, 0, 0, 2, 3, 4)


def test_random_embedding_changes_the_image_in_prompt_and_negative(ti_pipe, sd1_pipe):
    def image(pipe, prompt, negative=""):
        p = GenerationParams(prompt=prompt, negative_prompt=negative, steps=2, width=32, height=32, seed=1,
                             cfg_scale=5)
        return pipe.generate(p)

    base = image(sd1_pipe, "a photo", "easynegative")
    with_ti = image(ti_pipe, "a photo", "easynegative")
    assert with_ti.images[0].tobytes() != base.images[0].tobytes()
    same = image(ti_pipe, "a photo", "blurry")
    assert same.images[0].tobytes() == image(sd1_pipe, "a photo", "blurry").images[0].tobytes()
    assert "TI hashes" not in parse_infotext(same.infotexts[0])
    lib = ti_pipe.embeddings
    fields = parse_infotext(image(ti_pipe, "a zqxcat, [myartist:zqxcat:1]", "easynegative").infotexts[0])
    assert fields["TI hashes"] == (f"zqxcat: {lib.loaded['zqxcat'].shorthash}, myartist: {lib.loaded['myartist'].shorthash}, "
                                   f"easynegative: {lib.loaded['easynegative'].shorthash}")
    assert f'TI hashes: "easynegative: {lib.loaded["easynegative"].shorthash}"' in with_ti.infotexts[0]


def test_set_embeddings_checks_widths(ti_pipe):
    with pytest.raises(ValueError, match="widths \\[32\\]"):
        ti_pipe.text.set_embeddings({"x": (torch.zeros(1, 768),)})


def test_cli_embeddings_dir(ti_pipe, tiny_sd1, tmp_path):
    from diffusekit.interfaces.cli import main
    from diffusekit.pipelines.infotext import read_infotext

    rc = main(["generate", "a photo by myartist", "--model", str(tiny_sd1), "--embeddings-dir",
               str(ti_pipe.embeddings_dir), "--steps", "2", "--width", "32", "--height", "32", "--seed", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    (png,) = tmp_path.glob("*.png")
    assert f'TI hashes: "myartist: {ti_pipe.embeddings.loaded["myartist"].shorthash}"' in read_infotext(png)
