"""Writing an SAE in SAELens's layout (`cfg.json` + `sae_weights.safetensors`, the files of its `save_model`), so that
an SAE made here loads in SAELens (`SAE.load_from_disk(folder)`) and encodes as it does here."""

from __future__ import annotations

import json
from pathlib import Path

from ..store.artifacts import write_atomic
from .importing import SAELENS_CONFIG, SAELENS_WEIGHTS
from .model import Sae

FOLDER = "saelens"  # beside our own pair in an sae_weights folder
# The config layout written: that of SAELens 6 (its readers treat configs without a version as pre-6 ones).
SAELENS_FORMAT_VERSION = "6.0.0"
FORMAT_VERSION = 1  # of the saelens/ folder as written here


def saelens_config(sae: Sae, metadata: dict) -> dict:
    """SAELens's cfg.json for this SAE; ValueError where SAELens has no encoder that computes the same codes."""
    spec = sae.spec
    cfg = {"d_in": spec.d_model, "d_sae": spec.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": spec.subtracts_b_dec, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, **metadata}}
    if spec.architecture == "relu":
        return {"architecture": "standard", **cfg}
    if spec.architecture == "topk":
        if not spec.relu_after_topk:
            raise ValueError("its TopK keeps negative selected pre-activations (saev's TopK); SAELens's TopK passes "
                             "them through a ReLU")
        return {"architecture": "topk", **cfg, "k": spec.k, "rescale_acts_by_decoder_norm": False}
    # batchtopk at inference and jumprelu: relu(pre) * (pre > threshold), SAELens's JumpReLU (its BatchTopK SAEs are
    # saved the same way).
    return {"architecture": "jumprelu", **cfg}


def export_saelens(sae: Sae, folder: Path, metadata: dict) -> str:
    """Writes `folder/cfg.json` and `folder/sae_weights.safetensors`; returns "" or, writing nothing, the reason the
    SAE has no SAELens form. `metadata` goes into the config's metadata (SAELens keeps what it does not know)."""
    from safetensors.torch import save

    try:
        cfg = saelens_config(sae, metadata)
    except ValueError as exc:
        return str(exc)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in sae.file_tensors().items()}
    folder = Path(folder)
    write_atomic(folder / SAELENS_WEIGHTS, save(tensors))
    write_atomic(folder / SAELENS_CONFIG, json.dumps(cfg, indent=2, sort_keys=True).encode())
    return ""
