import pytest
import torch

from sae.model import SAEConfig, TopKSAE, load_sae


def _model(**kw):
    torch.manual_seed(0)
    return TopKSAE(SAEConfig(d_in=16, expansion_factor=4, **kw))


def test_topk_keeps_the_k_largest_relu_values_unchanged():
    model = _model(k=5)
    x = torch.randn(8, 16)
    out = model(x)
    pre = model.pre_acts(x)
    expected = torch.relu(pre).topk(5, dim=-1).values.sort(dim=-1).values
    torch.testing.assert_close(out.values.sort(dim=-1).values, expected)
    z = model.encode(x)
    assert ((z > 0).sum(-1) <= 5).all()
    torch.testing.assert_close(z.gather(1, out.indices), out.values)


def test_sparse_decode_equals_dense():
    model = _model(k=6)
    x = torch.randn(10, 16)
    out = model(x)
    dense = model.encode(x) @ model.W_dec + model.b_dec
    torch.testing.assert_close(out.x_hat, dense, atol=1e-5, rtol=1e-5)


def test_decoder_rows_stay_unit_norm_through_a_step():
    model = _model(k=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(32, 16)
    loss = (model(x).x_hat - x).pow(2).sum()
    loss.backward()
    model.remove_parallel_gradient()
    parallel = (model.W_dec.grad * model.W_dec).sum(1)
    torch.testing.assert_close(parallel, torch.zeros_like(parallel), atol=1e-5, rtol=0)
    opt.step()
    model.normalize_decoder()
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(64))


def test_b_dec_starts_at_the_data_mean_and_aux_loss_reaches_dead_latents():
    mean = torch.randn(16)
    model = TopKSAE(SAEConfig(d_in=16, expansion_factor=4, k=2), mean)
    torch.testing.assert_close(model.b_dec.data, mean)
    x = torch.randn(8, 16)
    out = model(x)
    assert model.aux_loss(x, out, torch.zeros(64, dtype=torch.bool)).item() == 0
    dead = torch.ones(64, dtype=torch.bool)
    aux = model.aux_loss(x, out, dead)
    aux.backward()
    assert aux.item() > 0 and model.W_dec.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw, message", [({"k": 0}, "k must be"), ({"k": 2, "k_ratio": 0.1}, "not both"), ({"k_ratio": 2.0}, "k_ratio")]
)
def test_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(d_in=16, **kw)


def test_k_ratio_is_a_fraction_of_latents():
    assert SAEConfig(d_in=16, expansion_factor=4, k_ratio=0.25).active == 16


def test_save_and_load_round_trip(tmp_path):
    model = _model(k=3)
    model.save(tmp_path)
    loaded = load_sae(tmp_path)
    x = torch.randn(4, 16)
    torch.testing.assert_close(loaded(x).x_hat, model(x).x_hat)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path / "nothing")


def dense_auxk(pre, decoder, dead, aux_k, y, y_hat):
    """The textbook AuxK, densely: the top aux_k dead units of every row reconstruct y - y_hat."""
    values, ids = pre.masked_fill(~dead, float("-inf")).topk(min(aux_k, int(dead.sum())), dim=-1)
    residual_hat = torch.einsum("rk,rkd->rd", torch.relu(values), decoder[ids])
    variance = (y - y.mean(0)).pow(2).sum(-1).mean()
    return (residual_hat - (y - y_hat).detach()).pow(2).sum(-1).mean() / variance


def test_the_one_auxk_has_the_dense_auxks_value_and_gradients():
    torch.manual_seed(3)
    model = _model(k=4)
    x = torch.randn(32, 16)
    dead = torch.rand(64) < 0.5
    out = model(x)
    sparse = model.aux_loss(x, out, dead)
    grads = torch.autograd.grad(sparse, [model.W_enc, model.b_enc, model.W_dec, model.b_dec])
    dense = dense_auxk(model.pre_acts(x), model.W_dec, dead, model.cfg.auxiliary, x, out.x_hat)
    expected = torch.autograd.grad(dense, [model.W_enc, model.b_enc, model.W_dec, model.b_dec])
    torch.testing.assert_close(sparse, dense)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
