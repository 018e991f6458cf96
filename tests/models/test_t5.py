"""T5 v1.1 encoder: parity with transformers' T5EncoderModel, bucket rule, loading keys."""
import pytest
import torch

from diffusekit.models import t5
from diffusekit.models.t5 import T5EncoderModel, relative_position_bucket, t5_config_from_hf

transformers = pytest.importorskip("transformers")


def _hf(cfg: t5.T5Config, seed=0):
    torch.manual_seed(seed)
    hf_cfg = transformers.T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                                   num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                   relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                                   relative_attention_max_distance=cfg.relative_attention_max_distance,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False)
    return transformers.T5EncoderModel(hf_cfg).eval()


@pytest.mark.parametrize("tokens", [7, 40])    # 40 > max_distance 20: the log buckets and the last bucket are used
def test_matches_transformers_t5_encoder(tokens):
    cfg = t5.TINY
    ref = _hf(cfg)
    ours = T5EncoderModel(t5_config_from_hf(ref.config.to_dict())).eval()
    assert ours.config == cfg
    sd = {k: v for k, v in ref.state_dict().items()}
    assert "shared.weight" in sd
    missing, unexpected = ours.load_state_dict({k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"},
                                               strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, tokens // 2:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
        want_masked = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got_masked = ours(ids, attention_mask=mask)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_masked, want_masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_masked[1], got[1], atol=1e-3)    # the mask is live


def test_relative_position_buckets_match_transformers():
    rel = torch.arange(-300, 301)[None, :]
    for buckets, dist in [(32, 128), (8, 20)]:
        want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            rel, bidirectional=True, num_buckets=buckets, max_distance=dist)
        assert torch.equal(relative_position_bucket(rel, buckets, dist), want)
    b = relative_position_bucket(torch.tensor([-1, 0, 1, 7, 8, 127, 128, 10_000]))
    assert b.tolist() == [1, 0, 17, 23, 24, 31, 31, 31]   # sign half, exact < 8, log-spaced, last bucket


def test_t5_xxl_preset_size():
    with torch.device("meta"):
        model = T5EncoderModel(t5.T5_XXL)
    n = sum(p.numel() for p in model.parameters())
    assert n == 4_762_310_656          # google/t5-v1_1-xxl encoder (shared embedding included)


def test_errors():
    model = T5EncoderModel(t5.TINY)
    with pytest.raises(ValueError, match="token ids must be in 0..399"):
        model(torch.tensor([[1, 400]]))
    with pytest.raises(ValueError, match="gated-gelu"):
        t5_config_from_hf({"feed_forward_proj": "relu"})
