"""CrossLayerTranscoder: each sparsifier, tied/skip options, normalisation inside the model, sparse paths, save/load."""

import pytest
import torch

from clt.config import ACTIVATIONS
from clt.model import CrossLayerTranscoder, TranscoderConfig, load_transcoder
from clt.train_transcoder import train_step


def _model(**kw):
    torch.manual_seed(0)
    return CrossLayerTranscoder(TranscoderConfig(**{"d_in": 8, "d_out": 6, "expansion_factor": 4, **kw}))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_shapes_and_sparsity_of_each_activation(activation):
    model = _model(activation=activation, k=3)
    x = torch.randn(16, 8)
    y_hat, z = model(x)
    assert y_hat.shape == (16, 6) and z.shape == (16, 32)
    assert (z >= 0).all() or activation == "jumprelu"
    if activation == "topk":
        assert ((z > 0).sum(-1) <= 3).all()
    if activation == "batchtopk":
        assert (z > 0).sum() <= 3 * 16
        model.eval()
        assert model.batchtopk_threshold > 0
        z_eval = model.encode(x)
        assert torch.equal(z_eval > 0, model.forward_normalized(x).pre > model.batchtopk_threshold)


def test_topk_keeps_values_unchanged():
    model = _model(k=4)
    x = torch.randn(5, 8)
    pre = x @ model.W_enc.T + model.b_enc
    z = model.encode(x)
    expected = torch.relu(pre).topk(4, dim=-1).values.sort(-1).values
    torch.testing.assert_close(z.topk(4, dim=-1).values.sort(-1).values, expected)


def test_jumprelu_threshold_learns_through_the_straight_through_estimate():
    model = _model(activation="jumprelu", jumprelu_threshold=0.5, bandwidth=1.0, l0_coef=1.0)
    x = torch.randn(64, 8)
    out = model.forward_normalized(x)
    loss = out.y_hat.pow(2).mean() + model.sparsity_loss(out)
    loss.backward()
    assert model.log_threshold.grad is not None and model.log_threshold.grad.abs().sum() > 0
    assert ((out.z == 0) | (out.pre > 0.5)).all()


def test_sparse_decode_equals_dense():
    model = _model(k=5)
    x = torch.randn(10, 8)
    out = model.forward_normalized(x)
    values, indices = out.z.topk(5, dim=-1)
    torch.testing.assert_close(model.decode_sparse(values, indices), out.y_hat, atol=1e-5, rtol=1e-5)


def test_tied_decoder_and_skip_path():
    tied = _model(d_out=8, tied=True)
    assert tied.W_dec is None and torch.equal(tied.decoder, tied.W_enc)
    with pytest.raises(ValueError, match="tied decoder needs"):
        TranscoderConfig(d_in=8, d_out=6, tied=True)
    skip = _model(skip=True)
    with torch.no_grad():
        skip.W_skip.normal_()
    x = torch.randn(4, 8)
    y_hat, z = skip(x)
    torch.testing.assert_close(skip.decode(z, x), y_hat)
    with pytest.raises(ValueError, match="skip path"):
        skip.decode(z)


def test_normalisation_is_part_of_the_model():
    model = _model(normalize_source="standard", normalize_target="standard")
    src_mean, src_std, tgt_mean, tgt_std = torch.randn(8), torch.rand(8) + 0.5, torch.randn(6), torch.rand(6) + 0.5
    model.set_statistics(src_mean, src_std, tgt_mean, tgt_std)
    assert torch.equal(model.b_dec.data, torch.zeros(6))
    x_raw = torch.randn(3, 8) * src_std + src_mean
    out = model.forward_normalized((x_raw - src_mean) / src_std)
    y_raw, _ = model(x_raw)
    torch.testing.assert_close(y_raw, out.y_hat * tgt_std + tgt_mean)
    torch.testing.assert_close(model.decode(model.encode(x_raw)), y_raw)
    raw = _model(normalize_source="none", normalize_target="none")
    raw.set_statistics(src_mean, src_std, tgt_mean, tgt_std)
    torch.testing.assert_close(raw.b_dec.data, tgt_mean)


def test_scale_normalisation_divides_by_one_number():
    model = _model(normalize_source="standard", normalize_target="scale")
    tgt_std = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    model.set_statistics(torch.zeros(8), torch.ones(8), torch.full((6,), 5.0), tgt_std)
    s = tgt_std.pow(2).mean().sqrt()
    assert torch.allclose(model.tgt_std, s.expand(6))
    y = torch.randn(4, 6) * tgt_std + 5.0
    torch.testing.assert_close(model.normalize_target(y), (y - 5.0) / s)
    torch.testing.assert_close(model.denormalize_target(model.normalize_target(y)), y)


def test_decoder_inits():
    unit, zero = _model(), _model(decoder_init="zero")
    assert unit.unit_norm_decoder and torch.allclose(unit.W_dec.norm(dim=1), torch.ones(32))
    assert not zero.unit_norm_decoder and not zero.W_dec.any()
    assert torch.equal(unit.W_enc, zero.W_enc)
    for bad in (dict(decoder_init="zero", activation="relu"), dict(decoder_init="zero", d_out=8, tied=True)):
        with pytest.raises(ValueError, match="decoder_init zero is for untied topk/batchtopk"):
            TranscoderConfig(d_in=8, d_out=bad.pop("d_out", 6), **bad)
    with pytest.raises(ValueError, match="decoder_init must be one of"):
        TranscoderConfig(d_in=8, d_out=6, decoder_init="ones")


def test_relu_l1_and_aux_losses():
    model = _model(activation="relu", l1_coef=0.1)
    out = model.forward_normalized(torch.randn(8, 8))
    assert model.sparsity_loss(out) > 0
    topk = _model(k=2)
    x, y = torch.randn(8, 8), torch.randn(8, 6)
    out = topk.forward_normalized(x)
    assert topk.aux_loss(x, y, out, torch.zeros(32, dtype=torch.bool)) == 0
    aux = topk.aux_loss(x, y, out, torch.ones(32, dtype=torch.bool))
    aux.backward()
    assert aux > 0 and topk.W_dec.grad.abs().sum() > 0
    tied = _model(d_out=8, tied=True, dictionary_penalty="l2", dictionary_coef=0.5)
    out = tied.forward_normalized(x)
    torch.testing.assert_close(tied.dictionary_loss(), 0.5 * tied.W_enc.pow(2).sum())
    assert tied.sparsity_loss(out) == 0


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("kw", [{}, {"skip": True}, {"d_out": 8, "tied": True}])
def test_sparse_training_path_has_the_dense_gradients(activation, kw):
    """forward_train (active entries only) gives the outputs and gradients of autograd through the dense map."""
    model = _model(activation=activation, k=3, **kw)
    with torch.no_grad():
        model.b_enc.normal_()
        model.decoder.normal_()  # not the zero init: every gradient non-trivial
        if model.W_skip is not None:
            model.W_skip.normal_()
    x = torch.randn(37, 8)
    y = torch.randn(37, model.cfg.d_out)
    grads = []
    for forward in (model.forward_normalized, lambda rows: model.forward_train(rows, chunk=10)):
        model.zero_grad()
        out = forward(x)
        (out.y_hat - y).pow(2).sum().backward()
        grads.append((out.y_hat.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, out.l0()))
    (y_dense, g_dense, l0_dense), (y_sparse, g_sparse, l0_sparse) = grads
    assert model.forward_train(x).codes is not None and l0_dense == l0_sparse
    torch.testing.assert_close(y_sparse, y_dense, atol=1e-5, rtol=1e-5)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kw", [{"activation": "relu"}, {"activation": "jumprelu", "skip": True}])
def test_relu_and_jumprelu_train_sparsely_with_the_dense_gradients(kw):
    """Sparse codes take the thresholded path (non-zero entries and the straight-through window only): the loss
    with its L1 / L0 term and every gradient (threshold included) are autograd's through the dense map."""
    model = _model(**kw)
    with torch.no_grad():
        model.b_enc.fill_(-2.0)  # a few percent of the entries above the threshold
        model.decoder.normal_()
        if model.log_threshold is not None:
            model.log_threshold.copy_(torch.rand(32).mul(0.5).add(0.1).log())
    x, y = torch.randn(300, 8), torch.randn(300, model.cfg.d_out)
    results = []
    for forward in (model.forward_normalized, model.forward_train):
        model.zero_grad()
        out = forward(x)
        loss = (out.y_hat - y).pow(2).sum() + 10 * model.sparsity_loss(out)
        loss.backward()
        results.append((out, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (dense, loss_dense, g_dense), (sparse, loss_sparse, g_sparse) = results
    assert sparse.codes is not None and sparse.z is None and dense.l0() == sparse.l0() > 0
    assert torch.equal(dense.fired(32), sparse.fired(32))
    assert loss_sparse == pytest.approx(loss_dense, rel=1e-5)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], atol=1e-4, rtol=1e-4, msg=name)
    assert g_dense["log_threshold" if model.log_threshold is not None else "b_enc"].abs().sum() > 0
    with torch.no_grad():
        model.b_enc.fill_(2.0)  # dense codes: the dense path
    assert model.forward_train(x).z is not None


@pytest.mark.parametrize(
    "kw", [dict(activation="jumprelu", skip=True), dict(d_out=8, tied=True, activation="batchtopk")]
)
def test_save_and_load_round_trip(tmp_path, kw):
    model = _model(**kw, normalize_source="center")
    model.set_statistics(torch.randn(8), torch.ones(8), torch.randn(model.cfg.d_out), torch.ones(model.cfg.d_out))
    model.save(tmp_path)
    loaded = load_transcoder(tmp_path)
    model.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(loaded(x)[0], model(x)[0])
    assert loaded.cfg == model.cfg


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"activation": "gelu"}, "activation"),
        ({"k": 2, "k_ratio": 0.1}, "not both"),
        ({"k": 1000}, "k must be"),
        ({"normalize_source": "zca"}, "normalize_source"),
        ({"l1_coef": -1.0}, "penalty"),
        ({"dictionary_penalty": "l3"}, "dictionary_penalty"),
        ({"dictionary_penalty": "l1"}, "go together"),
        ({"dictionary_coef": 0.1}, "go together"),
        ({"dictionary_penalty": "l2", "dictionary_coef": 0.1}, "cannot act here"),
        ({"aux_k": -3}, "aux_k must be at least 1"),
    ],
)
def test_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        TranscoderConfig(d_in=8, d_out=6, **kw)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_activation_learns_a_sparse_map_better_than_linear(activation):
    """y is a sparse non-linear function of x (4 of 32 ReLU features); a transcoder beats least squares."""
    torch.manual_seed(1)
    enc, dec = torch.randn(8, 32), torch.randn(32, 6)

    def sample(n):
        x = torch.randn(n, 8)
        pre = x @ enc
        z = torch.zeros_like(pre).scatter(1, pre.topk(4, dim=1).indices, pre.topk(4, dim=1).values.relu())
        return x, z @ dec

    x, y = sample(4096)
    x_val, y_val = sample(1024)
    xa = torch.cat([x, torch.ones(len(x), 1)], 1)
    w = torch.linalg.lstsq(xa, y).solution
    linear_fvu = (
        (torch.cat([x_val, torch.ones(1024, 1)], 1) @ w - y_val).pow(2).sum() / (y_val - y_val.mean(0)).pow(2).sum()
    ).item()
    model = CrossLayerTranscoder(TranscoderConfig(d_in=8, d_out=6, expansion_factor=8, k=8, activation=activation,
                                                  l1_coef=1e-3 if activation == "relu" else 0.0))  # fmt: skip
    model.set_statistics(x.mean(0), x.std(0), y.mean(0), y.std(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rows_since_fired = torch.zeros(model.cfg.n_features, dtype=torch.long)
    for step in range(600):  # the trainer's step: FVU + AuxK + sparsity, unit-norm decoder rows
        batch = slice((step * 256) % 4096, (step * 256) % 4096 + 256)
        assert train_step(model, opt, x[batch], y[batch], rows_since_fired) is not None
    model.eval()
    with torch.no_grad():
        fvu = ((model(x_val)[0] - y_val).pow(2).sum() / (y_val - y_val.mean(0)).pow(2).sum()).item()
    assert fvu < 0.5 * linear_fvu, (fvu, linear_fvu)


def test_encoder_init_from_data_points_rows_at_normalised_sources():
    model = _model(normalize_source="standard")
    mean, std = torch.randn(8), torch.rand(8) + 0.5
    model.set_statistics(mean, std, torch.zeros(6), torch.ones(6))
    x_raw = torch.randn(5, 8) * std + mean
    model.init_encoder_from(x_raw, torch.Generator().manual_seed(0))
    x = (x_raw - mean) / std
    directions = x / x.norm(dim=1, keepdim=True)
    assert all(any(torch.allclose(row, d, atol=1e-5) for d in directions) for row in model.W_enc)
    with pytest.raises(ValueError, match="tied"):
        _model(d_out=8, tied=True).init_encoder_from(x_raw)
