"""The LocalRegression benchmark cases of issue 2 and the implementations they compare, shared
by the pytest-benchmark suite and the table script."""

import torch

import reggan_ext
from reggan_ext import reference

# name -> (batch, channels, size, kernel, groups)
CASES = {
    "N16 3->3 per-channel 128x128 k3": (16, 3, 128, 3, 3),
    "N16 3->3 per-channel 128x128 k5": (16, 3, 128, 5, 3),
    "N16 3->3 per-channel 128x128 k7": (16, 3, 128, 7, 3),
    "N8 16->16 groups=1 64x64 k3": (8, 16, 64, 3, 1),
}
QUICK_CASES = {"N2 3->3 per-channel 16x16 k3": (2, 3, 16, 3, 3)}

PASSES = ("forward", "backward", "forward+backward")

IMPLEMENTATIONS = {
    "kernel": reggan_ext.local_regression,
    "shifted": reference.local_regression_shifted,
    "unfold": reference.local_regression,
}


def make_inputs(case, device, dtype, requires_grad=False):
    batch, channels, size, kernel, groups = case
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator, dtype=dtype)
    w = torch.randn(channels, channels // groups, kernel, kernel, size, size, generator=generator,
                    dtype=dtype)
    b = torch.randn(channels, size, size, generator=generator, dtype=dtype)
    return [t.to(device).requires_grad_(requires_grad) for t in (x, w, b)]


def forward_fn(impl, case, x, w, b):
    _, _, _, kernel, groups = case
    return lambda: impl(x, w, b, 1, kernel // 2, 1, groups)


def pass_fn(impl, case, device, dtype, which):
    """A no-argument callable running `which` in forward | backward | forward+backward."""
    x, w, b = make_inputs(case, device, dtype, requires_grad=which != "forward")
    forward = forward_fn(impl, case, x, w, b)
    if which == "forward":
        return forward
    batch, channels, size, _, _ = case
    grad = torch.randn(batch, channels, size, size, dtype=dtype, device=device)
    if which == "backward":
        y = forward()
        return lambda: torch.autograd.grad(y, (x, w, b), grad, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), (x, w, b), grad)


def scaled_cases(cases, batch_multiplier):
    """The cases with every batch multiplied (and the names saying so): a GPU needs larger batches
    than a CPU before launch overhead stops mattering."""
    scaled = {}
    for name, (batch, *rest) in cases.items():
        scaled[name.replace(f"N{batch} ", f"N{batch * batch_multiplier} ", 1)] = (
            batch * batch_multiplier, *rest)
    return scaled


def weight_elements(case):
    """Elements of the case's weight: one per output pixel, input channel of its group and tap,
    which is also the forward's multiply-adds per sample."""
    _, channels, size, kernel, groups = case
    return channels * (channels // groups) * kernel * kernel * size * size


def multiply_adds(case, which):
    """Multiply-adds a pass does: one per weight and sample in the forward; the backward's input
    gradient and weight gradient each do as many."""
    batch = case[0]
    return (1 if which == "forward" else 2) * batch * weight_elements(case)


def traffic_bytes(case, dtype, which):
    """Bytes a pass must move at least. Forward: read x, weight and bias, write y. Backward: read
    grad_y, x and weight, write grad_x, grad_weight and grad_bias."""
    batch, channels, size, _, _ = case
    plane = size * size
    activations = batch * channels * plane
    weight = weight_elements(case)
    bias = channels * plane
    elements = (2 * activations + weight + bias if which == "forward"
                else 3 * activations + 2 * weight + bias)
    return elements * torch.finfo(dtype).bits // 8
