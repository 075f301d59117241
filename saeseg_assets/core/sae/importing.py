"""Importing SAEs trained elsewhere (saev `.pt` files of every layout, SAELens folders, our own pair) into our model,
weights-only, with the encoder of the library that wrote them; what is read and refused: docs/import.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..data.cache import ActivationCache
from ..store.checkpoints import CheckpointError, read_header_and_state, read_safetensors
from .evaluation import sample_metrics, token_sample
from .model import STEM, Sae, SaeSpec, load_sae, save_sae

B_DEC_SETTINGS = ("auto", "true", "false")  # values of the import_subtracts_b_dec setting
SAMPLE_TOKENS = 16_384  # training tokens on which an undecided b_dec convention is measured
MIN_FVU_RATIO = 1.05  # the worse convention's FVU must exceed the better one's by 5%, or the import is refused
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SAEV_ACTIVATIONS = ("Relu", "TopK", "BatchTopK")
_KEPT_BY_IMPORT = ("weights_sha256", "training_key", "imported_from", "import")  # a fresh import writes these anew


@dataclass(frozen=True)
class Read:
    """A checkpoint as its file gives it: the spec and tensors of our model, the b_dec convention where the file
    settles it (None where it cannot), what the format was and what else the file said."""

    spec: SaeSpec
    tensors: dict[str, torch.Tensor]
    path: Path
    subtracts_b_dec: bool | None
    layout: str
    meta: dict = field(default_factory=dict)

    def model(self, subtracts_b_dec: bool) -> Sae:
        """The model under one b_dec convention (every tensor checked for shape and finiteness)."""
        return Sae.from_file_tensors(replace(self.spec, subtracts_b_dec=subtracts_b_dec), self.tensors, self.path)


def read_sae_checkpoint(path: Path) -> Read:
    """Reads an SAE checkpoint of any supported layout: a folder (or either file) of our pair or of SAELens's pair,
    else a saev `.pt` file. Refused, naming the file and the field, where anything is missing, malformed, non-finite
    or unsupported."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such SAE checkpoint")
    if not (path.is_dir() or path.suffix in (".safetensors", ".json")):
        read = _read_saev(path)
    elif _is_saelens(path):
        read = _read_saelens(path if path.is_dir() else path.parent)
    else:
        sae, meta = load_sae(path)
        kept = {k: v for k, v in meta.items() if k not in _KEPT_BY_IMPORT}
        read = Read(sae.spec, sae.file_tensors(), path, sae.spec.subtracts_b_dec, "saeseg (sae.safetensors + sae.json)",
                    kept)
    if read.subtracts_b_dec is not None:
        read = replace(read, spec=replace(read.spec, subtracts_b_dec=read.subtracts_b_dec))
    read.model(read.spec.subtracts_b_dec)  # validates shapes and finiteness before anything else happens
    return read


def import_sae(source: Path, folder: Path, cache: ActivationCache, subtracts_b_dec: str = "auto", *,
               imported_from: str = "", log: Callable[[str], None] = print) -> tuple[Sae, dict]:
    """Reads a checkpoint from elsewhere, checks it against the activation cache it will be used on, settles the
    b_dec convention (`decide_convention`), and saves it into `folder` as our pair; nothing is written unless every
    check passes. `imported_from`: the path to record, where `source` is a copy."""
    read = read_sae_checkpoint(source)
    D, S = read.spec.d_model, read.spec.d_sae
    if D != cache.d_model:
        raise CheckpointError(f"{source}: the SAE encodes d_model = {D} (W_enc [{D}, {S}]), but the activation cache "
                              f"{cache.path} holds d_model = {cache.d_model}")
    subtracts, how = decide_convention(read, cache, subtracts_b_dec, log)
    meta = {**read.meta, "imported_from": imported_from or str(Path(source).resolve()),
            "import": {"format": read.layout, "subtracts_b_dec": subtracts, **how}}
    save_sae(read.model(subtracts), Path(folder), meta)
    return load_sae(folder)


def decide_convention(read: Read, cache: ActivationCache, setting: str = "auto",
                      log: Callable[[str], None] = print) -> tuple[bool, dict]:
    """Whether the encoder subtracts b_dec, and how that was decided: the setting where it says 'true' or 'false';
    else the file where its layout settles it; else (saev schema 1) the convention with the lower FVU on a sample of
    `cache`, refused when the two FVUs lie within 5% of each other."""
    if setting not in B_DEC_SETTINGS:
        raise ValueError(f"import_subtracts_b_dec = {setting!r}: expected one of {B_DEC_SETTINGS}")
    if setting != "auto":
        return setting == "true", {"b_dec_convention": "setting"}
    if read.subtracts_b_dec is not None:
        return read.subtracts_b_dec, {"b_dec_convention": "file"}
    if not read.tensors["b_dec"].any():
        return True, {"b_dec_convention": "b_dec is zero: both conventions give the same codes"}
    x_ND = torch.from_numpy(token_sample(cache, SAMPLE_TOKENS, seed=0, buffer_images=64)).float()
    fvu = {flag: sample_metrics(read.model(flag), x_ND).fvu for flag in (True, False)}
    figures = {"fvu_subtracting_b_dec": fvu[True], "fvu_keeping_x": fvu[False], "sample_tokens": len(x_ND)}
    log(f"{read.path}: {read.layout} does not say whether its encoder subtracts b_dec; on {len(x_ND)} tokens of "
        f"{cache.path}: FVU {fvu[True]:.4f} subtracting it, {fvu[False]:.4f} not")
    ranked = sorted((v if math.isfinite(v) else math.inf, flag) for flag, v in fvu.items())
    (best, better), (worst, _) = ranked
    if not worst > best * MIN_FVU_RATIO:
        raise CheckpointError(
            f"{read.path}: {read.layout} files were written both by saev versions whose encoder subtracts b_dec and by "
            f"later ones that do not, and {len(x_ND)} tokens of {cache.path} do not tell which this is: FVU "
            f"{fvu[True]:.4f} subtracting b_dec, {fvu[False]:.4f} not (within {MIN_FVU_RATIO - 1:.0%} of each "
            "other); set import_subtracts_b_dec to 'true' or 'false'")
    return better, {"b_dec_convention": "measured", **figures}


# --- saev: one JSON header line, then torch.save(state_dict) ---------------------------------------------------

def _read_saev(path: Path) -> Read:
    """saev's `dump` layouts: no schema (ReLU, encoder subtracts b_dec), schema 1 in its two forms (the convention
    undecided: both kinds of encoder wrote it), schemas 2 to 5 (encoder x W_enc + b_enc)."""
    header, state = read_header_and_state(path)
    schema = header.get("schema")
    if schema is None:
        layout, cfg, prefix, kind, params, subtracts = "saev, no schema (legacy)", header, "", "Relu", {}, True
    elif schema in (1, 2, 3, 4, 5):
        cfg, prefix = _object(header, "cfg", path), "cfg."
        subtracts = None if schema == 1 else False
        if schema == 1 and header.get("cls", "SparseAutoencoderConfig") in SAEV_ACTIVATIONS:
            layout, kind, params = "saev schema 1, activation named by cls", header["cls"], cfg
        else:
            layout = f"saev schema {schema}" + (", activation as a dict" if schema == 1 else "")
            activation = cfg.get("activation", {"cls": "Relu", "params": {}} if schema == 1 else None)
            kind, params = _activation(activation, path)
    else:
        raise CheckpointError(f"{path}: header field schema = {schema!r}: not a saev layout this importer reads "
                              "(no schema, or 1 to 5)")
    D, S = _sizes(state, path)
    _check_saev_sizes(cfg, prefix, D, S, path)
    tensors = {k: v.float() for k, v in state.items() if k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    top_k = params.get("top_k", 32)  # saev's default where a file leaves it out
    threshold = state.get("activation.threshold")
    if kind == "Relu":
        spec = SaeSpec("relu", D, S)
    elif kind == "TopK" or threshold is None:  # saev's BatchTopK before its inference threshold was per-token top-k
        spec = _spec(path, f"{prefix}top_k", "topk", D, S, top_k, relu_after_topk=False)
    else:
        spec = _spec(path, f"{prefix}top_k", "batchtopk", D, S, top_k)
        tensors["threshold"] = _per_latent(threshold, S, path, "activation.threshold")
    meta = {"header": header}
    if kind == "Relu" and (coeff := _l1_coeff(cfg, params)) is not None:
        meta["l1_coeff"] = coeff
    return Read(spec, tensors, path, subtracts, layout, meta)


def _l1_coeff(cfg: dict, params: dict) -> float | None:
    """The L1 coefficient a ReLU file was trained with: flat in old headers, {"cls": "L1Sparsity", "params":
    {"coeff": ...}} in the activation of newer ones."""
    sparsity = params.get("sparsity")
    nested = sparsity.get("params", {}).get("coeff") if isinstance(sparsity, dict) else None
    return cfg.get("l1_coeff", cfg.get("sparsity_coeff", nested))


def _sizes(tensors: dict[str, torch.Tensor], path: Path) -> tuple[int, int]:
    """(d_model, d_sae) from W_enc [d_model, d_sae]."""
    W_enc = tensors.get("W_enc")
    if W_enc is None or W_enc.ndim != 2:
        raise CheckpointError(f"{path}: no 2-D tensor W_enc (has {sorted(tensors)})")
    return tuple(W_enc.shape)


def _object(header: dict, name: str, path: Path) -> dict:
    value = header.get(name)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: header field {name} is {type(value).__name__}, expected a JSON object")
    return value


def _activation(activation, path: Path) -> tuple[str, dict]:
    """(class name, parameters) of a serialized saev activation {"cls": ..., "params": {...}}."""
    if not (isinstance(activation, dict) and isinstance(activation.get("cls"), str)
            and isinstance(activation.get("params", {}), dict)):
        raise CheckpointError(f"{path}: header field cfg.activation = {activation!r}: expected "
                              '{"cls": ..., "params": {...}}')
    if activation["cls"] not in SAEV_ACTIVATIONS:
        raise CheckpointError(f"{path}: header field cfg.activation.cls = {activation['cls']!r} is not supported "
                              f"(saev's activations: {', '.join(SAEV_ACTIVATIONS)})")
    return activation["cls"], activation.get("params", {})


def _check_saev_sizes(cfg: dict, prefix: str, D: int, S: int, path: Path) -> None:
    name = "d_model" if "d_model" in cfg else "d_vit"
    if name in cfg and int(cfg[name]) != D:
        raise CheckpointError(f"{path}: header field {prefix}{name} = {cfg[name]}, but W_enc has {D} rows")
    width = cfg[name] if name in cfg else D
    if "d_sae" in cfg and int(cfg["d_sae"]) != S:
        raise CheckpointError(f"{path}: header field {prefix}d_sae = {cfg['d_sae']}, but W_enc has {S} columns")
    if "d_sae" not in cfg and "exp_factor" in cfg and int(cfg["exp_factor"]) * int(width) != S:
        raise CheckpointError(f"{path}: header field {prefix}exp_factor = {cfg['exp_factor']} gives d_sae = "
                              f"{int(cfg['exp_factor']) * int(width)}, but W_enc has {S} columns")


def _spec(path: Path, field_name: str, architecture: str, D: int, S: int, k, **flags) -> SaeSpec:
    try:
        return SaeSpec(architecture, D, S, int(k), **flags)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {field_name} = {k!r}: {exc}") from exc


def _per_latent(threshold: torch.Tensor, S: int, path: Path, name: str) -> torch.Tensor:
    """A threshold per latent from one for all (a scalar) or one per latent."""
    if threshold.numel() == 1:
        return torch.full((S,), float(threshold.reshape(())), dtype=torch.float32)
    if tuple(threshold.shape) != (S,):
        raise CheckpointError(f"{path}: {name} has shape {tuple(threshold.shape)}, expected a scalar or ({S},)")
    return threshold.float()


# --- SAELens: cfg.json + sae_weights.safetensors ---------------------------------------------------------------

def _is_saelens(path: Path) -> bool:
    """Whether a folder (or a file's folder) holds SAELens's pair rather than ours; ours wins where both are."""
    if not path.is_dir():
        return path.name in (SAELENS_CONFIG, SAELENS_WEIGHTS)
    ours = any((path / f"{STEM}{suffix}").exists() for suffix in (".safetensors", ".json"))
    return not ours and any((path / name).exists() for name in (SAELENS_CONFIG, SAELENS_WEIGHTS))


def _read_saelens(folder: Path) -> Read:
    """SAELens's `save_model` layout: standard, topk (rescaled by decoder norm or not), jumprelu, and batchtopk
    training files; `apply_b_dec_to_input` settles the b_dec convention. Pre-6.0 configs are read as SAELens reads
    them (architecture standard unless activation_fn is topk)."""
    cfg_path, weights_path = folder / SAELENS_CONFIG, folder / SAELENS_WEIGHTS
    for f in (cfg_path, weights_path):
        if not f.exists():
            raise CheckpointError(f"{f}: missing (an SAELens checkpoint is the pair {SAELENS_CONFIG} + "
                                  f"{SAELENS_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: unreadable SAELens config: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    tensors = {name: t.float() for name, t in read_safetensors(weights_path).items()}

    def refuse(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{cfg_path}: {name} = {cfg.get(name)!r}: {why}")

    activation_fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    architecture = cfg.get("architecture") or ("topk" if activation_fn == "topk" else "standard")
    if architecture == "gated":
        raise refuse("architecture", "gated SAEs (a gate path and a magnitude path) are not supported; standard, "
                     "topk, jumprelu and batchtopk are")
    if architecture not in ("standard", "topk", "jumprelu", "batchtopk"):
        raise refuse("architecture", "not supported; standard, topk, jumprelu and batchtopk are")
    normalize = cfg.get("normalize_activations")
    normalize = {None: "none", False: "none", True: "expected_average_only_in"}.get(normalize, normalize)
    if normalize != "none":
        raise refuse("normalize_activations", "needs a norm scaling factor that the file does not carry; fold it "
                     "into the weights first" if normalize == "expected_average_only_in" else
                     "normalizes each token before encoding, which this pipeline's SAE does not do")
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise refuse("reshape_activations", "only flat activations (none) are supported")
    if architecture == "standard" and activation_fn not in (None, "relu"):
        raise refuse("activation_fn", "a standard SAE is imported with its ReLU only")
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.equal(scaling, torch.ones_like(scaling)):
        raise CheckpointError(f"{weights_path}: scaling_factor (a fine-tuning scale, finetuning_scaling_factor) is "
                              "not supported")
    D, S = _sizes(tensors, weights_path)
    for name, size, what in (("d_in", D, "rows"), ("d_sae", S, "columns")):
        if name in cfg and int(cfg[name]) != size:
            raise CheckpointError(f"{cfg_path}: {name} = {cfg[name]}, but W_enc in {weights_path} has {size} {what}")
    k = cfg.get("k", kwargs.get("k"))
    if architecture == "standard":
        spec = SaeSpec("relu", D, S)
    elif architecture == "jumprelu":
        spec = SaeSpec("jumprelu", D, S)
    elif architecture == "topk":
        spec = _spec(cfg_path, "k", "topk", D, S, k)
    else:  # a BatchTopK training file: its running threshold is the inference threshold (SAELens saves it so)
        spec = _spec(cfg_path, "k", "batchtopk", D, S, round(k) if isinstance(k, float) else k)
        if "threshold" not in tensors and "topk_threshold" in tensors:
            tensors["threshold"] = _per_latent(tensors.pop("topk_threshold"), S, weights_path, "topk_threshold")
    if architecture in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False):
        # Pre-activations scaled by each decoder row's norm, codes divided by it before decoding: the same as
        # unit decoder rows with the norms folded into the encoder (SAELens folds it so when it saves for inference).
        norm_S = tensors["W_dec"].norm(dim=1)
        tensors["W_enc"], tensors["b_enc"] = tensors["W_enc"] * norm_S, tensors["b_enc"] * norm_S
        tensors["W_dec"] = tensors["W_dec"] / norm_S[:, None]
    tensors = {name: t for name, t in tensors.items() if name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    subtracts = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(subtracts, bool):
        raise refuse("apply_b_dec_to_input", "expected true or false")
    layout = f"SAELens {architecture} (cfg.json + sae_weights.safetensors)"
    return Read(spec, tensors, cfg_path, subtracts, layout, {"saelens_config": cfg})
