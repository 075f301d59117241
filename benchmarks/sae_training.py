"""SAE training throughput, side by side in one run: streamed from a zarr cache vs the same tokens held in memory,
and against the machine's matmul roofline (rate measured here, FLOPs of the sparse TopK step counted).

Also prints the sparse-decode step against a dense step of the same SAE. Targets: stream/memory >= 0.9, roofline >= 60%.
Usage: python benchmarks/sae_training.py [--d-model 384] [--expansion 16] [--batch 1024] [--steps 40] [--rounds 2]
       [--data data] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saeseg_assets.core.data.cache import CACHE_FOLDER, ActivationCache
from saeseg_assets.core.data.synthetic import write_sparse_cache
from saeseg_assets.core.sae.model import Sae, SaeSpec
from saeseg_assets.core.sae.training import train_sae, train_step
from saeseg_assets.core.settings import TrainSettings
from saeseg_assets.core.store.artifacts import Store


class InMemoryCache:
    """The same cache with its activations read once into RAM: `token_batches` cuts the very same batches from it."""

    def __init__(self, cache: ActivationCache):
        self.activations = cache.read("activations", 0, cache.n_images)
        for name in ("path", "attrs", "n_images", "n_patches", "d_model", "n_tokens", "chunk_images", "fingerprint"):
            setattr(self, name, getattr(cache, name))

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.activations[start:stop]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(n: int, d: int, s: int, device: str, seconds: float = 2.0) -> float:
    """FLOP/s of an [n, d] x [d, s] fp32 matmul, the best of repeated timings."""
    a, b = torch.randn(n, d, device=device), torch.randn(s, d, device=device)
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync(device)
        t0 = time.perf_counter()
        a @ b.T
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * d * s / best


def step_flops_per_token(d: int, s: int, k: int) -> int:
    """FLOPs the sparse TopK step performs per token: the dense encoder matmul, then four k-sparse products
    (decode, its gradient for the codes and for W_dec, the W_enc gradient). AuxK work and elementwise ops are left
    out, so the ratio to the roofline errs low."""
    return 2 * d * s + 4 * 2 * k * d


def dense_flops_per_token(d: int, s: int) -> int:
    """The same step with a dense decode: encoder and decoder matmuls and their three gradient matmuls."""
    return 5 * 2 * d * s


def training_rate(cache, config: TrainSettings, device: str) -> float:
    """Tokens/s of the training loop (from its own clock, which starts after initialization)."""
    with tempfile.TemporaryDirectory() as tmp:
        quiet = config.model_copy(update={"log_every_steps": 10 ** 9, "save_every_s": 1e9})
        run = train_sae(cache, quiet, Path(tmp) / "state.safetensors", device=device, log=lambda m: None)
    return run.tokens_trained / run.history[-1]["seconds"]


def fixed_batch_rate(spec: SaeSpec, config: TrainSettings, device: str, steps: int, dense: bool) -> float:
    """Tokens/s of bare steps on one batch held on the device (no data path): the sparse step or a dense one."""
    torch.manual_seed(0)
    sae = Sae.initialized(spec, torch.zeros(spec.d_model), seed=0).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x_ND = torch.randn(config.batch_size, spec.d_model, device=device)
    dead_S = torch.zeros(spec.d_sae, dtype=torch.bool, device=device)

    def dense_step() -> None:
        # Plain autograd on dense codes, as a reference: a dense encoder backward and a dense decode.
        pre_NS = sae.pre_activations(x_ND)
        vals_NK, idx_NK = pre_NS.topk(spec.k, dim=1, sorted=False)
        codes_NS = torch.zeros_like(pre_NS).scatter(1, idx_NK, torch.relu(vals_NK))
        x_hat_ND = torch.addmm(sae.b_dec_D, codes_NS, sae.W_dec_SD)
        optimizer.zero_grad(set_to_none=True)
        (x_hat_ND - x_ND).pow(2).mean().backward()
        sae.remove_parallel_decoder_grad_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        sae.normalize_decoder_()

    def step() -> None:
        if dense:
            dense_step()
        else:
            train_step(sae, optimizer, x_ND, config, 1e-4, dead_S, 0)

    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * config.batch_size / (time.perf_counter() - t0)


def compare(label: str, cache: ActivationCache, config: TrainSettings, rounds: int, device: str, rate: float,
            encoder_rate: float) -> None:
    memory = InMemoryCache(cache)
    streamed, held = [], []
    for _ in range(rounds):  # interleaved, so that load from other processes hits both alike
        streamed.append(training_rate(cache, config, device))
        held.append(training_rate(memory, config, device))
    s, m = statistics.median(streamed), statistics.median(held)
    flops = step_flops_per_token(cache.d_model, config.expansion * cache.d_model, config.k)
    print(f"\n[{label}] {cache.n_tokens:,} tokens x d_model {cache.d_model}, d_sae {config.expansion * cache.d_model}, "
          f"k {config.k}, batch {config.batch_size}, {config.total_steps} steps per run, {rounds} runs each")
    print(f"  streamed from zarr : {s:9,.0f} tokens/s   (runs: {', '.join(f'{x:,.0f}' for x in streamed)})")
    print(f"  held in memory     : {m:9,.0f} tokens/s   (runs: {', '.join(f'{x:,.0f}' for x in held)})")
    print(f"  (a) streamed / in-memory = {s / m:.2f}   (target >= 0.9)")
    print(f"  (b) streamed / roofline  = {s * flops / rate:.0%}   ({flops / 1e6:.2f} MFLOP per token; roofline "
          f"{rate / flops:,.0f} tokens/s; target >= 60%; against the encoder-shaped matmul's own rate: "
          f"{s * flops / encoder_rate:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=TrainSettings().batch_size, help="tokens per step (default: the "
                        "training default)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per timed run")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each kind, interleaved")
    parser.add_argument("--images", type=int, default=64, help="images (of 256 patches) in the synthetic cache")
    parser.add_argument("--data", default="data", help="the store whose newest training cache is measured too, if any "
                        "(default: the embedded demo's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    d, s = args.d_model, args.expansion * args.d_model
    encoder_rate, square_rate = matmul_rate(args.batch, d, s, device), matmul_rate(2048, 2048, 2048, device)
    rate = max(encoder_rate, square_rate)  # the higher of the two: ratios against it err low
    print(f"matmul roofline: {rate / 1e9:.1f} GFLOP/s (fp32; encoder shape [{args.batch}, {d}] x [{d}, {s}]: "
          f"{encoder_rate / 1e9:.1f}, square 2048: {square_rate / 1e9:.1f})")
    config = TrainSettings(expansion=args.expansion, k=args.k, batch_size=args.batch,
                         train_tokens=args.steps * args.batch, device=device, buffer_images=64)

    spec = SaeSpec("topk", d, s, args.k)
    sparse = fixed_batch_rate(spec, config, device, max(10, args.steps // 2), dense=False)
    dense = fixed_batch_rate(spec, config, device, max(5, args.steps // 8), dense=True)
    print(f"\nstep on one fixed batch (no data path): sparse decode {sparse:,.0f} tokens/s, dense decode "
          f"{dense:,.0f} tokens/s: sparse/dense = {sparse / dense:.2f}x steps in the same time")
    print(f"  sparse step at {sparse * step_flops_per_token(d, s, args.k) / rate:.0%} of the roofline; "
          f"dense step at {dense * dense_flops_per_token(d, s) / rate:.0%}")

    with tempfile.TemporaryDirectory() as tmp:
        synthetic = write_sparse_cache(Path(tmp) / "bench.zarr", n_images=args.images, grid=16, d_model=d,
                                       n_features=4 * d, active=16, chunk_images=16)
        compare("synthetic cache", synthetic, config, args.rounds, device, rate, encoder_rate)
    real = Store(args.data).newest("train_activations")
    if real is not None:
        cache = ActivationCache(real / CACHE_FOLDER)
        compare(f"demo cache {real}", cache, config.model_copy(update={"expansion": s // cache.d_model}), args.rounds,
                device, rate, encoder_rate)
    else:
        print(f"\n(no training cache under {args.data}: the demo's own cache was not measured)")


if __name__ == "__main__":
    main()
