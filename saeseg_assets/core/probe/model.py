"""The linear segmentation probe Linear(d_model, 151) and its checkpoints: ours (safetensors + JSON) and the
reference `.pt` format, read weights-only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.ade20k import class_table_version
from ..data.cache import ActivationCache
from ..store.checkpoints import (
    CheckpointError,
    load_tensors,
    read_reference_checkpoint,
    save_tensors,
)
from .metrics import N_OUTPUTS

STEM = "probe"
FORMAT_VERSION = 1  # of probe.safetensors + probe.json


@dataclass(frozen=True)
class Probe:
    """Linear map from one patch activation to 151 logits (index = ADE mask value; 0 is never predicted)."""

    weight_CD: torch.Tensor
    bias_C: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return self.weight_CD.shape[1]

    @property
    def layer(self) -> str:
        """What it reads (SweepSettings.probe_layer); a probe trained elsewhere reads the SAE's layer."""
        return str(self.meta.get("probe_layer", "sae"))

    def to(self, device: str | torch.device) -> Probe:
        return Probe(self.weight_CD.to(device), self.bias_C.to(device), self.meta)


def probe_field(probe_layer: str) -> str:
    """The cache array a probe of `probe_layer` (SweepSettings.probe_layer) reads."""
    return {"sae": "activations", "final": "final_tokens"}[probe_layer]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_probe(folder: Path, probe: Probe) -> Path:
    """Writes probe.safetensors + probe.json atomically; returns the safetensors path."""
    meta = {"format": "saeseg-probe", "class_table_version": class_table_version(), "d_model": probe.d_model,
            **probe.meta}
    weights, _ = save_tensors(Path(folder), STEM, {"weight": probe.weight_CD.float(), "bias": probe.bias_C.float()},
                              meta)
    return weights


def load_probe(path: Path | str) -> Probe:
    """Reads our format (a folder, probe.safetensors or probe.json) or the reference format (any other file: a JSON
    line, then a torch-saved state dict of a Linear(d_model, 151), loaded weights-only: pickled code never runs)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: probe checkpoint not found")
    if path.is_dir() or path.suffix in (".safetensors", ".json"):
        tensors, meta = load_tensors(path, STEM)
        return _checked(tensors.get("weight"), tensors.get("bias"), meta, path)
    config, state = read_reference_checkpoint(path)
    weight, bias = _only_key(state, "weight", path), _only_key(state, "bias", path)
    return _checked(weight, bias, {"source": "imported", "reference_config": config}, path)


def _only_key(state: dict[str, torch.Tensor], name: str, path: Path) -> torch.Tensor | None:
    # A Linear saved alone has keys weight/bias; saved inside a module, one prefix (e.g. "probe.weight").
    matches = [k for k in state if k == name or k.endswith("." + name)]
    if len(matches) > 1:
        raise CheckpointError(f"{path}: several '{name}' tensors ({matches}); expected one Linear(d_model, 151)")
    return state[matches[0]] if matches else None


def _checked(weight: torch.Tensor | None, bias: torch.Tensor | None, meta: dict, path: Path) -> Probe:
    if weight is None or bias is None:
        raise CheckpointError(f"{path}: a probe needs tensors 'weight' [151, d_model] and 'bias' [151]")
    if weight.ndim != 2 or weight.shape[0] != N_OUTPUTS or tuple(bias.shape) != (N_OUTPUTS,):
        raise CheckpointError(f"{path}: expected weight [151, d_model] and bias [151], got weight "
                              f"{list(weight.shape)} and bias {list(bias.shape)}")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise CheckpointError(f"{path}: the probe holds NaN or infinite values")
    return Probe(weight.float().contiguous(), bias.float().contiguous(), dict(meta))


def check_d_model(probe: Probe, cache: ActivationCache, source: Path | str) -> None:
    if probe.d_model != cache.d_model:
        raise CheckpointError(f"{source}: the probe reads d_model {probe.d_model}, but the activation cache "
                              f"{cache.path} has d_model {cache.d_model} (another backbone?)")


