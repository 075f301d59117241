"""Training the SAE: it learns, saved weights act on raw activations, a killed run resumes, an unusable state is
named."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from saeseg_assets.core.data.synthetic import write_sparse_cache
from saeseg_assets.core.sae.evaluation import evaluate_sae
from saeseg_assets.core.sae.model import Sae, SaeSpec, load_sae
from saeseg_assets.core.sae.training import (
    STATE_FILE,
    _learning_rate,
    _loss,
    _token_stream,
    _unscaled,
    fit_sae,
    train_sae,
)
from saeseg_assets.core.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 32 images x 64 patches = 2,048 tokens of width 32, each the mean plus 4 of 128 directions.
TINY = TrainSettings(expansion=4, k=8, batch_size=128, train_tokens=128 * 150, lr=1e-2, warmup_steps=10,
                   decay_fraction=0.2, buffer_images=16)


def replace(config: TrainSettings, **changes) -> TrainSettings:
    """The same settings with some changed, validated like any other."""
    return TrainSettings(**{**config.model_dump(), **changes})


@pytest.fixture
def caches(tmp_path):
    train = write_sparse_cache(tmp_path / "training.zarr", n_images=32, seed=0)
    val = write_sparse_cache(tmp_path / "validation.zarr", n_images=8, seed=1, split="validation")
    return train, val


def _quiet(message: str) -> None:
    pass


@pytest.mark.parametrize("config", [TINY, replace(TINY, architecture="relu", l1_coeff=3e-3),
                                    replace(TINY, architecture="batchtopk")], ids=["topk", "relu", "batchtopk"])
def test_training_learns_the_sparse_structure(caches, tmp_path, config):
    train, val = caches
    run = train_sae(train, config, tmp_path / "state.safetensors", log=_quiet)
    metrics = evaluate_sae(run.sae, val)
    assert metrics.fvu < 0.25, metrics
    assert metrics.dead_fraction <= 0.1, metrics
    if config.architecture == "topk":
        assert metrics.l0 <= 8
    if config.architecture == "batchtopk":
        # Held-out tokens are encoded with the threshold estimated in training: about k per token on average.
        assert run.sae.threshold_S.min() > 0 and 4 <= metrics.l0 <= 16, metrics
    assert run.history[0]["fvu"] > run.history[-1]["fvu"]
    assert run.tokens_trained == 150 * 128 and run.history[-1]["tokens"] == 150 * 128
    assert torch.allclose(run.sae.W_dec_SD.norm(dim=1), torch.ones(128), atol=1e-5)


def test_the_input_scale_is_folded_into_the_weights():
    torch.manual_seed(0)
    sae = Sae(SaeSpec("topk", 5, 12, 3))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    raw = _unscaled(sae, scale=7.0)
    x = torch.randn(9, 5) * 7.0
    # Trained on x / 7: the raw model reconstructs x itself, with codes in raw units and the same decoder rows.
    torch.testing.assert_close(raw(x), 7.0 * sae(x / 7.0))
    def dense(model, x):  # codes as [N, d_sae]: the order of topk's selection carries no meaning
        vals, idx = model.encode(x)
        return torch.zeros(len(x), model.spec.d_sae).scatter(1, idx, vals)

    torch.testing.assert_close(dense(raw, x), 7.0 * dense(sae, x / 7.0))
    torch.testing.assert_close(raw.W_dec_SD, sae.W_dec_SD)


def test_learning_rate_warms_up_holds_and_decays():
    config = TrainSettings(lr=1.0, warmup_steps=4, decay_fraction=0.5, batch_size=1, train_tokens=20)
    lrs = [_learning_rate(config, step) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4:10] == [1.0] * 6
    assert lrs[10:] == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])


def test_a_resumed_stream_continues_with_the_same_batches(caches):
    train, _ = caches
    config = replace(TINY, batch_size=256)  # 8 batches per pass
    fresh = _token_stream(train, config, epoch=0, skip=0)
    first = [next(fresh) for _ in range(12)]
    resumed = _token_stream(train, config, epoch=0, skip=5)
    again = [next(resumed) for _ in range(7)]
    assert [(e, i) for e, i, _ in first[5:]] == [(e, i) for e, i, _ in again] == \
        [(0, 5), (0, 6), (0, 7), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(first[5:], again))
    assert not torch.equal(first[0][2], first[8][2])  # each pass is shuffled anew


KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    from saeseg_assets.core.data.cache import ActivationCache
    from saeseg_assets.core.settings import TrainSettings
    from saeseg_assets.core.sae.training import train_sae

    cache, config, state, kill_at = sys.argv[1:]
    torch.set_num_threads(1)  # as in the test process: equal threads give equal sums

    def die(step):
        if step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    train_sae(ActivationCache(cache), TrainSettings(**{**json.loads(config), "save_every_s": 1e9}), Path(state),
              log=print, save_every_steps=20, after_step=die)
""")


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(caches, tmp_path, architecture):
    train, _ = caches
    config = replace(TINY, train_tokens=128 * 60, architecture=architecture)
    state = tmp_path / STATE_FILE
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(train.path), config.model_dump_json(),
                             str(state), "47"], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert state.exists()  # the last save was at step 40; steps 41..47 are lost and redone

    resumed = train_sae(train, replace(config, save_every_s=1e9), state, log=_quiet, save_every_steps=20)
    assert resumed.resumed_at_step == 40
    uninterrupted = train_sae(train, config, tmp_path / "other_state.safetensors", log=_quiet)
    # Same batches in the same order from the same saved model and optimizer state: equal, bit for bit.
    for name, tensor in uninterrupted.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], tensor), name
    assert resumed.history == [{**row, "seconds": r["seconds"]}
                               for row, r in zip(uninterrupted.history, resumed.history)]


def test_a_state_that_cannot_be_resumed_is_named_and_training_starts_over(caches, tmp_path):
    train, _ = caches
    state = tmp_path / STATE_FILE
    config = replace(TINY, train_tokens=128 * 30)
    train_sae(train, replace(config, save_every_s=1e9), state, log=_quiet, save_every_steps=10)
    assert state.exists()  # saved at steps 10 and 20 (never after the last step)
    messages = []
    run = train_sae(train, replace(config, seed=1), state, log=messages.append)
    assert run.resumed_at_step == 0 and not any("resuming" in m for m in messages)
    assert f"{state}: the trainer state belongs to another run" in run.restart_reason
    assert any(m.startswith("WARNING: ") and run.restart_reason in m for m in messages)

    state.write_bytes(state.read_bytes()[:100])  # torn, e.g. by a full disk
    messages.clear()
    run = train_sae(train, config, state, log=messages.append)
    assert run.resumed_at_step == 0 and f"{state}: unreadable trainer state" in run.restart_reason
    assert any(m.startswith("WARNING: ") for m in messages)


def test_fit_sae_saves_the_pair_with_its_provenance_and_drops_the_state(caches, tmp_path):
    train, _ = caches
    folder = tmp_path / "sae"
    sae, meta = fit_sae(train, TINY, folder, log=_quiet)
    assert not (folder / STATE_FILE).exists() and sorted(p.name for p in folder.iterdir()) == [
        "sae.json", "sae.safetensors"]
    assert meta == json.loads((folder / "sae.json").read_text())
    assert meta["source_cache"]["fingerprint"] == train.fingerprint
    assert (meta["tokens_trained"], meta["training"]["k"], meta["architecture"]) == (150 * 128, 8, "topk")
    assert meta["subtracts_b_dec"] is True and "inference_threshold" not in meta
    assert (meta["resumed_at_step"], meta["restart_reason"]) == (0, "")
    assert torch.equal(load_sae(folder)[0].W_dec_SD, sae.W_dec_SD)


def test_auxk_gives_dead_latents_a_gradient_towards_the_residual():
    torch.manual_seed(0)
    sae = Sae.initialized(SaeSpec("topk", 8, 64, 4), torch.zeros(8), seed=0)
    x = torch.randn(8, 8)
    with torch.no_grad():
        fired = sae.encode(x)[1].unique()  # at most 8 x 4 of the 64 latents
    dead = torch.ones(64, dtype=torch.bool)
    dead[fired] = False  # the latents that fire on none of these tokens
    grads = {}
    for aux_coeff in (0.0, 1 / 32):
        sae.zero_grad()
        loss, _ = _loss(sae, x, replace(TINY, k=4, aux_coeff=aux_coeff), dead, k_aux=4)
        loss.backward()
        grads[aux_coeff] = sae.W_enc_SD.grad[dead].abs().sum(1)
    assert (grads[0.0] == 0).all()  # TopK alone never reaches a latent that does not fire
    assert (grads[1 / 32] > 0).sum() >= 4  # AuxK does, for the dead latents it picks


def test_bf16_autocast_trains(caches, tmp_path):
    train, val = caches
    run = train_sae(train, replace(TINY, bf16=True, train_tokens=128 * 40), tmp_path / "s", log=_quiet)
    assert all(torch.isfinite(p).all() for p in run.sae.parameters())
    assert evaluate_sae(run.sae, val).fvu < 0.9


def test_batch_larger_than_the_cache_is_refused(caches, tmp_path):
    train, _ = caches
    with pytest.raises(ValueError, match="batch_size 4096 exceeds the 2048 tokens"):
        train_sae(train, replace(TINY, batch_size=4096), tmp_path / "s", log=_quiet)


def test_settings_the_architecture_ignores_do_not_change_its_identity():
    assert TINY.identity() == replace(TINY, l1_coeff=0.5).identity() == replace(TINY, save_every_s=1.0).identity()
    assert TINY.identity() != replace(TINY, k=9).identity()
    relu = replace(TINY, architecture="relu")
    assert relu.identity() == replace(relu, k=9, aux_coeff=0.0).identity() != replace(relu, l1_coeff=0.5).identity()
    batch = replace(TINY, architecture="batchtopk")
    assert batch.identity() == replace(batch, l1_coeff=0.5).identity() != replace(batch, k=9).identity()
