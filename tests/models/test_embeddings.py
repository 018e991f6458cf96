"""Textual-inversion files: the formats A1111 reads, pickle safety, skipping by width, the
`inputs_embeds` path of the CLIP forward (parity with transformers fed the same token embeddings)."""
import hashlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from diffusekit.models.clip import CLIPTextModel
from diffusekit.models.embeddings import EmbeddingError, EmbeddingLibrary, load_embedding


def _pt(path, vec, **extra):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "x", "step": 500,
                "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5", **extra}, path)
    return path


def test_a1111_pt_and_kohya_safetensors_and_diffusers_bin(tmp_path):
    vec = torch.randn(3, 32)
    a = load_embedding(_pt(tmp_path / "myartist.pt", vec))
    assert a.name == "myartist" and a.count == 3 and a.shape == 32 and a.step == 500
    assert (a.sd_checkpoint, a.sd_checkpoint_name) == ("abcdef12", "v1-5")
    assert torch.equal(a.vectors["*"], vec)
    assert a.sha256 == hashlib.sha256((tmp_path / "myartist.pt").read_bytes()).hexdigest()
    assert a.shorthash == a.sha256[:12]

    save_file({"emb_params": vec.half()}, tmp_path / "kohya.safetensors")
    b = load_embedding(tmp_path / "kohya.safetensors")
    assert b.name == "kohya" and b.vectors["*"].dtype == torch.float32
    assert torch.equal(b.vectors["*"], vec.half().float())

    torch.save({"<cat-toy>": vec[0]}, tmp_path / "learned_embeds.bin")  # diffusers: one (W,) vector
    c = load_embedding(tmp_path / "learned_embeds.bin")
    assert c.count == 1 and torch.equal(c.vectors["*"], vec[:1])


def test_sdxl_file_has_one_tensor_per_encoder(tmp_path):
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}, tmp_path / "xl.safetensors")
    e = load_embedding(tmp_path / "xl.safetensors")
    assert e.count == 2 and e.shape == 80
    l, g = e.for_encoders([32, 48])
    assert l.shape == (2, 32) and g.shape == (2, 48) and torch.equal(l, e.vectors["clip_l"])
    with pytest.raises(EmbeddingError, match="SDXL embedding .* 1 text encoder"):
        e.for_encoders([32])


class _NotATensor:
    pass


def test_pickle_with_an_object_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "payload": _NotATensor()}, path)
    with pytest.raises(EmbeddingError, match="arbitrary pickled code.*_NotATensor"):
        load_embedding(path)
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2], protocol=2) + b"garbage")  # torch.save's protocol
    with pytest.raises(EmbeddingError):
        load_embedding(tmp_path / "junk.pt")


def test_not_an_embedding(tmp_path):
    save_file({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, tmp_path / "two.safetensors")
    with pytest.raises(EmbeddingError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "two.safetensors")
    _pt(tmp_path / "long.pt", torch.zeros(76, 32))
    with pytest.raises(EmbeddingError, match="76 vectors"):
        load_embedding(tmp_path / "long.pt")


def test_library_loads_skips_by_width_and_reports_failures(tmp_path):
    _pt(tmp_path / "good.pt", torch.randn(2, 32))
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": torch.randn(1, 768)}, tmp_path / "sub" / "sd1real.safetensors")
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, tmp_path / "xl.safetensors")
    torch.save({"x": _NotATensor()}, tmp_path / "bad.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored")
    lib = EmbeddingLibrary(tmp_path, [32])
    assert lib.refresh() is True
    assert list(lib.loaded) == ["good"]
    assert set(lib.skipped) == {"sd1real", "xl"}
    assert "768 wide" in lib.skipped["sd1real"][1] and "32" in lib.skipped["sd1real"][1]
    assert "SDXL" in lib.skipped["xl"][1]
    assert list(lib.failed) == ["bad"] and "arbitrary pickled code" in lib.failed["bad"]
    (good,) = lib.vectors()["good"]
    assert good.shape == (2, 32)
    assert lib.refresh() is False                     # nothing changed: same objects, not re-read
    _pt(tmp_path / "more.pt", torch.randn(1, 32))
    assert lib.refresh() is True and set(lib.loaded) == {"good", "more"}


def test_inputs_embeds_equals_token_lookup_and_transformers_hooked_like_a1111():
    """Our forward with `inputs_embeds` = transformers CLIPTextModel whose token_embedding output is
    replaced at the same rows (A1111's EmbeddingsWithFixes hook). Tolerance 1e-5 (float32)."""
    transformers = pytest.importorskip("transformers")
    from diffusekit.models.convert_clip import clip_config_from_hf, clip_state_dict_from_hf
    torch.manual_seed(0)
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu")).eval()
    d = hf.config.to_dict()
    d["architectures"] = ["CLIPTextModel"]
    cfg = clip_config_from_hf(d)
    ours = CLIPTextModel(cfg)
    ours.load_state_dict(clip_state_dict_from_hf(hf.state_dict(), cfg))
    ours.eval()
    W = cfg.width
    transformer = getattr(hf, "text_model", hf)  # transformers 5 puts the text transformer at the top

    ids = torch.tensor([[49406, 320, 1125, 539, 0, 0, 49407] + [49407] * 70])
    with torch.no_grad():
        plain = ours(ids, layer=-1)
        same = ours(ids, layer=-1, inputs_embeds=ours.token_embeddings(ids))
        assert torch.equal(plain.hidden, same.hidden) and torch.equal(plain.pooled, same.pooled)

        vec = torch.randn(2, W, generator=torch.Generator().manual_seed(1))
        x = ours.token_embeddings(ids).clone()
        x[0, 4:6] = vec
        got = ours(ids, layer=-2, final_norm=True, inputs_embeds=x)

        def hook(module, args, out):
            out = out.clone()
            out[0, 4:6] = vec
            return out

        handle = transformer.embeddings.token_embedding.register_forward_hook(hook)
        try:
            ref = hf(input_ids=ids, output_hidden_states=True)
        finally:
            handle.remove()
    want = transformer.final_layer_norm(ref.hidden_states[-2])
    torch.testing.assert_close(got.hidden, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got.hidden, ours(ids, layer=-2).hidden)
    with pytest.raises(ValueError, match="inputs_embeds has shape"):
        ours(ids, inputs_embeds=x[:, :5])
