"""CUDA kernels of local_regression against the CPU kernels and the unfold reference.

float64 and float32 are compared tightly; float16 and bfloat16 against an error bound (see
`assert_within_half_precision`). Also odd shapes, batches of 0, 1 and more than a kernel's batch tile,
non-contiguous and channels_last inputs, determinism, 64-bit indexing, streams, gradcheck, opcheck,
the module and torch.compile. Everything here runs wherever torch.cuda.is_available().
"""

import pytest
import torch

import reggan_ext
from reggan_ext import LocalRegression, reference

from conftest import TOLERANCES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

ops = torch.ops.reggan_ext

# (batch, in_ch, out_ch, (H, W), (kH, kW), stride, padding, dilation, groups)
GEOMETRIES = [
    (2, 3, 3, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), 3),  # RegGAN's per-channel layer
    (16, 3, 3, (64, 64), (7, 7), (1, 1), (3, 3), (1, 1), 3),  # two full batch tiles, 49 taps
    (3, 4, 6, (10, 7), (2, 3), (2, 1), (1, 2), (1, 2), 2),
    (1, 2, 4, (13, 8), (5, 3), (3, 2), (2, 1), (2, 1), 1),  # stride 3, dilation 2
    (10, 2, 2, (7, 9), (3, 3), (2, 2), (1, 1), (1, 1), 2),  # a partial second batch tile
    (17, 3, 3, (6, 5), (3, 2), (1, 1), (1, 0), (2, 1), 3),  # more images than any tile
    (1, 1, 1, (5, 37), (1, 7), (1, 3), (0, 3), (1, 2), 1),  # rows that are not warp multiples
    (2, 2, 2, (11, 10), (3, 3), (3, 3), (2, 2), (3, 3), 1),  # dilation a multiple of the stride
    (3, 6, 3, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (0, 3, 3, (5, 5), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # empty batch
]
GEOMETRY_IDS = [f"N{g[0]}-{g[1]}to{g[2]}-{g[3][0]}x{g[3][1]}-k{g[4][0]}x{g[4][1]}-g{g[8]}"
                for g in GEOMETRIES]


def random_arguments(geometry, dtype, device, seed=0):
    """Inputs of the three ops, drawn in float64 on the CPU and rounded to dtype."""
    batch, in_ch, out_ch, size, kernel, stride, padding, dilation, groups = geometry
    out_h = (size[0] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (size[1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, dtype=torch.float64, generator=generator).to(dtype).to(device)

    return dict(
        x=draw(batch, in_ch, *size), w=draw(out_ch, in_ch // groups, *kernel, out_h, out_w),
        b=draw(out_ch, out_h, out_w), gy=draw(batch, out_ch, out_h, out_w),
        geometry=(list(stride), list(padding), list(dilation), groups),
    )


def run_ops(args):
    """Forward, backward_input and backward_weight of the kernels on args' device."""
    x, w, b, gy, geometry = args["x"], args["w"], args["b"], args["gy"], args["geometry"]
    y = ops.local_regression(x, w, b, *geometry)
    gx = ops.local_regression_backward_input(gy, w, list(x.shape[2:]), *geometry)
    gw = ops.local_regression_backward_weight(gy, x, list(w.shape[2:4]), *geometry)
    return y, gx, gw


def run_reference(x, w, b, gy, geometry):
    """The same three results from the unfold oracle and autograd, in float64 on the CPU."""
    stride, padding, dilation, groups = geometry
    x, w, b, gy = (t.detach().cpu().double() for t in (x, w, b, gy))
    x.requires_grad_()
    w.requires_grad_()
    y = reference.local_regression(x, w, b, stride, padding, dilation, groups)
    if y.numel() == 0:
        return y.detach(), torch.zeros_like(x), torch.zeros_like(w)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    return y.detach(), gx, gw


def to_cpu(args):
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in args.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_matches_cpu_and_reference(dtype, geometry):
    args = random_arguments(geometry, dtype, "cuda")
    cuda = run_ops(args)
    cpu = run_ops(to_cpu(args))
    ref = run_reference(args["x"], args["w"], args["b"], args["gy"], args["geometry"])
    # The CPU and CUDA kernels sum in the same order; only fused multiply-adds differ. (The
    # float32 CPU kernel itself is up to 4e-6 off the float64 reference here.)
    tight = 1e-12 if dtype == torch.float64 else 5e-5
    names = ("forward", "grad_input", "grad_weight")
    for name, got, want_cpu, want_ref in zip(names, cuda, cpu, ref):
        assert got.device.type == "cuda" and got.dtype == dtype, name
        torch.testing.assert_close(got.cpu(), want_cpu, rtol=tight, atol=tight,
                                   msg=lambda m: f"{name} vs CPU: {m}")
        torch.testing.assert_close(got.cpu().double(), want_ref, **TOLERANCES[dtype],
                                   msg=lambda m: f"{name} vs reference: {m}")


# Half an ulp of the output format, doubled for slack: the kernels round once, at the end.
HALF_PRECISION_UNIT = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_within_half_precision(args, results, exact):
    """float16/bfloat16 inputs are exact in float32 and so are their products; the kernels sum K
    of them in float32 (error <= K * 2**-24 * sum|terms|, whatever the order) and round the sum
    once to the dtype (half an ulp). exact(x, w, b, gy, geometry) gives the three results in
    float64 on the same rounded inputs; on absolute values, sum|terms|."""
    x, w, groups = args["x"], args["w"], args["geometry"][3]
    dtype = x.dtype
    taps = w.shape[2] * w.shape[3]
    # K of each result: an output's inputs and its bias; the output taps that read an input (at
    # most); the samples of a weight's gradient.
    counts = (w.shape[1] * taps + 1, w.shape[0] // groups * taps, x.shape[0])
    ref = exact(x, w, args["b"], args["gy"], args["geometry"])
    bound = exact(x.abs(), w.abs(), args["b"].abs(), args["gy"].abs(), args["geometry"])
    unit = HALF_PRECISION_UNIT[dtype]
    for name, got, want, terms, count in zip(("forward", "grad_input", "grad_weight"), results,
                                             ref, bound, counts):
        assert got.dtype == dtype, name
        error = (got.cpu().double() - want).abs()
        allowed = unit * want.abs() + count * 2.0**-24 * terms + 1e-7
        assert (error <= allowed).all(), (
            f"{name}: error {error.max().item():.3g} exceeds the bound at "
            f"{(error > allowed).nonzero()[:5].tolist()}")


def run_cpu_float64(x, w, b, gy, geometry):
    """run_ops by the float64 CPU kernels: an exact oracle (tested against the reference) that,
    unlike the unfold reference, needs no memory beyond its results on large grids."""
    return run_ops({"x": x.cpu().double(), "w": w.cpu().double(), "b": b.cpu().double(),
                    "gy": gy.cpu().double(), "geometry": geometry})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_half_precision(dtype, geometry):
    args = random_arguments(geometry, dtype, "cuda")
    assert_within_half_precision(args, run_ops(args), run_reference)


def blocked_geometry(kernel, padding, width, column_stride=1, column_dilation=1):
    """A per-channel geometry whose grids are large enough for the register-blocked kernels (at
    least SMs x 1024 threads of 4 columns, as in local_regression_kernels.cu) on this GPU."""
    channels, height = 16 * column_stride, 128
    out_w = (width + 2 * padding[1] - column_dilation * (kernel[1] - 1) - 1) // column_stride + 1
    blocked = torch.cuda.get_device_properties(0).multi_processor_count * 1024
    # The forward's threads: 8 images (float32) per thread, channels * height * (out_w / 4)
    # column blocks per 8 images; backward_weight's do not depend on the batch.
    batch = 8 * -(-blocked // (channels * height * -(-out_w // 4)))
    assert channels * kernel[0] * height * -(-out_w // 4) >= blocked, "too small for this GPU"
    return (batch, channels, channels, (height, width), kernel, (1, column_stride), padding,
            (1, column_dilation), channels)


def misaligned(args):
    """args with each tensor replaced by a contiguous copy one element past an aligned address."""
    def shift(t):
        storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        return storage[1:].view(t.shape).copy_(t)

    return {k: shift(v) if torch.is_tensor(v) else v for k, v in args.items()}


# Widths of whole quads (each pad_w % 4) take the quad-column kernels; 130 does not. The last
# two read columns a step of 2 apart (the kernels' general column step): a column dilation, and
# a column stride.
BLOCKED = [((3, 3), (1, 1), 128, 1, 1), ((5, 5), (2, 2), 128, 1, 1), ((7, 7), (3, 3), 128, 1, 1),
           ((3, 5), (1, 0), 132, 1, 1), ((3, 3), (1, 1), 130, 1, 1), ((3, 3), (1, 2), 128, 1, 2),
           ((3, 3), (1, 1), 128, 2, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,padding,width,column_stride,column_dilation", BLOCKED,
                         ids=[f"k{k[0]}x{k[1]}-p{p[1]}-w{w}-s{s}-d{d}"
                              for k, p, w, s, d in BLOCKED])
def test_blocked_kernels(dtype, kernel, padding, width, column_stride, column_dilation):
    """The register-blocked kernels of large grids against the CPU (float64, float32) or within
    the half-precision bound (float16, bfloat16), and with aligned tensors (quad columns where
    the widths allow) against misaligned copies (scalar loads): the same sums in the same
    order, so equal bit for bit in every dtype."""
    geometry = blocked_geometry(kernel, padding, width, column_stride, column_dilation)
    args = random_arguments(geometry, dtype, "cuda")
    aligned = run_ops(args)
    shifted = run_ops(misaligned(args))
    names = ("forward", "grad_input", "grad_weight")
    for name, got, want in zip(names, aligned, shifted):
        assert torch.equal(got, want), f"{name}: aligned and misaligned tensors differ"
    if dtype in (torch.float64, torch.float32):
        tight = 1e-12 if dtype == torch.float64 else 5e-5
        for name, got, want in zip(names, aligned, run_ops(to_cpu(args))):
            torch.testing.assert_close(got.cpu(), want, rtol=tight, atol=tight,
                                       msg=lambda m: f"{name} vs CPU: {m}")
    else:
        assert_within_half_precision(args, aligned, run_cpu_float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [100, 256])
def test_split_batch_weight_gradient(dtype, batch):
    """Batches through RegGAN's 3-channel layer: backward_weight's grid alone would be small,
    so the batch is split (100 images into 3 ranges of at least 32; 256, the benchmarks' batch,
    into enough that an H100's grid takes the 4-column kernel) and the partial sums added in a
    fixed order: deterministic, and equal to the CPU's sum within rounding."""
    geometry = (batch, 3, 3, (128, 128), (3, 3), (1, 1), (1, 1), (1, 1), 3)
    args = random_arguments(geometry, dtype, "cuda")
    results = run_ops(args)
    gw = results[2]
    assert torch.equal(gw, run_ops(args)[2])
    _, _, shifted = run_ops(misaligned(args))
    assert torch.equal(gw, shifted)
    if dtype == torch.bfloat16:
        assert_within_half_precision(args, results, run_cpu_float64)
        return
    want = run_cpu_float64(args["x"], args["w"], args["b"], args["gy"], args["geometry"])[2]
    # Sums of N products of unit normals: a float32 sum is within N * 2**-24 * sum|terms|.
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(gw.cpu().double(), want, rtol=tolerance, atol=tolerance * 10)


def test_non_contiguous_and_channels_last():
    """The ops accept any strides; results equal those of contiguous copies bit for bit."""
    args = random_arguments(GEOMETRIES[2], torch.float32, "cuda")
    expected = run_ops(args)
    x, w, b, gy = args["x"], args["w"], args["b"], args["gy"]
    strided = dict(args)
    strided["x"] = x.to(memory_format=torch.channels_last)
    # Every other element of a wider tensor, and transposed copies viewed back.
    wide = torch.zeros(*w.shape[:-1], 2 * w.shape[-1], device="cuda")
    wide[..., ::2] = w
    strided["w"] = wide[..., ::2]
    strided["b"] = b.transpose(1, 2).contiguous().transpose(1, 2)
    strided["gy"] = gy.to(memory_format=torch.channels_last)
    assert not strided["w"].is_contiguous() and not strided["b"].is_contiguous()
    assert not strided["x"].is_contiguous() and not strided["gy"].is_contiguous()
    names = ("forward", "grad_input", "grad_weight")
    for name, got, want in zip(names, run_ops(strided), expected):
        assert got.is_contiguous(), name
        assert torch.equal(got, want), name


def test_expanded_grad_output():
    """grad_output of a sum is an expanded (stride 0) tensor."""
    args = random_arguments(GEOMETRIES[0], torch.float64, "cuda")
    ones = torch.ones(run_ops(args)[0].shape, dtype=torch.float64, device="cuda")
    _, gx, gw = run_ops(dict(args, gy=ones))
    x = args["x"].clone().requires_grad_()
    w = args["w"].clone().requires_grad_()
    stride, padding, dilation, groups = args["geometry"]
    reggan_ext.local_regression(x, w, args["b"], stride, padding, dilation, groups).sum().backward()
    assert torch.equal(x.grad, gx) and torch.equal(w.grad, gw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_is_deterministic(dtype):
    geometry = (12, 4, 4, (65, 47), (3, 3), (1, 1), (1, 1), (1, 1), 2)
    args = random_arguments(geometry, dtype, "cuda")
    first = run_ops(args)
    for _ in range(3):
        for name, a, b in zip(("forward", "grad_input", "grad_weight"), first, run_ops(args)):
            assert torch.equal(a, b), name


def test_batch_one_and_zero_match_cpu():
    for batch in (0, 1):
        geometry = (batch, 3, 3, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), 3)
        args = random_arguments(geometry, torch.float64, "cuda")
        for name, got, want in zip(("forward", "grad_input", "grad_weight"), run_ops(args),
                                   run_ops(to_cpu(args))):
            assert got.shape == want.shape, name
            torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
        if batch == 0:
            assert torch.equal(run_ops(args)[2], torch.zeros_like(args["w"]))


def test_nan_propagates():
    args = random_arguments(GEOMETRIES[0], torch.float32, "cuda")
    args["x"][0, 1, 4, 4] = float("nan")
    y, _, gw = run_ops(args)
    assert torch.isnan(y[0, 1, 3:6, 3:6]).all() and torch.isnan(y[0, 1]).sum() == 9
    assert not torch.isnan(y[0, [0, 2]]).any() and not torch.isnan(y[1]).any()
    assert torch.isnan(gw[1]).any() and not torch.isnan(gw[[0, 2]]).any()


@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=GEOMETRY_IDS[:4])
def test_nan_weights_over_the_padding_propagate(geometry):
    """Zero padding times a NaN weight is NaN, over padded rows as over padded columns: the
    forward has NaN exactly where the CPU kernels (and the reference) have it."""
    args = random_arguments(geometry, torch.float32, "cuda")
    args["w"].view(-1)[::7] = float("nan")
    y = run_ops(args)[0]
    want = run_ops(to_cpu(args))[0]
    assert torch.isnan(want).any()
    assert torch.equal(y.isnan().cpu(), want.isnan())
    torch.testing.assert_close(y.cpu().nan_to_num(), want.nan_to_num(), rtol=5e-5, atol=5e-5)


def test_side_stream():
    """The kernels run on the current stream, ordered after the work that made their inputs."""
    geometry = (8, 3, 3, (128, 128), (5, 5), (1, 1), (2, 2), (1, 1), 3)
    args = random_arguments(geometry, torch.float32, "cuda")
    expected = run_ops(args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Inputs written on the side stream right before the kernels read them.
        fresh = {k: (v * 1).mul_(1) if torch.is_tensor(v) else v for k, v in args.items()}
        results = run_ops(fresh)
    stream.synchronize()
    for name, got, want in zip(("forward", "grad_input", "grad_weight"), results, expected):
        assert torch.equal(got, want), name


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_second_device():
    args = random_arguments(GEOMETRIES[0], torch.float64, "cuda:1")
    for name, got, want in zip(("forward", "grad_input", "grad_weight"), run_ops(args),
                               run_ops(to_cpu(args))):
        assert got.device == torch.device("cuda:1"), name
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


def test_device_mismatch_is_rejected():
    args = random_arguments(GEOMETRIES[0], torch.float32, "cuda")
    with pytest.raises(ValueError, match="weight is on cpu but input is on cuda"):
        ops.local_regression(args["x"], args["w"].cpu(), None, *args["geometry"])


def test_unsupported_dtype_is_rejected():
    x = torch.zeros(1, 1, 4, 4, device="cuda", dtype=torch.float8_e4m3fn)
    w = torch.zeros(1, 1, 3, 3, 2, 2, device="cuda", dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="CUDA kernels support float32, float64, float16 and bf"):
        ops.local_regression(x, w, None, [1, 1], [0, 0], [1, 1], 1)


def test_64_bit_indexing():
    """More than 2**31 elements per tensor: the kernels take their 64-bit path. With a 1x1 kernel
    every op is an elementwise product, which float16 computes exactly like torch's multiply."""
    side = 46341  # side**2 > 2**31
    needed = 6 * 2 * side * side
    if torch.cuda.get_device_properties(0).total_memory < needed + (8 << 30):
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of GPU memory")
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 1, side, side, device="cuda", dtype=torch.float16, generator=generator)
    w = torch.randn(1, 1, 1, 1, side, side, device="cuda", dtype=torch.float16,
                    generator=generator)
    geometry = ([1, 1], [0, 0], [1, 1], 1)
    y = ops.local_regression(x, w, None, *geometry)
    assert torch.equal(y.view(-1), x.view(-1) * w.view(-1))
    del y
    gy = torch.randn_like(x)
    gx = ops.local_regression_backward_input(gy, w, [side, side], *geometry)
    assert torch.equal(gx.view(-1), w.view(-1) * gy.view(-1))
    del gx
    gw = ops.local_regression_backward_weight(gy, x, [1, 1], *geometry)
    assert torch.equal(gw.view(-1), gy.view(-1) * x.view(-1))


def test_gradcheck():
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device="cuda", requires_grad=True)
    x = torch.randn(2, 2, 9, 7, **kw)
    w = torch.randn(4, 2, 3, 2, 3, 4, **kw)
    b = torch.randn(4, 3, 4, **kw)

    def fn(x, w, b):
        return reggan_ext.local_regression(x, w, b, stride=(3, 2), padding=(2, 1), dilation=(2, 1))

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype):
    torch.manual_seed(0)
    kw = dict(dtype=dtype, device="cuda", requires_grad=True)
    x = torch.randn(3, 4, 10, 7, **kw)
    w = torch.randn(6, 2, 2, 3, 6, 7, **kw)
    b = torch.randn(6, 6, 7, **kw)
    geometry = ([2, 1], [1, 2], [1, 2], 2)
    channels_last = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    for sample in ((x, w, b, *geometry), (channels_last, w, None, *geometry)):
        torch.library.opcheck(ops.local_regression.default, sample)
    gy = torch.randn(3, 6, 6, 7, dtype=dtype, device="cuda")
    torch.library.opcheck(ops.local_regression_backward_input.default,
                          (gy, w.detach(), [10, 7], *geometry))
    torch.library.opcheck(ops.local_regression_backward_weight.default,
                          (gy, x.detach(), [2, 3], *geometry))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_module_matches_cpu(padding_mode):
    torch.manual_seed(0)
    cpu = LocalRegression(3, 3, 5, (32, 24), padding="same", groups=3, padding_mode=padding_mode,
                          dtype=torch.float64)
    gpu = LocalRegression(3, 3, 5, (32, 24), padding="same", groups=3, padding_mode=padding_mode,
                          dtype=torch.float64, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 3, 32, 24, dtype=torch.float64)
    x_gpu = x.cuda().requires_grad_()
    x.requires_grad_()
    for layer, inp in ((cpu, x), (gpu, x_gpu)):
        layer(inp).square().sum().backward()
    tight = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, **tight)
    torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, **tight)
    torch.testing.assert_close(gpu.bias.grad.cpu(), cpu.bias.grad, **tight)
    torch.testing.assert_close(gpu(x_gpu).cpu(), cpu(x), **tight)


def test_torch_compile_half():
    torch.manual_seed(0)
    layer = LocalRegression(3, 3, 3, (32, 32), padding=1, groups=3, device="cuda",
                            dtype=torch.float16)
    model = torch.nn.Sequential(layer, torch.nn.Tanh())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.float16, requires_grad=True)
    y_eager = model(x)
    gx_eager, gw_eager = torch.autograd.grad(y_eager.float().sum(), (x, layer.weight))
    y = compiled(x)
    gx, gw = torch.autograd.grad(y.float().sum(), (x, layer.weight))
    # The kernels are the same; tanh and its derivative may be fused and rounded differently.
    half = dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y, y_eager, **half)
    torch.testing.assert_close(gx, gx_eager, **half)
    torch.testing.assert_close(gw, gw_eager, **half)
