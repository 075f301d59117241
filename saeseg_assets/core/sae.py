"""The sparse autoencoder (TopK or ReLU) with its sparse TopK kernels, and its checkpoint files.

Saved weights act on raw activations of the cache they were trained on (format: README, "SAE").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointError, load_tensors, read_reference_checkpoint, save_tensors

ARCHITECTURES = ("topk", "relu")
STEM = "sae"


@dataclass(frozen=True)
class SaeSpec:
    """What a set of SAE weights means; saved in sae.json beside the weights."""

    architecture: str  # "topk": the k largest pre-activations per token fire; "relu": every positive one fires
    d_model: int  # width of the activations it encodes
    d_sae: int  # number of latents
    k: int = 0  # latents active per token (topk); 0 for relu

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r}: expected one of {ARCHITECTURES}")
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k = {self.k} must lie in 1..d_sae ({self.d_sae})")


class Sae(nn.Module):
    """f = act((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec, with act = TopK(k) then ReLU, or ReLU.

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
        return torch.addmm(self.b_enc_S, x_ND - self.b_dec_D, self.W_enc_SD.T)

    def encode(self, x_ND: torch.Tensor, dead_S: torch.Tensor | None = None,
               k_aux: int = 0) -> tuple[torch.Tensor, ...]:
        """The codes of each token as (values_NK, indices_NK): token n has code values[n, j] (>= 0) on latent
        indices[n, j]. topk: the k selected latents (a selected one may be 0 after the ReLU), with the sparse backward;
        relu: every latent in order (K = d_sae), the indices a broadcast view, not a copy.

        With a [d_sae] mask `dead_S` (training), also the top `k_aux` pre-activations among the masked latents for the
        AuxK loss, taken from the same matmul: (values_NK, indices_NK, aux_values_NA, aux_indices_NA); A = 0 for relu.
        """
        N = len(x_ND)
        if self.spec.architecture == "topk":
            codes = _TopKEncode.apply(x_ND, self.W_enc_SD, self.b_enc_S, self.b_dec_D, self.spec.k, dead_S, k_aux)
            return codes if dead_S is not None else codes[:2]
        values_NS = F.relu(self.pre_activations(x_ND))
        indices_NS = torch.arange(self.spec.d_sae, device=x_ND.device).expand(N, -1)
        if dead_S is None:
            return values_NS, indices_NS
        return values_NS, indices_NS, values_NS.new_zeros(N, 0), indices_NS.new_zeros(N, 0)

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
        return {"W_enc": self.W_enc_SD.detach().T.contiguous(), "b_enc": self.b_enc_S.detach(),
                "W_dec": self.W_dec_SD.detach(), "b_dec": self.b_dec_D.detach()}

    @classmethod
    def from_file_tensors(cls, spec: SaeSpec, tensors: dict[str, torch.Tensor], source: Path) -> Sae:
        expected = {"W_enc": (spec.d_model, spec.d_sae), "b_enc": (spec.d_sae,),
                    "W_dec": (spec.d_sae, spec.d_model), "b_dec": (spec.d_model,)}
        for name, shape in expected.items():
            if name not in tensors:
                raise CheckpointError(f"{source}: no tensor {name!r} (has {sorted(tensors)})")
            if tuple(tensors[name].shape) != shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        sae = cls(spec)
        with torch.no_grad():
            sae.W_enc_SD.copy_(tensors["W_enc"].T)
            sae.b_enc_S.copy_(tensors["b_enc"])
            sae.W_dec_SD.copy_(tensors["W_dec"])
            sae.b_dec_D.copy_(tensors["b_dec"])
        return sae


class _TopKEncode(torch.autograd.Function):
    """TopK encoder whose backward touches only the selected (token, latent) pairs.

    Optionally also selects the top `k_aux` pre-activations among dead latents (for the AuxK loss) from the same
    pre-activations, so the one dense matmul serves both.
    """

    @staticmethod
    def forward(ctx, x_ND, W_enc_SD, b_enc_S, b_dec_D, k, dead_S, k_aux):
        xc_ND = x_ND - b_dec_D
        pre_NS = torch.addmm(b_enc_S, xc_ND, W_enc_SD.T)
        vals_NK, idx_NK = pre_NS.topk(k, dim=1, sorted=False)
        aux_vals_NA = pre_NS.new_zeros(len(pre_NS), 0)
        aux_idx_NA = torch.zeros(len(pre_NS), 0, dtype=torch.long, device=pre_NS.device)
        if dead_S is not None and k_aux > 0:
            dead_idx = dead_S.nonzero().squeeze(1)
            if len(dead_idx):
                aux_vals_NA, local_NA = pre_NS[:, dead_idx].topk(min(k_aux, len(dead_idx)), dim=1, sorted=False)
                aux_idx_NA = dead_idx[local_NA]
        # Under autocast the matmul ran in low precision; the codes go on in the weights' precision.
        vals_NK, aux_vals_NA = F.relu(vals_NK).to(W_enc_SD.dtype), F.relu(aux_vals_NA).to(W_enc_SD.dtype)
        ctx.save_for_backward(xc_ND, W_enc_SD, torch.cat([idx_NK, aux_idx_NA], 1),
                              torch.cat([vals_NK, aux_vals_NA], 1) > 0)
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
        grad_b_dec_D = -(grad_b_enc_S @ W_enc_SD)
        grad_x_ND = None
        if ctx.needs_input_grad[0]:
            grad_x_ND = F.embedding_bag(idx_NM, W_enc_SD, per_sample_weights=g_NM, mode="sum")
        return grad_x_ND, grad_W_SD, grad_b_enc_S, grad_b_dec_D, None, None, None


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
    """Loads our format (a folder, sae.safetensors or sae.json) or the reference's `sae.pt`; returns (model, meta)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such SAE checkpoint")
    if path.is_file() and path.suffix not in (".safetensors", ".json"):
        return _load_reference(path)
    tensors, meta = load_tensors(path, STEM)
    folder = path if path.is_dir() else path.parent
    recorded = meta.get("weights_sha256")
    if recorded and recorded != weights_digest(folder):
        raise CheckpointError(f"{folder}: {STEM}.json does not describe {STEM}.safetensors (a torn write?)")
    try:
        spec = SaeSpec(**{f: meta[f] for f in ("architecture", "d_model", "d_sae", "k") if f in meta})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / (STEM + '.json')}: {exc}") from exc
    return Sae.from_file_tensors(spec, tensors, folder), meta


def import_sae(source: Path, folder: Path, d_model: int, cache_path: Path) -> tuple[Sae, dict]:
    """Checks a checkpoint from elsewhere against the cache it will be used on, then saves it into `folder`."""
    source = Path(source)
    sae, meta = load_sae(source)
    if sae.spec.d_model != d_model:
        raise CheckpointError(f"{source}: the SAE encodes d_model = {sae.spec.d_model}, but the activation cache "
                              f"{cache_path} holds d_model = {d_model}")
    # A training key would claim that this folder's own training produced the weights.
    kept = {k: v for k, v in meta.items() if k not in ("weights_sha256", "training_key", "imported_from")}
    save_sae(sae, Path(folder), {**kept, "imported_from": str(source.resolve())})
    return load_sae(folder)


def _load_reference(path: Path) -> tuple[Sae, dict]:
    """The original experiment's file: its header says ReLU or TopK; the state dict gives the sizes."""
    cfg, state = read_reference_checkpoint(path)
    with open(path, "rb") as f:
        header = json.loads(f.readline())
    activation = cfg.get("activation")
    kind = activation.get("cls") if isinstance(activation, dict) else header.get("cls", "Relu")
    params = activation.get("params", {}) if isinstance(activation, dict) else cfg
    if kind not in ("Relu", "TopK"):
        raise CheckpointError(f"{path}: activation {kind!r} is not supported (only Relu and TopK)")
    W_enc = state.get("W_enc")
    if W_enc is None or W_enc.ndim != 2:
        raise CheckpointError(f"{path}: the state dict has no 2-D W_enc (keys: {sorted(state)})")
    d_model, d_sae = W_enc.shape
    if "d_vit" in cfg and int(cfg["d_vit"]) != d_model:
        raise CheckpointError(f"{path}: header says d_vit = {cfg['d_vit']}, W_enc has {d_model} rows")
    try:
        spec = SaeSpec("topk" if kind == "TopK" else "relu", d_model, d_sae,
                       int(params.get("top_k", 0)) if kind == "TopK" else 0)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    tensors = {k: v.float() for k, v in state.items() if k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    meta = {"source_format": "reference sae.pt", "reference_header": header}
    if kind == "Relu" and ("sparsity_coeff" in cfg or "l1_coeff" in cfg):
        meta["l1_coeff"] = cfg.get("l1_coeff", cfg.get("sparsity_coeff"))
    return Sae.from_file_tensors(spec, tensors, path), meta
