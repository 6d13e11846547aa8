"""One FVU for every dictionary: squared error over the evaluated rows' squared deviation from their own mean."""

import numpy as np
import pytest
import torch

from clt.metrics import reconstruction
from clt.model import CrossLayerTranscoder, TranscoderConfig
from sae.data import RowStream
from sae.metrics import ReconstructionTotals
from sae.model import SAEConfig, TopKSAE
from sae.train_topk import evaluate


def numpy_fvu(y: np.ndarray, y_hat: np.ndarray) -> float:
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def test_streamed_totals_give_the_fvu_of_all_rows_at_once():
    torch.manual_seed(0)
    y = torch.randn(3, 50, 4) * 3 + 5  # far from zero: a mean other than the rows' own would show
    y_hat = y + torch.randn_like(y) * 0.5
    totals = ReconstructionTotals()
    for rows in torch.arange(50).split(7):
        totals.add(y[:, rows], y_hat[:, rows], torch.ones(3, len(rows), 2))
    for layer, result in enumerate(totals.result()):
        assert np.isclose(result.fvu, numpy_fvu(y[layer].numpy(), y_hat[layer].numpy()), rtol=1e-9)


def test_the_sae_and_the_transcoder_report_the_same_fvu_definition():
    torch.manual_seed(1)
    x = (torch.randn(40 * 5, 8) * 2 + 3).numpy()  # 40 instances of 5 nodes
    sae = TopKSAE(SAEConfig(d_in=8, expansion_factor=2, k=3), torch.zeros(8)).eval()
    stream = RowStream({"h": x}, 5, np.arange(40), batch_size=16)
    with torch.no_grad():
        x_hat = sae(torch.from_numpy(x)).x_hat.numpy()
    assert np.isclose(evaluate(sae, stream, "h")["val/fvu"], numpy_fvu(x, x_hat), rtol=1e-6)
    transcoder = CrossLayerTranscoder(TranscoderConfig(8, 8, expansion_factor=2, k=3)).eval()
    with torch.no_grad():
        y_hat = transcoder(torch.from_numpy(x))[0].numpy()
    batches = [(torch.from_numpy(x[i : i + 16]), torch.from_numpy(x[i : i + 16])) for i in range(0, 200, 16)]
    assert np.isclose(reconstruction(transcoder, batches).fvu, numpy_fvu(x, y_hat), rtol=1e-6)


def _dense_totals(model, batches) -> ReconstructionTotals:
    totals = ReconstructionTotals()
    with torch.no_grad():
        for x, y in batches:
            y_hat, z = model(x)
            totals.add(y[None], y_hat[None], z[None])
    return totals


def test_a_topk_transcoder_is_measured_from_its_active_features_as_from_its_dense_codes():
    torch.manual_seed(2)
    for skip in (False, True):
        model = CrossLayerTranscoder(TranscoderConfig(12, 6, expansion_factor=4, k=5, skip=skip)).eval()
        model.set_statistics(torch.randn(12), torch.rand(12) + 0.5, torch.randn(6), torch.rand(6) + 0.5)
        with torch.no_grad():
            model.b_enc.copy_(torch.randn(48) - 3)  # some selected entries below zero: ReLU'd values of 0
            if skip:
                model.W_skip.copy_(torch.randn(12, 6))
        batches = [(torch.randn(n, 12) * 2 + 1, torch.randn(n, 6) * 3 - 2) for n in (33, 17, 50)]
        sparse = reconstruction(model, batches)
        dense = _dense_totals(model, batches).result()[0]
        assert (sparse.frequency == 0).any() and (sparse.frequency == dense.frequency).all()
        assert sparse.l0 == dense.l0 < 5  # entries ReLU'd to zero are not counted
        np.testing.assert_allclose(sparse.mean_activation, dense.mean_activation, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(sparse.sse, dense.sse, rtol=1e-5)
        assert np.isclose(sparse.fvu, dense.fvu, rtol=1e-5) and np.isclose(sparse.cosine, dense.cosine, rtol=1e-6)


def test_dictionary_health_dead_dense_and_effective_features():
    """Eight features: one dead, two firing on most rows (dense), the rest rarely; the effective number of features
    is exp(entropy) of the firing frequencies, n for n equally firing features and 1 for one."""
    from sae.metrics import Reconstruction, effective_features

    frequency = np.array([0.0, 0.9, 0.6, 0.1, 0.1, 0.1, 0.1, 0.0005])
    zeros = np.zeros(2)
    summary = Reconstruction(10, zeros + 1, zeros + 2, 1.0, 2.0, frequency, frequency).summary()
    assert summary["dead_fraction"] == 1 / 8 and summary["dense_fraction"] == 2 / 8
    assert summary["rare_fraction"] == 1 / 8
    p = frequency[frequency > 0] / frequency.sum()
    assert summary["effective_features"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert effective_features(np.full(5, 0.2)) == pytest.approx(5.0)
    assert effective_features(np.array([0.0, 0.3, 0.0])) == pytest.approx(1.0)
    assert effective_features(np.zeros(4)) == 0.0


def test_fvu_of_constant_or_non_finite_rows_is_an_error_not_a_number():
    for y, y_hat, message in ((torch.ones(8, 3), torch.ones(8, 3), "do not vary"),
                              (torch.randn(8, 3), torch.full((8, 3), float("nan")), "non-finite")):  # fmt: skip
        totals = ReconstructionTotals()
        totals.add(y[None], y_hat[None], torch.ones(1, 8, 4))
        result = totals.result()[0]
        with pytest.raises(ValueError, match=message):
            _ = result.fvu
