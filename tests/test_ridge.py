"""Tests of the ridge solver: the kernels against numpy's per-pixel closed form on explicitly built
design matrices, the streaming API, lambda selection against brute force, bad inputs, and the
ops' registrations."""

import copy
import math
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import reggan_ext.ridge
from reggan_ext import LocalRegression, RidgeFitter, fit_local_regression, ridge_loss
from reggan_ext.ridge import _unpack, ridge_solve_reference, ridge_statistics_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_NUMPY_PAD = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


# numpy oracle ---------------------------------------------------------------------------------


def _pads(layer):
    """(top, bottom, left, right) from the layer's arguments, by nn.Conv2d's rules."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        sides = []
        for k, d in zip(layer.kernel_size, layer.dilation):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return tuple(sides)
    ph, pw = layer.padding
    return (ph, ph, pw, pw)


def numpy_design(layer, x):
    """Design matrices Z (groups, H_out, W_out, N, D) built sample by sample from the layer's
    semantics: the taps each output pixel reads (padded by padding_mode), then 1 for a bias."""
    x = np.asarray(x.detach().cpu().double())
    top, bottom, left, right = _pads(layer)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), _NUMPY_PAD[layer.padding_mode])
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    assert (h_out, w_out) == layer.output_size
    cg = layer.in_channels // layer.groups
    n = x.shape[0]
    columns = []
    for c in range(cg):
        for u in range(kh):
            for v in range(kw):
                rows = np.arange(h_out) * sh + u * dh
                cols = np.arange(w_out) * sw + v * dw
                taps = [xp[:, g * cg + c][:, rows][:, :, cols] for g in range(layer.groups)]
                columns.append(np.stack(taps))                      # (groups, N, H_out, W_out)
    if layer.bias is not None:
        columns.append(np.ones((layer.groups, n, h_out, w_out)))
    z = np.stack(columns, -1)                                       # (groups, N, H, W, D)
    return z.transpose(0, 2, 3, 1, 4)


def numpy_targets(layer, y):
    """(groups, H_out, W_out, N, C_out/groups)."""
    y = np.asarray(y.detach().cpu().double())
    n, c, h, w = y.shape
    return y.reshape(n, layer.groups, c // layer.groups, h, w).transpose(1, 3, 4, 0, 2)


def numpy_penalty(layer, penalize_bias):
    d = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    diag = np.ones(d + (layer.bias is not None))
    if layer.bias is not None and not penalize_bias:
        diag[-1] = 0
    return np.diag(diag)


def numpy_fit(layer, x, y, lam, penalize_bias=True):
    """Per-pixel closed form with np.linalg.solve: (weight, bias) in the layer's layout."""
    z, t = numpy_design(layer, x), numpy_targets(layer, y)
    zt = np.swapaxes(z, -1, -2)
    w = np.linalg.solve(zt @ z + lam * numpy_penalty(layer, penalize_bias), zt @ t)
    groups, h, wd, d, og = w.shape
    w = w.transpose(0, 4, 3, 1, 2).reshape(groups * og, d, h, wd)
    taps = d - (layer.bias is not None)
    weight = w[:, :taps].reshape(tuple(layer.weight.shape))
    return weight, (w[:, taps] if layer.bias is not None else None)


def numpy_statistics(layer, x, y):
    z, t = numpy_design(layer, x), numpy_targets(layer, y)
    groups, h, w, n, d = z.shape
    full = np.einsum("ghwna,ghwnb->gabhw", z, z)
    rows, cols = np.tril_indices(d)
    cross = np.einsum("ghwna,ghwno->goahw", z, t).reshape(-1, d, h, w)
    return {"gram": full[:, rows, cols], "cross": cross,
            "target_sq": (t ** 2).sum(3).transpose(0, 3, 1, 2).reshape(-1, h, w)}


def assert_close(actual, expected, rtol, atol_scale=None):
    actual = np.asarray(actual.detach().cpu().double()) if isinstance(actual, torch.Tensor) \
        else actual
    scale = np.abs(expected).max() if atol_scale is None else atol_scale
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-300))


def assert_states_equal(got, want, **tolerances):
    """RidgeFitter state dicts: the same geometry, and statistics equal within tolerances."""
    assert got.keys() == want.keys() and got["geometry"] == want["geometry"]
    for key in want.keys() - {"geometry"}:
        torch.testing.assert_close(got[key].cpu(), want[key], **tolerances)


def make_layer(cin=2, cout=2, k=3, size=(7, 9), dtype=torch.float64, device="cpu", **kw):
    return LocalRegression(cin, cout, k, size, dtype=dtype, device=device, **kw)


def make_data(layer, n, seed=0, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layer.in_channels, *layer.input_size, generator=gen, dtype=dtype)
    y = torch.randn(n, layer.out_channels, *layer.output_size, generator=gen, dtype=dtype)
    return x.to(device), y.to(device)


GEOMETRIES = [
    dict(),
    dict(k=1),
    dict(k=(2, 3), size=(6, 8)),
    dict(stride=2),
    dict(stride=(3, 2), size=(10, 9)),
    dict(padding=1),
    dict(padding=(2, 0)),
    dict(padding="same"),
    dict(k=4, padding="same", size=(6, 7)),
    dict(k=(2, 3), padding="same", dilation=(3, 2), size=(9, 8)),
    dict(padding="valid", dilation=2),
    dict(padding=1, padding_mode="reflect"),
    dict(padding="same", padding_mode="replicate", k=4, size=(6, 9)),
    dict(padding=(1, 2), padding_mode="circular"),
    dict(cin=4, cout=4, groups=4),
    dict(cin=4, cout=6, groups=2, padding=1),
    dict(cin=3, cout=2, groups=1, padding="same", k=(3, 1)),
    dict(bias=False, padding=1),
    dict(bias=False, cin=2, cout=4, groups=2, stride=2, padding=2, padding_mode="reflect"),
    dict(size=(1, 13), k=(1, 3), padding=(0, 1)),
    dict(size=(17, 3), k=(3, 1), stride=(2, 1)),
]


# Statistics and closed form --------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_statistics_match_numpy_and_reference(geometry, device):
    layer = make_layer(device=device, **geometry)
    x, y = make_data(layer, 11, device=device)
    fitter = RidgeFitter(layer).update(x, y)
    expected = numpy_statistics(layer, x, y)
    reference = ridge_statistics_reference(layer, x, y)
    for key, value in expected.items():
        assert_close(fitter.statistics[key], value, 1e-12)
        assert_close(reference[key], value, 1e-12)
    assert fitter.count == 11


@pytest.mark.parametrize("geometry, samples", [
    (dict(cin=8, cout=3, groups=1, k=5, padding=2, size=(4, 37)), 5),
    (dict(cin=1, cout=1, k=7, padding=3, size=(3, 430)), 5),
    (dict(cin=3, cout=3, groups=3, k=3, padding="same", size=(10, 37)), 70),
    (dict(cin=2, cout=4, groups=2, k=5, padding=2, stride=(2, 1), size=(11, 21)), 70),
    (dict(cin=2, cout=2, groups=2, k=(3, 2), dilation=(2, 3), padding=(2, 1), size=(9, 19)), 70),
    (dict(cin=1, cout=3, k=7, padding=3, size=(6, 300)), 70),
    (dict(cin=4, cout=2, groups=2, k=3, padding=1, size=(7, 18)), 70),
    (dict(cin=4, cout=2, groups=2, k=5, padding=2, size=(9, 41)), 70),
    (dict(cin=3, cout=2, groups=1, k=(5, 3), dilation=(1, 2), padding=(2, 2), size=(10, 45)), 66)],
    ids=["201-unknowns", "50-unknowns", "per-channel-k3", "per-channel-k5-strided",
         "per-channel-dilated", "one-input-three-outputs-k7", "two-inputs-per-group",
         "two-inputs-per-group-k5", "three-inputs-dilated"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_statistics_over_segments_bands_and_passes(geometry, samples, dtype, device):
    """Where the CPU kernel splits its work: design rows long enough and output rows wide
    enough that a row is split into segments of one or several vectors of pixels, the last one
    partial (on CPUs with up to 2 MiB of L2, whose size sets the segments); output heights that
    its bands of rows do not divide; more samples than one pass takes. With one input channel
    per group it sums products that the entries of neighbouring rows and columns share; with
    up to six, in batches of 64 samples or more, where that saves enough multiply-adds (the
    last three layers here); otherwise the Gram's entries."""
    layer = make_layer(device=device, **geometry)
    x, y = make_data(layer, samples, device=device)
    stats = RidgeFitter(layer, dtype=dtype).update(x.to(dtype), y.to(dtype)).statistics
    expected = numpy_statistics(layer, x.to(dtype), y.to(dtype))
    for key, value in expected.items():
        assert_close(stats[key], value, 1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("penalize_bias", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_solve_matches_numpy_closed_form(geometry, penalize_bias, device):
    layer = make_layer(device=device, **geometry)
    x, y = make_data(layer, 13, seed=1, device=device)
    lam = 0.7
    weight, bias = RidgeFitter(layer, penalize_bias=penalize_bias).update(x, y).solve(lam)
    expected_w, expected_b = numpy_fit(layer, x, y, lam, penalize_bias)
    assert weight.shape == layer.weight.shape and weight.dtype == torch.float64
    assert_close(weight, expected_w, 1e-9)
    if layer.bias is None:
        assert bias is None
    else:
        assert bias.shape == layer.bias.shape
        assert_close(bias, expected_b, 1e-9)


@pytest.fixture
def one_update_per_batch(monkeypatch):
    """Every batch is summed by an update of its own: none are gathered (RidgeFitter.update)."""
    monkeypatch.setattr(reggan_ext.ridge, "_GATHER_BYTES", 0)


def test_accumulation_ways_agree(one_update_per_batch):
    """Two input channels per group: one batch of 70 samples sums the products that neighbouring
    pixels share, two of 35 the Gram's entries. Both give numpy's statistics."""
    layer = make_layer(cin=4, cout=2, groups=2, k=5, padding=2, size=(9, 41))
    x, y = make_data(layer, 70)
    whole = RidgeFitter(layer).update(x, y).statistics
    halves = RidgeFitter(layer).update(x[:35], y[:35]).update(x[35:], y[35:]).statistics
    for key, value in numpy_statistics(layer, x, y).items():
        assert_close(whole[key], value, 1e-12)
        assert_close(halves[key], value, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_statistics_do_not_depend_on_threads(dtype):
    """The per-channel layer's tasks own bands of 8 output rows where each thread gets 4 tasks
    or more, else bands of 4: here one thread takes the bands of 8 (12 output rows, the last
    band short) and two threads those of 4. Every entry sums its samples in order either way:
    the statistics agree bit for bit, and with numpy's."""
    layer = make_layer(cin=3, cout=3, groups=3, k=3, padding="same", size=(12, 37))
    x, y = make_data(layer, 21, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = RidgeFitter(layer, dtype=dtype).update(x, y).statistics
        torch.set_num_threads(2)
        two = RidgeFitter(layer, dtype=dtype).update(x, y).statistics
    finally:
        torch.set_num_threads(threads)
    for key, value in numpy_statistics(layer, x, y).items():
        assert torch.equal(one[key], two[key]), key
        assert_close(one[key], value, 1e-12 if dtype == torch.float64 else 1e-5)


def _random_geometry(rng):
    groups = rng.choice([1, 2, 3])
    cin, cout = groups * rng.randint(1, 2), groups * rng.randint(1, 2)
    k = (rng.randint(1, 4), rng.randint(1, 4))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    size = (rng.randint(4, 10), rng.randint(4, 12))
    padding_mode = rng.choice(["zeros", "reflect", "replicate", "circular"])
    if rng.random() < 0.3:
        padding, stride = "same", (1, 1)
    else:
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        padding = (rng.randint(0, 2), rng.randint(0, 2))
    # reflect needs the padding below the size; every mode needs the kernel to fit.
    extent = [d * (kk - 1) + 1 for d, kk in zip(dilation, k)]
    if any(e > s for e, s in zip(extent, size)):
        dilation = (1, 1)
    return dict(cin=cin, cout=cout, groups=groups, k=k, dilation=dilation, size=size,
                stride=stride, padding=padding, padding_mode=padding_mode,
                bias=rng.random() < 0.7)


@pytest.mark.parametrize("seed", range(40))
def test_random_geometries_match_numpy(seed):
    rng = random.Random(seed)
    geometry = _random_geometry(rng)
    layer = make_layer(**geometry)
    n = rng.choice([1, 2, 5, 17])
    x, y = make_data(layer, n, seed=seed)
    penalize_bias = rng.random() < 0.5
    lam = rng.choice([0.05, 1.0, 20.0])
    weight, bias = RidgeFitter(layer, penalize_bias=penalize_bias).update(x, y).solve(lam)
    expected_w, expected_b = numpy_fit(layer, x, y, lam, penalize_bias)
    # A free bias with one sample fits y alone: the weights are 0 up to rounding.
    scale = max(np.abs(expected_w).max(), 0 if bias is None else np.abs(expected_b).max())
    assert_close(weight, expected_w, 1e-8, scale)
    if bias is not None:
        assert_close(bias, expected_b, 1e-8, scale)


def test_unregularized_fit_recovers_exact_weights():
    """lam = 0 with more samples than unknowns: the fit recovers the weights that generated y."""
    # Circular padding: replicate and reflect padding make border taps duplicates of each other.
    layer = make_layer(cin=2, cout=4, groups=2, padding=1, padding_mode="circular")
    x, _ = make_data(layer, 40)
    with torch.no_grad():
        y = layer(x)
    weight, bias = RidgeFitter(layer).update(x, y).solve(0)
    torch.testing.assert_close(weight, layer.weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bias, layer.bias, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("geometry, samples", [
    (dict(cin=3, cout=3, groups=3, k=5, size=(9, 10)), 9),
    (dict(cin=4, cout=2, groups=2, k=5, size=(9, 41)), 70),
    (dict(cin=3, cout=2, groups=1, k=3, size=(9, 10)), 9)],
    ids=["per-channel", "two-inputs-per-group", "three-inputs-few-samples"])
@pytest.mark.parametrize("device", DEVICES)
def test_float32_input_gives_exact_float64_statistics(geometry, samples, device):
    """The CPU accumulation keeps float32 data as float32 in its scratch and converts it as the
    sums load it, in each of its ways to sum: products of one or of two input channels per
    group, and the Gram's entries over a few samples."""
    layer = make_layer(padding="same", device=device, **geometry)
    x, y = make_data(layer, samples, dtype=torch.float32, device=device)
    single = RidgeFitter(layer).update(x, y).statistics
    double = RidgeFitter(layer).update(x.double(), y.double()).statistics
    for key in ("gram", "cross", "target_sq"):
        assert single[key].dtype == torch.float64
        # Products of floats are exact in double; only the summation order could differ.
        torch.testing.assert_close(single[key], double[key], rtol=1e-14, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_statistics_within_documented_tolerance(device):
    layer = make_layer(cin=2, cout=2, groups=2, k=3, padding=1, size=(8, 9),
                       dtype=torch.float32, device=device)
    x, y = make_data(layer, 64, dtype=torch.float32, device=device)
    fitter = RidgeFitter(layer, dtype=torch.float32).update(x, y)
    assert fitter.statistics["gram"].dtype == torch.float32
    weight, bias = fitter.solve(1.0)
    assert weight.dtype == torch.float32
    expected_w, expected_b = numpy_fit(layer, x, y, 1.0)
    assert_close(weight, expected_w, 1e-3)
    assert_close(bias, expected_b, 1e-3)
    # float64 input is cast to the float32 statistics.
    weight64, _ = RidgeFitter(layer, dtype=torch.float32).update(x.double(), y.double()).solve(1.0)
    torch.testing.assert_close(weight64, weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_channels_last_inputs(device, dtype):
    layer = make_layer(cin=2, cout=4, groups=2, padding=1, device=device)
    x, y = make_data(layer, 6, device=device)
    x, y = x.to(dtype), y.to(dtype)
    expected = RidgeFitter(layer, dtype=dtype).update(x, y).statistics
    wide_x = torch.randn(6, 2, 7, 18, dtype=dtype, device=device)
    wide_x[..., ::2] = x
    for xs, ys in [(wide_x[..., ::2], y.transpose(2, 3).contiguous().transpose(2, 3)),
                   (x.contiguous(memory_format=torch.channels_last),
                    y.contiguous(memory_format=torch.channels_last))]:
        assert not xs.is_contiguous() and not ys.is_contiguous()
        got = RidgeFitter(layer, dtype=dtype).update(xs, ys).statistics
        for key in ("gram", "cross", "target_sq"):
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


# Streaming --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "one_update_per_batch"])
@pytest.mark.parametrize("device", DEVICES)
def test_uneven_batches_merge_and_state_dict(device, gather, monkeypatch):
    if not gather:
        monkeypatch.setattr(reggan_ext.ridge, "_GATHER_BYTES", 0)
    layer = make_layer(cin=2, cout=2, groups=2, k=3, padding="same", padding_mode="reflect",
                       device=device)
    x, y = make_data(layer, 23, device=device)
    whole = RidgeFitter(layer).update(x, y)
    pieces = RidgeFitter(layer)
    for a, b in [(0, 0), (0, 1), (1, 8), (8, 8), (8, 15), (15, 23)]:
        pieces.update(x[a:b], y[a:b])
    first, second = RidgeFitter(layer).update(x[:5], y[:5]), RidgeFitter(layer).update(x[5:], y[5:])
    merged = first.merge(second)
    resumed = RidgeFitter(layer).load_state_dict(RidgeFitter(layer).update(x[:9], y[:9])
                                                 .state_dict()).update(x[9:], y[9:])
    expected = whole.solve(0.5)
    for other in (pieces, merged, resumed):
        assert other.count == 23
        for key in ("gram", "cross", "target_sq"):
            torch.testing.assert_close(other.statistics[key], whole.statistics[key], rtol=1e-13,
                                       atol=1e-12)
        for got, want in zip(other.solve(0.5), expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_small_cpu_batches_are_gathered_for_one_update(monkeypatch):
    """Small batches are copied side by side and summed by one update when their space is full
    or the statistics are read; a batch too large for half the space is summed at once. The
    statistics equal those of the updates that summed them, bitwise, whatever the caller does
    to its tensors afterwards."""
    layer = make_layer(cin=2, cout=2, groups=2, k=3, padding="same", padding_mode="reflect")
    x, y = make_data(layer, 16)
    sample_bytes = (x[0].numel() + y[0].numel()) * x.element_size()
    monkeypatch.setattr(reggan_ext.ridge, "_GATHER_BYTES", 8 * sample_bytes)  # 8 samples
    gathered = RidgeFitter(layer)
    for a, b in [(0, 0), (0, 3), (3, 6), (6, 9), (9, 14), (14, 16)]:
        xb, yb = x[a:b].clone(), y[a:b].clone()
        gathered.update(xb, yb).update_validation(xb, yb)
        xb.fill_(math.nan)
        yb.fill_(math.nan)
    # [0, 6) was summed when [6, 9) did not fit; [9, 14) at once; [6, 9) and [14, 16) wait.
    assert gathered._gathered["statistics"].count == 5 and gathered.count == 16
    monkeypatch.setattr(reggan_ext.ridge, "_GATHER_BYTES", 0)
    expected = RidgeFitter(layer)
    for a, b in [(0, 6), (9, 14)]:
        expected.update(x[a:b], y[a:b]).update_validation(x[a:b], y[a:b])
    expected.update(torch.cat([x[6:9], x[14:]]), torch.cat([y[6:9], y[14:]]))
    expected.update_validation(torch.cat([x[6:9], x[14:]]), torch.cat([y[6:9], y[14:]]))
    merged = RidgeFitter(layer).merge(copy.deepcopy(gathered))
    for got in (gathered.state_dict(), merged.state_dict()):
        assert_states_equal(got, expected.state_dict(), rtol=0, atol=0)
    # Loading statistics replaces the gathered batches too.
    monkeypatch.setattr(reggan_ext.ridge, "_GATHER_BYTES", 8 * sample_bytes)
    reloaded = RidgeFitter(layer).update(x[:2], y[:2]).load_state_dict(expected.state_dict())
    assert reloaded.count == 16
    torch.testing.assert_close(reloaded.statistics["gram"], expected.statistics["gram"], rtol=0,
                               atol=0)
    # A batch of another dtype has the gathered ones summed first.
    mixed = RidgeFitter(layer).update(x[:3].float(), y[:3].float()).update(x[3:6], y[3:6])
    assert mixed._gathered["statistics"].count == 3
    monkeypatch.setattr(reggan_ext.ridge, "_GATHER_BYTES", 0)
    apart = RidgeFitter(layer).update(x[:3].float(), y[:3].float()).update(x[3:6], y[3:6])
    torch.testing.assert_close(mixed.statistics["gram"], apart.statistics["gram"], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_batches_are_summed_at_once():
    layer = make_layer(cin=2, cout=2, groups=2, k=3, padding=1, device="cuda")
    x, y = make_data(layer, 2, device="cuda")
    fitter = RidgeFitter(layer).update(x, y)
    assert fitter._gathered["statistics"].count == 0 and fitter.count == 2


def test_state_dict_carries_validation_and_rejects_mismatches():
    layer = make_layer(padding=1)
    x, y = make_data(layer, 8)
    fitter = RidgeFitter(layer).update(x, y).update_validation(x[:3], y[:3])
    state = fitter.state_dict()
    assert set(state) == {"geometry", "gram", "cross", "target_sq", "count", "validation.gram",
                          "validation.cross", "validation.target_sq", "validation.count"}
    assert state["geometry"]["padding (left, right, top, bottom)"] == (1, 1, 1, 1)
    state["gram"].zero_()  # a copy, not a view of the fitter's buffers
    assert fitter.statistics["gram"].abs().sum() > 0
    restored = RidgeFitter(layer).load_state_dict(fitter.state_dict())
    scores = [f.lambda_scores([0.1, 1.0], "validation", "global") for f in (fitter, restored)]
    torch.testing.assert_close(scores[0], scores[1])
    with pytest.raises(ValueError, match="expected keys"):
        RidgeFitter(layer).load_state_dict({"gram": state["gram"]})
    other = make_layer(padding=0)
    with pytest.raises(ValueError, match="another layer geometry: padding"):
        RidgeFitter(other).load_state_dict(RidgeFitter(layer).state_dict())
    with pytest.raises(ValueError, match=r"another geometry: padding .* \(1, 1, 1, 1\) "
                                         r"\(expected \(0, 0, 0, 0\)\)"):
        RidgeFitter(other).merge(fitter)
    # Geometries whose statistics have equal shapes are told apart too.
    for same_shapes in (make_layer(padding=2, dilation=2), make_layer(padding=1,
                                                                      padding_mode="reflect")):
        with pytest.raises(ValueError, match="another geometry"):
            RidgeFitter(same_shapes).merge(fitter)
        with pytest.raises(ValueError, match="another layer geometry"):
            RidgeFitter(same_shapes).load_state_dict(fitter.state_dict())
        with pytest.raises(ValueError, match="geometry of the fitted one"):
            fitter.fit_(same_shapes, 1.0)
    with pytest.raises(TypeError, match="expected a RidgeFitter"):
        fitter.merge(state)


def _all_reduce_worker(rank, world, init_file, out_file, x, y, xv, yv):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        layer = make_layer(cin=2, cout=2, groups=2, padding=1)
        fitter = RidgeFitter(layer)
        shard = slice(rank * 7, 23 if rank == world - 1 else (rank + 1) * 7)
        fitter.update(x[shard], y[shard])
        if rank == 1:  # validation data on one rank only
            fitter.update_validation(xv, yv)
        fitter.all_reduce()
        if rank == 0:
            torch.save({"state": fitter.state_dict(), "solution": fitter.solve(0.3)}, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_all_reduce_equals_single_process():
    layer = make_layer(cin=2, cout=2, groups=2, padding=1)
    x, y = make_data(layer, 23)
    xv, yv = make_data(layer, 5, seed=9)
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_all_reduce_worker, args=(2, init_file, out_file, x, y, xv, yv), nprocs=2)
        result = torch.load(out_file)
    single = RidgeFitter(layer).update(x, y).update_validation(xv, yv)
    assert_states_equal(result["state"], single.state_dict(), rtol=1e-13, atol=1e-12)
    for got, want in zip(result["solution"], single.solve(0.3)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fit_local_regression_and_fit_():
    layer = make_layer(cin=2, cout=2, groups=2, padding=1)
    x, y = make_data(layer, 12)
    expected_w, expected_b = numpy_fit(layer, x, y, 0.4)
    assert fit_local_regression(layer, [(x[:5], y[:5]), (x[5:], y[5:])], 0.4) == 0.4
    assert_close(layer.weight, expected_w, 1e-9)
    assert_close(layer.bias, expected_b, 1e-9)
    target = make_layer(cin=2, cout=2, groups=2, padding=1, dtype=torch.float32)
    RidgeFitter(layer).update(x, y).fit_(target, 0.4)
    assert target.weight.dtype == torch.float32
    assert_close(target.weight, expected_w, 1e-6)
    chosen = fit_local_regression(layer, [(x, y)], [0.1, 1.0, 10.0], select="validation",
                                  validation=[make_data(layer, 4, seed=3)])
    assert chosen in (0.1, 1.0, 10.0)


# Lambda selection against brute force -----------------------------------------------------------


CANDIDATES = [0.0, 0.03, 0.3, 3.0, 30.0]


def brute_force_terms(layer, x, y, lam, penalize_bias):
    """Per pixel system: RSS summed over the outputs and tr(H), from the explicit n x n hat
    matrix H = Z (Z^T Z + lam P)^+ Z^T (a pseudo-inverse: with lam = 0 taps that only read zero
    padding leave the matrix singular)."""
    z, t = numpy_design(layer, x), numpy_targets(layer, y)
    zt = np.swapaxes(z, -1, -2)
    hat = z @ np.linalg.pinv(zt @ z + lam * numpy_penalty(layer, penalize_bias)) @ zt
    residual = t - hat @ t
    return (residual ** 2).sum((-1, -2)), np.trace(hat, axis1=-2, axis2=-1)


def brute_force_gcv(layer, x, y, penalize_bias, scope):
    n, og = x.shape[0], layer.out_channels // layer.groups
    scores = []
    for lam in CANDIDATES:
        rss, trace = brute_force_terms(layer, x, y, lam, penalize_bias)
        if scope == "global":
            m = n * layer.out_channels * rss[0].size
            rss, trace = rss.sum(), og * trace.sum()
        else:
            m, trace = n * og, og * trace
        scores.append(np.where(m > trace, m * rss / (m - trace) ** 2, np.inf))
    return np.stack(scores)


def assert_chooses_least(fitter, select, scope, expected_scores):
    """solve() picks the candidate of least expected score (per pixel or overall); returns it."""
    _, _, chosen = fitter.solve(CANDIDATES, select=select, scope=scope)
    best = np.asarray(CANDIDATES)[expected_scores.argmin(0)]
    if scope == "global":
        assert chosen == best
    else:
        np.testing.assert_array_equal(chosen.numpy(), best)
    return best


@pytest.mark.parametrize("penalize_bias", [True, False])
@pytest.mark.parametrize("scope", ["pixel", "global"])
@pytest.mark.parametrize("geometry", [dict(cin=2, cout=4, groups=2, padding=1),
                                      dict(cin=1, cout=1, k=2, padding="same", bias=False),
                                      dict(cin=3, cout=3, groups=3, padding=(1, 0))], ids=str)
def test_gcv_matches_brute_force(geometry, scope, penalize_bias):
    # Circular padding keeps every system solvable at lam = 0.
    geometry = dict(geometry, padding_mode="circular")
    torch.manual_seed(0)  # the layer's initial weights and the noise below
    layer = make_layer(size=(5, 6), **geometry)
    x, _ = make_data(layer, 30, seed=4)
    with torch.no_grad():  # a signal the fit can find, plus noise
        y = layer(x) + 0.5 * torch.randn(30, layer.out_channels, *layer.output_size,
                                         dtype=torch.float64)
    fitter = RidgeFitter(layer, penalize_bias=penalize_bias).update(x, y)
    scores = fitter.lambda_scores(CANDIDATES, "gcv", scope)
    expected = brute_force_gcv(layer, x, y, penalize_bias, scope)
    expected = expected.reshape(scores.shape)
    assert_close(scores, expected, 1e-8)
    best = assert_chooses_least(fitter, "gcv", scope, expected)
    if scope == "pixel":
        assert len(np.unique(best)) > 1  # the per-pixel choice is not trivially uniform


def test_gcv_is_infinite_where_lam_cannot_be_used():
    layer = make_layer(cin=1, cout=1, k=3, padding=1, size=(4, 5))
    x, y = make_data(layer, 5)  # 10 unknowns, 5 samples: lam = 0 cannot be solved
    fitter = RidgeFitter(layer).update(x, y)
    scores = fitter.lambda_scores([0.0, 1.0], "gcv", "pixel")
    assert torch.isinf(scores[0]).all() and torch.isfinite(scores[1]).all()
    assert fitter.solve([0.0, 1.0], select="gcv", scope="global")[2] == 1.0
    # Enough samples, but the border taps only read zero padding: singular there at lam = 0.
    scores = RidgeFitter(layer).update(*make_data(layer, 50)).lambda_scores([0.0], "gcv", "pixel")
    border = torch.ones(4, 5, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert torch.isinf(scores[0, 0][border]).all() and torch.isfinite(scores[0, 0][~border]).all()


@pytest.mark.parametrize("penalize_bias", [True, False])
@pytest.mark.parametrize("scope", ["pixel", "global"])
def test_validation_matches_brute_force(scope, penalize_bias):
    torch.manual_seed(0)
    # Circular padding keeps every system solvable at lam = 0.
    layer = make_layer(cin=2, cout=4, groups=2, padding=1, padding_mode="circular",
                       size=(5, 6))
    x, _ = make_data(layer, 25, seed=5)
    xv, _ = make_data(layer, 9, seed=6)
    with torch.no_grad():
        noise = lambda t: 0.7 * torch.randn(t.shape[0], 4, 5, 6, dtype=torch.float64)  # noqa: E731
        y, yv = layer(x) + noise(x), layer(xv) + noise(xv)
    fitter = RidgeFitter(layer, penalize_bias=penalize_bias).update(x, y).update_validation(xv, yv)
    scores = fitter.lambda_scores(CANDIDATES, "validation", scope)
    expected = []
    for lam in CANDIDATES:
        weight, bias = numpy_fit(layer, x, y, lam, penalize_bias)
        probe = copy.deepcopy(layer)
        with torch.no_grad():
            probe.weight.copy_(torch.from_numpy(weight))
            probe.bias.copy_(torch.from_numpy(bias))
            error = (probe(xv) - yv).pow(2).sum(0).reshape(2, 2, 5, 6).sum(1)
        expected.append(error.sum() if scope == "global" else error)
    expected = torch.stack(expected).numpy()
    assert_close(scores, expected, 1e-9)
    assert_chooses_least(fitter, "validation", scope, expected)


def test_validation_skips_candidates_that_cannot_be_solved():
    layer = make_layer(cin=1, cout=1, k=3, padding=1, size=(4, 4))
    x, y = make_data(layer, 5)
    fitter = RidgeFitter(layer).update(x, y).update_validation(*make_data(layer, 4, seed=1))
    scores = fitter.lambda_scores([0.0, 1.0], "validation", "pixel")
    assert torch.isinf(scores[0]).all() and torch.isfinite(scores[1]).all()
    assert fitter.solve([0.0, 1.0], select="validation", scope="global")[2] == 1.0


# Gradient descent -------------------------------------------------------------------------------


@pytest.mark.parametrize("penalize_bias", [True, False])
def test_gradient_descent_on_ridge_loss_converges_to_closed_form(penalize_bias):
    torch.manual_seed(0)
    # No padding: taps that only read zeros would make the problem ill-conditioned and slow.
    layer = make_layer(cin=2, cout=2, groups=2, size=(5, 6))
    x, y = make_data(layer, 64, seed=7)
    lam = 2.0
    fitter = RidgeFitter(layer, penalize_bias=penalize_bias).update(x, y)
    weight, bias = fitter.solve(lam)
    # Step 1/L, L the largest curvature of the quadratic: 2 * lambda_max(G + lam) / numel.
    full = _unpack(fitter.statistics["gram"].flatten(2), fitter.unknowns)
    curvature = 2 * (torch.linalg.eigvalsh(full).max() + lam) / y.numel()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1 / curvature.item())
    for _ in range(300):
        optimizer.zero_grad()
        ridge_loss(layer, x, y, lam, penalize_bias=penalize_bias).backward()
        optimizer.step()
    torch.testing.assert_close(layer.weight.detach(), weight, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(layer.bias.detach(), bias, rtol=1e-7, atol=1e-7)


# Kernels directly -------------------------------------------------------------------------------


def random_systems(groups, d, og, h, w, dtype, device, seed=0):
    """Statistics of well-conditioned random SPD systems."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(groups, h * w, 3 * d, d, generator=gen, dtype=torch.float64)
    full = z.transpose(-1, -2) @ z / d
    rows, cols = torch.tril_indices(d, d)
    gram = full[..., rows, cols].transpose(1, 2).reshape(groups, -1, h, w)
    cross = torch.randn(groups * og, d, h, w, generator=gen, dtype=torch.float64)
    lam = torch.rand(groups, h, w, generator=gen, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (gram, cross, lam)]


# 160 unknowns are more than the CUDA kernels factor in shared memory (106 in float64, 152 in
# float32): their thread-per-system kernels factor them in global memory. (One such system: the
# LAPACK of torch's reference can hang factoring several that large in parallel.)
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1, 1), (2, 5, 3, 3, 7), (3, 26, 1, 4, 5),
                                   (1, 40, 2, 1, 17), (2, 9, 1, 5, 16), (1, 160, 2, 1, 1)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("penalize_last", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_solve_kernel_matches_torch_linalg(sizes, dtype, penalize_last, device):
    gram, cross, lam = random_systems(*sizes, dtype, device)
    solution, info = torch.ops.reggan_ext.ridge_solve(gram, cross, lam, penalize_last)
    expected, expected_info = ridge_solve_reference(gram.double(), cross.double(), lam.double(),
                                                    penalize_last)
    assert solution.dtype == dtype and info.dtype == torch.int32
    assert (info == 0).all() and (expected_info == 0).all()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(solution.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1, 1), (2, 5, 1, 3, 7), (3, 26, 1, 4, 5),
                                   (1, 40, 1, 1, 17), (1, 160, 1, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("penalize_last", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_inverse_trace_kernel_matches_torch_linalg(sizes, dtype, penalize_last, device):
    gram, _, lam = random_systems(*sizes, dtype, device)
    trace, info = torch.ops.reggan_ext.ridge_inverse_trace(gram, lam, penalize_last)
    d = sizes[1]
    penalty = torch.ones(d, dtype=torch.float64, device=device)
    if not penalize_last:
        penalty[-1] = 0
    full = _unpack(gram.double().flatten(2), d) + torch.diag_embed(
        lam.double().reshape(sizes[0], -1, 1) * penalty)
    expected = (torch.linalg.inv(full).diagonal(dim1=-2, dim2=-1) * penalty).sum(-1)
    assert trace.dtype == dtype and (info == 0).all()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(trace.double(), expected.reshape(lam.shape), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_solve_kernels_take_strided_tensors(dtype, device):
    gram, cross, lam = random_systems(2, 5, 3, 4, 7, dtype, device)
    # The same values with the pixel dimensions transposed in memory.
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (gram, cross, lam)]
    assert not any(t.is_contiguous() for t in strided)
    ops = torch.ops.reggan_ext
    for got, want in [(ops.ridge_solve(*strided, True), ops.ridge_solve(gram, cross, lam, True)),
                      (ops.ridge_inverse_trace(strided[0], strided[2], False),
                       ops.ridge_inverse_trace(gram, lam, False))]:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


# d = 6 takes the CUDA thread-per-system kernels, 26 and 50 the warp-per-system ones.
@pytest.mark.parametrize("d", [6, 26, 50])
@pytest.mark.parametrize("device", DEVICES)
def test_solve_kernel_info_matches_lapack(d, device):
    gram, cross, lam = random_systems(2, d, 2, 3, 5, torch.float64, "cpu")
    zero = torch.zeros_like(lam)
    full_index = torch.tril_indices(d, d)
    diagonal = [int(i) for i in ((full_index[0] == full_index[1]).nonzero().flatten())]
    # Break the leading minor of order k + 1 of a few systems with a strongly negative pivot:
    # the first, a second and a first column of a pair, and the last.
    broken = {(0, 0, 0): 0, (0, 1, 3): 2, (1, 2, 4): d - 1, (1, 0, 2): 3}
    for (g, i, j), k in broken.items():
        gram[g, diagonal[k], i, j] = -100.0
    gram, cross, zero = gram.to(device), cross.to(device), zero.to(device)
    solution, info = torch.ops.reggan_ext.ridge_solve(gram, cross, zero, True)
    expected_solution, expected = ridge_solve_reference(gram, cross, zero, True)
    torch.testing.assert_close(info.cpu(), expected.cpu().int())
    assert sorted(info[info > 0].tolist()) == [1, 3, 4, d]
    _, trace_info = torch.ops.reggan_ext.ridge_inverse_trace(gram, zero, True)
    torch.testing.assert_close(trace_info.cpu(), info.cpu())
    # The systems that pass are solved as usual, and a second run gives the same bits.
    solved = (info == 0).repeat_interleave(2, 0)[:, None].expand_as(solution)
    torch.testing.assert_close(solution[solved], expected_solution[solved], rtol=1e-10, atol=1e-10)
    again = torch.ops.reggan_ext.ridge_solve(gram, cross, zero, True)[0]
    assert torch.equal(again[solved], solution[solved])


def test_solve_kernel_nan_is_reported_not_silent():
    gram, cross, lam = random_systems(1, 4, 1, 2, 3, torch.float64, "cpu")
    gram[0, 0, 1, 1] = math.nan
    solution, info = torch.ops.reggan_ext.ridge_solve(gram, cross, lam, True)
    assert info[0, 1, 1] == 1 and (info.flatten()[[0, 1, 2, 3, 5]] == 0).all()
    assert torch.isfinite(solution).all()


def test_cpu_instruction_set_paths_agree():
    """Every CPU path (AVX-512, AVX2, baseline) the machine can run, each in a subprocess:
    ATEN_CPU_CAPABILITY narrows the instruction set of torch's kernels and of ours alike."""
    script = """
import torch, reggan_ext
from reggan_ext.ridge import ridge_statistics_reference, ridge_solve_reference
torch.manual_seed(0)
worst = 0.0  # largest relative error over its tolerance
# Two input channels per group over a few samples and over many, and one: the accumulation's
# two ways to sum.
for cin, groups, k, n in ((4, 2, 3, 13), (4, 2, 5, 70), (2, 2, 3, 13)):
    layer = reggan_ext.LocalRegression(cin, 6, k, (9, 21), groups=groups, padding='same',
                                       dtype=torch.float64)
    x, y = torch.randn(n, cin, 9, 21), torch.randn(n, 6, 9, 21)
    expected = ridge_statistics_reference(layer, x.double(), y.double())
    lam = torch.full((groups, 9, 21), 0.5, dtype=torch.float64)
    solution, _ = ridge_solve_reference(expected['gram'], expected['cross'], lam, True)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-4)):
        stats = reggan_ext.RidgeFitter(layer, dtype=dtype).update(x, y).statistics
        got, _ = torch.ops.reggan_ext.ridge_solve(stats['gram'], stats['cross'], lam.to(dtype),
                                                  True)
        pairs = [(stats[k], expected[k]) for k in ('gram', 'cross', 'target_sq')]
        for a, b in pairs + [(got, solution)]:
            worst = max(worst, float((a.double() - b).abs().max() / b.abs().max()) / tol)
print(torch.ops.reggan_ext.ridge_cpu_isa(), worst)
"""
    runnable = {"AVX512": [("avx512", "avx512"), ("avx2", "avx2"), ("default", "baseline")],
                "AVX2": [("avx2", "avx2"), ("default", "baseline")]}
    for capability, isa in runnable.get(torch.backends.cpu.get_cpu_capability(),
                                        [("default", "baseline")]):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        name, worst = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                                     capture_output=True, text=True).stdout.split()
        assert name == isa
        assert float(worst) < 1, f"{isa}: error {worst} times the tolerance"


# Bad inputs --------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    layer = make_layer(cin=2, cout=2, groups=2, padding=1)
    x, y = make_data(layer, 4)
    fitter = RidgeFitter(layer)
    with pytest.raises(RuntimeError, match="no data"):
        fitter.solve(1.0)
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 2, 7, 9\)"):
        fitter.update(x[:, :1], y)
    with pytest.raises(ValueError, match=r"expected x of shape"):
        fitter.update(x[0], y)
    with pytest.raises(ValueError, match=r"expected y of shape \(N, 2, 7, 9\)"):
        fitter.update(x, y[..., :-1])
    with pytest.raises(ValueError, match="x has 4 samples but y has 3"):
        fitter.update(x, y[:3])
    with pytest.raises(ValueError, match="y has dtype torch.float32 but x has torch.float64"):
        fitter.update(x, y.float())
    with pytest.raises(ValueError, match="x must be float32 or float64"):
        fitter.update(x.long(), y.long())
    with pytest.raises(TypeError, match="x must be a tensor"):
        fitter.update(x.numpy(), y)
    with pytest.raises(ValueError, match="x is on meta but the statistics are on cpu"):
        fitter.update(x.to("meta"), y.to("meta"))
    fitter.update(x, y)
    for lam, error, message in [(-1.0, ValueError, "finite and >= 0"),
                                (math.nan, ValueError, "finite and >= 0"),
                                (math.inf, ValueError, "finite and >= 0"),
                                ("1", TypeError, "real number"), (True, TypeError, "real number"),
                                (torch.ones(3), ValueError, "lambda map must have shape")]:
        with pytest.raises(error, match=message):
            fitter.solve(lam)
    with pytest.raises(ValueError, match="select must be one of"):
        fitter.solve([1.0], select="loo")
    with pytest.raises(ValueError, match="scope must be one of"):
        fitter.solve([1.0], select="gcv", scope="channel")
    with pytest.raises(ValueError, match="non-empty sequence"):
        fitter.solve([], select="gcv")
    with pytest.raises(ValueError, match="non-empty sequence"):
        fitter.solve(1.0, select="gcv")
    with pytest.raises(ValueError, match="finite and >= 0"):
        fitter.solve([1.0, -2.0], select="gcv")
    with pytest.raises(RuntimeError, match="update_validation"):
        fitter.solve([1.0], select="validation")
    with pytest.raises(ValueError, match="geometry of the fitted one"):
        fitter.fit_(make_layer(cin=2, cout=2, groups=2), 1.0)
    with pytest.raises(TypeError, match="must be a reggan_ext.LocalRegression"):
        RidgeFitter(torch.nn.Conv2d(2, 2, 3))
    with pytest.raises(TypeError, match="dtype must be"):
        RidgeFitter(layer, dtype=torch.float16)


def test_rank_deficient_and_non_finite_fail_loudly():
    layer = make_layer(cin=1, cout=1, k=3, padding=1, size=(4, 5))
    x, y = make_data(layer, 6)  # 10 unknowns, 6 samples
    fitter = RidgeFitter(layer).update(x, y)
    with pytest.raises(RuntimeError, match=r"20 of 20 pixel systems .* use lam > 0"):
        fitter.solve(0.0)
    assert torch.isfinite(fitter.solve(1e-3)[0]).all()
    # A tap that reads the zero padding for every sample: singular at lam = 0 on the border only.
    fitter = RidgeFitter(layer).update(*make_data(layer, 50))
    with pytest.raises(RuntimeError, match=r"14 of 20 pixel systems .* taps that only read "
                                           "zero padding"):
        fitter.solve(0.0)
    for name, value in [("x", math.nan), ("x", math.inf), ("y", math.nan), ("y", -math.inf)]:
        xb, yb = x.clone(), y.clone()
        (xb if name == "x" else yb)[0, 0, 1, 1] = value
        with pytest.raises(RuntimeError, match=r"statistics of [1-9]\d* of 20 pixel systems are "
                                               "not finite"):
            RidgeFitter(layer).update(xb, yb).solve(1.0)


def test_lambda_selection_rejects_what_it_cannot_score():
    layer = make_layer(groups=2, padding=1)
    x, y = make_data(layer, 20)
    candidates = [1.0, 100.0]
    for name, value in [("x", math.nan), ("y", math.inf)]:
        xv, yv = x[:5].clone(), y[:5].clone()
        (xv if name == "x" else yv)[0, 0, 2, 2] = value
        fitter = RidgeFitter(layer).update(x, y).update_validation(xv, yv)
        with pytest.raises(RuntimeError, match=r"validation statistics of [1-9]\d* of 126 pixel "
                                               "systems are not finite"):
            fitter.solve(candidates, select="validation")
    empty = RidgeFitter(layer).update(x, y).update_validation(x[:0], y[:0])
    with pytest.raises(RuntimeError, match="needs validation samples"):
        empty.solve(candidates, select="validation")
    xb = x.clone()
    xb[3, 1, 0, 0] = math.nan
    with pytest.raises(RuntimeError, match="lambda_scores: the statistics of"):
        RidgeFitter(layer).update(xb, y).lambda_scores(candidates, "gcv")


def test_lambda_arguments_of_other_types():
    layer = make_layer(groups=2, padding=1)
    x, y = make_data(layer, 20)
    fitter = RidgeFitter(layer).update(x, y)
    expected = fitter.solve(0.5)[0]
    for lam in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        torch.testing.assert_close(fitter.solve(lam)[0], expected, rtol=0, atol=0)
    candidates = [0.25, 0.5, 4.0]
    scores = fitter.lambda_scores(candidates, "gcv", "global")
    for same in (np.array(candidates), torch.tensor(candidates), tuple(candidates)):
        torch.testing.assert_close(fitter.lambda_scores(same, "gcv", "global"), scores)
    torch.testing.assert_close(fitter.lambda_scores(range(1, 3), "gcv", "global"),
                               fitter.lambda_scores([1.0, 2.0], "gcv", "global"))
    with pytest.raises(ValueError, match="non-empty sequence"):
        fitter.solve("0.5", select="gcv")
    lam_map = torch.full((2, 7, 9), 0.5, requires_grad=True)
    weight, bias = fitter.solve(lam_map)  # no gradient flows to lambda: none is claimed
    assert not weight.requires_grad and not bias.requires_grad
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="floating-point tensor, got torch.int64"):
        fitter.solve(torch.ones(2, 7, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="scope must be one of"):
        fitter.solve(0.5, scope="everything")
    single = RidgeFitter(layer, dtype=torch.float32).update(x, y)
    assert single.solve([0.3], select="gcv")[2] == 0.3  # the candidate, not its float32 rounding
    with pytest.raises(ValueError, match="overflows the fitter's torch.float32"):
        single.solve(1e39)
    with pytest.raises(ValueError, match="overflows the fitter's torch.float32"):
        single.solve([1.0, 1e39], select="gcv")
    with pytest.raises(ValueError, match="must be finite and >= 0 in the fitter's torch.float32"):
        single.solve(torch.full((2, 7, 9), 1e39, dtype=torch.float64))

def test_kernel_argument_errors():
    layer = make_layer(cin=2, cout=2, groups=2, padding=1)
    x, y = make_data(layer, 3)
    stats = RidgeFitter(layer).statistics
    ops = torch.ops.reggan_ext
    args = [stats["gram"], stats["cross"], stats["target_sq"], x, y, [3, 3], [1, 1], [1, 1],
            [1, 1], 2, True]

    def call(**changes):
        names = ["gram", "cross", "target_sq", "input", "target", "kernel_size", "stride",
                 "padding", "dilation", "groups", "bias"]
        values = dict(zip(names, args), **changes)
        ops.ridge_accumulate_(*[values[n] for n in names])

    with pytest.raises(ValueError, match="expected target of shape"):
        call(target=y[..., :-1])
    with pytest.raises(ValueError, match="expected gram of shape"):
        call(bias=False)
    with pytest.raises(ValueError, match="input has 3 samples but target has 2"):
        call(target=y[:2])
    with pytest.raises(ValueError, match="float32 statistics need float32 input"):
        call(gram=stats["gram"].float(), cross=stats["cross"].float(),
             target_sq=stats["target_sq"].float())
    with pytest.raises(ValueError, match="must be contiguous"):
        call(gram=stats["gram"].transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match=r"groups \(3\) must divide the input channels \(2\)"):
        call(groups=3)
    lam = torch.ones(2, 7, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected lam of shape"):
        ops.ridge_solve(stats["gram"], stats["cross"], lam[:1], True)
    with pytest.raises(ValueError, match="lam has dtype"):
        ops.ridge_solve(stats["gram"], stats["cross"], lam.float(), True)
    with pytest.raises(ValueError, match=r"expected gram of shape \(groups, D\*\(D\+1\)/2"):
        ops.ridge_inverse_trace(stats["gram"][:, :-1], lam, True)
    with pytest.raises(ValueError, match="expected lam of shape"):
        ops.ridge_inverse_trace(stats["gram"], lam[..., :-1], True)
    with pytest.raises(ValueError, match=r"groups of gram \(2\) must divide the output "
                                         r"channels of cross \(1\)"):
        ops.ridge_solve(stats["gram"], stats["cross"][:1], lam, True)
    with pytest.raises(ValueError, match=r"expected gram of shape .* = \[2, 45, 7, 9\]"):
        ops.ridge_solve(stats["gram"], stats["cross"][:, :-1], lam, True)
    with pytest.raises(ValueError, match="at least one group and one unknown"):
        ops.ridge_solve(stats["gram"][:0], stats["cross"][:0], lam[:0], True)


# Registration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    layer = make_layer(cin=2, cout=4, groups=2, padding=1, stride=(1, 2), device=device)
    x, y = make_data(layer, 3, device=device)
    for dtype, xs, ys in [(torch.float64, x, y), (torch.float64, x.float(), y.float()),
                          (torch.float32, x.float(), y.float())]:
        stats = RidgeFitter(layer, dtype=dtype).statistics
        torch.library.opcheck(
            torch.ops.reggan_ext.ridge_accumulate_.default,
            (stats["gram"], stats["cross"], stats["target_sq"], xs, ys, [3, 3], [1, 2],
             [1, 1], [1, 1], 2, True))
    gram, cross, lam = random_systems(2, 5, 2, 3, 4, torch.float64, device)
    torch.library.opcheck(torch.ops.reggan_ext.ridge_solve.default, (gram, cross, lam, True))
    torch.library.opcheck(torch.ops.reggan_ext.ridge_solve.default,
                          (gram.float(), cross.float(), lam.float(), False))
    for args in [(gram, lam, True), (gram.float(), lam.float(), False)]:
        torch.library.opcheck(torch.ops.reggan_ext.ridge_inverse_trace.default, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu_end_to_end():
    layer = make_layer(cin=3, cout=3, groups=3, k=5, padding="same", padding_mode="reflect",
                       size=(19, 23))
    x, y = make_data(layer, 37)
    cpu = RidgeFitter(layer).update(x, y).update_validation(x[:9], y[:9])
    gpu = RidgeFitter(copy.deepcopy(layer).cuda()).update(x.cuda(), y.cuda())
    gpu.update_validation(x[:9].cuda(), y[:9].cuda())
    assert_states_equal(gpu.state_dict(), cpu.state_dict(), rtol=1e-12, atol=1e-10)
    candidates = [0.01, 0.1, 1.0]
    for select in ("gcv", "validation"):
        for scope in ("pixel", "global"):
            torch.testing.assert_close(gpu.lambda_scores(candidates, select, scope).cpu(),
                                       cpu.lambda_scores(candidates, select, scope),
                                       rtol=1e-8, atol=1e-10)
    chosen = cpu.solve(candidates, "gcv", "pixel")[2]
    for lam in (0.5, chosen):
        for got, want in zip(gpu.solve(lam if isinstance(lam, float) else lam.cuda()),
                             cpu.solve(lam)):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9)
