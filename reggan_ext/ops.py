"""Python front end of the local_regression ops: argument conventions of F.conv2d, and
torch.func (vmap rules, and the autograd formulas with forward-mode ones as an autograd.Function
for its transforms).

The schemas, argument checks, fake (Meta) kernels and autograd kernels live in C++
(csrc/local_regression); the backward is two ops of its own so that each gradient is computed
only when it is needed.
"""

import torch
import torch.autograd.forward_ad as fwAD
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
    return _local_regression(input, weight, bias, stride, (top, left), dilation, groups)


# Autograd. The ops' autograd kernels are C++ (csrc/local_regression/autograd), for autograd and
# torch.compile alike, and a C++ Function has no forward-mode formula and cannot run under
# torch.func's transforms (grad, vjp, jacrev, jvp, jacfwd, vmap). There, and in
# torch.autograd.forward_ad's dual levels, the same formulas, with forward-mode ones, run as an
# autograd.Function. Elsewhere the op is called directly: a Function's Python costs more than a
# small layer's kernel. torch.compile traces the ops' own vmap rules (below) but not a Function's
# jvp, so it takes the direct call too.
class _Differentiable:
    def __init__(self, op, setup_context, backward, jvp):
        self.op = op

        def forward(*args):  # a Python function, as torch.compile requires of a Function
            return op(*args)

        self.function = type(op.name(), (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
            "generate_vmap_rule": True,
        })

    def __call__(self, *args):
        transformed = torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0
        if transformed and not torch.compiler.is_compiling():
            leaves = (_PytreeLeaf(a) if isinstance(a, tuple) else a for a in args)
            return self.function.apply(*leaves)
        return self.op(*args)


class _PytreeLeaf(tuple):
    """A pair argument that pytree keeps as one leaf: under vmap of a jvp (hessian, jacfwd of
    jacrev) torch pairs a Function's flattened arguments with its tangents, one per argument
    (get_tangents_in_dims in torch/_functorch/autograd_function.py)."""


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.save_for_forward(input, weight)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = _backward_input(grad_output, weight, input.shape[2:], *ctx.geometry)
    if ctx.needs_input_grad[1]:
        grad_weight = _backward_weight(grad_output, input, weight.shape[2:4], *ctx.geometry)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_output.sum(0)
    return grad_input, grad_weight, grad_bias, None, None, None, None


def _jvp(ctx, d_input, d_weight, d_bias, *_):
    # y is linear in input and in (weight, bias).
    input, weight = ctx.saved_tensors
    terms = []
    if d_input is not None:
        terms.append(_local_regression(d_input, weight, None, *ctx.geometry))
    if d_weight is not None:
        terms.append(_local_regression(input, d_weight, d_bias, *ctx.geometry))
    elif d_bias is not None:
        terms.append(d_bias.expand(input.shape[0], *d_bias.shape))
    return sum(terms[1:], terms[0])


# The two backward ops are linear in each of their tensors, and each one's derivatives are the
# other two ops, so gradients of gradients (gradient penalties, gradgradcheck) are exact to any
# order.
def _setup_backward_context(ctx, inputs, output):
    grad_output, other, size, *geometry = inputs
    ctx.save_for_backward(grad_output, other)
    ctx.save_for_forward(grad_output, other)
    ctx.size = size
    ctx.geometry = tuple(geometry)


def _backward_of_backward_input(ctx, grad):
    # grad_input = backward_input(grad_output, weight): grad is a gradient with respect to it.
    grad_output, weight = ctx.saved_tensors
    d_grad_output = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad_output = _local_regression(grad, weight, None, *ctx.geometry)
    if ctx.needs_input_grad[1]:
        d_weight = _backward_weight(grad_output, grad, weight.shape[2:4], *ctx.geometry)
    return d_grad_output, d_weight, None, None, None, None, None


def _backward_of_backward_weight(ctx, grad):
    # grad_weight = backward_weight(grad_output, input): grad is a gradient with respect to it.
    grad_output, input = ctx.saved_tensors
    d_grad_output = d_input = None
    if ctx.needs_input_grad[0]:
        d_grad_output = _local_regression(input, grad, None, *ctx.geometry)
    if ctx.needs_input_grad[1]:
        d_input = _backward_input(grad_output, grad, input.shape[2:], *ctx.geometry)
    return d_grad_output, d_input, None, None, None, None, None


def _bilinear_jvp(function, ctx, d_grad_output, d_other):
    grad_output, other = ctx.saved_tensors
    terms = []
    if d_grad_output is not None:
        terms.append(function(d_grad_output, other, ctx.size, *ctx.geometry))
    if d_other is not None:
        terms.append(function(grad_output, d_other, ctx.size, *ctx.geometry))
    return sum(terms[1:], terms[0])


def _jvp_of_backward_input(ctx, d_grad_output, d_weight, *_):
    return _bilinear_jvp(_backward_input, ctx, d_grad_output, d_weight)


def _jvp_of_backward_weight(ctx, d_grad_output, d_input, *_):
    return _bilinear_jvp(_backward_weight, ctx, d_grad_output, d_input)


_local_regression = _Differentiable(_ops.local_regression.default, _setup_context, _backward,
                                    _jvp)
_backward_input = _Differentiable(_ops.local_regression_backward_input.default,
                                  _setup_backward_context, _backward_of_backward_input,
                                  _jvp_of_backward_input)
_backward_weight = _Differentiable(_ops.local_regression_backward_weight.default,
                                   _setup_backward_context, _backward_of_backward_weight,
                                   _jvp_of_backward_weight)


# vmap rules: the mapped dimension joins the batch where the weights are shared, else the groups
# (each mapped slice is a layer of its own, as in an ensemble over torch.func.stack_module_state).
def _leading(tensor, dim, size):
    """tensor with its mapped dimension first, expanded to size where it has none."""
    return tensor.expand(size, *tensor.shape) if dim is None else tensor.movedim(dim, 0)


def _into_first(tensor, dim, size):
    """(size, A, ...) -> (size * A, ...): samples into the batch, or the weights and biases of
    size layers into the output channels (groups); None stays None."""
    return None if tensor is None else _leading(tensor, dim, size).flatten(0, 1)


def _into_channels(tensor, dim, size):
    """(size, N, C, H, W) -> (N, size * C, H, W)."""
    return _leading(tensor, dim, size).transpose(0, 1).flatten(1, 2)


def _vmap_forward(info, in_dims, input, weight, bias, stride, padding, dilation, groups):
    input_dim, weight_dim, bias_dim = in_dims[:3]
    size = info.batch_size
    if weight_dim is None and bias_dim is None:
        output = _ops.local_regression.default(_into_first(input, input_dim, size), weight, bias,
                                               stride, padding, dilation, groups)
        return output.unflatten(0, (size, -1)), 0
    output = _ops.local_regression.default(
        _into_channels(input, input_dim, size), _into_first(weight, weight_dim, size),
        _into_first(bias, bias_dim, size), stride, padding, dilation, groups * size)
    return output.unflatten(1, (size, -1)), 1


def _vmap_backward_input(info, in_dims, grad_output, weight, input_size, stride, padding,
                         dilation, groups):
    grad_output_dim, weight_dim = in_dims[:2]
    size = info.batch_size
    if weight_dim is None:
        grad_input = _ops.local_regression_backward_input.default(
            _into_first(grad_output, grad_output_dim, size), weight, input_size, stride, padding,
            dilation, groups)
        return grad_input.unflatten(0, (size, -1)), 0
    grad_input = _ops.local_regression_backward_input.default(
        _into_channels(grad_output, grad_output_dim, size),
        _into_first(weight, weight_dim, size), input_size, stride, padding, dilation,
        groups * size)
    return grad_input.unflatten(1, (size, -1)), 1


def _vmap_backward_weight(info, in_dims, grad_output, input, kernel_size, stride, padding,
                          dilation, groups):
    # The batch is summed over, so the mapped dimension always joins the groups.
    grad_output_dim, input_dim = in_dims[:2]
    size = info.batch_size
    grad_weight = _ops.local_regression_backward_weight.default(
        _into_channels(grad_output, grad_output_dim, size),
        _into_channels(input, input_dim, size), kernel_size, stride, padding, dilation,
        groups * size)
    return grad_weight.unflatten(0, (size, -1)), 0


torch.library.register_vmap("reggan_ext::local_regression", _vmap_forward)
torch.library.register_vmap("reggan_ext::local_regression_backward_input", _vmap_backward_input)
torch.library.register_vmap("reggan_ext::local_regression_backward_weight", _vmap_backward_weight)
