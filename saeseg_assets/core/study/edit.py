"""The class-suppression edit x' = x + sum_i (v_i - f_i(x)) W_dec[i], taken exactly into the linear probe's logits,
the random-direction control's shift of the same norm, and the explicit form the shortcut is tested against."""

from __future__ import annotations

import math

import torch

from ..probe.metrics import N_OUTPUTS
from .logit_shift import CHUNK_VALUES, LogitShift, RowTerm, tensor_bytes
from .model import SuppressionModel


class LatentEdit:
    """What suppressing one latent set does at the SAE's layer, for every scale and mode: with v_L = scale x max
    activation, the edit's coefficients are (v_i - f_i) on the tokens `tokens_U` where a chosen latent fires, and v_L
    (every_token mode) or 0 (where_active mode) on every other token; the edit is the coefficients times W_dec[L].
    Its norm on each token, for the random-direction control, comes from the Gram matrix of the chosen rows."""

    def __init__(self, model: SuppressionModel, latents: tuple[int, ...]):
        self.latents = tuple(latents)
        index = list(self.latents)
        self.max_L = model.max_activation_S[index]
        self.tokens_U, self.codes_UL = model.codes.columns(self.latents)
        # The edit's norm on each token, ||sum_i a_i W_dec[i]|| with a = v - f, through the Gram matrix G:
        # a G a = scale^2 (m G m) - 2 scale (f G m) + f G f.
        W_LD = model.W_dec_SD[index]
        G_LL = W_LD @ W_LD.T
        self.mGm = float(self.max_L @ G_LL @ self.max_L) if self.latents else 0.0
        self.fGm_U = self.codes_UL @ (G_LL @ self.max_L) if self.latents else torch.zeros(0)
        # f G f a block of tokens at a time (codes_UL @ G_LL whole is as large as the codes).
        self.fGf_U = torch.cat([((f_BL @ G_LL) * f_BL).sum(1) for f_BL in self.codes_UL.split(
            max(1, CHUNK_VALUES // max(len(index), 1)))]) if len(self.tokens_U) and self.latents else torch.zeros(0)

    @property
    def size_bytes(self) -> int:
        """What it holds: the codes and per-token terms."""
        return tensor_bytes(self.tokens_U, self.codes_UL, self.fGm_U, self.fGf_U)

    @property
    def n_tokens(self) -> int:
        """Tokens where a chosen latent fires (edited in both modes)."""
        return len(self.tokens_U)

    def values(self, scale: float) -> torch.Tensor:
        """v_L: what each latent is set to."""
        return scale * self.max_L

    def norms(self, scale: float, mode: str) -> tuple[float, torch.Tensor]:
        """The edit's norm on the other tokens (one number) and on `tokens_U`."""
        rest = abs(scale) * math.sqrt(max(self.mGm, 0.0)) if mode == "every_token" else 0.0
        return rest, (scale * scale * self.mGm - 2 * scale * self.fGm_U + self.fGf_U).clamp(min=0).sqrt()


class LatentEffect(LatentEdit):
    """The shortcut: the edit taken exactly into the probe's logits, computed once for every scale, mode and control
    of the set. Its logit delta is the edit's coefficients times P_LC = W_dec[L] W_probe^T, exact because the probe
    is linear: scale x unit_C + own (= -codes_UL P_LC) on `tokens_U`, scale x unit_C (or 0) elsewhere."""

    def __init__(self, model: SuppressionModel, latents: tuple[int, ...]):
        super().__init__(model, latents)
        P_LC = model.decoder_logits(self.latents)
        self.unit_C = self.max_L @ P_LC if self.latents else torch.zeros(N_OUTPUTS)
        # On the tokens where they fire, the latents' own contribution leaves: -codes_UL P_LC, held as
        # codes_UL (-P_LC) (the same products, exactly) with no copy of the codes.
        self.own = RowTerm(self.codes_UL, -P_LC) if self.latents else RowTerm(torch.zeros(0, N_OUTPUTS))
        self._rows: dict[float, dict] = {}  # per scale, the rows' predictions, the same in both modes

    @property
    def size_bytes(self) -> int:
        """What it holds: the codes and per-token terms, the own term's kept values, the rows' predictions."""
        return super().size_bytes + self.own.kept_bytes + tensor_bytes(*(
            v for memo in self._rows.values() for v in memo.values()))

    def shift(self, scale: float, mode: str, images: list[int] | None = None) -> LogitShift:
        """The edit in logit space (on every token: `images`, those a caller reads, saves nothing here)."""
        if not self.latents:
            return LogitShift.zero()
        unit_C = scale * self.unit_C
        return LogitShift(unit_C if mode == "every_token" else torch.zeros(N_OUTPUTS), self.tokens_U, unit_C,
                          self.own, self._rows.setdefault(float(scale), {}))

    def direction_shift(self, model: SuppressionModel, direction_D: torch.Tensor, scale: float,
                        mode: str) -> LogitShift:
        """The random-direction control: the unit direction, times the edit's own norm on each token."""
        rest, norms_U = self.norms(scale, mode)
        q_C = model.probe_W_CD @ direction_D
        return LogitShift(rest * q_C, self.tokens_U, torch.zeros(N_OUTPUTS), RowTerm(norms_U[:, None], q_C[None, :]))

    def direction_lengths(self, n_tokens: int, scale: float, mode: str) -> torch.Tensor:
        """The random-direction control's length on every token (its shift is that times the direction's logits)."""
        rest, norms_U = self.norms(scale, mode)
        t_N = torch.full((n_tokens,), rest, dtype=torch.float32)
        t_N[self.tokens_U] = norms_U
        return t_N

    def control_shifts(self, model: SuppressionModel, random_effects: list[LatentEffect],
                       directions: list[torch.Tensor], scale: float,
                       mode: str) -> tuple[list[LogitShift], list[LogitShift]]:
        """The controls' shifts: each random latent set's edit at this setting, and each random direction's."""
        return ([e.shift(scale, mode) for e in random_effects],
                [self.direction_shift(model, d, scale, mode) for d in directions])


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
