"""Every dictionary starts from its own random vectors: an SAE and a transcoder trained with the same seed must not
share initial rows (they did: CLT decoder row j vs SAE encoder row j had cosine 0.86 on the demo)."""

import torch

from clt.model import load_transcoder
from sae.model import init_seed, load_sae
from sae.runs import newest_finished


def per_index_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    rows = min(len(a), len(b))
    a, b = a[:rows], b[:rows]
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_dictionaries_trained_with_the_same_seed_do_not_start_alike(analysed_run):
    sae = load_sae(newest_finished(analysed_run, "sae", "encoder_layer_0"))
    l0 = load_transcoder(newest_finished(analysed_run, "clt", "clt_L0.mlp_in_to_L0.mlp_out"))
    l1 = load_transcoder(newest_finished(analysed_run, "clt", "clt_L1.mlp_in_to_L1.mlp_out"))
    clt = load_transcoder(newest_finished(analysed_run, "clt", "clt_multilayer"))
    decoders = {"sae": sae.W_dec.detach(), "L0": l0.W_dec.detach(), "L1": l1.W_dec.detach(),
                "clt": clt.W_dec[0][:, 0].detach()}  # fmt: skip
    names = list(decoders)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            cosine = per_index_cosine(decoders[a], decoders[b]).abs()
            assert cosine.mean() < 0.5 and cosine.max() < 0.99, (a, b, cosine.mean(), cosine.max())


def test_the_initial_seed_depends_on_the_identity_and_the_seed():
    seeds = {init_seed(identity, seed) for identity in ("sae/encoder_layer_0", "clt/clt_L0_to_L1", "clt/clt_multilayer")
             for seed in (0, 1)}  # fmt: skip
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert init_seed("clt/clt_L0_to_L1", 0) == init_seed("clt/clt_L0_to_L1", 0)
