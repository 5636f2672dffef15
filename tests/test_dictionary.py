"""Dictionary features as units (dnd.dictionary): file layouts against reference formulas
written out here in numpy, NMF codes against scikit-learn, attaching to the toy CNN, and an
SAE trained on planted directions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dnd.dictionary.attach import attach, attached, detach
from dnd.dictionary.files import load_dictionary, save_dictionary
from dnd.dictionary.fit import fit_dictionary, sample_positions, train_sae
from dnd.dictionary.kinds import (
    Dictionary,
    DictionaryError,
    Directions,
    NMFDictionary,
    SparseAutoencoder,
)
from dnd.target import capture, hook_count

C, F_ = 12, 20  # channels and latents of the small random SAE files


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def relu(a):
    return np.maximum(a, 0.0)


def topk_rows(a, k):
    """Keep the k largest entries of each row (ReLU'd), zero the rest."""
    out = np.zeros_like(a)
    idx = np.argsort(-a, axis=1)[:, :k]
    rows = np.arange(a.shape[0])[:, None]
    out[rows, idx] = relu(a[rows, idx])
    return out


def encode(d: Dictionary, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return d.encode(torch.from_numpy(x)).numpy()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices only: one thread avoids waiting on a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def x():
    return _rand(np.random.default_rng(1), 50, C, scale=2.0)


# ----------------------------------------------------------------- SAELens folders


def _saelens(folder, cfg, tensors):
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()},
              str(folder / "sae_weights.safetensors"))
    return folder


def _sae_tensors(rng, **extra):
    t = {"W_enc": _rand(rng, C, F_, scale=0.5), "b_enc": _rand(rng, F_, scale=0.5),
         "W_dec": _rand(rng, F_, C), "b_dec": _rand(rng, C, scale=0.5)}
    t.update(extra)
    return t


def test_saelens_standard(tmp_path, x):
    t = _sae_tensors(np.random.default_rng(0))
    cfg = {"architecture": "standard", "d_in": C, "d_sae": F_, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "sae_lens_version": "6.5.0"}
    sae = load_dictionary(_saelens(tmp_path / "s", cfg, t))
    ref = relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    np.testing.assert_allclose(encode(sae, x), ref, rtol=1e-5, atol=1e-5)
    assert (ref > 0).any() and (ref == 0).any()
    # decode is the SAELens decoder: z @ W_dec + b_dec
    with torch.no_grad():
        rec = sae.decode(torch.from_numpy(ref)).numpy()
    np.testing.assert_allclose(rec, ref @ t["W_dec"] + t["b_dec"], rtol=1e-4, atol=1e-4)


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path, x):
    t = _sae_tensors(np.random.default_rng(2))
    cfg = {"architecture": "topk", "d_in": C, "d_sae": F_, "k": 4,
           "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": True,
           "normalize_activations": "none"}
    sae = load_dictionary(_saelens(tmp_path / "s", cfg, t))
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * np.linalg.norm(t["W_dec"], axis=1)
    ref = topk_rows(pre, 4)
    np.testing.assert_allclose(encode(sae, x), ref, rtol=1e-4, atol=1e-4)
    assert ((ref > 0).sum(1) <= 4).all()


def test_saelens_jumprelu_layer_norm_no_b_dec(tmp_path, x):
    rng = np.random.default_rng(3)
    t = _sae_tensors(rng, threshold=np.abs(_rand(rng, F_, scale=0.3)))
    cfg = {"architecture": "jumprelu", "d_in": C, "d_sae": F_, "apply_b_dec_to_input": False,
           "normalize_activations": "layer_norm"}
    sae = load_dictionary(_saelens(tmp_path / "s", cfg, t))
    xn = x - x.mean(1, keepdims=True)
    xn = xn / (xn.std(1, ddof=1, keepdims=True) + 1e-5)
    pre = xn @ t["W_enc"] + t["b_enc"]
    ref = relu(pre) * (pre > relu(t["threshold"]))
    np.testing.assert_allclose(encode(sae, x), ref, rtol=1e-4, atol=1e-4)
    assert ((pre > 0) & (pre <= t["threshold"])).any()  # the jump removes some latents


def test_saelens_pre_6_topk_config_and_log_threshold(tmp_path, x):
    rng = np.random.default_rng(4)
    t = _sae_tensors(rng)
    old = {"d_in": C, "d_sae": F_, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 3}, "normalize_activations": False}
    sae = load_dictionary(_saelens(tmp_path / "old", old, t))
    ref = topk_rows((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 3)
    np.testing.assert_allclose(encode(sae, x), ref, rtol=1e-4, atol=1e-4)
    log_t = _rand(rng, F_, scale=0.3) - 1.0
    t2 = _sae_tensors(rng, log_threshold=log_t)
    sae2 = load_dictionary(_saelens(tmp_path / "jr", {"architecture": "jumprelu", "d_in": C,
                                                      "d_sae": F_}, t2))
    pre = (x - t2["b_dec"]) @ t2["W_enc"] + t2["b_enc"]
    np.testing.assert_allclose(encode(sae2, x), relu(pre) * (pre > np.exp(log_t)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg, tensors_extra, message", [
    ({"normalize_activations": "expected_average_only_in"}, {}, "fold"),
    ({"architecture": "gated"}, {}, "gated"),
    ({"reshape_activations": "hook_z"}, {}, "hook_z"),
    ({}, {"r_mag": np.zeros(F_, np.float32)}, "r_mag"),
    ({"d_in": C + 1}, {}, "cfg.json says"),
])
def test_saelens_refuses_what_it_cannot_reproduce(tmp_path, cfg, tensors_extra, message):
    t = _sae_tensors(np.random.default_rng(5), **tensors_extra)
    folder = _saelens(tmp_path / "s", {"d_in": C, "d_sae": F_, **cfg}, t)
    with pytest.raises(DictionaryError, match=message):
        load_dictionary(folder)


# ----------------------------------------------------------------- dictionary_learning


def _dl(folder, state, dict_class=None):
    folder.mkdir()
    torch.save({k: torch.as_tensor(v) for k, v in state.items()}, folder / "ae.pt")
    if dict_class:
        (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": dict_class},
                                                        "buffer": {}}))
    return folder


def test_dictionary_learning_layouts(tmp_path, x):
    rng = np.random.default_rng(6)
    enc_w, enc_b = _rand(rng, F_, C, scale=0.5), _rand(rng, F_, scale=0.5)
    dec_w, bias = _rand(rng, C, F_), _rand(rng, C, scale=0.5)

    ae = load_dictionary(_dl(tmp_path / "std", {"encoder.weight": enc_w, "encoder.bias": enc_b,
                                                "decoder.weight": dec_w, "bias": bias}))
    np.testing.assert_allclose(encode(ae, x), relu((x - bias) @ enc_w.T + enc_b), rtol=1e-5,
                               atol=1e-5)

    new = load_dictionary(_dl(tmp_path / "new", {"encoder.weight": enc_w, "encoder.bias": enc_b,
                                                 "decoder.weight": dec_w,
                                                 "decoder.bias": bias}))
    np.testing.assert_allclose(encode(new, x), relu(x @ enc_w.T + enc_b), rtol=1e-5, atol=1e-5)

    topk_state = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w,
                  "b_dec": bias, "k": torch.tensor(3, dtype=torch.int),
                  "threshold": torch.tensor(0.4)}
    post_relu = relu((x - bias) @ enc_w.T + enc_b)
    topk = load_dictionary(_dl(tmp_path / "topk", topk_state, "AutoEncoderTopK") / "ae.pt")
    np.testing.assert_allclose(encode(topk, x), topk_rows(post_relu, 3), rtol=1e-5, atol=1e-5)
    batch = load_dictionary(_dl(tmp_path / "batch", topk_state, "BatchTopKSAE"))
    np.testing.assert_allclose(encode(batch, x), post_relu * (post_relu > 0.4), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(DictionaryError, match="config.json"):
        load_dictionary(_dl(tmp_path / "noconfig", topk_state))


def test_dictionary_learning_jumprelu_and_matryoshka(tmp_path, x):
    rng = np.random.default_rng(7)
    w_enc, b_enc = _rand(rng, C, F_, scale=0.5), _rand(rng, F_, scale=0.5)
    w_dec, b_dec = _rand(rng, F_, C), _rand(rng, C, scale=0.5)
    thr = _rand(rng, F_, scale=0.4)  # some negative: relu(pre * (pre > t)) must still hold
    jump = load_dictionary(_dl(tmp_path / "jump", {"W_enc": w_enc, "b_enc": b_enc,
                                                   "W_dec": w_dec, "b_dec": b_dec,
                                                   "threshold": thr}))
    pre = x @ w_enc + b_enc  # JumpReluAutoEncoder does not subtract b_dec by default
    np.testing.assert_allclose(encode(jump, x), relu(pre * (pre > thr)), rtol=1e-5, atol=1e-5)

    mat = load_dictionary(_dl(tmp_path / "mat", {
        "W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec,
        "k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(0.3),
        "group_sizes": torch.tensor([5, 15])}))
    post = relu((x - b_dec) @ w_enc + b_enc)
    np.testing.assert_allclose(encode(mat, x), post * (post > 0.3), rtol=1e-5, atol=1e-5)

    gated = {"encoder.weight": w_enc.T, "decoder.weight": w_dec.T, "decoder_bias": b_dec,
             "r_mag": b_enc, "gate_bias": b_enc, "mag_bias": b_enc}
    with pytest.raises(DictionaryError, match="GatedAutoEncoder"):
        load_dictionary(_dl(tmp_path / "gated", gated))


# ----------------------------------------------------------------- generic and dnd files


def test_generic_safetensors(tmp_path, x):
    rng = np.random.default_rng(8)
    t = {"W_enc": _rand(rng, C, F_, scale=0.5), "b_enc": _rand(rng, F_, scale=0.5),
         "b_dec": _rand(rng, C, scale=0.5)}
    save_file({k: torch.from_numpy(v) for k, v in t.items()}, str(tmp_path / "relu.safetensors"))
    sae = load_dictionary(tmp_path / "relu.safetensors")
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    np.testing.assert_allclose(encode(sae, x), relu(pre), rtol=1e-5, atol=1e-5)

    thr = np.abs(_rand(rng, F_, scale=0.5))
    save_file({**{k: torch.from_numpy(v) for k, v in t.items()},
               "threshold": torch.from_numpy(thr)}, str(tmp_path / "jump.safetensors"))
    np.testing.assert_allclose(encode(load_dictionary(tmp_path / "jump.safetensors"), x),
                               relu(pre) * (pre > thr), rtol=1e-5, atol=1e-5)

    save_file({**{k: torch.from_numpy(v) for k, v in t.items()}, "k": torch.tensor(2)},
              str(tmp_path / "topk.safetensors"))
    np.testing.assert_allclose(encode(load_dictionary(tmp_path / "topk.safetensors"), x),
                               topk_rows(pre, 2), rtol=1e-5, atol=1e-5)

    save_file({"W_enc": torch.from_numpy(t["W_enc"].T.copy()),
               "b_enc": torch.from_numpy(t["b_enc"])}, str(tmp_path / "transposed.safetensors"))
    with pytest.raises(DictionaryError, match=r"W_enc must be \[d_in, d_sae\]"):
        load_dictionary(tmp_path / "transposed.safetensors")


def test_directions_files_and_dot_product(tmp_path, x):
    rng = np.random.default_rng(9)
    w, b = _rand(rng, 5, C), _rand(rng, 5)
    np.save(tmp_path / "d.npy", w)
    torch.save(torch.from_numpy(w), tmp_path / "d.pt")
    save_file({"directions": torch.from_numpy(w), "bias": torch.from_numpy(b)},
              str(tmp_path / "db.safetensors"))
    for name in ("d.npy", "d.pt"):
        d = load_dictionary(tmp_path / name)
        assert isinstance(d, Directions)
        np.testing.assert_allclose(encode(d, x), x @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(encode(load_dictionary(tmp_path / "db.safetensors"), x),
                               x @ w.T + b, rtol=1e-5, atol=1e-5)
    # Every layout: conv maps, linear vectors and tokens, per position.
    d = Directions(w, b)
    h4 = torch.randn(2, C, 3, 4)
    np.testing.assert_allclose(d(h4).numpy(), np.einsum("bchw,fc->bfhw", h4.numpy(), w)
                               + b[None, :, None, None], rtol=1e-5, atol=1e-5)
    h3 = torch.randn(2, 7, C)
    np.testing.assert_allclose(d(h3).numpy(), h3.numpy() @ w.T + b, rtol=1e-5, atol=1e-5)
    assert d(torch.randn(3, C)).shape == (3, 5)
    save_file({"a": torch.zeros(2, C), "b": torch.zeros(3, C)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(DictionaryError, match="Known layouts"):
        load_dictionary(tmp_path / "two.safetensors")


def test_unknown_layout_names_the_known_ones(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictionaryError, match="SAELens.*dictionary_learning.*overcomplete"):
        load_dictionary(tmp_path / "empty")
    (tmp_path / "w.txt").write_text("1 2 3")
    with pytest.raises(DictionaryError, match="unknown file type"):
        load_dictionary(tmp_path / "w.txt")
    # A whole pickled module (how overcomplete saves SAEs) is refused, not unpickled.
    torch.save(torch.nn.Linear(C, 4), tmp_path / "module.pt")
    with pytest.raises(DictionaryError, match="not a tensors-only torch file.*overcomplete"):
        load_dictionary(tmp_path / "module.pt")


def test_save_and_load_round_trip(tmp_path, x):
    rng = np.random.default_rng(10)
    dicts = [
        Directions(_rand(rng, 4, C), _rand(rng, 4)),
        NMFDictionary(np.abs(_rand(rng, 5, C)), n_iter=50),
        SparseAutoencoder(_rand(rng, C, F_), _rand(rng, F_), b_pre=_rand(rng, C),
                          activation="jumprelu", threshold=np.abs(_rand(rng, F_)),
                          W_dec=_rand(rng, F_, C), input_norm="constant_norm_rescale",
                          info={"note": "x"}),
    ]
    xp = np.abs(x)
    for i, d in enumerate(dicts):
        back = load_dictionary(save_dictionary(d, tmp_path / f"{i}.safetensors"))
        assert type(back) is type(d) and back.fingerprint() == d.fingerprint()
        np.testing.assert_array_equal(encode(back, xp), encode(d, xp))
    changed = SparseAutoencoder(dicts[2].W_enc * 1.001, dicts[2].b_enc, b_pre=dicts[2].b_pre,
                                activation="jumprelu", threshold=dicts[2].threshold,
                                W_dec=dicts[2].W_dec, input_norm="constant_norm_rescale")
    assert changed.fingerprint() != dicts[2].fingerprint()


# ----------------------------------------------------------------- NMF


def _nmf_data(seed=0, n=1500, c=32, f=8):
    rng = np.random.default_rng(seed)
    h = rng.gamma(0.5, 1.0, (f, c)) * (rng.random((f, c)) < 0.5)
    w = rng.gamma(0.5, 1.0, (n, f)) * (rng.random((n, f)) < 0.4)
    return np.maximum(w @ h + 0.05 * rng.standard_normal((n, c)), 0).astype(np.float32)


def test_nmf_codes_match_sklearn_transform_on_held_out_rows():
    from sklearn.decomposition import NMF

    data = _nmf_data()
    train, held = data[:1000], data[1000:]
    model = NMF(n_components=8, init="nndsvda", random_state=0, max_iter=1000,
                tol=1e-6).fit(train)
    ref = model.transform(held)
    d = NMFDictionary.from_sklearn(model)
    assert (d.components >= 0).all()
    codes = encode(d, held)
    assert (codes >= 0).all() and (ref > 0).mean() > 0.2
    rel = np.linalg.norm(codes - ref) / np.linalg.norm(ref)
    assert rel < 1e-3, rel
    assert np.abs(codes - ref).max() < 1e-3 * np.abs(ref).max()
    # fit_dictionary fits the same kind of model
    fitted = fit_dictionary("nmf", train, 8, seed=0)
    assert isinstance(fitted, NMFDictionary) and fitted.components.shape == (8, 32)
    assert (fitted.components >= 0).all()


def test_nmf_refuses_negative_inputs_and_has_exact_gradients():
    data = _nmf_data(1, n=300, c=10, f=4)
    d = NMFDictionary.fit(data, 4, seed=0, max_iter=3000)
    with pytest.raises(DictionaryError, match="post-ReLU"):
        d.encode(torch.from_numpy(data - 1.0))
    with pytest.raises(DictionaryError, match="non-negative"):
        fit_dictionary("nmf", data - 1.0, 4)
    d64 = d.double()
    x = torch.from_numpy(data[:6].astype(np.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(d64.encode, (x,), eps=1e-6, atol=1e-5)
    d64.encode(x).sum().backward()
    assert x.grad.abs().sum() > 0


# ----------------------------------------------------------------- attaching to a target


@pytest.fixture(scope="module")
def toy():
    from dnd.target import load_target

    return load_target("toyworld-cnn")


def _images(seed=0, n=2):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_attach_gives_feature_maps_and_leaves_outputs_unchanged(toy):
    rng = np.random.default_rng(11)
    x = _images()
    base_hooks = hook_count(toy.module)
    with torch.no_grad():
        before = toy.module(x)
        with capture(toy.module, {n: toy.layer(n) for n in ("conv3", "conv4", "fc")}) as o:
            toy.module(x)
        layer_out = {k: v.clone() for k, v in o.items()}
    dicts = {"conv3": Directions(_rand(rng, 7, 64)),  # conv3 is an nn.Sequential
             "conv4": train_sae(_rand(rng, 500, 128), 10, k=2, steps=5),
             "fc": Directions(_rand(rng, 3, 64), _rand(rng, 3))}
    handles = [attach(toy, layer, d, name="feat") for layer, d in dicts.items()]
    assert hook_count(toy.module) == base_hooks + 3
    assert set(attached(toy)) == {"conv3.feat", "conv4.feat", "fc.feat"}
    names = [h.layer for h in handles]
    with torch.no_grad():
        plain = toy.module(x)
        with capture(toy.module, {n: toy.layer(n) for n in names}) as outs:
            during = toy.module(x)
    assert torch.equal(before, plain) and torch.equal(before, during)
    assert outs["conv3.feat"].shape == (2, 7, 8, 8)
    assert outs["conv4.feat"].shape == (2, 10, 8, 8)
    assert outs["fc.feat"].shape == (2, 3)
    with torch.no_grad():
        for layer, d in dicts.items():
            np.testing.assert_allclose(outs[f"{layer}.feat"].numpy(), d(layer_out[layer]).numpy(),
                                       rtol=1e-5, atol=1e-5)
    for h in handles:
        detach(h)
        h.remove()  # idempotent
    assert hook_count(toy.module) == base_hooks
    assert not attached(toy) and not hasattr(toy.layer("conv3"), "feat")
    assert all(not d._forward_hooks for d in dicts.values())
    with pytest.raises(ValueError, match="conv3.feat"):
        toy.layer("conv3.feat")
    with torch.no_grad():
        assert torch.equal(toy.module(x), before)


def test_attached_dictionary_runs_only_when_read(toy):
    calls = []

    class Counting(Directions):
        def encode(self, x):
            calls.append(x.shape[0])
            return super().encode(x)

    with attach(toy, "conv4", Counting(torch.randn(2, 128)), "cnt") as h:
        assert calls == [8 * 8]  # attach's own check on one blank image
        calls.clear()
        with torch.no_grad():
            toy.module(_images())
            assert not calls
            with capture(toy.module, {h.layer: toy.layer(h.layer)}):
                toy.module(_images())
    assert calls == [2 * 8 * 8]
    assert "conv4.cnt" not in attached(toy)


def test_attach_checks_the_channel_count_and_nmf_sign(toy, tmp_path):
    np.save(tmp_path / "dirs.npy", np.ones((5, 10), np.float32))
    base = hook_count(toy.module)
    with pytest.raises(DictionaryError, match=r"dirs\.npy.*\[5, 10\].*\[F, 64\]"):
        attach(toy, "conv3", load_dictionary(tmp_path / "dirs.npy"), "d")
    # conv3.1 is the BatchNorm before the ReLU: negative values.
    nmf = NMFDictionary(np.ones((3, 64), np.float32))
    with pytest.raises(DictionaryError, match="post-ReLU"):
        attach(toy, "conv3.1", nmf, "nmf")
    with pytest.raises(DictionaryError, match="Python identifier"):
        attach(toy, "conv3", Directions(torch.ones(2, 64)), "a.b")
    with attach(toy, "conv3", Directions(torch.ones(2, 64)), "dup"):
        with pytest.raises(DictionaryError, match="already has an attribute 'dup'"):
            attach(toy, "conv3", Directions(torch.ones(2, 64)), "dup")
    assert hook_count(toy.module) == base and not attached(toy)


def test_gradients_flow_through_attached_dictionaries(toy):
    w = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    x = _images(1).requires_grad_(True)
    with attach(toy, "conv3", Directions(w), "dir") as h:
        with capture(toy.module, {h.layer: toy.layer(h.layer)}) as outs:
            toy.module(x)
        outs[h.layer][:, 2].sum().backward()
    g_dict = x.grad.clone()
    x.grad = None
    with capture(toy.module, {"conv3": toy.layer("conv3")}) as outs:
        toy.module(x)
    torch.einsum("bchw,c->b", outs["conv3"], w[2]).sum().backward()
    assert g_dict.abs().sum() > 0
    torch.testing.assert_close(g_dict, x.grad)

    rng = np.random.default_rng(12)
    for d in (train_sae(np.abs(_rand(rng, 400, 128)), 16, k=4, steps=20),
              NMFDictionary(np.abs(_rand(rng, 4, 128)), n_iter=50)):
        x.grad = None
        with attach(toy, "conv4", d, "f") as h:
            with capture(toy.module, {h.layer: toy.layer(h.layer)}) as outs:
                toy.module(x)
            outs[h.layer].sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------- sampling and fitting


def test_sample_positions_are_seeded_channel_vectors(toy):
    from dnd.probe import open_probe

    probe = open_probe("toyworld:6")
    s = sample_positions(toy, probe, "conv3", max_samples=100, seed=0, batch_size=4)
    assert s.shape == (100, 64) and s.dtype == np.float32
    np.testing.assert_array_equal(s, sample_positions(toy, probe, "conv3", 100, seed=0))
    assert not np.array_equal(s, sample_positions(toy, probe, "conv3", 100, seed=1))
    full = sample_positions(toy, probe, "conv3", max_samples=10_000)
    assert full.shape == (6 * 8 * 8, 64)
    # Every sampled row is one of the layer's position vectors.
    dist = ((s[:, None, :] - full[None, :, :]) ** 2).sum(-1).min(1)
    assert dist.max() < 1e-8
    assert sample_positions(toy, probe, "fc", 100).shape == (6, 64)

    nmf = fit_dictionary("nmf", sample_positions(toy, probe, "conv4", 300), 6, seed=0)
    with attach(toy, "conv4", nmf, "nmf") as h, torch.no_grad():
        with capture(toy.module, {h.layer: toy.layer(h.layer)}) as outs:
            toy.module(_images())
    assert outs["conv4.nmf"].shape == (2, 6, 8, 8) and (outs["conv4.nmf"] >= 0).all()


def _planted(seed, n=6000, c=64, d=32, active=3):
    """Samples that are sparse non-negative mixes of ``d`` known unit directions."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((d, c))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    coef = np.zeros((n, d))
    for i in range(n):
        coef[i, rng.choice(d, active, replace=False)] = rng.uniform(0.5, 2.0, active)
    x = coef @ dirs + 0.02 * rng.standard_normal((n, c)) + 0.3
    return x.astype(np.float32), dirs


def test_topk_sae_recovers_planted_directions():
    x, dirs = _planted(0)
    sae = fit_dictionary("sae", x, 64, seed=0, k=3, steps=600, batch_size=256)
    assert isinstance(sae, SparseAutoencoder) and sae.activation == "topk"
    dec = sae.W_dec.numpy() / np.linalg.norm(sae.W_dec.numpy(), axis=1, keepdims=True)
    best = (dirs @ dec.T).max(1)
    assert (best > 0.9).mean() >= 0.9, np.sort(best)[:8]
    # It reads raw activations: reconstruction explains most of the variance, k per row.
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x[:500]))
        rec = sae.decode(z).numpy()
    assert ((z > 0).sum(1) <= 3).all()
    fvu = ((rec - x[:500]) ** 2).sum() / ((x[:500] - x[:500].mean(0)) ** 2).sum()
    assert fvu < 0.1, fvu
    # Same seed, same SAE; another seed, another one.
    short = [train_sae(x[:1000], 16, k=2, steps=20, seed=s) for s in (0, 0, 1)]
    assert short[0].fingerprint() == short[1].fingerprint() != short[2].fingerprint()


def test_train_sae_arguments():
    x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    with pytest.raises(DictionaryError, match="exactly one"):
        train_sae(x, 4)
    with pytest.raises(DictionaryError, match="exactly one"):
        train_sae(x, 4, k=2, l1=0.1)
    with pytest.raises(DictionaryError, match="k=9"):
        train_sae(x, 4, k=9)
    with pytest.raises(DictionaryError, match="unknown dictionary kind"):
        fit_dictionary("pca", x, 4)
    relu_sae = train_sae(x, 16, l1=1.0, steps=50)
    assert relu_sae.activation == "relu" and relu_sae.k is None
    with torch.no_grad():
        assert (relu_sae.encode(torch.from_numpy(x)) >= 0).all()
