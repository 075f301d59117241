"""The backbone's tail and the propagated mechanism on tiny random DINOv2 models (two blocks; with and without
registers; no download): the tail on recorded layer-L tokens gives the full forward's final tokens, a zero edit gives
the final probe's baseline predictions exactly, propagate with an empty tail and the SAE-layer probe is the shortcut,
and CLS and registers are carried, never edited."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from saeseg_assets.core.data.backbone import Backbone, BackboneInfo
from saeseg_assets.core.data.cache import ActivationCache, CacheProvenance, CacheWriter
from saeseg_assets.core.data.tail import BackboneTail
from saeseg_assets.core.probe.metrics import N_OUTPUTS, patch_predictions
from saeseg_assets.core.settings import MODES, SuppressionSettings
from saeseg_assets.core.study.class_study import sweep_row
from saeseg_assets.core.study.model import SuppressionModel
from saeseg_assets.core.study.patches import ClassPatches
from saeseg_assets.core.study.propagate import Edit, Propagation

from .test_study_engine import random_model

PATCH, GRID, D = 4, 4, 16


def tiny_backbone(registers: int) -> Backbone:
    """A two-block DINOv2 (with `registers` register tokens: Dinov2WithRegistersModel) with random weights."""
    torch.manual_seed(registers)
    common = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * D,
                  patch_size=PATCH, image_size=PATCH * GRID, layerscale_value=0.5)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    info = BackboneInfo("tiny", "tiny", model.config.model_type, D, PATCH, 2, 1 + registers, (0.5,) * 3, (0.25,) * 3)
    return Backbone(model.eval(), info, torch.device("cpu"))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PATCH * GRID, PATCH * GRID, 3), dtype=np.uint8)


def _record(tmp_path, backbone: Backbone, images: np.ndarray) -> ActivationCache:
    """A float32 cache of block 0's tokens and the final tokens, written and read back as recording does."""
    settings = CacheProvenance(backbone="tiny", backbone_source="tiny", layer=0, crop_size=PATCH * GRID,
                               patch_size=PATCH, d_model=D, dataset_root="none", split="validation",
                               preprocessing="none", dtype="float32", n_prefix_tokens=backbone.info.n_prefix_tokens,
                               final_norm=backbone.final_norm_name)
    writer = CacheWriter(tmp_path / "cache.zarr", settings, [f"img{i}" for i in range(len(images))], chunk_images=4)
    for a in range(0, len(images), 4):
        tokens = backbone.layer_tokens(backbone.preprocess(images[a:a + 4]), 0)
        n = len(tokens.patch_BPD)
        labels = np.ones((n, GRID, GRID), np.uint8)
        writer.write_chunk(a, tokens.patch_BPD.numpy(), labels, np.ones((n, GRID, GRID), np.float32),
                           np.ones((n, PATCH * GRID, PATCH * GRID), np.uint8), tokens.prefix_BRD.numpy(),
                           tokens.final_BPD.numpy())
    return ActivationCache(writer.finish())


@pytest.mark.parametrize("registers", [0, 4])
def test_the_tail_on_recorded_tokens_gives_the_full_forwards_final_tokens(tmp_path, registers):
    backbone = tiny_backbone(registers)
    images = _images(6)
    cache = _record(tmp_path, backbone, images)
    assert cache.read("prefix_tokens", 0, 6).shape == (6, 1 + registers, D)
    with torch.no_grad():  # the model's own forward: its final LayerNorm on the last hidden state, prefix dropped
        full_BPD = backbone.model(pixel_values=backbone.preprocess(images)).last_hidden_state[:, 1 + registers:]
    tail = BackboneTail.of(backbone, layer=0)
    assert tail.n_blocks == 1
    final_BPD = tail.final_tokens(torch.from_numpy(cache.read("prefix_tokens", 0, 6)),
                                  torch.from_numpy(cache.read("activations", 0, 6)), block_images=4)
    assert torch.allclose(final_BPD, full_BPD, atol=1e-5)
    assert np.allclose(cache.read("final_tokens", 0, 6), full_BPD.numpy(), atol=1e-5)
    # Something did happen: the last block and the norm moved the tokens far from the recorded ones.
    assert float((final_BPD - torch.from_numpy(cache.read("activations", 0, 6))).abs().mean()) > 0.1


def test_a_writer_of_tail_tokens_refuses_a_chunk_without_them(tmp_path):
    backbone = tiny_backbone(0)
    settings = CacheProvenance(backbone="tiny", backbone_source="tiny", layer=0, crop_size=16, patch_size=4,
                               d_model=D, dataset_root="none", split="validation", preprocessing="none",
                               n_prefix_tokens=1, final_norm=backbone.final_norm_name)
    writer = CacheWriter(tmp_path / "c.zarr", settings, ["a"], chunk_images=1)
    with pytest.raises(ValueError, match="prefix and final tokens must be written"):
        writer.write_chunk(0, np.zeros((1, 16, D)), np.ones((1, 4, 4), np.uint8), np.ones((1, 4, 4), np.float32),
                           np.ones((1, 16, 16), np.uint8))


def propagated_model(registers: int, n_images: int = 6, tail: BackboneTail | None = None,
                     block_images: int = 16) -> tuple[SuppressionModel, torch.Tensor, torch.Tensor]:
    """`random_model`'s codes and labels over a tiny backbone's real layer-0 tokens, propagating through its tail to a
    random final-layer probe; also the prefix and patch tokens."""
    backbone = tiny_backbone(registers)
    base = random_model(registers, n_images=n_images, grid=GRID, d=D)
    tokens = backbone.layer_tokens(backbone.preprocess(_images(n_images, seed=1)), 0)
    gen = torch.Generator().manual_seed(7)
    probe_W_CD, probe_b_C = torch.randn(N_OUTPUTS, D, generator=gen), torch.randn(N_OUTPUTS, generator=gen)
    propagation = Propagation(tail or BackboneTail.of(backbone, 0), tokens.prefix_BRD, tokens.patch_BPD,
                              probe_W_CD, probe_b_C, block_images)
    codes = replace(base.codes, logits_NC=propagation.baseline_logits())
    model = SuppressionModel(base.W_dec_SD, probe_W_CD, base.max_activation_S.numpy(), base.frequency_S, codes,
                             base.patch.labels_N, _no_pixels(base), GRID, pixel=False, propagation=propagation)
    return model, tokens.prefix_BRD, tokens.patch_BPD


@pytest.mark.parametrize("registers", [0, 4])
def test_a_zero_edit_through_the_tail_gives_the_final_probes_baseline_exactly(registers):
    backbone = tiny_backbone(registers)
    # Edits run in blocks of 4 images, the baseline in blocks of 16: other batches, the same numbers.
    model, _, _ = propagated_model(registers, block_images=4)
    n_tokens = model.n_tokens
    zero = Edit(torch.zeros(D), torch.arange(n_tokens), torch.zeros(n_tokens, 1), torch.zeros(1, D))
    (shift,) = model.propagated([zero])
    assert len(shift.rows_M) == n_tokens  # every image went through the tail
    assert float(shift.deltas_MC.abs().max()) == 0.0
    assert torch.equal(model.patch.predictions_after(shift), model.patch.pred_N)
    # That baseline is the final probe on the backbone's own final tokens.
    with torch.no_grad():
        pixels = backbone.preprocess(_images(6, seed=1))
        final_ND = backbone.model(pixel_values=pixels).last_hidden_state[:, 1 + registers:].reshape(-1, D)
    own_NC = final_ND @ model.probe_W_CD.T + model.propagation.probe_b_C
    assert torch.equal(patch_predictions(own_NC), model.patch.pred_N)


def test_an_edit_that_reaches_no_image_runs_no_image_through_the_tail(monkeypatch):
    model, _, _ = propagated_model(0)
    calls = []
    monkeypatch.setattr(BackboneTail, "forward", lambda self, p, x: calls.append(len(x)) or x)
    latent = 12  # fires on about 8% of tokens
    effect = model.effect((latent,))
    images = torch.unique(effect.tokens_U // (GRID * GRID))
    assert 0 < len(images) < model.n_images
    where_active = effect.shift(-2.0, "where_active")
    assert sum(calls) == len(images) and len(where_active.rows_M) == len(images) * GRID * GRID
    effect.shift(0.0, "every_token")  # at scale 0 the rest of the tokens get nothing: as where_active
    assert sum(calls) == 2 * len(images)
    effect.shift(-2.0, "every_token")
    assert sum(calls) == 2 * len(images) + model.n_images


def test_propagate_with_an_empty_tail_and_the_sae_layer_probe_is_the_shortcut():
    shortcut = random_model(0, n_images=6, grid=GRID, d=D)
    x_BPD = torch.randn(6, GRID * GRID, D, generator=torch.Generator().manual_seed(3))
    bias_C = torch.randn(N_OUTPUTS, generator=torch.Generator().manual_seed(4))
    bias_C[147:] = bias_C[147]  # the ties of random_model's probe, kept
    logits_NC = x_BPD.reshape(-1, D) @ shortcut.probe_W_CD.T + bias_C
    shortcut = SuppressionModel(shortcut.W_dec_SD, shortcut.probe_W_CD, shortcut.max_activation_S.numpy(),
                                shortcut.frequency_S, replace(shortcut.codes, logits_NC=logits_NC),
                                shortcut.patch.labels_N, _no_pixels(shortcut), GRID, pixel=False)
    empty = BackboneTail([], nn.Identity(), n_prefix_tokens=1)
    propagation = Propagation(empty, torch.zeros(6, 1, D), x_BPD, shortcut.probe_W_CD, bias_C)
    propagate = SuppressionModel(shortcut.W_dec_SD, shortcut.probe_W_CD, shortcut.max_activation_S.numpy(),
                                 shortcut.frequency_S, replace(shortcut.codes, logits_NC=propagation.baseline_logits()),
                                 shortcut.patch.labels_N, _no_pixels(shortcut), GRID, pixel=False,
                                 propagation=propagation)
    assert torch.equal(propagate.patch.pred_N, shortcut.patch.pred_N)
    config = SuppressionSettings(control_seeds=2)
    rows = {}
    for name, model in (("shortcut", shortcut), ("propagate", propagate)):
        patches = ClassPatches(model, 3)
        rows[name] = [sweep_row(patches, s, latents, config, True)
                      for latents in ((1,), (1, 2, 12)) for mode in MODES for s in
                      [replace_setting(latents, mode, scale) for scale in (-2.0, 0.0, 1.5)]]
    assert rows["propagate"] == rows["shortcut"]
    # Not a trivial agreement: some settings change many target patches, some few.
    rates = [r.target_change_rate for r in rows["shortcut"]]
    assert max(rates) > 0.3 and min(rates) < 0.3


def replace_setting(latents, mode, scale):
    from saeseg_assets.core.report.results import Setting

    return Setting("f1", len(latents), mode, scale)


def test_cls_and_registers_are_carried_never_edited(monkeypatch):
    model, prefix_BRD, patch_BPD = propagated_model(4)
    seen = []
    forward = BackboneTail.forward
    monkeypatch.setattr(BackboneTail, "forward", lambda self, p, x: seen.append((p.clone(), x.clone()))
                        or forward(self, p, x))
    effect = model.effect((1, 2))
    effect.shift(-2.0, "every_token")
    prefix_in, patch_in = torch.cat([p for p, _ in seen]), torch.cat([x for _, x in seen])
    assert prefix_in.shape == (6, 5, D) and torch.equal(prefix_in, prefix_BRD.float())
    # The patch tokens got x + sum_i (v_i - f_i) W_dec[i] where a latent fires, x + sum_i v_i W_dec[i] elsewhere.
    f_NL = model.codes.columns((1, 2))
    dense_NL = torch.zeros(model.n_tokens, 2)
    dense_NL[f_NL[0]] = f_NL[1]
    v_L = -2.0 * model.max_activation_S[[1, 2]]
    expected = patch_BPD.reshape(-1, D) + (v_L - dense_NL) @ model.W_dec_SD[[1, 2]]
    assert torch.allclose(patch_in.reshape(-1, D), expected, atol=1e-5)


def test_the_random_direction_gets_the_edits_norm_at_the_layer():
    model, _, _ = propagated_model(0)
    effect = model.effect((1, 12))
    direction_D = torch.nn.functional.normalize(torch.randn(D), dim=0)
    for mode in MODES:
        edit, control = effect.edit(-2.0, mode), effect.direction_edit(direction_D, -2.0, mode)
        for token in (int(effect.tokens_U[0]), int(effect.tokens_U[-1])):
            image, p = divmod(token, GRID * GRID)
            prop = model.propagation
            own, rand = prop._image_edit(edit, image)[p], prop._image_edit(control, image)[p]
            assert float(rand.norm()) == pytest.approx(float(own.norm()), rel=1e-4)
            assert float(rand @ direction_D) == pytest.approx(float(own.norm()), rel=1e-4)
        quiet = next(t for t in range(model.n_tokens) if t not in set(effect.tokens_U.tolist()))
        image, p = divmod(quiet, GRID * GRID)
        expected = float(effect.values(-2.0) @ effect.W_LD @ torch.zeros(D)) if mode == "where_active" else \
            float((effect.values(-2.0) @ effect.W_LD).norm())
        assert float(model.propagation._image_edit(control, image)[p].norm()) == pytest.approx(expected, abs=1e-5)


def test_the_final_probe_trains_on_the_final_tokens(tmp_path):
    from saeseg_assets.core.data.cache import token_batches
    from saeseg_assets.core.probe.sweep import train_sweep
    from saeseg_assets.core.settings import SweepSettings

    cache = _record(tmp_path, tiny_backbone(4), _images(8))
    (batch,) = token_batches(cache, [(0, 8)], 8 * GRID * GRID, np.random.default_rng(0), fields=("final_tokens",),
                             remainder="yield")
    rows = batch["final_tokens"]
    assert rows.shape == (8 * GRID * GRID, D)
    final_ND = cache.read("final_tokens", 0, 8).reshape(-1, D)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, final_ND.tolist()))
    config = SweepSettings(lrs=(1e-2,), weight_decays=(0.0,), epochs=1, probe_layer="final", target="majority")
    probe = train_sweep(cache, config, log=lambda _: None).probe
    assert probe.meta["probe_layer"] == "final" and probe.layer == "final"
    assert probe.meta["held_out_images"] == [[4, 8]]  # one of the two chunks held out, as for the SAE-layer probe


def _no_pixels(model: SuppressionModel) -> torch.Tensor:
    """Pixel labels of a model without the pixel level: their number of images alone."""
    return torch.zeros(model.n_images, 0, 0, dtype=torch.uint8)
