"""fusedlab.nn.CATTransformer: the de-interleaved model against a port of the reference's interleaved
forward, causality, ragged lengths, chunk-size training."""
import pytest
import torch

import fusedlab
from fusedlab.nn import CATConfig, CATTransformer, chunk_size_for_step
from fusedlab.reference.cat_model import interleaved_logits


def make(chunk_sizes, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = CATConfig(vocab_size=40, dim=32, n_heads=4, n_kv_heads=2, compressor_dim=16, compressor_heads=2,
                    compressor_layers=1, n_layers=2, chunk_sizes=chunk_sizes, max_seq_len=96, **kw)
    return CATTransformer(cfg).double().eval()


@pytest.mark.parametrize("chunk_sizes, l, L", [((4,), 4, 24), ((8,), 8, 16), ((4, 8, 16), 4, 32),
                                               ((4, 8, 16), 16, 48), ((2, 4), 2, 10)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_logits_equal_the_interleaved_reference(chunk_sizes, l, L, qk_norm, gen):
    model = make(chunk_sizes, qk_norm=qk_norm)
    tokens = torch.randint(0, 40, (2, L), generator=gen)
    torch.testing.assert_close(model(tokens, l), interleaved_logits(model, tokens, l), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk_sizes, l", [((4,), 4), ((4, 8), 8), ((4, 8), 4)])
def test_prefixes_and_ragged_lengths_agree(chunk_sizes, l, gen):
    """Logits of any prefix (L not a multiple of l included) equal the full sequence's at those positions:
    no position depends on a later token."""
    model = make(chunk_sizes)
    tokens = torch.randint(0, 40, (2, 27), generator=gen)
    full = model(tokens, l)
    for L in (1, l - 1, l, l + 1, 2 * l + 3, 26):
        torch.testing.assert_close(model(tokens[:, :L], l), full[:, :L], rtol=1e-9, atol=1e-9)


def test_chunk_sizes_are_chosen_per_call_and_round_robin_in_training(gen):
    cfg = CATConfig(vocab_size=30, dim=32, n_heads=2, compressor_dim=16, compressor_heads=2,
                    chunk_sizes=(2, 4, 8), max_seq_len=64)
    assert [chunk_size_for_step(cfg, s) for s in range(5)] == [2, 4, 8, 2, 4]
    torch.manual_seed(0)
    model = CATTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.arange(32).repeat(8, 1) % 30  # a predictable sequence
    first = [model.loss(tokens, l).item() for l in cfg.chunk_sizes]
    for step in range(60):
        opt.zero_grad()
        model.loss(tokens, chunk_size_for_step(cfg, step)).backward()
        opt.step()
    last = [model.loss(tokens, l).item() for l in cfg.chunk_sizes]
    assert all(b < 0.5 * a for a, b in zip(first, last)), (first, last)


def test_errors():
    model = make((4, 8))
    with pytest.raises(ValueError, match=r"chunk_size must be one of the trained sizes \(4, 8\)"):
        model(torch.zeros(1, 8, dtype=torch.long), 16)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 97, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="powers of two"):
        CATConfig(chunk_sizes=(3, 6))
    with pytest.raises(ValueError, match="n_kv_heads"):
        CATConfig(dim=32, n_heads=4, n_kv_heads=3)


def recompute_generate(model, prompt, n, l, temperature=0.0, top_k=None, generator=None):
    """The slow oracle: the full forward over everything so far, at every step."""
    seq = prompt
    for _ in range(n):
        logits = model(seq, l)[:, -1]
        seq = torch.cat([seq, model._pick(logits, temperature, top_k, generator)[:, None]], 1)
    return seq


@pytest.mark.parametrize("chunk_sizes, l", [((4,), 4), ((4, 8), 4), ((4, 8), 8)])
@pytest.mark.parametrize("P", [1, 3, 4, 9])
def test_cached_greedy_generation_equals_recompute(chunk_sizes, l, P, gen):
    model = make(chunk_sizes, seed=1)
    prompt = torch.randint(0, 40, (3, P), generator=gen)
    got = model.generate(prompt, 21, chunk_size=l)
    assert torch.equal(got, recompute_generate(model, prompt, 21, l))


@pytest.mark.parametrize("chunk_sizes, l", [((4,), 4), ((4, 8), 8)])
def test_cached_sampling_equals_recompute(chunk_sizes, l, gen):
    model = make(chunk_sizes, seed=2)
    prompt = torch.randint(0, 40, (4, 5), generator=gen)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    got = model.generate(prompt, 19, chunk_size=l, temperature=1.3, top_k=10,
                         generator=torch.Generator().manual_seed(seed))
    want = recompute_generate(model, prompt, 19, l, 1.3, 10, torch.Generator().manual_seed(seed))
    assert torch.equal(got, want)


def test_cache_bytes_count_compressed_slots_plus_one_chunk(gen):
    model = make((8,))
    tokens, stats = model.generate(torch.randint(0, 40, (2, 10), generator=gen), 54, return_stats=True)
    assert tokens.shape == (2, 64)
    assert stats["cache_slots_per_layer"] == 64 // 8 + 1 + 8 == model.cache_slots(64)
    assert stats["dense_slots_per_layer"] == 64
    # k and v, 2 kv heads of 8 dims, 2 layers, batch 2, float64
    assert stats["cache_bytes"] == 2 * 2 * 8 * 8 * 2 * 2 * stats["cache_slots_per_layer"]
    assert stats["dense_cache_bytes"] == 2 * 2 * 8 * 8 * 2 * 2 * 64
    # the count at L = 4096, l = 16: 273 slots against 4096
    big = CATConfig(dim=64, n_heads=4, compressor_dim=32, compressor_heads=2, chunk_sizes=(16,), max_seq_len=4096)
    assert CATTransformer(big).cache_slots(4096) == 273


def test_generate_errors(gen):
    model = make((4,))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(torch.zeros(1, 90, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="prompt must be"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=-1.0)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_sliced_batches_autocast_and_the_default_chunk_size(gen):
    """Inputs as training loops make them: a sliced batch (tokens[:, :-1], not contiguous) at a multiple of l;
    CPU autocast (the two streams come out in different dtypes) through forward, loss and generate; no chunk
    size means the largest trained one."""
    model = make((2, 4, 8)).float()
    batch = torch.randint(0, 40, (2, 17), generator=gen)
    sliced = batch[:, :16]
    assert not sliced.is_contiguous()
    torch.testing.assert_close(model(sliced, 4), model(sliced.contiguous(), 4), rtol=0, atol=0)
    assert torch.equal(model.generate(sliced[:, :8], 5, chunk_size=4),
                       model.generate(sliced[:, :8].contiguous(), 5, chunk_size=4))
    assert model._chunk_size(None) == 8 and torch.equal(model(batch), model(batch, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch, 4)
        loss = model.loss(batch, 4)
        out = model.generate(batch[:, :5], 6, chunk_size=4)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss) and out.shape == (2, 11)
    torch.testing.assert_close(logits.float(), model(batch, 4), atol=0.1, rtol=0.1)


def test_generate_uses_the_configured_backend_and_keeps_the_prompt_dtype(gen, monkeypatch):
    from fusedlab.nn import cat_model

    model = make((4,), backend="reference")
    seen = []
    decode = cat_model.cat_decode
    monkeypatch.setattr(cat_model, "cat_decode", lambda *a, **kw: seen.append(kw.get("backend")) or decode(*a, **kw))
    prompt = torch.randint(0, 40, (2, 3), generator=gen, dtype=torch.int32)
    out = model.generate(prompt, 4)
    assert seen and set(seen) == {"reference"} and out.dtype == torch.int32
    assert cat_model._decode_backend("cpu", torch.device("meta")) == "auto"


def test_loss_and_generate_argument_errors(gen):
    model = make((4,))
    with pytest.raises(ValueError, match="L >= 2"):
        model.loss(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k an int"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=1.0, top_k=2.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), True)
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        model(torch.zeros(1, 8, dtype=torch.long), True)
