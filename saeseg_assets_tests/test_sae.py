"""The SAE: model (every encoder), sparse kernels, evaluation figures, our checkpoint files (imports from other
libraries: test_sae_import.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from saeseg_assets.core.sae.evaluation import EvalTotals
from saeseg_assets.core.sae.model import (
    Sae,
    SaeSpec,
    batch_topk,
    load_sae,
    save_sae,
    sparse_decode,
)
from saeseg_assets.core.store.checkpoints import CheckpointError


def _random_sae(architecture="topk", d_model=6, d_sae=20, k=3, seed=0, dtype=torch.float32, **flags) -> Sae:
    torch.manual_seed(seed)
    sae = Sae(SaeSpec(architecture, d_model, d_sae, k if architecture in ("topk", "batchtopk") else 0, **flags))
    sae = sae.to(dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
        if architecture in ("batchtopk", "jumprelu"):
            sae.threshold_S.copy_(torch.rand(d_sae) * 2 - 0.5)  # some below 0: those act as 0
    return sae


def dense(vals, idx, d_sae: int) -> torch.Tensor:
    """Codes as [N, d_sae] from any layout `encode` gives (zero codes may repeat a latent: they add nothing)."""
    return torch.zeros(len(vals), d_sae, dtype=vals.dtype).scatter_add(1, idx, vals)


# --- the model ----------------------------------------------------------------------------------------------

def test_topk_keeps_the_k_largest_pre_activations_and_relus_them():
    # d_model 2, four latents; pre-activations of x = (1, 2) are (1, 2, -1, 3) + b_enc = (1, 2, -1, -0.5).
    sae = Sae(SaeSpec("topk", d_model=2, d_sae=4, k=3))
    with torch.no_grad():
        sae.W_enc_SD.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]))
        sae.b_enc_S.copy_(torch.tensor([0.0, 0.0, 0.0, -3.5]))
        sae.W_dec_SD.copy_(torch.eye(4, 2))
    vals, idx = sae.encode(torch.tensor([[1.0, 2.0]]))
    # The top 3 are latents 1, 0 and 3 (2, 1, -0.5); latent 3 is selected but ReLU'd to 0.
    assert sorted(zip(idx[0].tolist(), vals[0].tolist())) == [(0, 1.0), (1, 2.0), (3, 0.0)]
    assert sae(torch.tensor([[1.0, 2.0]])).tolist() == [[1.0, 2.0]]


def test_relu_is_the_reference_formula():
    sae = _random_sae("relu")
    x = torch.randn(5, 6)
    f = F.relu((x - sae.b_dec_D) @ sae.W_enc_SD.T + sae.b_enc_S)
    vals, idx = sae.encode(x)
    torch.testing.assert_close(vals, f)
    assert idx.tolist() == [list(range(20))] * 5  # every latent, in order
    torch.testing.assert_close(sae(x), f @ sae.W_dec_SD + sae.b_dec_D)
    # Codes of some latents only take the sparse path: the same sum over those latents' decoder rows.
    torch.testing.assert_close(sae.decode(vals[:, 3:7], idx[:, 3:7]), f[:, 3:7] @ sae.W_dec_SD[3:7] + sae.b_dec_D)
    # ReLU has no AuxK: asked for dead latents' codes, it gives none.
    _, _, aux_vals, aux_idx = sae.encode(x, torch.ones(20, dtype=torch.bool), 4)
    assert aux_vals.shape == aux_idx.shape == (5, 0)


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu"])
def test_threshold_encoders_keep_what_exceeds_the_threshold_as_it_is(architecture):
    sae = _random_sae(architecture, d_model=6, d_sae=20)
    x = torch.randn(9, 6)
    pre = (x - sae.b_dec_D) @ sae.W_enc_SD.T + sae.b_enc_S
    expected = torch.where(pre > sae.threshold_S.clamp(min=0), pre, 0.0)  # SAELens: relu(pre) * (pre > threshold)
    vals, idx = sae.encode(x)
    assert vals.shape[1] == int((expected > 0).sum(1).max())  # sparse: as wide as the busiest token
    torch.testing.assert_close(dense(vals, idx, 20), expected)
    torch.testing.assert_close(sae.decode(vals, idx), expected @ sae.W_dec_SD + sae.b_dec_D)


def test_encoder_flags_keep_x_and_keep_negative_topk_codes():
    sae = _random_sae("topk", d_model=6, d_sae=20, k=5, subtracts_b_dec=False, relu_after_topk=False)
    with torch.no_grad():
        sae.b_enc_S.sub_(3.0)  # so that some selected pre-activations are negative
    x = torch.randn(7, 6)
    pre = x @ sae.W_enc_SD.T + sae.b_enc_S  # saev since 2025-07-31: no b_dec in the encoder
    top = pre.topk(5, dim=1).indices
    expected = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top))  # and its TopK has no ReLU
    assert (expected < 0).any()
    torch.testing.assert_close(dense(*sae.encode(x), 20), expected)
    relu = _random_sae("relu", subtracts_b_dec=False)
    torch.testing.assert_close(relu.encode(x)[0], F.relu(x @ relu.W_enc_SD.T + relu.b_enc_S))


def test_batch_topk_keeps_the_largest_of_the_whole_batch():
    # Two tokens, k = 2: the four largest of the batch are 9, 8, 7 (token 0) and 6 (token 1).
    pre = torch.tensor([[9.0, 8.0, 7.0, 0.0], [6.0, 1.0, 2.0, -1.0]])
    vals, idx = batch_topk(pre, 2)
    assert vals.shape == (2, 3)  # token 0 got three, token 1 one, padded with zero codes
    assert dense(vals, idx, 4).tolist() == [[9.0, 8.0, 7.0, 0.0], [6.0, 0.0, 0.0, 0.0]]


def test_batchtopk_training_step_has_the_gradients_of_the_dense_computation():
    sae = _random_sae("batchtopk", dtype=torch.float64, d_model=5, d_sae=16, k=3)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    dead = torch.zeros(16, dtype=torch.bool)
    vals, idx, _, _ = sae.encode(x, dead, 0)
    params = [x, sae.W_enc_SD, sae.b_enc_S, sae.b_dec_D, sae.W_dec_SD]
    sparse_grads = torch.autograd.grad((x - sae.decode(vals, idx)).pow(2).sum(), params)
    pre = (x - sae.b_dec_D) @ sae.W_enc_SD.T + sae.b_enc_S
    keep = torch.zeros(7 * 16, dtype=torch.bool)
    keep[pre.detach().reshape(-1).topk(7 * 3).indices] = True
    codes = F.relu(pre) * keep.reshape(7, 16)
    dense_grads = torch.autograd.grad((x - codes @ sae.W_dec_SD - sae.b_dec_D).pow(2).sum(), params)
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec", "W_dec"), sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, msg=f"gradient of {name}")
    # Outside a training step the same SAE encodes with its threshold, token by token.
    pre0 = pre.detach()
    torch.testing.assert_close(dense(*sae.encode(x.detach()), 16),
                               torch.where(pre0 > sae.threshold_S.clamp(min=0), pre0, 0.0))


def test_the_batchtopk_threshold_follows_the_smallest_selected_code():
    sae = _random_sae("batchtopk", d_sae=4, k=1)
    sae.threshold_S.zero_()
    sae.track_threshold_(torch.tensor([[3.0, 0.0], [2.0, 5.0]]), momentum=0.1)
    assert sae.threshold_S.tolist() == [2.0] * 4  # the first batch sets it
    sae.track_threshold_(torch.tensor([[1.0, 0.0]]), momentum=0.1)
    torch.testing.assert_close(sae.threshold_S, torch.full((4,), 0.9 * 2.0 + 0.1 * 1.0))
    sae.track_threshold_(torch.zeros(2, 2), momentum=0.1)  # nothing positive: unchanged
    torch.testing.assert_close(sae.threshold_S, torch.full((4,), 1.9))


def _dense_topk_sae_loss(x, W_enc, b_enc, b_dec, W_dec, k, dead, k_aux):
    """The same computation with dense tensors and plain autograd: the reference for the sparse kernels."""
    pre = (x - b_dec) @ W_enc.T + b_enc
    idx = pre.topk(k, dim=1).indices
    codes = torch.zeros_like(pre).scatter(1, idx, F.relu(pre.gather(1, idx)))
    x_hat = codes @ W_dec + b_dec
    masked = pre.masked_fill(~dead, float("-inf"))
    aux_idx = masked.topk(k_aux, dim=1).indices
    aux_codes = torch.zeros_like(pre).scatter(1, aux_idx, F.relu(pre.gather(1, aux_idx)))
    return (x - x_hat).pow(2).sum() + 0.5 * (aux_codes @ W_dec - x).pow(2).sum()


def test_sparse_kernels_give_the_gradients_of_the_dense_computation():
    torch.manual_seed(0)
    sae = _random_sae(dtype=torch.float64, d_model=5, d_sae=16, k=4)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 4, 9, 10, 15]] = True
    vals, idx, aux_vals, aux_idx = sae.encode(x, dead, 2)
    x_hat = sae.decode(vals, idx)
    aux_hat = sparse_decode(aux_vals, aux_idx, sae.W_dec_SD)
    assert set(aux_idx.unique().tolist()) <= {1, 4, 9, 10, 15}
    sparse_loss = (x - x_hat).pow(2).sum() + 0.5 * (aux_hat - x).pow(2).sum()
    params = [x, sae.W_enc_SD, sae.b_enc_S, sae.b_dec_D, sae.W_dec_SD]
    sparse_grads = torch.autograd.grad(sparse_loss, params)
    dense_loss = _dense_topk_sae_loss(x, sae.W_enc_SD, sae.b_enc_S, sae.b_dec_D, sae.W_dec_SD, 4, dead, 2)
    dense_grads = torch.autograd.grad(dense_loss, params)
    torch.testing.assert_close(sparse_loss, dense_loss)
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec", "W_dec"), sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, msg=f"gradient of {name}")


def test_topk_encoding_passes_gradcheck():
    torch.manual_seed(1)
    sae = _random_sae(dtype=torch.float64, d_model=4, d_sae=10, k=3)
    dead = torch.arange(10) % 3 == 0
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def codes(x, *_weights):  # gradcheck perturbs the SAE's own weight tensors in place: encode reads them
        return [t for t in sae.encode(x, dead, 2) if t.is_floating_point()]

    assert torch.autograd.gradcheck(codes, (x, sae.W_enc_SD, sae.b_enc_S, sae.b_dec_D))


def test_decoder_steps_stay_on_unit_rows():
    sae = Sae.initialized(SaeSpec("topk", 4, 8, 2), torch.zeros(4), seed=0)
    torch.testing.assert_close(sae.W_dec_SD.norm(dim=1), torch.ones(8))
    torch.testing.assert_close(sae.W_enc_SD, sae.W_dec_SD)  # encoder = decoder transposed (in file layout)
    sae.W_dec_SD.grad = torch.randn(8, 4) + 3 * sae.W_dec_SD.detach()
    sae.remove_parallel_decoder_grad_()
    torch.testing.assert_close((sae.W_dec_SD.grad * sae.W_dec_SD).sum(1), torch.zeros(8), atol=1e-6, rtol=0)


# --- evaluation figures -------------------------------------------------------------------------------------

def _fvu(batches) -> float:
    totals = EvalTotals(d_model=2, d_sae=3)
    for x, x_hat in batches:
        totals.add(torch.as_tensor(x), torch.as_tensor(x_hat), torch.zeros(3))
    return totals.metrics().fvu


@pytest.mark.parametrize("offset", [0.0, 1e7])  # a far-off mean must not cancel the variance away
def test_fvu_is_one_for_the_mean_and_zero_for_a_perfect_reconstruction(offset):
    x = torch.randn(50, 2, dtype=torch.float64) * torch.tensor([3.0, 0.5]) + torch.tensor([10.0, -4.0]) + offset
    mean = x.mean(0).expand_as(x)
    assert _fvu([(x[:20], mean[:20]), (x[20:], mean[20:])]) == pytest.approx(1.0)
    assert _fvu([(x[:20], x[:20]), (x[20:], x[20:])]) == 0.0


def test_fvu_by_hand_uses_the_mean_of_the_whole_set():
    # Points (0,0), (2,0), (0,2), (2,2): mean (1,1), sum ||x - mean||^2 = 4 * 2 = 8.
    # The last point is reconstructed as (1,1): squared error 2, so FVU = 2 / 8 = 0.25.
    # Per-batch means would give 2 / (2 + 2) = 0.5; variance around zero would give 2 / 16 = 0.125.
    batches = [([[0.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [2.0, 0.0]]),
               ([[0.0, 2.0], [2.0, 2.0]], [[0.0, 2.0], [1.0, 1.0]])]
    assert _fvu(batches) == pytest.approx(0.25)


def test_sparsity_figures_count_tokens_and_latents():
    totals = EvalTotals(d_model=1, d_sae=5)
    # 200 tokens; latent 0 fires on all, latent 1 on 2 (1% exactly: dense, as in latent selection), latent 2 on 3,
    # latent 3 never, latent 4 on 1 (0.5%: not dense).
    active = torch.zeros(200, 5, dtype=torch.bool)
    active[:, 0] = True
    active[:2, 1] = True
    active[:3, 2] = True
    active[:1, 4] = True
    x = torch.randn(200, 1)
    totals.add(x, x, active.sum(0))
    m = totals.metrics()
    assert (m.l0, m.dead_fraction, m.dense_fraction, m.mse, m.n_tokens) == (206 / 200, 0.2, 0.6, 0.0, 200)


# --- checkpoint files ---------------------------------------------------------------------------------------

def test_our_format_round_trips_and_binds_the_json_to_the_weights(tmp_path):
    sae = _random_sae()
    save_sae(sae, tmp_path, {"tokens_trained": 123})
    meta = json.loads((tmp_path / "sae.json").read_text())
    assert (meta["architecture"], meta["d_model"], meta["d_sae"], meta["k"]) == ("topk", 6, 20, 3)
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "sae.safetensors").items()}
    assert shapes == {"W_enc": (6, 20), "b_enc": (20,), "W_dec": (20, 6), "b_dec": (6,)}
    for path in (tmp_path, tmp_path / "sae.safetensors", tmp_path / "sae.json"):
        loaded, loaded_meta = load_sae(path)
        x = torch.randn(4, 6)
        torch.testing.assert_close(loaded(x), sae(x))
        assert loaded_meta["tokens_trained"] == 123
    # Weights replaced without their JSON (a torn write) are noticed.
    save_sae(_random_sae(seed=1), tmp_path / "other", {})
    os.replace(tmp_path / "other" / "sae.safetensors", tmp_path / "sae.safetensors")
    with pytest.raises(CheckpointError, match="does not describe"):
        load_sae(tmp_path)


@pytest.mark.parametrize("architecture", ["relu", "batchtopk", "jumprelu"])
def test_every_encoder_and_flag_round_trips(tmp_path, architecture):
    sae = _random_sae(architecture, subtracts_b_dec=False)
    save_sae(sae, tmp_path, {})
    loaded, meta = load_sae(tmp_path)
    assert loaded.spec == sae.spec and meta["subtracts_b_dec"] is False
    x = torch.randn(4, 6)
    assert torch.equal(dense(*loaded.encode(x), 20), dense(*sae.encode(x), 20))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_naming_the_file_and_tensor(tmp_path, bad):
    sae = _random_sae()
    with torch.no_grad():
        sae.b_dec_D[2] = bad
    save_sae(sae, tmp_path, {})
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: b_dec holds 1 NaN or infinite values"):
        load_sae(tmp_path)


def test_a_truncated_safetensors_file_is_named(tmp_path):
    save_sae(_random_sae(), tmp_path, {})
    weights = tmp_path / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"{weights}: unreadable safetensors file"):
        load_sae(tmp_path)
