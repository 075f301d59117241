"""The sparse autoencoder (ReLU, TopK, BatchTopK or JumpReLU encoder) with its sparse kernels, and its checkpoint files.

Saved weights act on raw activations of the cache they were trained on (format: docs/formats.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..store.checkpoints import CheckpointError, load_tensors, save_tensors

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")  # every encoder this model runs, imported ones included
FORMAT_VERSION = 1  # of sae.safetensors + sae.json
THRESHOLDED = ("batchtopk", "jumprelu")  # encoders that fire where the pre-activation exceeds a per-latent threshold
STEM = "sae"


@dataclass(frozen=True)
class SaeSpec:
    """What a set of SAE weights means; saved in sae.json beside the weights."""

    # "relu": every positive pre-activation fires; "topk": the k largest per token; "batchtopk": trained keeping the
    # batch's N x k largest, used with its threshold; "jumprelu": each pre-activation above its latent's threshold.
    architecture: str
    d_model: int  # width of the activations it encodes
    d_sae: int  # number of latents
    k: int = 0  # latents per token (topk), or per token on average in a training batch (batchtopk); else 0
    # Whether the encoder reads x - b_dec (ours, SAELens' apply_b_dec_to_input, saev before 2025-07-31) or x itself.
    subtracts_b_dec: bool = True
    # topk: whether the selected pre-activations pass a ReLU (ours, SAELens) or are kept as they are (saev).
    relu_after_topk: bool = True

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r}: expected one of {ARCHITECTURES}")
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k = {self.k} must lie in 1..d_sae ({self.d_sae})")


class Sae(nn.Module):
    """f = act((x - b_dec) W_enc + b_enc) (or act(x W_enc + b_enc) where the spec says the encoder keeps x),
    x_hat = f W_dec + b_dec; act = ReLU, TopK(k) then ReLU (or TopK alone), or, for batchtopk at inference and
    jumprelu, "pre-activation where it exceeds max(threshold, 0), else 0" with a [d_sae] threshold buffer.

    Both weight matrices are held latent-major ([d_sae, d_model]) so that the sparse kernels touch whole rows;
    the file stores W_enc as [d_model, d_sae] like the reference.
    """

    def __init__(self, spec: SaeSpec):
        super().__init__()
        self.spec = spec
        S, D = spec.d_sae, spec.d_model
        self.W_enc_SD = nn.Parameter(torch.zeros(S, D))
        self.b_enc_S = nn.Parameter(torch.zeros(S))
        self.W_dec_SD = nn.Parameter(torch.zeros(S, D))
        self.b_dec_D = nn.Parameter(torch.zeros(D))
        if spec.architecture in THRESHOLDED:
            self.register_buffer("threshold_S", torch.zeros(S))

    @classmethod
    def initialized(cls, spec: SaeSpec, mean_D: torch.Tensor, seed: int) -> Sae:
        """Random unit decoder rows, encoder = decoder transposed, decoder bias = the data mean."""
        sae = cls(spec)
        gen = torch.Generator().manual_seed(seed)
        W_SD = F.normalize(torch.randn(spec.d_sae, spec.d_model, generator=gen), dim=1)
        with torch.no_grad():
            sae.W_dec_SD.copy_(W_SD)
            sae.W_enc_SD.copy_(W_SD)
            sae.b_dec_D.copy_(mean_D)
        return sae

    def pre_activations(self, x_ND: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc_S, x_ND - self.b_dec_D if self.spec.subtracts_b_dec else x_ND, self.W_enc_SD.T)

    def encode(self, x_ND: torch.Tensor, dead_S: torch.Tensor | None = None,
               k_aux: int = 0) -> tuple[torch.Tensor, ...]:
        """The codes of each token as (values_NK, indices_NK): token n has code values[n, j] on latent indices[n, j].
        topk: the k selected latents (a selected one may be 0 after the ReLU), with the sparse backward; relu: every
        latent in order (K = d_sae), the indices a broadcast view, not a copy; batchtopk and jumprelu: the latents above
        threshold, K the most any token has, padded with zero codes.

        With a [d_sae] mask `dead_S` (a training step), also the top `k_aux` pre-activations among the masked latents
        for the AuxK loss, taken from the same matmul: (values_NK, indices_NK, aux_values_NA, aux_indices_NA); A = 0 for
        relu and jumprelu. A batchtopk training step selects the batch's N x k largest pre-activations instead (K the
        most any token got, padded with zero codes) and has the sparse backward of topk.
        """
        N, arch = len(x_ND), self.spec.architecture
        if arch == "topk" or (arch == "batchtopk" and dead_S is not None):
            b_dec_D = self.b_dec_D if self.spec.subtracts_b_dec else None
            codes = _TopKEncode.apply(x_ND, self.W_enc_SD, self.b_enc_S, b_dec_D, self.spec.k, dead_S, k_aux,
                                      arch == "batchtopk", self.spec.relu_after_topk)
            return codes if dead_S is not None else codes[:2]
        pre_NS = self.pre_activations(x_ND)
        if arch == "relu":
            values_NK = F.relu(pre_NS)
            indices_NK = torch.arange(self.spec.d_sae, device=x_ND.device).expand(N, -1)
        else:
            values_NK, indices_NK = above_threshold(pre_NS, self.threshold_S)
        if dead_S is None:
            return values_NK, indices_NK
        return values_NK, indices_NK, values_NK.new_zeros(N, 0), indices_NK.new_zeros(N, 0)

    def decode(self, values_NK: torch.Tensor, indices_NK: torch.Tensor) -> torch.Tensor:
        """x_hat [N, d_model] from codes laid out as `encode` gives them: relu's every-latent codes (in latent order)
        through one dense matmul, any other layout through the sparse kernel, whose cost and W_dec gradient scale
        with the entries per token, not with d_sae."""
        if self.spec.architecture == "relu" and indices_NK.shape[1] == self.spec.d_sae:
            return torch.addmm(self.b_dec_D, values_NK, self.W_dec_SD)
        return sparse_decode(values_NK, indices_NK, self.W_dec_SD) + self.b_dec_D

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x_ND))

    @torch.no_grad()
    def track_threshold_(self, values_NK: torch.Tensor, momentum: float) -> None:
        """batchtopk training: moves the inference threshold of every latent toward the smallest positive code the
        batch selection kept (an exponential moving average; the first batch sets it). No host sync."""
        smallest = torch.where(values_NK > 0, values_NK, float("inf")).min().to(self.threshold_S.dtype)
        moved = torch.where(self.threshold_S == 0, smallest, (1 - momentum) * self.threshold_S + momentum * smallest)
        self.threshold_S.copy_(torch.where(torch.isfinite(smallest), moved, self.threshold_S))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec_SD.div_(self.W_dec_SD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Keeps steps on unit-norm decoder rows tangent to the sphere (renormalizing then undoes little)."""
        g_SD, W_SD = self.W_dec_SD.grad, self.W_dec_SD
        if g_SD is not None:
            g_SD.sub_((g_SD * W_SD).sum(dim=1, keepdim=True) * W_SD)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors in the file's names and layout."""
        tensors = {"W_enc": self.W_enc_SD.detach().T.contiguous(), "b_enc": self.b_enc_S.detach(),
                   "W_dec": self.W_dec_SD.detach(), "b_dec": self.b_dec_D.detach()}
        if self.spec.architecture in THRESHOLDED:
            tensors["threshold"] = self.threshold_S.detach()
        return tensors

    @classmethod
    def from_file_tensors(cls, spec: SaeSpec, tensors: dict[str, torch.Tensor], source: Path) -> Sae:
        """The model from tensors in the file's names and layout, refused (naming `source` and the tensor) unless every
        one is there, of its shape, and finite: a NaN SAE never gets past loading."""
        expected = {"W_enc": (spec.d_model, spec.d_sae), "b_enc": (spec.d_sae,),
                    "W_dec": (spec.d_sae, spec.d_model), "b_dec": (spec.d_model,)}
        if spec.architecture in THRESHOLDED:
            expected["threshold"] = (spec.d_sae,)
        for name, shape in expected.items():
            if name not in tensors:
                raise CheckpointError(f"{source}: no tensor {name!r} (has {sorted(tensors)})")
            if tuple(tensors[name].shape) != shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
            bad = int((~torch.isfinite(tensors[name])).sum())
            if bad:
                raise CheckpointError(f"{source}: {name} holds {bad} NaN or infinite values")
        sae = cls(spec)
        with torch.no_grad():
            sae.W_enc_SD.copy_(tensors["W_enc"].T)
            sae.b_enc_S.copy_(tensors["b_enc"])
            sae.W_dec_SD.copy_(tensors["W_dec"])
            sae.b_dec_D.copy_(tensors["b_dec"])
            if spec.architecture in THRESHOLDED:
                sae.threshold_S.copy_(tensors["threshold"])
        return sae


def above_threshold(pre_NS: torch.Tensor, threshold_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU codes, sparse: each pre-activation above max(its latent's threshold, 0) as it is, as (values_NK,
    indices_NK) with K the most any token has (at least 1), the rest of a token's row zero codes."""
    live_NS = pre_NS > threshold_S.clamp_min(0)
    K = max(1, int(live_NS.sum(1).max())) if len(pre_NS) else 1
    return torch.where(live_NS, pre_NS, 0.0).topk(K, dim=1, sorted=False)


def batch_topk(pre_NS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The N x k largest pre-activations of a batch of N tokens, as (values_NK, indices_NK) with K the most any token
    got, a token's row padded with zero codes on latent 0."""
    N, S = pre_NS.shape
    values_M, flat_M = pre_NS.reshape(-1).topk(N * k, sorted=False)
    token_M, order_M = torch.sort(flat_M // S, stable=True)
    counts_N = torch.bincount(token_M, minlength=N)
    slot_M = torch.arange(len(token_M), device=pre_NS.device) - (counts_N.cumsum(0) - counts_N)[token_M]
    K = max(1, int(counts_N.max()))
    values_NK = pre_NS.new_zeros(N, K)
    indices_NK = torch.zeros(N, K, dtype=torch.long, device=pre_NS.device)
    values_NK[token_M, slot_M] = values_M[order_M]
    indices_NK[token_M, slot_M] = flat_M[order_M] % S
    return values_NK, indices_NK


class _TopKEncode(torch.autograd.Function):
    """TopK encoder (per token, or over the batch) whose backward touches only the selected (token, latent) pairs.

    Optionally also selects the top `k_aux` pre-activations among dead latents (for the AuxK loss) from the same
    pre-activations, so the one dense matmul serves both. `b_dec_D` None: the encoder reads x itself.
    """

    @staticmethod
    def forward(ctx, x_ND, W_enc_SD, b_enc_S, b_dec_D, k, dead_S, k_aux, batch=False, relu=True):
        xc_ND = x_ND - b_dec_D if b_dec_D is not None else x_ND
        pre_NS = torch.addmm(b_enc_S, xc_ND, W_enc_SD.T)
        vals_NK, idx_NK = batch_topk(pre_NS, k) if batch else pre_NS.topk(k, dim=1, sorted=False)
        aux_vals_NA = pre_NS.new_zeros(len(pre_NS), 0)
        aux_idx_NA = torch.zeros(len(pre_NS), 0, dtype=torch.long, device=pre_NS.device)
        if dead_S is not None and k_aux > 0:
            dead_idx = dead_S.nonzero().squeeze(1)
            if len(dead_idx):
                aux_vals_NA, local_NA = pre_NS[:, dead_idx].topk(min(k_aux, len(dead_idx)), dim=1, sorted=False)
                aux_idx_NA = dead_idx[local_NA]
        # Under autocast the matmul ran in low precision; the codes go on in the weights' precision.
        if relu:
            vals_NK, aux_vals_NA = F.relu(vals_NK).to(W_enc_SD.dtype), F.relu(aux_vals_NA).to(W_enc_SD.dtype)
            live_NM = torch.cat([vals_NK, aux_vals_NA], 1) > 0
        else:  # every selected pre-activation is a code, whatever its sign (saev's TopK)
            vals_NK, aux_vals_NA = vals_NK.to(W_enc_SD.dtype), aux_vals_NA.to(W_enc_SD.dtype)
            live_NM = torch.ones(len(vals_NK), vals_NK.shape[1] + aux_vals_NA.shape[1], dtype=torch.bool,
                                 device=vals_NK.device)
        ctx.has_b_dec = b_dec_D is not None
        ctx.save_for_backward(xc_ND, W_enc_SD, torch.cat([idx_NK, aux_idx_NA], 1), live_NM)
        ctx.mark_non_differentiable(idx_NK, aux_idx_NA)
        return vals_NK, idx_NK, aux_vals_NA, aux_idx_NA

    @staticmethod
    def backward(ctx, g_vals_NK, _g_idx, g_aux_NA, _g_aux_idx):
        xc_ND, W_enc_SD, idx_NM, live_NM = ctx.saved_tensors
        S = W_enc_SD.shape[0]
        # Gradient of the pre-activations: non-zero only where a latent was selected and positive (ReLU).
        g_NM = torch.cat([g_vals_NK, g_aux_NA], 1).to(xc_ND.dtype) * live_NM
        grad_W_SD = scatter_rows(idx_NM, g_NM, xc_ND.to(W_enc_SD.dtype), S)
        grad_b_enc_S = torch.zeros(S, dtype=g_NM.dtype, device=g_NM.device).index_add_(
            0, idx_NM.reshape(-1), g_NM.reshape(-1))
        grad_b_dec_D = -(grad_b_enc_S @ W_enc_SD) if ctx.has_b_dec else None
        grad_x_ND = None
        if ctx.needs_input_grad[0]:
            grad_x_ND = F.embedding_bag(idx_NM, W_enc_SD, per_sample_weights=g_NM, mode="sum")
        return grad_x_ND, grad_W_SD, grad_b_enc_S, grad_b_dec_D, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """sum_k vals[n, k] W[idx[n, k]], with a backward whose cost scales with the entries, not with W's rows."""

    @staticmethod
    def forward(ctx, vals_NK, idx_NK, W_SD):
        ctx.save_for_backward(vals_NK, idx_NK, W_SD)
        return F.embedding_bag(idx_NK, W_SD, per_sample_weights=vals_NK, mode="sum")

    @staticmethod
    def backward(ctx, grad_ND):
        vals_NK, idx_NK, W_SD = ctx.saved_tensors
        grad_vals_NK = grad_W_SD = None
        if ctx.needs_input_grad[0]:
            # One dot product <grad_n, W[idx[n, k]]> per entry: embedding_bag's own backward for the weights of its
            # entries does exactly that (its backward for W would fill a dense [S, D] gradient the slow way).
            with torch.enable_grad():
                v_NK = vals_NK.detach().requires_grad_()
                out_ND = F.embedding_bag(idx_NK, W_SD.detach(), per_sample_weights=v_NK, mode="sum")
                (grad_vals_NK,) = torch.autograd.grad(out_ND, v_NK, grad_ND)
        if ctx.needs_input_grad[2]:
            grad_W_SD = scatter_rows(idx_NK, vals_NK, grad_ND, W_SD.shape[0])
        return grad_vals_NK, None, grad_W_SD


def sparse_decode(vals_NK: torch.Tensor, idx_NK: torch.Tensor, W_SD: torch.Tensor) -> torch.Tensor:
    """[N, D] = sum_k vals[n, k] * W[idx[n, k]]: a decode from k active latents per token, without the bias."""
    return _SparseDecode.apply(vals_NK, idx_NK, W_SD)


def scatter_rows(idx_NM: torch.Tensor, weights_NM: torch.Tensor, rows_ND: torch.Tensor, n_out: int) -> torch.Tensor:
    """out[s] = sum of weights[n, m] * rows[n] over the entries with idx[n, m] == s: the gradient of a weight matrix
    used sparsely. Computed as one embedding_bag over the entries sorted by s (faster here than sparse matmuls)."""
    flat = idx_NM.reshape(-1)
    order = torch.argsort(flat)
    offsets_S = torch.zeros(n_out, dtype=torch.long, device=flat.device)
    offsets_S[1:] = torch.bincount(flat, minlength=n_out)[:-1].cumsum(0)
    return F.embedding_bag(order // max(idx_NM.shape[1], 1), rows_ND, offsets_S,
                           per_sample_weights=weights_NM.reshape(-1)[order].to(rows_ND.dtype), mode="sum")


# --- checkpoint files ---------------------------------------------------------------------------------------

def save_sae(sae: Sae, folder: Path, meta: dict) -> tuple[Path, Path]:
    """Writes sae.safetensors + sae.json; the JSON carries the spec, `meta` and a hash that binds it to the weights."""
    from safetensors.torch import save

    tensors = {k: v.cpu().contiguous() for k, v in sae.file_tensors().items()}
    digest = hashlib.sha256(save(tensors)).hexdigest()
    return save_tensors(folder, STEM, tensors, {**meta, **asdict(sae.spec), "weights_sha256": digest})


def weights_digest(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / f"{STEM}.safetensors").read_bytes()).hexdigest()


def load_sae(path: Path) -> tuple[Sae, dict]:
    """Loads our format (a folder, sae.safetensors or sae.json); returns (model, meta). Checkpoints of other libraries
    go through `sae_import.import_sae`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such SAE checkpoint")
    tensors, meta = load_tensors(path, STEM)
    folder = path if path.is_dir() else path.parent
    recorded = meta.get("weights_sha256")
    if recorded and recorded != weights_digest(folder):
        raise CheckpointError(f"{folder}: {STEM}.json does not describe {STEM}.safetensors (a torn write?)")
    try:
        spec = SaeSpec(**{f: meta[f] for f in SaeSpec.__dataclass_fields__ if f in meta})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / (STEM + '.json')}: {exc}") from exc
    return Sae.from_file_tensors(spec, tensors, folder), meta
