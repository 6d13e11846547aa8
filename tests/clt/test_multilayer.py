"""MultiLayerTranscoder: shapes, the sparse training path against autograd through the dense map, AuxK, save/load."""

import torch
from torch.nn import functional as F

from clt.model import load_transcoder
from clt.multilayer import MultiLayerConfig, MultiLayerTranscoder


def _model(**kw):
    torch.manual_seed(0)
    return MultiLayerTranscoder(MultiLayerConfig(**{"n_layers": 3, "d": 6, "expansion_factor": 4, "k": 3, **kw}))


def _dense(model, xs):
    """The same map with dense codes and autograd through everything."""
    parts = []
    for i in range(model.cfg.n_layers):
        pre = torch.addmm(model.b_enc[i], xs[i], model.W_enc[i].T)
        values, indices = pre.topk(model.cfg.active, dim=-1)
        parts.append(torch.zeros_like(pre).scatter(-1, indices, F.relu(values)) @ model.decoder(i))
    return model._assemble(parts)


def test_layer_m_sums_the_features_of_every_layer_up_to_m():
    model = _model()
    zs = torch.zeros(3, 1, 24)
    zs[2, 0, 5] = 1.0  # a layer-2 feature writes only into layer 2
    y = model.decode(zs) - model.decode(torch.zeros_like(zs))
    assert y[:2].abs().max() == 0 and torch.allclose(y[2, 0], model.W_dec[2][5, 0])
    zs = torch.zeros(3, 1, 24)
    zs[0, 0, 1] = 2.0  # a layer-0 feature writes into layers 0, 1 and 2
    y = model.decode(zs) - model.decode(torch.zeros_like(zs))
    torch.testing.assert_close(y[:, 0], 2 * model.W_dec[0][1])
    norms = torch.stack([w.norm(dim=(1, 2)) for w in model.W_dec])
    torch.testing.assert_close(norms, torch.ones(3, 24))  # unit norm across the layers a feature writes to


def test_sparse_training_path_has_the_dense_gradients():
    model = _model()
    with torch.no_grad():
        model.b_enc.normal_()
    xs, ys = torch.randn(3, 11, 6), torch.randn(3, 11, 6)
    grads = []
    for forward in (lambda x: model.forward_train(x).y_hat, lambda x: _dense(model, x)):
        model.zero_grad()
        (forward(xs) - ys).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4, msg=name)
    out = model.forward_train(xs)
    assert out.l0() == 9.0 and out.fired(24).shape == (72,)
    aux = model.aux_loss(xs, ys, out, torch.ones(72, dtype=torch.bool))
    aux.backward()
    assert aux > 0 and model.W_enc.grad.abs().sum() > 0


def test_save_and_load_round_trip(tmp_path):
    model = _model(normalize_source="standard", normalize_target="center")
    model.set_statistics(torch.randn(3, 6), torch.rand(3, 6) + 0.5, torch.randn(3, 6), torch.rand(3, 6) + 0.5)
    model.save(tmp_path)
    loaded = load_transcoder(tmp_path)
    assert isinstance(loaded, MultiLayerTranscoder) and loaded.cfg == model.cfg
    xs = torch.randn(3, 4, 6)
    torch.testing.assert_close(loaded(xs)[0], model(xs)[0])
