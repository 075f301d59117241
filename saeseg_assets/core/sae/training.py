"""Training a sparse autoencoder on an activation cache, resumable after kill -9.

The loop streams shuffled tokens from the cache epoch after epoch; trainer state is saved now and then, atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.cache import ActivationCache, chunk_spans, prefetch, token_batches
from ..settings import MAX_DEAD_TOKENS, TrainSettings
from ..store.artifacts import OutputSpec, write_atomic
from .evaluation import token_sample
from .model import Sae, SaeSpec, load_sae, save_sae, sparse_decode

STATE_FILE = "trainer_state.safetensors"
# batchtopk: weight of each batch's smallest selected code in the moving average that becomes the inference threshold.
# saev's default; SAELens's 0.01 averages over ~100 steps while the codes still shrink, and on the tests' data left the
# threshold too high (held-out L0 6.1 for k = 8, FVU 0.263 against 8.5 and 0.219 with 0.1).
THRESHOLD_MOMENTUM = 0.1
_SUMMED = ("loss", "fvu", "l0", "steps")  # per-step figures averaged over each log interval


def fit_sae(cache: ActivationCache, config: TrainSettings, folder: Path, *, device: str = "cpu",
            log: Callable[[str], None] = print, **train_options) -> tuple[Sae, dict]:
    """Trains the SAE for (config, cache) into `folder` (sae.safetensors + sae.json), resuming a killed run from
    `folder/trainer_state.safetensors`; returns the saved model and its sae.json."""
    folder = Path(folder)
    run = train_sae(cache, config, folder / STATE_FILE, device=device, log=log, **train_options)
    meta = {"training": config.model_dump(mode="json"), "tokens_trained": run.tokens_trained,
            "source_cache": {"fingerprint": cache.fingerprint, "backbone": cache.attrs.get("backbone"),
                             "layer": cache.attrs.get("layer"), "n_tokens": cache.n_tokens},
            "train_seconds": run.history[-1]["seconds"] if run.history else run.seconds, "history": run.history,
            "resumed_at_step": run.resumed_at_step, "restart_reason": run.restart_reason}
    if config.architecture == "relu":
        meta["l1_coeff"] = config.l1_coeff
    if config.architecture == "batchtopk":
        meta["inference_threshold"] = float(run.sae.threshold_S[0])
    save_sae(run.sae, folder, meta)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return load_sae(folder)


@dataclass
class TrainingRun:
    sae: Sae  # on raw activations (the input scaling is folded in)
    tokens_trained: int
    history: list[dict]  # one row per log interval: step, tokens, seconds, loss, fvu, l0, dead_fraction
    seconds: float  # wall time of this call (a resumed run counts only its own part)
    resumed_at_step: int = 0
    restart_reason: str = ""  # why a saved trainer state could not be used and training began again at step 0


@dataclass
class _State:
    """What a killed run needs to go on exactly where it was (apart from the batches since the last save)."""

    sae: Sae  # trained on inputs divided by `scale`
    scale: float
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_since_fired_S: torch.Tensor | None = None
    optimizer: dict | None = None
    history: list[dict] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)  # running sums of the log interval in progress


def train_sae(cache: ActivationCache, config: TrainSettings, state_file: Path, *, device: str = "cpu",
              log: Callable[[str], None] = print, save_every_steps: int = 0,
              after_step: Callable[[int], None] | None = None) -> TrainingRun:
    """Trains an SAE on `cache` on `device`, resuming from `state_file` when it holds a run of the same key.
    `save_every_steps` and `after_step` let a test kill a run at a known step."""
    t_start = time.perf_counter()
    device = torch.device(device)
    key = _state_key(config, cache)
    spec = SaeSpec(config.architecture, cache.d_model, config.expansion * cache.d_model,
                   config.k if config.architecture != "relu" else 0)
    if config.batch_size > cache.n_tokens:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {cache.n_tokens} tokens of {cache.path}")
    dead_tokens = config.dead_tokens or min(MAX_DEAD_TOKENS, max(cache.n_tokens // 2, config.batch_size))
    k_aux = config.aux_k or max(1, cache.d_model // 2)

    state, restart_reason = None, ""
    try:
        state = _load_state(state_file, key, spec)
    except _UnusableState as exc:
        restart_reason = str(exc)
        log(f"WARNING: {restart_reason}; training starts again from step 0")
    if state is not None:
        log(f"resuming SAE training at step {state.step} of {config.total_steps} from {state_file}")
    else:
        mean_D, scale = _data_statistics(cache, config)
        state = _State(Sae.initialized(spec, mean_D / scale, config.seed), scale)
    resumed_at = state.step
    sae = state.sae.to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr, **_fast_adam(device))
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    since_fired_S = (state.tokens_since_fired_S if state.tokens_since_fired_S is not None
                     else torch.zeros(spec.d_sae, dtype=torch.long)).to(device)
    # Four batches ahead: shuffling, the fp16 -> fp32 copy and the first read of each pass overlap the steps.
    stream = prefetch(_token_stream(cache, config, state.epoch, state.batch_in_epoch), depth=4)
    sums = {name: torch.tensor(state.sums.get(name, 0.0), device=device) for name in _SUMMED}
    t_log, timed_from, last_save = time.perf_counter(), state.step, time.perf_counter()

    for step in range(state.step, config.total_steps):
        epoch, batch_in_epoch, acts_ND = next(stream)
        x_ND = acts_ND.to(device, non_blocking=True).div_(state.scale)
        stats = train_step(sae, optimizer, x_ND, config, _learning_rate(config, step), since_fired_S >= dead_tokens,
                           k_aux)
        since_fired_S += len(x_ND)
        since_fired_S[stats.pop("fired")] = 0
        for name, value in stats.items():
            sums[name] += value
        sums["steps"] += 1
        done = step + 1
        state.step, state.epoch, state.batch_in_epoch = done, epoch, batch_in_epoch + 1

        if done % max(1, config.log_every_steps) == 0 or done == config.total_steps:
            now = time.perf_counter()
            row = _history_row(sums, done, config.batch_size, since_fired_S, dead_tokens)
            row["seconds"] = round((state.history[-1]["seconds"] if state.history else 0.0) + now - t_log, 3)
            state.history.append(row)
            log(f"step {done}/{config.total_steps}  tokens {row['tokens']:,}  "
                f"{(done - timed_from) * config.batch_size / (now - t_log):,.0f} tokens/s  loss {row['loss']:.4f}  "
                f"fvu {row['fvu']:.3f}  L0 {row['l0']:.1f}  dead {row['dead_fraction']:.3f}")
            sums = {name: torch.zeros((), device=device) for name in _SUMMED}
            t_log, timed_from = now, done
        periodic = save_every_steps and done % save_every_steps == 0
        if done < config.total_steps and (periodic or time.perf_counter() - last_save >= config.save_every_s):
            state.sums = {name: float(value) for name, value in sums.items()}
            _save_state(state_file, key, state, optimizer, since_fired_S)
            last_save = time.perf_counter()
        if after_step is not None:
            after_step(done)

    stream.close()
    return TrainingRun(_unscaled(sae, state.scale), config.total_steps * config.batch_size, state.history,
                       time.perf_counter() - t_start, resumed_at, restart_reason)


def train_step(sae: Sae, optimizer: torch.optim.Optimizer, x_ND: torch.Tensor, config: TrainSettings, lr: float,
               dead_S: torch.Tensor, k_aux: int) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch of unit-variance inputs; returns the batch's figures, as tensors."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(x_ND.device.type, dtype=torch.bfloat16, enabled=config.bf16):
        loss, stats = _loss(sae, x_ND, config, dead_S, k_aux)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_decoder_grad_()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
    optimizer.step()
    sae.normalize_decoder_()
    return stats


def _loss(sae: Sae, x_ND: torch.Tensor, config: TrainSettings, dead_S: torch.Tensor,
          k_aux: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss on inputs of unit variance, and per-batch figures (summed tensors, no host sync)."""
    vals_NK, idx_NK, aux_vals_NA, aux_idx_NA = sae.encode(x_ND, dead_S, k_aux)
    err_ND = x_ND - sae.decode(vals_NK, idx_NK)
    loss = err_ND.pow(2).mean()
    if aux_idx_NA.shape[1]:
        # AuxK: the dead latents' best guess at what the live ones missed, scale-free like the main loss.
        residual_ND = err_ND.detach()
        aux_hat_ND = sparse_decode(aux_vals_NA, aux_idx_NA, sae.W_dec_SD)
        aux = (aux_hat_ND - residual_ND).pow(2).sum() / residual_ND.pow(2).sum().clamp_min(1e-12)
        loss = loss + config.aux_coeff * aux
    if config.architecture == "relu":
        # ReLU codes are sparse only under the L1 penalty (TopK's sparsity is built in).
        loss = loss + config.l1_coeff * vals_NK.sum(dim=1).mean()
    if config.architecture == "batchtopk":
        sae.track_threshold_(vals_NK.detach(), THRESHOLD_MOMENTUM)
    active_NK = vals_NK.detach() > 0
    fired = idx_NK[active_NK]
    l0 = active_NK.sum() / len(x_ND)
    batch_fvu = err_ND.detach().pow(2).sum() / (x_ND - x_ND.mean(0)).pow(2).sum().clamp_min(1e-12)
    return loss, {"loss": loss.detach(), "fvu": batch_fvu, "l0": l0, "fired": fired}


def _learning_rate(config: TrainSettings, step: int) -> float:
    """Linear warm-up, constant, then a linear fall to 0 over the final `decay_fraction` of the steps."""
    total = config.total_steps
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    decay_steps = int(config.decay_fraction * total)
    decay = min(1.0, (total - step) / decay_steps) if decay_steps else 1.0
    return config.lr * min(warm, decay)


def _token_stream(cache: ActivationCache, config: TrainSettings, epoch: int,
                  skip: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(epoch, batch index, activations) forever; each epoch one shuffled pass, its order a function of (seed, epoch).

    A resumed run re-creates the epoch it stopped in and skips the batches it had already trained on.
    """
    spans = chunk_spans(cache)
    while True:
        rng = np.random.default_rng(int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0]))
        batches = token_batches(cache, spans, config.batch_size, rng, buffer_images=config.buffer_images)
        for i, batch in enumerate(batches):
            if i >= skip:
                yield epoch, i, torch.from_numpy(batch["activations"]).float()
        epoch, skip = epoch + 1, 0


def _data_statistics(cache: ActivationCache, config: TrainSettings,
                     n_sample: int = 16_384) -> tuple[torch.Tensor, float]:
    """Mean and the scale that gives the centred inputs unit variance per dimension, from a shuffled sample."""
    x_ND = torch.from_numpy(token_sample(cache, n_sample, config.seed, config.buffer_images)).double()
    mean_D = x_ND.mean(0)
    scale = float((x_ND - mean_D).pow(2).sum(1).mean().div(cache.d_model).sqrt().clamp_min(1e-12))
    return mean_D.float(), scale


def _unscaled(sae: Sae, scale: float) -> Sae:
    """The same SAE on raw inputs: biases scale with the input; codes come out in raw units, W_dec rows stay unit."""
    raw = Sae(sae.spec)
    with torch.no_grad():
        raw.W_enc_SD.copy_(sae.W_enc_SD)
        raw.W_dec_SD.copy_(sae.W_dec_SD)
        raw.b_enc_S.copy_(sae.b_enc_S * scale)
        raw.b_dec_D.copy_(sae.b_dec_D * scale)
        if sae.spec.architecture == "batchtopk":
            raw.threshold_S.copy_(sae.threshold_S * scale)  # a threshold on pre-activations, which scale with x
    return raw.cpu()


def _fast_adam(device: torch.device) -> dict:
    # The fused kernel is about 3x faster than the per-tensor loop on CPU and exists on CUDA too.
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def _history_row(sums: dict[str, torch.Tensor], step: int, batch_size: int, since_fired_S: torch.Tensor,
                 dead_tokens: int) -> dict:
    n = sums["steps"].clamp_min(1)
    return {"step": step, "tokens": step * batch_size,
            **{name: round(float(sums[name] / n), 5) for name in ("loss", "fvu", "l0")},
            "dead_fraction": round(float((since_fired_S >= dead_tokens).float().mean()), 5)}


# --- trainer state: one safetensors file, its scalars in the header, replaced atomically ----------------------

def _save_state(path: Path, key: str, state: _State, optimizer: torch.optim.Optimizer,
                since_fired_S: torch.Tensor) -> None:
    from safetensors.torch import save

    tensors = {f"model.{name}": p.detach().cpu() for name, p in state.sae.state_dict().items()}
    for i, slot in optimizer.state_dict()["state"].items():
        tensors.update({f"adam.{i}.{name}": t.detach().cpu() for name, t in slot.items()})
    tensors["tokens_since_fired_S"] = since_fired_S.cpu()
    meta = {"key": key, "scale": state.scale, "step": state.step, "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch, "history": state.history, "sums": state.sums,
            "param_groups": optimizer.state_dict()["param_groups"]}
    write_atomic(Path(path), save({k: v.contiguous() for k, v in tensors.items()},
                                  metadata={"trainer": json.dumps(meta)}))


class _UnusableState(Exception):
    """A saved trainer state that cannot be resumed; the message names the file and the reason."""


def _state_key(config: TrainSettings, cache: ActivationCache) -> str:
    """Equal for runs that must give the same weights: a state is resumed only under the same key."""
    return OutputSpec("sae_training", 1, config.identity(), {"cache": cache.fingerprint}).key


def _load_state(path: Path, key: str, spec: SaeSpec) -> _State | None:
    """The saved state of the run with this key; None where there is no file; `_UnusableState` where there is one
    that cannot be resumed (another run's, or unreadable, e.g. torn by a full disk)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["trainer"])
            if meta["key"] != key:
                raise _UnusableState(f"{path}: the trainer state belongs to another run (key {meta['key']}, "
                                     f"this run {key})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise _UnusableState(f"{path}: unreadable trainer state ({type(exc).__name__}: {exc})") from exc
    sae = Sae(spec)
    sae.load_state_dict({name[len("model."):]: t for name, t in tensors.items() if name.startswith("model.")})
    slots: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("adam."):
            _, i, slot = name.split(".")
            slots.setdefault(int(i), {})[slot] = t
    return _State(sae, meta["scale"], meta["step"], meta["epoch"], meta["batch_in_epoch"],
                  tensors["tokens_since_fired_S"], {"state": slots, "param_groups": meta["param_groups"]},
                  meta["history"], meta["sums"])
