"""LocalRegression op and module against the unfold reference: values, gradients, geometry sweep,
opcheck, torch.compile, bad inputs and the module's nn.Conv2d conventions."""

import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import reggan_ext
from reggan_ext import LocalRegression, local_regression, reference
from reggan_ext.ops import check_device_supported

from conftest import TOLERANCES

ops = torch.ops.reggan_ext


def random_layer_inputs(batch, in_ch, out_ch, size, kernel, stride=1, padding=0, dilation=1,
                        groups=1, bias=True, dtype=torch.float64, device="cpu"):
    layer = LocalRegression(in_ch, out_ch, kernel, size, stride, padding, dilation, groups, bias,
                            dtype=dtype, device=device)
    x = torch.randn(batch, in_ch, *size, dtype=dtype, device=device)
    return layer, x


def reference_grads(fn, x, weight, bias, grad_output):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = fn(leaves[0], leaves[1], b)
    y.backward(grad_output)
    return y.detach(), leaves[0].grad, leaves[1].grad, None if b is None else b.grad


def check_against_reference(layer, x, dtype):
    """Forward and every gradient of `layer` (through the kernels) against the unfold oracle."""
    x = x.detach().requires_grad_()
    y = layer(x)
    grad_output = torch.randn_like(y)
    layer.zero_grad()
    y.backward(grad_output)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode

    def oracle(xx, w, b):
        padded = F.pad(xx, layer._explicit_pad, mode=mode)
        return reference.local_regression(padded, w, b, layer.stride, 0, layer.dilation,
                                          layer.groups)

    ref_y, ref_gx, ref_gw, ref_gb = reference_grads(oracle, x, layer.weight, layer.bias,
                                                    grad_output)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y, ref_y, **tol)
    torch.testing.assert_close(x.grad, ref_gx, **tol)
    torch.testing.assert_close(layer.weight.grad, ref_gw, **tol)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, ref_gb, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "batch,in_ch,out_ch,size,kernel,stride,padding,dilation,groups",
    [
        (2, 3, 3, (9, 11), 3, 1, 1, 1, 3),  # RegGAN's per-channel layer
        (1, 3, 3, (16, 16), 5, 1, "same", 1, 3),
        (3, 4, 6, (10, 7), (2, 3), (2, 1), (1, 2), (1, 2), 2),
        (1, 2, 4, (8, 8), 5, 3, 2, 2, 1),
        (3, 5, 5, (13, 6), 4, 1, "same", 1, 5),  # even kernel: asymmetric 'same' padding
        (2, 2, 2, (7, 9), 1, 2, 0, 1, 1),
        (0, 3, 3, (5, 5), 3, 1, 1, 1, 1),
    ],
)
def test_matches_reference(device, dtype, batch, in_ch, out_ch, size, kernel, stride, padding,
                           dilation, groups):
    torch.manual_seed(0)
    layer, x = random_layer_inputs(batch, in_ch, out_ch, size, kernel, stride, padding, dilation,
                                   groups, dtype=dtype, device=device)
    check_against_reference(layer, x, dtype)


def random_geometry(seed):
    rng = random.Random(seed)
    groups_kind = rng.choice(["one", "two", "depthwise"])
    in_ch = rng.choice([2, 4]) if groups_kind == "two" else rng.randint(1, 4)
    groups = {"one": 1, "two": 2, "depthwise": in_ch}[groups_kind]
    out_ch = groups * rng.randint(1, 2)
    kernel = (rng.randint(1, 7), rng.randint(1, 7))
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (rng.randint(1, 3), rng.randint(1, 3))
    if stride == (1, 1) and rng.random() < 0.3:
        padding = "same"
    else:
        padding = (rng.randint(0, 3), rng.randint(0, 3))
    padding_mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
    # Large enough for the dilated kernel and for reflect padding (pad < size).
    size = tuple(max(d * (k - 1) + 1, 5) + rng.randint(0, 6) for k, d in zip(kernel, dilation))
    return dict(
        batch=rng.choice([0, 1, 3]), in_ch=in_ch, out_ch=out_ch, size=size, kernel=kernel,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=rng.random() < 0.8, padding_mode=padding_mode,
        layout=rng.choice(["contiguous", "channels_last", "transposed"]),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strided_tensors_of_every_op_match_reference(device, dtype):
    """The forward and both backward ops with every tensor argument a strided view."""
    torch.manual_seed(0)

    def strided(*shape):  # every other element of the last dimension
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)[..., ::2]

    x, w, b, gy = (strided(3, 4, 7, 9), strided(4, 2, 3, 3, 7, 9), strided(4, 7, 9),
                   strided(3, 4, 7, 9))
    assert not any(t.is_contiguous() for t in (x, w, b, gy))
    args = ([1, 1], [1, 1], [1, 1], 2)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    want = reference.local_regression(leaves[0], leaves[1], b, 1, 1, 1, 2)
    want.backward(gy)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(ops.local_regression(x, w, b, *args), want.detach(), **tol)
    torch.testing.assert_close(ops.local_regression_backward_input(gy, w, [7, 9], *args),
                               leaves[0].grad, **tol)
    torch.testing.assert_close(ops.local_regression_backward_weight(gy, x, [3, 3], *args),
                               leaves[1].grad, **tol)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (4, 1, "same", 1), ((2, 5), 1, "same", (2, 1)), (3, 1, "valid", 1),
    ((3, 2), (2, 1), (2, 1), 1)])
def test_shared_weights_match_conv2d(kernel, stride, padding, dilation, padding_mode):
    """With one kernel at every pixel the layer is nn.Conv2d: an oracle that shares no padding
    code with the layer (the reference pads as the module does)."""
    conv = torch.nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups=2,
                           padding_mode=padding_mode, dtype=torch.float64)
    layer = LocalRegression(4, 6, kernel, (9, 8), stride, padding, dilation, groups=2,
                            padding_mode=padding_mode, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(conv.weight[..., None, None].expand_as(layer.weight))
        layer.bias.copy_(conv.bias[:, None, None].expand_as(layer.bias))
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("seed", range(300))
def test_random_geometry_sweep(seed):
    g = random_geometry(seed)
    torch.manual_seed(seed)
    layer = LocalRegression(g["in_ch"], g["out_ch"], g["kernel"], g["size"], g["stride"],
                            g["padding"], g["dilation"], g["groups"], g["bias"],
                            padding_mode=g["padding_mode"], dtype=torch.float64)
    x = torch.randn(g["batch"], g["in_ch"], *g["size"], dtype=torch.float64)
    if g["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif g["layout"] == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    check_against_reference(layer, x, torch.float64)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(device, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 2, 3, 2, 4, 2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, 4, 2, dtype=torch.float64, device=device, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)

    def fn(x, w, b=None):
        return local_regression(x, w, b, stride=(2, 2), padding=(1, 0), dilation=(1, 2), groups=2)

    # Forward mode and the batched checks (vmap over the gradients) too.
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)


@pytest.mark.parametrize("bias", [True, False])
def test_gradgradcheck(device, bias):
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    x, w = torch.randn(2, 4, 5, 6, **kw), torch.randn(4, 2, 2, 3, 5, 2, **kw)
    inputs = (x, w, torch.randn(4, 5, 2, **kw)) if bias else (x, w)

    def fn(x, w, b=None):
        return local_regression(x, w, b, stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2)

    assert torch.autograd.gradgradcheck(fn, inputs, check_fwd_over_rev=True, check_batched_grad=True)


def test_gradient_penalty_matches_reference(device):
    """A gradient penalty (R1, WGAN-GP) differentiates a gradient: its gradients in the input
    and the weight equal those through the reference."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 7, dtype=torch.float64, device=device)
    w = torch.randn(3, 1, 3, 3, 8, 7, dtype=torch.float64, device=device)
    grads = []
    for op in (local_regression, reference.local_regression):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = op(xi, wi, None, 1, 1, 1, 3)
        (gx,) = torch.autograd.grad(y.tanh().sum(), xi, create_graph=True)
        grads.append(torch.autograd.grad(gx.pow(2).sum(), (xi, wi)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("wanted", ["input", "weight", "bias", "input, weight, bias"])
def test_backward_runs_only_the_kernels_of_the_gradients_asked_for(device, wanted):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    tensors = {"input": torch.randn(2, 3, 6, 5, device=device),
               "weight": torch.randn(3, 1, 3, 3, 6, 5, device=device),
               "bias": torch.randn(3, 6, 5, device=device)}
    for t in tensors.values():
        t.requires_grad_()
    y = local_regression(*tensors.values(), padding=1, groups=3)
    names = wanted.split(", ")
    with Calls() as calls:
        grads = torch.autograd.grad(y.sum(), [tensors[name] for name in names])
    kernels = {"input": "local_regression_backward_input.default",
               "weight": "local_regression_backward_weight.default"}
    assert [n for n in calls.names if n.startswith("local_regression")] == [
        kernels[name] for name in names if name in kernels]
    references = reference_grads(lambda x, w, b: reference.local_regression(x, w, b, 1, 1, 1, 3),
                                 *tensors.values(), torch.ones_like(y))
    for name, grad in zip(names, grads):
        want = references[1 + list(tensors).index(name)]
        torch.testing.assert_close(grad, want, **TOLERANCES[torch.float32])


def opcheck_samples(device):
    torch.manual_seed(0)
    samples = []
    for x_shape, w_shape, bias, stride, padding, dilation, groups in [
        ((2, 3, 9, 11), (3, 1, 3, 3, 9, 11), True, (1, 1), (1, 1), (1, 1), 3),
        ((1, 4, 8, 7), (6, 2, 2, 3, 4, 3), False, (2, 2), (0, 1), (1, 2), 2),
        ((0, 2, 5, 5), (2, 2, 3, 3, 5, 5), True, (1, 1), (1, 1), (1, 1), 1),
    ]:
        for dtype in (torch.float64, torch.float32):
            kw = dict(dtype=dtype, device=device, requires_grad=True)
            x, w = torch.randn(x_shape, **kw), torch.randn(w_shape, **kw)
            b = torch.randn(w_shape[0], *w_shape[4:], **kw) if bias else None
            samples.append((x, w, b, stride, padding, dilation, groups))
    return samples


def test_opcheck_forward(device):
    for args in opcheck_samples(device):
        torch.library.opcheck(ops.local_regression.default, args)


def test_opcheck_backward_ops(device):
    for x, w, b, stride, padding, dilation, groups in opcheck_samples(device):
        y = ops.local_regression(x, w, b, stride, padding, dilation, groups)
        gy = torch.randn_like(y)
        geometry = (stride, padding, dilation, groups)
        torch.library.opcheck(ops.local_regression_backward_input.default,
                              (gy, w.detach(), list(x.shape[2:]), *geometry))
        torch.library.opcheck(ops.local_regression_backward_weight.default,
                              (gy, x.detach(), list(w.shape[2:4]), *geometry))
        # With inputs that require grad, their own autograd formulas are checked too.
        gy.requires_grad_()
        torch.library.opcheck(ops.local_regression_backward_input.default,
                              (gy, w, list(x.shape[2:]), *geometry))
        torch.library.opcheck(ops.local_regression_backward_weight.default,
                              (gy, x, list(w.shape[2:4]), *geometry))


def test_torch_compile_fullgraph(device):
    torch.manual_seed(0)
    layer = LocalRegression(3, 3, 3, (16, 12), padding="same", groups=3, device=device)
    model = torch.nn.Sequential(layer, torch.nn.Tanh())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 16, 12, device=device, requires_grad=True)
    y_eager = model(x)
    (gx_eager,) = torch.autograd.grad(y_eager.sum(), x)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, gx_eager)


@pytest.mark.parametrize("how", ["dynamic", "mark_dynamic"])
def test_torch_compile_keeps_the_batch_dynamic(device, how):
    """One graph serves every batch size: the fake kernels keep the batch symbolic."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LocalRegression(3, 3, 3, (10, 9), padding=1, groups=3, device=device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True,
                             dynamic=True if how == "dynamic" else None)
    for n in (2, 3, 5, 4, 7):  # (dynamo specializes sizes 0 and 1 in any case)
        x = torch.randn(n, 3, 10, 9, device=device, requires_grad=True)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 0)
        y = compiled(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        torch.testing.assert_close(y, layer(x))
        torch.testing.assert_close(gx, torch.autograd.grad(layer(x).square().sum(), x)[0])
    assert counter.frame_count == 1


def test_torch_export_with_a_dynamic_batch(device, tmp_path):
    """torch.export keeps the op whole (for deployment, e.g. AOTInductor) with the batch
    symbolic, and the saved program loads and runs on another batch size."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        LocalRegression(3, 4, 3, (10, 9), padding="same", padding_mode="reflect", device=device),
        torch.nn.Tanh())
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(2, 3, 10, 9, device=device),),
                                  dynamic_shapes={"input": {0: batch}})
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "reggan_ext.local_regression.default" in targets
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    x = torch.randn(5, 3, 10, 9, device=device)
    torch.testing.assert_close(loaded(x), model(x))


def autocast_device_dtype(device):
    return torch.bfloat16 if device == "cpu" else torch.float16


def test_autocast_runs_in_the_widest_dtype(device):
    """Under autocast a convolution before the layer gives reduced-precision activations; the
    layer promotes them to its float32 weight (as if cast by hand), gradients included, and
    leaves all-float32 calls as they are."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1, device=device)
    layer = LocalRegression(3, 3, 3, (9, 8), padding=1, groups=3, device=device)
    x = torch.randn(2, 3, 9, 8, device=device)
    low = autocast_device_dtype(device)
    with torch.autocast(device, dtype=low):
        hidden = conv(x)
        assert hidden.dtype == low
        y = layer(hidden)
        plain = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(plain, layer(x), rtol=0, atol=0)
    (grad_weight,) = torch.autograd.grad(y.square().sum(), layer.weight)
    by_hand = hidden.detach().float()
    torch.testing.assert_close(y, layer(by_hand), rtol=0, atol=0)
    torch.testing.assert_close(
        grad_weight, torch.autograd.grad(layer(by_hand).square().sum(), layer.weight)[0],
        rtol=0, atol=0)

def test_backward_is_deterministic():
    torch.manual_seed(0)
    layer, x = random_layer_inputs(5, 4, 4, (33, 31), 3, padding=1, groups=2, dtype=torch.float32)
    x.requires_grad_()
    grads = []
    for _ in range(2):
        layer.zero_grad()
        x.grad = None
        layer(x).square().sum().backward()
        grads.append((x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("in_channels, out_channels, groups", [(4, 6, 2), (7, 5, 1)])
def test_backward_is_bitwise_equal_across_thread_counts(in_channels, out_channels, groups):
    """Each output element is summed by one task in a fixed order, whatever the split (the second
    layer's channels also come in several steps, whose partial sums the output holds)."""
    torch.manual_seed(0)
    layer, x = random_layer_inputs(6, in_channels, out_channels, (19, 37), 3, padding=1,
                                   groups=groups, dtype=torch.float32)
    x.requires_grad_()
    grad_output = torch.randn(6, out_channels, 19, 37)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            y = layer(x)
            results.append((y, *torch.autograd.grad(y, (x, layer.weight, layer.bias), grad_output)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# Geometries that take each path of the CPU kernels: (batch, in_ch, out_ch, (H, W), kernel,
# stride, padding, dilation, groups). Rows are split into blocks of 1 or 2 vectors (4 to 32
# columns with float32, half that with float64), with remainders. The forward sums bands of 4
# output rows (2 without AVX-512), the last one short where the bands do not divide the height,
# over tiles of 4, 2 and 1 samples, with kernels of 3, 5 and 7 (square, unit steps) compiled for
# their size; with strided or dilated rows it sums one row over tiles of 16 down to 1 samples (8
# without AVX-512). The input gradient splits batches into tiles of 16, 8, 4, 2 and 1 samples (8
# down to 1 without AVX-512), one of each size at most once the widest are taken. Padded scratch
# rows hold 128 KiB per thread (the weight gradient's up to 4 MiB), past which the kernels step
# over channels or samples.
KERNEL_PATHS = {
    "one column": (3, 2, 2, (5, 1), 3, 1, 1, 1, 1),
    "tails of blocks and batch tiles": (5, 3, 3, (7, 37), 3, 1, 1, 1, 3),
    "stride 2 and dilation, odd width": (6, 2, 4, (11, 47), (3, 5), 2, (2, 3), (1, 2), 2),
    "stride 3 columns": (2, 2, 2, (9, 40), 4, (1, 3), 1, 1, 1),
    "dilation 2 wider than the image": (1, 1, 1, (6, 9), 5, 1, 4, 2, 1),
    "padding beyond the kernel": (2, 2, 2, (4, 6), 3, 1, 3, 1, 2),
    # 48 channels of 3 rows of 113 float64 or more per sample: input and output channels in steps.
    "steps of channels": (2, 48, 48, (2, 100), (3, 2), 1, 1, 1, 1),
    # 5 rows of 212 float64 or more per sample: every kernel in steps of samples (backward_weight,
    # which also packs grad_y rows, past about 40 float64 samples).
    "steps of samples": (100, 1, 1, (3, 200), 5, 1, 2, 1, 1),
    # A band's rows of the weight gradient over 128 KiB: its scratch may take 4 MiB, which 1000
    # columns of grad_y rows of 16 channels fill in 7 to 29 samples.
    "steps of samples, a large weight gradient": (32, 16, 16, (2, 1000), 3, 1, 1, 1, 1),
    # 31 = 16 + 8 + 4 + 2 + 1 and 17 = 16 + 1: every batch tile, and the widest then the narrowest.
    "batch tiles of every size": (31, 2, 2, (4, 37), 3, 1, 1, 1, 2),
    "widest and narrowest batch tiles": (17, 1, 2, (3, 20), 3, 1, 1, 1, 1),
    "a batch of one": (1, 3, 3, (5, 19), 3, 1, 1, 1, 1),
    # Bands of 4, 4 and 2 rows whose windows reach past the top and the bottom of the image.
    "7 x 7 bands, two channels per group": (5, 4, 2, (10, 23), 7, 1, 3, 1, 2),
    # 40 channels of 5 to 7 rows of 106 float64 or more per sample: a 3 x 3 band in channel steps.
    "3 x 3 bands in steps of channels": (2, 40, 4, (6, 100), 3, 1, 1, 1, 1),
    # 31 = 16 + 8 + 4 + 2 + 1 samples, rows two apart: one row at a time in every batch tile.
    "strided rows in every batch tile": (31, 1, 2, (7, 21), 3, 2, 1, 1, 1),
    # A weight gradient of 8 MiB or more: stored past the caches by the AVX-512 kernels, rows
    # aligned or not.
    "streamed weight gradient": (2, 8, 16, (33, 61), 3, 1, 1, 1, 1),
}


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernel_paths(path, dtype):
    batch, in_ch, out_ch, size, kernel, stride, padding, dilation, groups = KERNEL_PATHS[path]
    torch.manual_seed(0)
    layer, x = random_layer_inputs(batch, in_ch, out_ch, size, kernel, stride, padding, dilation,
                                   groups, dtype=dtype)
    check_against_reference(layer, x, dtype)


def test_cpu_instruction_set_paths_agree():
    """Every CPU path (AVX-512, AVX2, baseline) the machine can run, each in a subprocess:
    ATEN_CPU_CAPABILITY narrows the instruction set of torch's kernels and of ours alike."""
    script = """
import sys, torch
sys.path.insert(0, 'tests')
import test_local_regression as t
for path in t.KERNEL_PATHS:
    for dtype in (torch.float64, torch.float32):
        t.test_cpu_kernel_paths(path, dtype)
print(torch.ops.reggan_ext.ridge_cpu_isa())
"""
    runnable = {"AVX512": [("avx512", "avx512"), ("avx2", "avx2"), ("default", "baseline")],
                "AVX2": [("avx2", "avx2"), ("default", "baseline")]}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for capability, isa in runnable.get(torch.backends.cpu.get_cpu_capability(),
                                        [("default", "baseline")]):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, check=True,
                             capture_output=True, text=True).stdout
        assert out.split()[-1] == isa


class TestCpuOutputCache:
    """Outputs of 32 MiB or more reuse freed blocks of their size (csrc/common/cpu_output_cache)."""

    # A float64 weight gradient of 8 * 8 * 9 * 80 * 100 * 8 bytes, 35.2 MiB.
    KERNEL, SIZE, CHANNELS = 3, (80, 100), 8

    def weight_gradient(self, seed):
        torch.manual_seed(seed)
        x = torch.randn(2, self.CHANNELS, *self.SIZE, dtype=torch.float64)
        grad_y = torch.randn_like(x)
        grad_w = ops.local_regression_backward_weight(grad_y, x, [3, 3], [1, 1], [1, 1], [1, 1], 1)
        w = torch.zeros_like(grad_w)
        _, _, expected, _ = reference_grads(
            lambda xx, ww, _: reference.local_regression(xx, ww, None, 1, 1, 1, 1),
            x, w, None, grad_y)
        return grad_w, expected

    def test_a_freed_block_is_reused_and_wholly_rewritten(self):
        reggan_ext.empty_cpu_cache()
        grad_w, expected = self.weight_gradient(0)
        assert grad_w.nbytes >= 32 << 20
        torch.testing.assert_close(grad_w, expected, **TOLERANCES[torch.float64])
        first_block, nbytes = grad_w.data_ptr(), grad_w.nbytes
        del grad_w
        assert reggan_ext.cpu_cache_bytes() >= nbytes
        # The same block, still holding the first gradient, must come back fully overwritten.
        reused, expected = self.weight_gradient(1)
        assert reused.data_ptr() == first_block
        torch.testing.assert_close(reused, expected, **TOLERANCES[torch.float64])
        held, _ = self.weight_gradient(2)
        assert held.data_ptr() != reused.data_ptr()
        del reused, held
        assert reggan_ext.empty_cpu_cache() >= 2 * nbytes
        assert reggan_ext.cpu_cache_bytes() == 0

    def test_accumulated_gradients_in_cached_blocks(self):
        reggan_ext.empty_cpu_cache()
        layer = LocalRegression(self.CHANNELS, self.CHANNELS, self.KERNEL, self.SIZE, padding=1,
                                dtype=torch.float64)
        x = torch.randn(2, self.CHANNELS, *self.SIZE, dtype=torch.float64)
        layer(x).square().sum().backward()
        once = layer.weight.grad.clone()
        layer(x).square().sum().backward()
        torch.testing.assert_close(layer.weight.grad, 2 * once, rtol=1e-12, atol=0)

    def test_at_most_1_gib_of_freed_blocks_is_kept(self):
        reggan_ext.empty_cpu_cache()
        x = torch.rand(1, 1, 2900, 2900)  # 32.1 MiB: a 1x1 layer's output of the same size
        w, b = torch.rand(1, 1, 1, 1, 2900, 2900), torch.rand(1, 2900, 2900)
        outputs = [local_regression(x, w, b) for _ in range(33)]  # 33 blocks of 34 MiB, live
        torch.testing.assert_close(outputs[-1], x * w[:, 0, 0] + b)
        block = outputs[0].nbytes
        del outputs
        assert 1024 * 2**20 - 2 * block < reggan_ext.cpu_cache_bytes() <= 1024 * 2**20
        reggan_ext.empty_cpu_cache()

    def test_small_outputs_are_not_cached(self):
        reggan_ext.empty_cpu_cache()
        layer, x = random_layer_inputs(2, 3, 3, (16, 16), 3, padding=1, groups=3)
        layer(x.requires_grad_()).sum().backward()
        assert reggan_ext.cpu_cache_bytes() == 0


def test_nan_propagates():
    layer, x = random_layer_inputs(1, 3, 3, (8, 8), 3, padding=1, groups=3)
    x[0, 1, 4, 4] = math.nan
    y = layer(x)
    assert torch.isnan(y[0, 1, 3:6, 3:6]).all()
    assert not torch.isnan(y[0, 0]).any() and not torch.isnan(y[0, 2]).any()
    assert torch.isnan(y[0, 1]).sum() == 9


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (5, 1, 3, 1), (3, 2, 2, 1), (3, 1, 2, 2), ((2, 4), 1, (1, 2), 1)])
def test_weights_over_the_padding_reach_no_input_gradient(kernel, stride, padding, dilation):
    """A weight whose tap reads the zero padding multiplies no input pixel, so even NaN there
    must not reach grad_x: the input gradient pairs each weight only with the pixels it reads."""
    layer, x = random_layer_inputs(5, 4, 4, (9, 35), kernel, stride, padding, dilation, groups=2)
    w = layer.weight.detach().clone()
    kh, kw = w.shape[2:4]
    reads_image = F.unfold(torch.ones(1, 1, *x.shape[2:]), (kh, kw), dilation, padding, stride)
    over_padding = (reads_image == 0).reshape(kh, kw, *w.shape[4:])
    assert over_padding.any()
    grad_y = torch.randn(5, 4, *w.shape[4:], dtype=w.dtype)
    args = (list(x.shape[2:]), [stride] * 2, list(torch.nn.modules.utils._pair(padding)),
            [dilation] * 2, 2)
    expected = ops.local_regression_backward_input(grad_y, w.masked_fill(over_padding, 0), *args)
    got = ops.local_regression_backward_input(grad_y, w.masked_fill(over_padding, math.nan), *args)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_batch_zero_gradients_are_zero():
    layer, x = random_layer_inputs(0, 2, 2, (6, 5), 3, padding=1)
    x.requires_grad_()
    y = layer(x)
    assert y.shape == (0, 2, 6, 5)
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("stride", [(10**9, 1), (1, 10**9), (10**12, 10**12)])
def test_a_huge_stride_costs_nothing(stride):
    """A single output row or column reads no input through its stride, so the kernels need not
    size their scratch or loops by it."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    height = 1 if stride[0] > 1 else 4
    width = 1 if stride[1] > 1 else 3
    w = torch.randn(2, 2, 2, 2, height, width, dtype=torch.float64, requires_grad=True)
    got = local_regression(x, w, None, stride)
    want = reference.local_regression(x, w, None, stride)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.sum(), (x, w))
    for g, r in zip(grads, torch.autograd.grad(want.sum(), (x, w))):
        torch.testing.assert_close(g, r)


class TestBadInput:
    def call(self, x_shape=(2, 3, 8, 8), w_shape=(3, 1, 3, 3, 8, 8), b_shape=(3, 8, 8),
             stride=1, padding=1, dilation=1, groups=3, x_dtype=torch.float32,
             w_dtype=torch.float32, w_device="cpu"):
        x = torch.zeros(x_shape, dtype=x_dtype)
        w = torch.zeros(w_shape, dtype=w_dtype, device=w_device)
        b = None if b_shape is None else torch.zeros(b_shape, dtype=w_dtype, device=w_device)
        return local_regression(x, w, b, stride, padding, dilation, groups)

    def test_valid_call(self):
        assert self.call().shape == (2, 3, 8, 8)

    @pytest.mark.parametrize("kwargs,error,match", [
        (dict(x_shape=(3, 8, 8)), ValueError, r"input of shape \(N, C_in, H, W\)"),
        (dict(w_shape=(3, 1, 3, 3, 64)), ValueError, r"weight of shape \(C_out, C_in/groups"),
        (dict(w_shape=(3, 1, 3, 3, 7, 8)), ValueError, r"weight of shape .* = \[3, 1, 3, 3, 8, 8\]"),
        (dict(b_shape=(3, 8)), ValueError, r"bias of shape \(C_out, H_out, W_out\)"),
        (dict(groups=2), ValueError, r"groups \(2\) must divide the input channels \(3\)"),
        (dict(groups=0), ValueError, r"groups must be >= 1"),
        (dict(stride=0), ValueError, r"stride must be >= 1"),
        (dict(padding=-1), ValueError, r"padding must be >= 0"),
        (dict(padding="full"), ValueError, r"padding must be 'same', 'valid'"),
        (dict(stride=2, padding="same"), ValueError, r"padding='same' is not supported for strided"),
        (dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1"),
        (dict(w_dtype=torch.float64), ValueError, r"weight has dtype Double but input has dtype Float"),
        (dict(x_dtype=torch.float16, w_dtype=torch.float16), ValueError, r"CPU kernels support float32 and float64"),
        (dict(x_dtype=torch.int64, w_dtype=torch.int64), ValueError, r"input must be a floating-point"),
        (dict(x_shape=(2, 3, 2, 2), w_shape=(3, 1, 5, 5, 1, 1), b_shape=None, padding=0), ValueError,
         r"dilated kernel \(5x5\) is larger than the padded input \(2x2\)"),
        (dict(w_device="meta"), ValueError, r"weight is on meta but input is on cpu"),
    ])
    def test_error(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            self.call(**kwargs)

    # The backward ops check their own arguments: torch.ops callers reach them directly.
    @staticmethod
    def backward_input(grad_output=(2, 3, 8, 8), weight=(3, 1, 3, 3, 8, 8), input_size=(8, 8),
                       dtype=torch.float32, weight_dtype=torch.float32, weight_device="cpu"):
        return ops.local_regression_backward_input(
            torch.zeros(grad_output, dtype=dtype),
            torch.zeros(weight, dtype=weight_dtype, device=weight_device), list(input_size),
            [1, 1], [1, 1], [1, 1], 3)

    @staticmethod
    def backward_weight(grad_output=(2, 3, 8, 8), x=(2, 3, 8, 8), kernel_size=(3, 3), groups=3,
                        dtype=torch.float32, x_dtype=torch.float32, grad_device="cpu"):
        return ops.local_regression_backward_weight(
            torch.zeros(grad_output, dtype=dtype, device=grad_device), torch.zeros(x, dtype=x_dtype),
            list(kernel_size), [1, 1], [1, 1], [1, 1], groups)

    def test_valid_backward_calls(self):
        assert self.backward_input().shape == (2, 3, 8, 8)
        assert self.backward_weight().shape == (3, 1, 3, 3, 8, 8)

    @pytest.mark.parametrize("kwargs,match", [
        (dict(grad_output=(3, 8, 8)), r"grad_output of shape \(N, C_out, H_out, W_out\) \(4 dim"),
        (dict(weight=(1, 3, 3, 8, 8)), r"weight of shape \(C_out, C_in/groups, kH, kW, H_out, W_out\) \(6"),
        (dict(grad_output=(2, 3, 8, 7)), r"grad_output of shape .* = \[2, 3, 8, 8\], got \[2, 3, 8, 7\]"),
        (dict(input_size=(8, 8, 1)), r"input_size must be \(H, W\), got \[8, 8, 1\]"),
        (dict(input_size=(9, 8)), r"weight of shape .* = \[3, 1, 3, 3, 9, 8\], got \[3, 1, 3, 3, 8, 8\]"),
        (dict(weight_dtype=torch.float64), r"weight has dtype Double but grad_output has dtype Float"),
        (dict(dtype=torch.int64, weight_dtype=torch.int64), r"grad_output must be a floating-point"),
        (dict(weight_device="meta"), r"weight is on meta but grad_output is on cpu"),
    ])
    def test_backward_input_error(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            self.backward_input(**kwargs)

    @pytest.mark.parametrize("kwargs,match", [
        (dict(grad_output=(3, 8, 8)), r"grad_output of shape \(N, C_out, H_out, W_out\) \(4 dim"),
        (dict(x=(3, 8, 8)), r"input of shape \(N, C_in, H, W\) \(4 dimensions\)"),
        (dict(grad_output=(1, 3, 8, 8)), r"grad_output of shape .* = \[2, 3, 8, 8\], got \[1, 3, 8, 8\]"),
        (dict(kernel_size=(3,)), r"kernel_size must be \(kH, kW\), got \[3\]"),
        (dict(groups=2), r"groups \(2\) must divide the input channels \(3\)"),
        (dict(x_dtype=torch.float64), r"grad_output has dtype Float but input has dtype Double"),
        (dict(grad_device="meta"), r"grad_output is on meta but input is on cpu"),
    ])
    def test_backward_weight_error(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            self.backward_weight(**kwargs)

    def test_cuda_tensor_on_cpu_only_build(self, monkeypatch):
        class FakeCudaTensor:
            is_cuda = True

        monkeypatch.setattr(reggan_ext.ops, "cuda_built", lambda: False)
        with pytest.raises(RuntimeError, match="built without CUDA kernels.*REGGAN_EXT_CUDA=1"):
            check_device_supported(FakeCudaTensor(), "input")


def test_cuda_kernels_are_built():
    if not torch.cuda.is_available():
        pytest.skip("no GPU: the CUDA kernels are compiled in CI but run only where a GPU is")
    assert reggan_ext.cuda_built(), "a GPU is present but reggan_ext was built without CUDA"


class TestModule:
    def test_output_size_and_weight_shape(self):
        layer = LocalRegression(6, 4, (3, 2), (20, 15), stride=(2, 1), padding=1, dilation=(1, 2),
                                groups=2)
        assert layer.output_size == (10, 15)
        assert layer.weight.shape == (4, 3, 3, 2, 10, 15)
        assert layer.bias.shape == (4, 10, 15)
        conv = torch.nn.Conv2d(6, 4, (3, 2), (2, 1), 1, (1, 2), 2)
        assert conv(torch.zeros(1, 6, 20, 15)).shape[2:] == layer.output_size

    @pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
    @pytest.mark.parametrize("padding", ["same", 2, (1, 0)])
    def test_padding_modes_match_reference(self, padding_mode, padding):
        torch.manual_seed(0)
        layer = LocalRegression(3, 3, 4, (9, 10), padding=padding, groups=3,
                                padding_mode=padding_mode, dtype=torch.float64)
        check_against_reference(layer, torch.randn(2, 3, 9, 10, dtype=torch.float64),
                                torch.float64)

    def test_same_padding_keeps_size(self):
        for k in (1, 2, 3, 4, 5):
            assert LocalRegression(1, 1, k, (11, 8), padding="same").output_size == (11, 8)

    @pytest.mark.parametrize("kernel", [1, 3, 5])
    def test_identity_init_reproduces_input(self, kernel):
        layer = LocalRegression(3, 3, kernel, (12, 9), padding="same", groups=3, init="identity")
        x = torch.randn(2, 3, 12, 9)
        torch.testing.assert_close(layer(x), x, rtol=0, atol=0)
        full = LocalRegression(2, 2, kernel, (12, 9), padding="same", init="identity")
        torch.testing.assert_close(full(x[:, :2]), x[:, :2], rtol=0, atol=0)

    def test_default_init_mirrors_conv2d(self):
        torch.manual_seed(0)
        layer = LocalRegression(4, 8, 3, (32, 32), padding=1, groups=2)
        bound = 1 / math.sqrt(2 * 3 * 3)
        for p in (layer.weight, layer.bias):
            assert p.abs().max() <= bound
            assert p.abs().max() > 0.95 * bound
            # U(-b, b) has standard deviation b / sqrt(3).
            assert abs(p.std().item() - bound / math.sqrt(3)) < 0.02 * bound

    def test_extra_repr(self):
        layer = LocalRegression(3, 3, 5, (128, 128), padding="same", groups=3, bias=False,
                                padding_mode="reflect")
        assert repr(layer) == (
            "LocalRegression(3, 3, kernel_size=(5, 5), input_size=(128, 128), "
            "output_size=(128, 128), stride=(1, 1), padding=same, groups=3, bias=False, "
            "padding_mode=reflect)"
        )

    def test_state_dict_round_trip(self):
        a = LocalRegression(3, 3, 3, (10, 10), padding=1, groups=3)
        b = LocalRegression(3, 3, 3, (10, 10), padding=1, groups=3)
        b.load_state_dict(a.state_dict())
        x = torch.randn(2, 3, 10, 10)
        assert torch.equal(a(x), b(x))
        other = LocalRegression(3, 3, 3, (12, 10), padding=1, groups=3)
        with pytest.raises(RuntimeError, match="size mismatch for weight"):
            other.load_state_dict(a.state_dict())

    def test_in_sequential_trains(self):
        torch.manual_seed(0)
        model = torch.nn.Sequential(LocalRegression(1, 1, 3, (8, 8), padding=1),
                                    torch.nn.Sigmoid())
        x = torch.rand(16, 1, 8, 8)
        target = torch.sigmoid(x.flip(-1))
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        first = None
        for _ in range(100):
            opt.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            first = first if first is not None else loss.item()
        assert loss.item() < 0.2 * first

    def test_wrong_input_size(self):
        layer = LocalRegression(3, 3, 3, (10, 10), padding=1)
        with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, 10, 10\), got \(2, 3, 10, 11\)"):
            layer(torch.zeros(2, 3, 10, 11))
        with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, 10, 10\), got \(2, 4, 10, 10\)"):
            layer(torch.zeros(2, 4, 10, 10))

    def test_conv2d_argument_conventions(self):
        """Sizes may be numpy or tensor integers, and the arguments come in nn.Conv2d's
        positional order (..., bias, padding_mode, device, dtype)."""
        import numpy as np

        layer = LocalRegression(np.int64(2), 2, np.int64(3), (np.int32(9), 8), torch.tensor(1), 1,
                                1, 1, True, "zeros", "cpu", torch.float64)
        assert layer.weight.dtype == torch.float64 and layer.output_size == (9, 8)
        assert all(type(v) is int for v in layer.kernel_size + layer.input_size + layer.stride)
        x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
        torch.testing.assert_close(local_regression(x, layer.weight, layer.bias, np.int64(1),
                                                    (np.int64(1), 1)), layer(x))

    @pytest.mark.parametrize("kwargs,match", [
        (dict(groups=2), r"groups \(2\) must divide in_channels \(3\)"),
        (dict(padding_mode="mirror"), r"padding_mode must be one of"),
        (dict(init="zeros"), r"init must be one of"),
        (dict(in_channels=0), r"in_channels must be a positive int"),
        (dict(out_channels=6, init="identity"), r"init='identity' requires in_channels == out_channels"),
        (dict(kernel_size=12), r"dilated kernel \(12\) is larger than the padded input \(10\)"),
        (dict(stride=2, padding="same"), r"padding='same' is not supported for strided"),
        (dict(in_channels=True), r"in_channels must be a positive int, got True"),
        (dict(stride=0), r"stride must be >= 1, got 0"),
        (dict(stride=-1), r"stride must be >= 1, got -1"),
        (dict(stride=2.0), r"stride must be an int or a pair of ints, got 2.0"),
        (dict(stride=(1, 2, 3)), r"stride must be an int or a pair of ints"),
        (dict(kernel_size=0), r"kernel_size must be >= 1, got 0"),
        (dict(dilation=(1, 0)), r"dilation must be >= 1, got \(1, 0\)"),
        (dict(padding=-1), r"padding must be >= 0, got -1"),
        (dict(input_size=-3), r"input_size must be >= 1, got -3"),
    ])
    def test_bad_arguments(self, kwargs, match):
        args = dict(in_channels=3, out_channels=3, kernel_size=3, input_size=(8, 8), padding=1)
        if "kernel_size" in kwargs:
            args["padding"] = 0
            args["input_size"] = (10, 10)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            LocalRegression(**args)


@pytest.mark.parametrize("seed", range(40))
def test_shifted_reference_matches_unfold_reference(seed):
    g = random_geometry(seed)
    torch.manual_seed(seed)
    layer = LocalRegression(g["in_ch"], g["out_ch"], g["kernel"], g["size"], g["stride"],
                            g["padding"], g["dilation"], g["groups"], g["bias"],
                            dtype=torch.float64)
    x = torch.randn(g["batch"], g["in_ch"], *g["size"], dtype=torch.float64)
    args = (x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(reference.local_regression_shifted(*args),
                               reference.local_regression(*args), **TOLERANCES[torch.float64])
