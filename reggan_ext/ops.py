"""Python front end of the local_regression ops: argument conventions of F.conv2d and autograd.

The schemas, argument checks and fake (Meta) kernels live in C++ (csrc/local_regression); the
backward is two ops of its own so that each gradient is computed only when it is needed.
"""

import torch
import torch.nn.functional as F

from reggan_ext._geometry import IntPair, Padding, explicit_padding, pair

_ops = torch.ops.reggan_ext


# Read once, when the package loads the library: torch.compile cannot trace the dispatcher
# query, and the registrations never change afterwards.
_CUDA_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("reggan_ext::local_regression", "CUDA")


def cuda_built() -> bool:
    """Whether this build of reggan_ext has the CUDA kernels."""
    return _CUDA_BUILT


def empty_cpu_cache() -> int:
    """Frees the blocks that the kernels' large CPU outputs (32 MiB and more: a locally
    connected layer's weight gradient) left for reuse, as torch.cuda.empty_cache() does on the GPU;
    returns their bytes. The kernels keep at most 1 GiB of them, and reuse a block for an output
    of the same size, which spares the page faults of fresh memory at every training step."""
    return _ops.empty_cpu_cache()


def cpu_cache_bytes() -> int:
    """Bytes of freed large CPU outputs kept for reuse (see empty_cpu_cache)."""
    return _ops.cpu_cache_bytes()


def check_device_supported(tensor: torch.Tensor, name: str) -> None:
    if tensor.is_cuda and not cuda_built():
        raise RuntimeError(
            f"{name} is a CUDA tensor, but reggan_ext was built without CUDA kernels. Rebuild it "
            "with a CUDA build of torch and a CUDA toolkit: "
            "REGGAN_EXT_CUDA=1 pip install --no-build-isolation --force-reinstall --no-deps ."
        )


def local_regression(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Locally connected 2-d layer: a convolution whose weights are not shared between pixels.

    y[n, o, i, j] = bias[o, i, j] + sum over c < C_in/groups, u < kH, v < kW of
        weight[o, c, u, v, i, j] * input[n, g(o) * C_in/groups + c, i*sH - pH + u*dH, j*sW - pW + v*dW]
    with g(o) = o // (C_out/groups) and zeros outside the image.

    Args:
        input: (N, C_in, H, W).
        weight: (C_out, C_in/groups, kH, kW, H_out, W_out), one kernel per output pixel.
        bias: (C_out, H_out, W_out) or None.
        stride, padding, dilation, groups: as in F.conv2d; padding may be 'same' or 'valid'.
            H_out and W_out follow nn.Conv2d's formula.
    """
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if weight.dim() != 6:
        raise ValueError(
            "local_regression: expected weight of shape (C_out, C_in/groups, kH, kW, H_out, W_out), "
            f"got shape {tuple(weight.shape)}"
        )
    top, bottom, left, right = explicit_padding(padding, weight.shape[2:4], stride, dilation)
    if (bottom, right) != (top, left):
        # Only padding='same' with an even dilated extent gets here; like F.conv2d, pad the extra
        # row/column explicitly.
        input = F.pad(input, (0, right - left, 0, bottom - top))
    check_device_supported(input, "input")
    return _ops.local_regression.default(input, weight, bias, stride, (top, left), dilation, groups)


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.local_regression_backward_input.default(
            grad_output, weight, input.shape[2:], *ctx.geometry
        )
    if ctx.needs_input_grad[1]:
        grad_weight = _ops.local_regression_backward_weight.default(
            grad_output, input, weight.shape[2:4], *ctx.geometry
        )
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_output.sum(0)
    return grad_input, grad_weight, grad_bias, None, None, None, None


torch.library.register_autograd(
    "reggan_ext::local_regression", _backward, setup_context=_setup_context
)


# The two backward ops are linear in each of their tensors, and each one's derivatives are the
# other two ops, so gradients of gradients (gradient penalties, gradgradcheck) are exact to any
# order.
def _setup_backward_context(ctx, inputs, output):
    grad_output, other, _, *geometry = inputs
    ctx.save_for_backward(grad_output, other)
    ctx.geometry = tuple(geometry)


def _backward_of_backward_input(ctx, grad):
    # grad_input = backward_input(grad_output, weight): grad is a gradient with respect to it.
    grad_output, weight = ctx.saved_tensors
    d_grad_output = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad_output = _ops.local_regression.default(grad, weight, None, *ctx.geometry)
    if ctx.needs_input_grad[1]:
        d_weight = _ops.local_regression_backward_weight.default(
            grad_output, grad, weight.shape[2:4], *ctx.geometry
        )
    return d_grad_output, d_weight, None, None, None, None, None


def _backward_of_backward_weight(ctx, grad):
    # grad_weight = backward_weight(grad_output, input): grad is a gradient with respect to it.
    grad_output, input = ctx.saved_tensors
    d_grad_output = d_input = None
    if ctx.needs_input_grad[0]:
        d_grad_output = _ops.local_regression.default(input, grad, None, *ctx.geometry)
    if ctx.needs_input_grad[1]:
        d_input = _ops.local_regression_backward_input.default(
            grad_output, grad, input.shape[2:], *ctx.geometry
        )
    return d_grad_output, d_input, None, None, None, None, None


torch.library.register_autograd(
    "reggan_ext::local_regression_backward_input",
    _backward_of_backward_input,
    setup_context=_setup_backward_context,
)
torch.library.register_autograd(
    "reggan_ext::local_regression_backward_weight",
    _backward_of_backward_weight,
    setup_context=_setup_backward_context,
)
