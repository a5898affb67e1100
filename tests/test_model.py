import math

import pytest
import torch

from recipe.model import (
    ModelArgs,
    ModelConfigError,
    RopeScaling,
    Transformer,
    apply_rope,
    build_meta_model,
    count_parameters,
    document_causal_mask,
    rope_cache,
    rope_frequencies,
)


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32,
                ffn_dim_multiplier=None, max_seq_len=64)
    base.update(kw)
    return ModelArgs(**base)


def make_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    return model


@pytest.mark.parametrize(
    "name,expected",
    [("llama3_8b", 8_030_261_248), ("llama3_70b", 70_553_706_496), ("llama3_405b", 405_853_388_800)],
)
def test_parameter_counts_of_configs(name, expected):
    from recipe.cli import model_args_from_config

    args = model_args_from_config(f"configs/{name}.yaml")
    assert count_parameters(build_meta_model(args)) == expected


def test_table3_shapes():
    from recipe.cli import model_args_from_config

    a8 = model_args_from_config("configs/llama3_8b.yaml")
    a405 = model_args_from_config("configs/llama3_405b.yaml")
    assert (a8.n_layers, a8.dim, a8.ffn_hidden_dim, a8.n_heads, a8.n_kv_heads) == (32, 4096, 14336, 32, 8)
    assert (a405.n_layers, a405.dim, a405.ffn_hidden_dim, a405.n_heads, a405.n_kv_heads) == (126, 16384, 53248, 128, 8)
    assert a8.rope_theta == 500000 and a8.vocab_size == 128256 and a8.norm_eps == 1e-5


def test_meta_names_and_untied_output():
    model = build_meta_model(tiny_args())
    names = set(dict(model.named_parameters()))
    for expected in ["tok_embeddings.weight", "norm.weight", "output.weight",
                     "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
                     "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
                     "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w2.weight",
                     "layers.1.feed_forward.w3.weight", "layers.1.attention_norm.weight",
                     "layers.1.ffn_norm.weight"]:
        assert expected in names
    assert model.output.weight is not model.tok_embeddings.weight
    assert not any(n.endswith("bias") for n in names)
    # The rope table is derived, never saved: a released checkpoint loads strictly.
    assert "rope" not in model.state_dict()


def test_meta_build_then_materialise():
    args = tiny_args()
    model = build_meta_model(args)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    assert torch.equal(model.rope, rope_cache(args))
    logits = model(torch.randint(0, args.vocab_size, (2, 16)))
    assert logits.shape == (2, 16, args.vocab_size) and torch.isfinite(logits).all()


def test_rope_theta_500k():
    args = tiny_args(dim=128, n_heads=2, n_kv_heads=2)  # head_dim 64
    freqs = rope_frequencies(args)
    expected = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    torch.testing.assert_close(freqs, expected.float())
    assert freqs[-1].item() == pytest.approx(500000.0 ** (-62 / 64))
    table = rope_cache(args)
    assert table.shape == (args.max_seq_len, 32, 2)
    torch.testing.assert_close(table[7, 3, 0], torch.cos(torch.tensor(7 * freqs[3].item())))


def test_rope_is_relative_and_norm_preserving():
    args = tiny_args(dim=32, n_heads=1, n_kv_heads=1)
    table = rope_cache(args)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(pq, pk):
        return (apply_rope(q, table[pq:pq + 1].unsqueeze(0)) * apply_rope(k, table[pk:pk + 1].unsqueeze(0))).sum()

    torch.testing.assert_close(score(10, 3), score(40, 33), atol=1e-5, rtol=1e-5)
    rotated = apply_rope(q, table[25:26].unsqueeze(0))
    torch.testing.assert_close(rotated.norm(), q.norm())


def test_rope_scaling_matches_llama31_rule():
    args = tiny_args(dim=128, n_heads=1, n_kv_heads=1, rope_scaling=RopeScaling())
    plain = rope_frequencies(tiny_args(dim=128, n_heads=1, n_kv_heads=1))
    scaled = rope_frequencies(args)
    wavelen = 2 * math.pi / plain
    assert torch.equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])  # high frequencies kept
    torch.testing.assert_close(scaled[wavelen > 8192], plain[wavelen > 8192] / 8)  # low ones divided by 8


def test_gqa_equals_mha_with_repeated_kv():
    gqa_args = tiny_args(n_heads=4, n_kv_heads=2)
    gqa = make_model(gqa_args)
    mha = Transformer(tiny_args(n_heads=4, n_kv_heads=4))
    state = gqa.state_dict()
    hd = gqa_args.head_dim
    for i in range(gqa_args.n_layers):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            heads = state[key].view(gqa_args.n_kv_heads, hd, gqa_args.dim)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(-1, gqa_args.dim)
    mha.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 97, (2, 24))
    docs = torch.tensor([[0] * 10 + [1] * 14, [5] * 24])
    torch.testing.assert_close(gqa(tokens, docs), mha(tokens, docs), atol=1e-5, rtol=1e-5)


def test_document_mask_packed_equals_separate():
    args = tiny_args()
    model = make_model(args)
    lengths = [5, 11, 8]
    docs = [torch.randint(0, args.vocab_size, (n,)) for n in lengths]
    packed = torch.cat(docs).unsqueeze(0)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    packed_logits = model(packed, doc_ids)[0]
    start = 0
    for d in docs:
        alone = model(d.unsqueeze(0))[0]
        torch.testing.assert_close(packed_logits[start:start + len(d)], alone, atol=2e-5, rtol=1e-5)
        start += len(d)
    # Without the mask, later documents would see earlier ones: the check above is not vacuous.
    unmasked = model(packed)[0]
    assert (unmasked[5:16] - packed_logits[5:16]).abs().max() > 1e-3


def test_reference_mask_shape():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1]]))
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 4, 4) and torch.equal(mask[0, 0], expected)


def test_single_document_mask_equals_causal():
    args = tiny_args()
    model = make_model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 20))
    # Row 0 holds one document, so its masked result must equal plain causal attention.
    masked = model(tokens, torch.tensor([[0] * 20, [0] * 19 + [1]]))
    causal = model(tokens)
    torch.testing.assert_close(masked[0], causal[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [(dict(dim=65, n_heads=4), "not divisible"), (dict(n_heads=4, n_kv_heads=3), "multiple of"),
     (dict(n_layers=0), "positive")],
)
def test_bad_dims_give_one_line_errors(kw, match):
    with pytest.raises(ModelConfigError, match=match) as err:
        tiny_args(**kw)
    assert "\n" not in str(err.value)


def test_sequence_longer_than_max_is_an_error():
    model = make_model(tiny_args(max_seq_len=16))
    with pytest.raises(ModelConfigError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_init_scheme():
    args = tiny_args(dim=256, n_heads=4, n_layers=4, vocab_size=1000)
    model = make_model(args)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # Output projections shrink with depth: std 0.02 / sqrt(2 * (layer + 1)).
    assert model.layers["3"].feed_forward.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert model.output.weight.abs().max().item() <= 3 * 256 ** -0.5 + 1e-6
    assert torch.equal(model.norm.weight, torch.ones(256))
