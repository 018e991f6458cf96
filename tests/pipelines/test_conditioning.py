"""Text conditioning reads its facts from the model's own tokenizer and text encoder, not from CLIP's.

The folders here are written by transformers and diffusers (`save_pretrained`): a tokenizer with added
tokens after EOS (what textual-inversion training saves), and one with a smaller vocabulary whose BOS,
EOS and comma ids are not CLIP's, paired with a text encoder of fewer positions. Our conditioning must
equal transformers' text encoder on transformers' ids.
"""
import json

import pytest
import torch

from diffusekit import GenerationParams, Pipeline
from diffusekit.models.tokenizer import CLIPTokenizer, find_bundled_bpe

BPE_GZ = find_bundled_bpe()
pytestmark = pytest.mark.skipif(BPE_GZ is None, reason="needs the CLIP BPE vocabulary")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


def _diffusers_folder(path, tok, positions):
    """An SD1-layout diffusers folder whose text encoder matches `tok`'s vocabulary and has `positions`."""
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok),
        max_position_embeddings=positions, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id)).eval()
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, cross_attention_dim=32)
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  latent_channels=4)
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = diffusers.StableDiffusionPipeline(vae=vae.eval(), text_encoder=text, tokenizer=tok, unet=unet.eval(),
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(path)
    return text


@pytest.fixture(scope="module")
def added_token_model(tmp_path_factory, clip_vocab_files):
    """CLIP's vocabulary plus two tokens added after EOS (ids 49408, 49409), 77 positions."""
    root = tmp_path_factory.mktemp("added")
    tok = transformers.CLIPTokenizer.from_pretrained(str(clip_vocab_files(root / "vocab")))
    assert tok.add_tokens(["<cat-toy>", "newword"]) == 2
    text = _diffusers_folder(root / "pipe", tok, 77)
    return root / "pipe", tok, text


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, clip_vocab_files):
    """A 3000-merge vocabulary (BOS 3512, EOS 3513) plus an added token, and a text encoder of 40 positions."""
    root = tmp_path_factory.mktemp("small")
    tok = transformers.CLIPTokenizer.from_pretrained(str(clip_vocab_files(root / "vocab", 3000)), model_max_length=40)
    tok.add_tokens(["<cat-toy>"])
    text = _diffusers_folder(root / "pipe", tok, 40)
    return root / "pipe", tok, text


ADDED_CORPUS = ["a photo of <cat-toy>", "A <CAT-TOY>, newword!", "newwords x<cat-toy>y", "<cat-toy><cat-toy>",
                "plain prompt without them", "newword <|endoftext|> <cat-toy>"]


def test_tokenizer_folder_with_added_tokens_gives_transformers_ids(added_token_model):
    path, tok, _ = added_token_model
    ours = CLIPTokenizer.from_pretrained(path / "tokenizer")
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (49406, 49407, 49410)
    for text in ADDED_CORPUS:
        assert ours.encode(text) == tok(text, add_special_tokens=False).input_ids, text


def test_legacy_added_tokens_json_layout(added_token_model, tmp_path, clip_vocab_files):
    """transformers 4 saved vocab.json + merges.txt + added_tokens.json: the same ids."""
    path, tok, _ = added_token_model
    folder = clip_vocab_files(tmp_path / "legacy")
    (folder / "added_tokens.json").write_text(json.dumps({"<cat-toy>": 49408, "newword": 49409}))
    ours = CLIPTokenizer.from_pretrained(folder)
    for text in ADDED_CORPUS:
        assert ours.encode(text) == tok(text, add_special_tokens=False).input_ids, text


def test_pooled_output_sits_at_the_eos_not_at_the_largest_id(added_token_model):
    """transformers takes the first EOS position; an added token's id is larger than EOS's."""
    path, tok, text = added_token_model
    pipe = Pipeline.from_pretrained(path)
    ids = tok(["a photo of <cat-toy>", "newword"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert int(ids.max()) > tok.eos_token_id
    with torch.no_grad():
        ours = pipe.parts.text_encoders[0](ids, eos_id=pipe.text.tokenizer.eos_id)
        ref = text(ids)
    torch.testing.assert_close(ours.pooled, ref.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", ["added_token_model", "small_vocab_model"])
def test_conditioning_equals_transformers_on_the_models_own_vocabulary(request, fixture):
    path, tok, text = request.getfixturevalue(fixture)
    pipe = Pipeline.from_pretrained(path)
    positions = text.config.max_position_embeddings
    w = pipe.text.window
    assert (w.bos, w.eos, w.length) == (tok.bos_token_id, tok.eos_token_id, positions - 2)
    assert w.comma == tok.convert_tokens_to_ids(",</w>")
    for prompt in ("a photo of <cat-toy>", "a photo of a cat"):
        ids = tok(prompt, padding="max_length", max_length=positions, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = text(ids).last_hidden_state
            c = pipe.text.encode_chunks(pipe.text.chunks(prompt))
        torch.testing.assert_close(c.context, ref, atol=1e-5, rtol=0)
    long = " ".join(["cat"] * (positions + 5))           # two windows of positions - 2 tokens each
    c = pipe.text.encode_chunks(pipe.text.chunks(long))
    assert c.context.shape == (1, 2 * positions, 32)
    ids = tok(long, padding="max_length", max_length=positions, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(c.context[:, :positions], text(ids).last_hidden_state, atol=1e-5, rtol=0)


def test_generate_with_an_added_token_and_a_small_vocabulary(small_vocab_model):
    path, _, _ = small_vocab_model
    pipe = Pipeline.from_pretrained(path)
    r = pipe.generate(GenerationParams(prompt="a <cat-toy>, (red:1.2) cat", negative_prompt="blurry", steps=2,
                                       width=16, height=16, seed=1))
    assert r.images[0].size == (16, 16) and "Seed: 1," in r.infotexts[0]
