"""The class-suppression edit x' = x + sum_i (v_i - f_i(x)) W_dec[i], taken exactly into the linear probe's logits,
the random-direction control's shift of the same norm, and the explicit form the shortcut is tested against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..probe.metrics import N_OUTPUTS
from .logit_shift import LogitShift
from .model import SuppressionModel


@dataclass(frozen=True)
class Edit:
    """The coefficients (v_i - f_i) of one intervention: on `tokens_U` (where an edited latent fires) they are
    `coef_UL`; on every other token they are v_L in every_token mode and 0 in where_active mode."""

    latents: tuple[int, ...]
    values_L: torch.Tensor
    tokens_U: torch.Tensor
    coef_UL: torch.Tensor
    every_token: bool


def latent_edit(model: SuppressionModel, latents: tuple[int, ...], scale: float, mode: str,
                columns: tuple[torch.Tensor, torch.Tensor] | None = None) -> Edit:
    """v_L = scale x max activation; `columns` (tokens, codes) of the latents may be passed when already read."""
    values_L = scale * model.max_activation_S[list(latents)]
    tokens_U, codes_UL = columns if columns is not None else model.codes.columns(latents)
    # where_active edits exactly the tokens where some chosen latent fires: the same rows in both modes.
    return Edit(tuple(latents), values_L, tokens_U, values_L[None, :] - codes_UL, mode == "every_token")


def edit_shift(model: SuppressionModel, edit: Edit) -> LogitShift:
    """The edit in logit space: delta_n = sum_i a_ni (W_probe W_dec[i]); exact because the probe is linear."""
    if not edit.latents:
        return LogitShift.zero()
    P_LC = model.decoder_logits(edit.latents)
    shift_C = edit.values_L @ P_LC if edit.every_token else torch.zeros(N_OUTPUTS)
    return LogitShift(shift_C, edit.tokens_U, edit.coef_UL @ P_LC)


def edit_norms(model: SuppressionModel, edit: Edit) -> tuple[float, torch.Tensor]:
    """||sum_i a_ni W_dec[i]|| on the other tokens (one number) and on `tokens_U`, through the Gram matrix."""
    if not edit.latents:
        return 0.0, torch.zeros(0)
    W_LD = model.W_dec_SD[list(edit.latents)]
    G_LL = W_LD @ W_LD.T
    norms_U = torch.einsum("ul,lm,um->u", edit.coef_UL, G_LL, edit.coef_UL).clamp(min=0).sqrt()
    rest = float((edit.values_L @ G_LL @ edit.values_L).clamp(min=0).sqrt()) if edit.every_token else 0.0
    return rest, norms_U


def direction_shift(model: SuppressionModel, edit: Edit, direction_D: torch.Tensor) -> LogitShift:
    """The random-direction control: the unit direction, times the edit's own norm on each token."""
    rest, norms_U = edit_norms(model, edit)
    q_C = model.probe_W_CD @ direction_D
    return LogitShift(rest * q_C, edit.tokens_U, norms_U[:, None] * q_C[None, :])


def edited_activations(sae, x_ND: torch.Tensor, latents: tuple[int, ...], values_L: torch.Tensor,
                       mode: str) -> torch.Tensor:
    """The explicit form: encode, keep the error term x - x_hat, set the chosen codes to v, decode, add the error."""
    vals_NK, idx_NK = sae.encode(x_ND)
    error_ND = x_ND - sae.decode(vals_NK, idx_NK)
    index_L = torch.tensor(latents, dtype=torch.long, device=x_ND.device)
    chosen_NKL = idx_NK[:, :, None] == index_L
    codes_NL = (vals_NK[:, :, None] * chosen_NKL).sum(1)  # 0 where a chosen latent was not selected
    rows_N = torch.ones_like(codes_NL[:, 0], dtype=torch.bool) if mode == "every_token" else (codes_NL > 0).any(1)
    edited_NL = torch.where(rows_N[:, None], values_L.to(codes_NL.dtype), codes_NL)
    # The chosen latents leave the token's codes and come back as columns of their own, edited where the mode says.
    vals_NM = torch.cat([vals_NK.masked_fill(chosen_NKL.any(2), 0.0), edited_NL], 1)
    idx_NM = torch.cat([idx_NK, index_L.expand(len(x_ND), -1)], 1)
    return sae.decode(vals_NM, idx_NM) + error_ND
