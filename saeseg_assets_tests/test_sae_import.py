"""Importing SAEs from other libraries. Each saev layout (a JSON header line, then `torch.save` of a state dict) and
each SAELens architecture (cfg.json + safetensors) is written here by hand with a non-zero b_dec, and the imported
codes are compared with that library version's encoder written out below. saev schema 1, written by encoders of both
b_dec conventions, is measured on a cache both ways. Refusals name the file and the field. No saev, no sae-lens, no
network."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from saeseg_assets.core.data.synthetic import write_sparse_cache
from saeseg_assets.core.sae.importing import import_sae, read_sae_checkpoint
from saeseg_assets.core.sae.model import Sae, SaeSpec
from saeseg_assets.core.sae.saelens_export import export_saelens
from saeseg_assets.core.store.checkpoints import CheckpointError

D, S = 8, 24


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_sparse_cache(tmp_path_factory.mktemp("cache") / "training.zarr", n_images=16, grid=4, d_model=D,
                              n_features=16)


def weights(seed: int = 0, b_dec_scale: float = 1.0, d_model: int = D) -> dict[str, torch.Tensor]:
    """Random weights in the files' layout (W_enc [d_model, d_sae]); b_dec far from zero unless scaled down."""
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_model, S, generator=g), "b_enc": torch.randn(S, generator=g) * 0.5,
            "W_dec": torch.randn(S, d_model, generator=g),
            "b_dec": (torch.randn(d_model, generator=g) + 1.0) * b_dec_scale}


def write_saev(path, header: dict, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes((json.dumps(header) + "\n").encode() + buffer.getvalue())


def write_saelens(folder, cfg: dict, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))


def codes(sae: Sae, x: torch.Tensor) -> torch.Tensor:
    vals, idx = sae.encode(x)
    return torch.zeros(len(x), sae.spec.d_sae).scatter_add(1, idx, vals)


# --- the libraries' encoders, written out: [N, d_sae] codes ----------------------------------------------------

def saev_relu(x, w, subtract=False):  # saev: (x - b_dec) W_enc + b_enc until 2025-07-31, x W_enc + b_enc after
    return F.relu((x - w["b_dec"] if subtract else x) @ w["W_enc"] + w["b_enc"])


def saev_topk(x, w, k, subtract=False):  # TopKActivation: mask * h, no ReLU
    h = (x - w["b_dec"] if subtract else x) @ w["W_enc"] + w["b_enc"]
    return torch.zeros_like(h).scatter(-1, h.topk(k, dim=-1).indices, 1.0) * h


def saev_batchtopk_eval(x, w, threshold):  # BatchTopKActivation in eval mode
    h = x @ w["W_enc"] + w["b_enc"]
    return torch.where(h > threshold, h, 0.0) if threshold > 0 else torch.where(h > 0, h, 0.0)


def saelens_hidden_pre(x, w, apply_b_dec):
    return (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]


def saelens_standard(x, w, apply_b_dec=True):
    return F.relu(saelens_hidden_pre(x, w, apply_b_dec))


def saelens_topk(x, w, k, apply_b_dec=True):  # TopK: relu of the k largest
    h = saelens_hidden_pre(x, w, apply_b_dec)
    top = h.topk(k, dim=-1)
    return torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())


def saelens_jumprelu(x, w, threshold, apply_b_dec=True):
    h = saelens_hidden_pre(x, w, apply_b_dec)
    return F.relu(h) * (h > threshold)


# --- saev -----------------------------------------------------------------------------------------------------

SAEV_CONFIG = {"n_reinit_samples": 1024, "remove_parallel_grads": True, "normalize_w_dec": True, "seed": 0}
BATCHTOPK_5 = {"cls": "BatchTopK", "params": {"key": "batch-top-k", "top_k": 4, "momentum": 0.1,
                                              "sparsity": {"cls": "NoSparsity", "params": {"key": "no-sparsity"}},
                                              "aux": {"cls": "AuxK", "params": {"key": "auxk", "k_aux": 512,
                                                                                "alpha": 0.03125}}}}
SAEV_LAYOUTS = {
    "legacy": ({"d_vit": D, "exp_factor": 3, "l1_coeff": 4e-4, "use_ghost_grads": False, **SAEV_CONFIG},
               "saev, no schema (legacy)", lambda x, w: saev_relu(x, w, subtract=True), "relu"),
    "schema 2 TopK": ({"schema": 2, "cfg": {"d_vit": D, "exp_factor": 3, **SAEV_CONFIG,
                                            "activation": {"cls": "TopK", "params": {"top_k": 4}}}, "commit": "a"},
                      "saev schema 2", lambda x, w: saev_topk(x, w, 4), "topk"),
    # Before its inference threshold (2025-11-16), saev's BatchTopK kept the top k of each token.
    "schema 2 BatchTopK": ({"schema": 2, "cfg": {"d_vit": D, "exp_factor": 3, **SAEV_CONFIG,
                                                 "activation": {"cls": "BatchTopK", "params": {"top_k": 5}}}},
                           "saev schema 2", lambda x, w: saev_topk(x, w, 5), "topk"),
    "schema 3 Relu": ({"schema": 3, "cfg": {"d_model": D, "exp_factor": 3,
                                            "activation": {"cls": "Relu", "params": {}}}},
                      "saev schema 3", saev_relu, "relu"),
    "schema 4 TopK": ({"schema": 4, "cfg": {"d_model": D, "d_sae": S,
                                            "activation": {"cls": "TopK", "params": {"top_k": 6}}}},
                      "saev schema 4", lambda x, w: saev_topk(x, w, 6), "topk"),
    "schema 5 BatchTopK": ({"schema": 5, "cfg": {"d_model": D, "d_sae": S, "activation": BATCHTOPK_5,
                                                 "reinit_blend": 0.8, "reinit_enc_dec_tranpose": True},
                            "commit": "b", "lib": "1.0"},
                           "saev schema 5", lambda x, w: saev_batchtopk_eval(x, w, 0.8), "batchtopk"),
    "schema 5 Relu": ({"schema": 5, "cfg": {"d_model": D, "d_sae": S, "activation": {"cls": "Relu", "params": {
        "key": "relu", "sparsity": {"cls": "L1Sparsity", "params": {"key": "l1-sparsity", "coeff": 4e-4}},
        "aux": {"cls": "NoAux", "params": {"key": "no-aux"}}}}}}, "saev schema 5", saev_relu, "relu"),
}


@pytest.mark.parametrize("name", SAEV_LAYOUTS)
def test_saev_layouts_encode_as_saev_does(tmp_path, cache, name):
    header, layout, formula, architecture = SAEV_LAYOUTS[name]
    w = weights()
    state = {"W_dec": w["W_dec"], "b_dec": w["b_dec"], "W_enc": w["W_enc"], "b_enc": w["b_enc"]}
    if name == "schema 5 BatchTopK":
        state["activation.threshold"] = torch.tensor(0.8)
    path = tmp_path / "sae.pt"
    write_saev(path, header, state)
    sae, meta = import_sae(path, tmp_path / "out", cache)
    x = torch.randn(64, D) * 2
    torch.testing.assert_close(codes(sae, x), formula(x, w))
    torch.testing.assert_close(sae.decode(*sae.encode(x)), formula(x, w) @ w["W_dec"] + w["b_dec"])
    assert (sae.spec.architecture, meta["import"]["format"], meta["import"]["b_dec_convention"]) == (
        architecture, layout, "file")
    assert meta["import"]["subtracts_b_dec"] is (name == "legacy")
    if name in ("legacy", "schema 5 Relu"):
        assert meta["l1_coeff"] == 4e-4


def test_a_saev_batchtopk_threshold_is_used_at_inference(tmp_path, cache):
    w = weights()
    path = tmp_path / "sae.pt"
    header = SAEV_LAYOUTS["schema 5 BatchTopK"][0]
    write_saev(path, header, {**w, "activation.threshold": torch.tensor(0.8)})
    sae = read_sae_checkpoint(path).model(False)
    x = torch.randn(64, D) * 2
    relu = saev_relu(x, w)
    assert ((relu > 0) & (relu <= 0.8)).any()  # pre-activations a plain ReLU would keep ...
    assert (codes(sae, x)[(relu > 0) & (relu <= 0.8)] == 0).all()  # ... are below the threshold
    # A threshold of zero or less, as saev's before its first training step, means: positive pre-activations.
    write_saev(path, header, {**w, "activation.threshold": torch.tensor(-1.0)})
    torch.testing.assert_close(codes(read_sae_checkpoint(path).model(False), x), relu)


def exact_weights(cache, subtracts: bool) -> dict[str, torch.Tensor]:
    """An SAE that reconstructs every token exactly under one b_dec convention, b_dec the cache mean: latents
    +-q_i . (x - b_dec) for a rotation Q. The other convention is off by b_dec on every token."""
    Q = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3)))[0]
    W_enc = torch.cat([Q, -Q]).T.contiguous()
    b_dec = torch.from_numpy(cache.read("activations", 0, cache.n_images)).float().reshape(-1, D).mean(0)
    b_enc = torch.zeros(2 * D) if subtracts else -(b_dec @ W_enc)
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": torch.cat([Q, -Q]), "b_dec": b_dec}


SCHEMA_1 = {"cls": {"schema": 1, "cfg": {"d_vit": D, "exp_factor": 2, **SAEV_CONFIG}, "cls": "Relu", "commit": "c"},
            "dict": {"schema": 1, "cfg": {"d_vit": D, "exp_factor": 2, **SAEV_CONFIG,
                                          "activation": {"cls": "Relu", "params": {}}},
                     "cls": "SparseAutoencoderConfig", "commit": "d"}}


@pytest.mark.parametrize("form", SCHEMA_1)
@pytest.mark.parametrize("subtracts", [True, False])
def test_saev_schema_1_convention_is_found_from_the_cache(tmp_path, cache, form, subtracts):
    w = exact_weights(cache, subtracts)
    path = tmp_path / "sae.pt"
    write_saev(path, SCHEMA_1[form], w)
    sae, meta = import_sae(path, tmp_path / "out", cache, log=lambda message: None)
    record = meta["import"]
    assert (record["b_dec_convention"], record["subtracts_b_dec"], sae.spec.subtracts_b_dec) == (
        "measured", subtracts, subtracts)
    right, wrong = ((record["fvu_subtracting_b_dec"], record["fvu_keeping_x"]) if subtracts
                    else (record["fvu_keeping_x"], record["fvu_subtracting_b_dec"]))
    assert right < 1e-6 < 0.5 < wrong
    x = torch.randn(32, D) * 2
    torch.testing.assert_close(codes(sae, x), saev_relu(x, w, subtract=subtracts))


def test_an_undecidable_schema_1_file_is_refused_unless_the_setting_decides(tmp_path, cache):
    path = tmp_path / "sae.pt"
    header = {**SCHEMA_1["cls"], "cfg": {**SCHEMA_1["cls"]["cfg"], "exp_factor": 3}}
    write_saev(path, header, weights(b_dec_scale=1e-5))  # b_dec too small to tell
    with pytest.raises(CheckpointError, match=rf"{path}: saev schema 1, activation named by cls files were written "
                                              r"both .* FVU [\d.]+ subtracting b_dec, [\d.]+ not \(within 5%"):
        import_sae(path, tmp_path / "out", cache, log=lambda message: None)
    assert not (tmp_path / "out").exists()
    sae, meta = import_sae(path, tmp_path / "out", cache, "false")
    assert (sae.spec.subtracts_b_dec, meta["import"]["b_dec_convention"]) == (False, "setting")
    # With b_dec exactly zero both conventions give the same codes: nothing to decide.
    write_saev(path, header, weights(b_dec_scale=0.0))
    assert import_sae(path, tmp_path / "zero", cache)[1]["import"]["b_dec_convention"].startswith("b_dec is zero")
    with pytest.raises(ValueError, match="import_subtracts_b_dec = 'maybe'"):
        import_sae(path, tmp_path / "other", cache, "maybe")


@pytest.mark.parametrize("header, message", [
    ({"schema": 2, "cfg": {"d_vit": D, "exp_factor": 3, "activation": {"cls": "JumpRelu", "params": {}}}},
     r"header field cfg.activation.cls = 'JumpRelu' is not supported"),
    ({"schema": 4, "cfg": {"d_model": D, "d_sae": S}}, r"header field cfg.activation = None"),
    ({"schema": 9, "cfg": {}}, r"header field schema = 9: not a saev layout"),
    ({"d_vit": 10, "exp_factor": 3}, r"header field d_vit = 10, but W_enc has 8 rows"),
    ({"schema": 4, "cfg": {"d_model": D, "d_sae": 30, "activation": {"cls": "Relu", "params": {}}}},
     r"header field cfg.d_sae = 30, but W_enc has 24 columns"),
    ({"schema": 2, "cfg": {"d_vit": D, "exp_factor": 4, "activation": {"cls": "Relu", "params": {}}}},
     r"header field cfg.exp_factor = 4 gives d_sae = 32, but W_enc has 24 columns"),
    ({"schema": 2, "cfg": {"d_vit": D, "exp_factor": 3, "activation": {"cls": "TopK", "params": {"top_k": 99}}}},
     r"cfg.top_k = 99: k = 99 must lie in 1..d_sae \(24\)"),
])
def test_saev_files_that_cannot_be_read_are_refused_naming_the_field(tmp_path, header, message):
    path = tmp_path / "sae.pt"
    write_saev(path, header, weights())
    with pytest.raises(CheckpointError, match=rf"{path}: {message}"):
        read_sae_checkpoint(path)


def test_bad_saev_files_are_refused_naming_the_file(tmp_path, cache):
    path = tmp_path / "sae.pt"
    buffer = io.BytesIO()
    torch.save(weights(), buffer)
    path.write_bytes(buffer.getvalue())  # a bare torch file: no header line
    with pytest.raises(CheckpointError, match=rf"{path}: the first line is not a JSON header"):
        read_sae_checkpoint(path)
    write_saev(path, {"d_vit": D, "exp_factor": 3}, weights())
    path.write_bytes(path.read_bytes()[:-300])  # truncated
    with pytest.raises(CheckpointError, match=rf"{path}: not a torch-saved state dict"):
        read_sae_checkpoint(path)
    nan = weights()
    nan["W_dec"][3, 1] = float("nan")
    write_saev(path, {"d_vit": D, "exp_factor": 3}, nan)
    with pytest.raises(CheckpointError, match=rf"{path}: W_dec holds 1 NaN or infinite values"):
        import_sae(path, tmp_path / "out", cache)
    assert not (tmp_path / "out").exists()
    write_saev(path, {"d_vit": 6, "exp_factor": 4}, weights(d_model=6))
    with pytest.raises(CheckpointError, match=rf"{path}: the SAE encodes d_model = 6 \(W_enc \[6, 24\]\), but the "
                                              rf"activation cache {cache.path} holds d_model = 8"):
        import_sae(path, tmp_path / "out", cache)
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """A pickled object that runs a shell command when unpickled without restrictions."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, cache):
    marker = tmp_path / "pwned"
    path = tmp_path / "sae.pt"
    write_saev(path, {"d_vit": D, "exp_factor": 3}, {**weights(), "W_enc": _RunsCode(f"touch {marker}")})
    with pytest.raises(CheckpointError, match=rf"{path}: refused"):
        import_sae(path, tmp_path / "out", cache)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The payload is live: an unrestricted load would have run it.
    torch.load(io.BytesIO(path.read_bytes().split(b"\n", 1)[1]), weights_only=False)
    assert marker.exists()


# --- SAELens ----------------------------------------------------------------------------------------------------

V6 = {"d_in": D, "d_sae": S, "dtype": "float32", "device": "cpu", "normalize_activations": "none",
      "reshape_activations": "none", "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.3.hook_resid_post"}}
THRESHOLD = torch.linspace(-0.2, 1.5, S)  # one below zero: SAELens's ReLU makes it act as zero
SAELENS_CASES = {
    "standard": ({"architecture": "standard", "apply_b_dec_to_input": True, **V6}, {}, saelens_standard, "relu"),
    "standard, b_dec not applied": ({"architecture": "standard", "apply_b_dec_to_input": False, **V6}, {},
                                    lambda x, w: saelens_standard(x, w, False), "relu"),
    "topk": ({"architecture": "topk", "k": 5, "apply_b_dec_to_input": True, **V6}, {},
             lambda x, w: saelens_topk(x, w, 5), "topk"),
    "jumprelu": ({"architecture": "jumprelu", "apply_b_dec_to_input": False, **V6}, {"threshold": THRESHOLD},
                 lambda x, w: saelens_jumprelu(x, w, THRESHOLD, False), "jumprelu"),
    # A BatchTopK training file: its running threshold is what SAELens saves as the JumpReLU threshold.
    "batchtopk": ({"architecture": "batchtopk", "k": 4.0, "apply_b_dec_to_input": True,
                   "rescale_acts_by_decoder_norm": False, **V6}, {"topk_threshold": torch.tensor(0.7).double()},
                  lambda x, w: saelens_jumprelu(x, w, 0.7), "batchtopk"),
    # Before 6.0: no architecture, activation_fn_str, normalize_activations a bool.
    "pre-6 standard": ({"d_in": D, "d_sae": S, "dtype": "float32", "activation_fn_str": "relu",
                        "normalize_activations": False, "hook_point": "blocks.3.hook_resid_post"}, {},
                       saelens_standard, "relu"),
    "pre-6 topk": ({"d_in": D, "d_sae": S, "dtype": "float32", "activation_fn": "topk",
                    "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": False}, {},
                   lambda x, w: saelens_topk(x, w, 3, False), "topk"),
}


@pytest.mark.parametrize("name", SAELENS_CASES)
def test_saelens_architectures_encode_as_saelens_does(tmp_path, cache, name):
    cfg, extra, formula, architecture = SAELENS_CASES[name]
    w = weights(seed=1)
    write_saelens(tmp_path / "saelens", cfg, {**w, **extra})
    sae, meta = import_sae(tmp_path / "saelens", tmp_path / "out", cache)
    x = torch.randn(64, D) * 2
    torch.testing.assert_close(codes(sae, x), formula(x, w))
    torch.testing.assert_close(sae.decode(*sae.encode(x)), formula(x, w) @ w["W_dec"] + w["b_dec"])
    assert (sae.spec.architecture, meta["import"]["b_dec_convention"]) == (architecture, "file")
    assert sae.spec.subtracts_b_dec is cfg.get("apply_b_dec_to_input", True)
    # Either file of the pair names the checkpoint too.
    assert read_sae_checkpoint(tmp_path / "saelens" / "cfg.json").spec == sae.spec


def test_saelens_topk_rescaled_by_decoder_norm_is_folded_into_unit_rows(tmp_path, cache):
    w = weights(seed=2)
    write_saelens(tmp_path / "s", {"architecture": "topk", "k": 4, "rescale_acts_by_decoder_norm": True, **V6}, w)
    sae = read_sae_checkpoint(tmp_path / "s").model(True)
    x = torch.randn(64, D) * 2
    norm = w["W_dec"].norm(dim=1)
    h = saelens_hidden_pre(x, w, True) * norm  # TopKSAE.encode with rescaling ...
    top = h.topk(4, dim=-1)
    f = torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(codes(sae, x), f)
    torch.testing.assert_close(sae(x), (f / norm) @ w["W_dec"] + w["b_dec"])  # ... and its decode
    torch.testing.assert_close(sae.W_dec_SD.norm(dim=1), torch.ones(S))


@pytest.mark.parametrize("change, message", [
    ({"architecture": "gated"}, r"cfg.json: architecture = 'gated': gated SAEs"),
    ({"normalize_activations": "expected_average_only_in"},
     r"cfg.json: normalize_activations = 'expected_average_only_in': needs a norm scaling factor"),
    ({"normalize_activations": "layer_norm"}, r"cfg.json: normalize_activations = 'layer_norm': normalizes each token"),
    ({"reshape_activations": "hook_z"}, r"cfg.json: reshape_activations = 'hook_z'"),
    ({"architecture": "standard", "activation_fn": "tanh-relu"}, r"cfg.json: activation_fn = 'tanh-relu'"),
    ({"d_in": 16}, r"cfg.json: d_in = 16, but W_enc in .*sae_weights.safetensors has 8 rows"),
    ({"architecture": "topk"}, r"cfg.json: k = None"),
])
def test_saelens_checkpoints_that_cannot_be_imported_are_refused_naming_the_field(tmp_path, change, message):
    folder = tmp_path / "saelens"
    write_saelens(folder, {"architecture": "standard", **V6, **change}, weights())
    with pytest.raises(CheckpointError, match=rf"{folder}/{message}"):
        read_sae_checkpoint(folder)


def test_broken_saelens_folders_are_refused_naming_the_file(tmp_path):
    folder = tmp_path / "saelens"
    write_saelens(folder, {"architecture": "standard", **V6}, {**weights(), "scaling_factor": torch.full((S,), 2.0)})
    with pytest.raises(CheckpointError, match=rf"{folder}/sae_weights.safetensors: scaling_factor"):
        read_sae_checkpoint(folder)
    weights_file = folder / "sae_weights.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{weights_file}: unreadable safetensors file"):
        read_sae_checkpoint(folder)
    weights_file.unlink()
    with pytest.raises(CheckpointError, match=rf"{weights_file}: missing"):
        read_sae_checkpoint(folder)
    jumprelu = tmp_path / "jumprelu"
    write_saelens(jumprelu, {"architecture": "jumprelu", **V6}, weights())
    with pytest.raises(CheckpointError, match=rf"{jumprelu}/cfg.json: no tensor 'threshold'"):
        read_sae_checkpoint(jumprelu)


# --- the SAELens copy -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("subtracts", [True, False])
def test_the_saelens_copy_reads_back_to_identical_codes(tmp_path, architecture, subtracts):
    spec = SaeSpec(architecture, D, S, 4 if architecture in ("topk", "batchtopk") else 0, subtracts_b_dec=subtracts)
    tensors = weights(seed=4)
    if architecture in ("batchtopk", "jumprelu"):
        tensors["threshold"] = THRESHOLD
    sae = Sae.from_file_tensors(spec, tensors, tmp_path)
    assert export_saelens(sae, tmp_path / "saelens", {"note": "test"}) == ""
    read = read_sae_checkpoint(tmp_path / "saelens")
    assert read.subtracts_b_dec is subtracts
    x = torch.randn(64, D) * 2
    assert torch.equal(codes(read.model(subtracts), x), codes(sae, x))
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}.get(architecture, "jumprelu")
    assert cfg["metadata"]["note"] == "test"


def test_an_sae_saelens_cannot_express_gets_no_copy(tmp_path):
    sae = Sae.from_file_tensors(SaeSpec("topk", D, S, 4, relu_after_topk=False), weights(), tmp_path)
    assert "ReLU" in export_saelens(sae, tmp_path / "saelens", {})
    assert not (tmp_path / "saelens").exists()
