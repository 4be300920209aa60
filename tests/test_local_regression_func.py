"""LocalRegression under torch.func: the ops' vmap rules against a loop over the mapped slices,
and grad, per-sample gradients, jacrev, jacfwd, hessian and gradients of gradients against the
same transforms of the pure-PyTorch reference, which torch.func supports natively."""

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, stack_module_state, vmap

from reggan_ext import LocalRegression, local_regression, reference

from conftest import TOLERANCES

ops = torch.ops.reggan_ext
# stride, padding, dilation, groups: every one of them other than 1 or 0.
GEOMETRY = ((2, 1), (1, 2), (1, 2), 2)
MAPPED = 3


@pytest.fixture(autouse=True)
def no_vmap_fallback():
    """Makes vmap fail, instead of looping with a warning, where an op has no vmap rule."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


def make_tensors(device, batch=2, in_ch=4, out_ch=6, size=(7, 9), kernel=(3, 2)):
    """Input, weight, bias and a grad_output of one layer of GEOMETRY, in float64."""
    stride, padding, dilation, groups = GEOMETRY
    layer = LocalRegression(in_ch, out_ch, kernel, size, stride, padding, dilation, groups,
                            dtype=torch.float64, device=device)
    x = torch.randn(batch, in_ch, *size, dtype=torch.float64, device=device)
    grad_output = torch.randn(batch, out_ch, *layer.output_size, dtype=torch.float64,
                              device=device)
    return x, layer.weight.detach(), layer.bias.detach(), grad_output


def mapped(t, dim):
    """MAPPED slices like t stacked at dim, or t itself where dim is None."""
    if dim is None:
        return t
    return torch.stack([torch.randn_like(t) for _ in range(MAPPED)], dim)


def loop(fn, in_dims, *args):
    """fn over the mapped slices, stacked at dim 0: what vmap(fn, in_dims) must return."""
    return torch.stack([
        fn(*(a if d is None else a.select(d, k) for a, d in zip(args, in_dims)))
        for k in range(MAPPED)
    ])


def forward(x, w, b):
    return ops.local_regression(x, w, b, *GEOMETRY)


def backward_input(gy, w):
    return ops.local_regression_backward_input(gy, w, (7, 9), *GEOMETRY)


def backward_weight(gy, x):
    return ops.local_regression_backward_weight(gy, x, (3, 2), *GEOMETRY)


@pytest.mark.parametrize("in_dims", [
    (0, None, None), (3, None, None),  # a batch of inputs, one layer
    (None, 0, 0), (None, 2, None), (None, None, 1),  # one input, a batch of layers
    (1, 0, 0),  # a layer per input
])
def test_forward_vmap_rule(device, in_dims):
    x, w, b, _ = make_tensors(device)
    args = [mapped(t, d) for t, d in zip((x, w, b), in_dims)]
    torch.testing.assert_close(vmap(forward, in_dims)(*args), loop(forward, in_dims, *args),
                               **TOLERANCES[torch.float64])


@pytest.mark.parametrize("in_dims", [(0, None), (2, None), (None, 0), (None, 3), (1, 0)])
def test_backward_input_vmap_rule(device, in_dims):
    _, w, _, gy = make_tensors(device)
    args = [mapped(t, d) for t, d in zip((gy, w), in_dims)]
    torch.testing.assert_close(vmap(backward_input, in_dims)(*args),
                               loop(backward_input, in_dims, *args), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("in_dims", [(0, None), (None, 4), (1, 0)])
def test_backward_weight_vmap_rule(device, in_dims):
    x, _, _, gy = make_tensors(device)
    args = [mapped(t, d) for t, d in zip((gy, x), in_dims)]
    torch.testing.assert_close(vmap(backward_weight, in_dims)(*args),
                               loop(backward_weight, in_dims, *args),
                               **TOLERANCES[torch.float64])


def test_vmap_of_an_empty_batch(device):
    x, w, b, gy = make_tensors(device, batch=0)
    assert vmap(forward, (0, None, None))(mapped(x, 0), w, b).shape == (MAPPED, *gy.shape)
    assert vmap(forward, (None, 0, 0))(x, mapped(w, 0), mapped(b, 0)).shape == (MAPPED, *gy.shape)


def transforms():
    """(name, transform of a function of (x, w, b)) pairs, each returning a pytree of tensors."""
    def loss(fn):
        return lambda x, w, b: fn(x, w, b).tanh().square().sum()

    def per_sample(fn):
        # vmap over the batch of grad of a loss of one sample, with respect to every tensor.
        def sample_loss(x, w, b):
            return loss(fn)(x.unsqueeze(0), w, b)
        return lambda x, w, b: vmap(grad(sample_loss, (0, 1, 2)), (0, None, None))(x, w, b)

    def grad_of_grad(fn):
        # The gradient, with respect to the input, of a norm of the weight's gradient (a penalty).
        def penalty(x, w, b):
            return grad(loss(fn), 1)(x, w, b).square().sum()
        return grad(penalty, (0, 1))

    def grad_of_vmap(fn):
        # The gradient of a loss of the layer mapped over the samples one by one.
        def mapped_loss(x, w, b):
            return vmap(fn, (0, None, None))(x.unsqueeze(1), w, b).tanh().square().sum()
        return grad(mapped_loss, (0, 1, 2))

    return [
        ("grad", lambda fn: grad(loss(fn), (0, 1, 2))),
        ("grad of vmap", grad_of_vmap),
        ("per-sample grad", per_sample),
        ("jacrev", lambda fn: jacrev(fn, (0, 1, 2))),
        ("jacfwd", lambda fn: jacfwd(fn, (0, 1, 2))),
        ("hessian in the input", lambda fn: hessian(loss(fn), 0)),
        ("hessian in the weight", lambda fn: hessian(loss(fn), 1)),
        ("grad of grad", grad_of_grad),
    ]


@pytest.mark.parametrize("name,transform", transforms(), ids=[name for name, _ in transforms()])
def test_func_transforms_match_the_reference(device, name, transform):
    x, w, b, _ = make_tensors(device, batch=2, in_ch=2, out_ch=2, size=(4, 5), kernel=(2, 3))

    def ours(x, w, b):
        return local_regression(x, w, b, *GEOMETRY)

    def oracle(x, w, b):
        return reference.local_regression(x, w, b, *GEOMETRY)

    torch.testing.assert_close(transform(ours)(x, w, b), transform(oracle)(x, w, b),
                               **TOLERANCES[torch.float64])


def test_ensemble_of_layers_under_vmap(device):
    """torch.func's ensembling: one vmap over the stacked parameters of several layers (padding
    modes other than zeros included) equals each layer alone, and so do its gradients."""
    torch.manual_seed(0)
    layers = [LocalRegression(4, 6, 3, (7, 9), padding="same", groups=2, padding_mode="reflect",
                              dtype=torch.float64, device=device) for _ in range(MAPPED)]
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64, device=device)
    params, buffers = stack_module_state(layers)

    def one(params, buffers, x):
        return functional_call(layers[0], (params, buffers), (x,))

    out = vmap(one, (0, 0, None))(params, buffers, x)
    torch.testing.assert_close(out, torch.stack([layer(x) for layer in layers]),
                               **TOLERANCES[torch.float64])
    out.square().sum().backward()
    sum(layer(x).square().sum() for layer in layers).backward()
    for name in ("weight", "bias"):
        torch.testing.assert_close(params[name].grad,
                                   torch.stack([getattr(layer, name).grad for layer in layers]),
                                   **TOLERANCES[torch.float64])


def test_compiled_vmap(device):
    """torch.compile traces the ops' vmap rules; no graph break."""
    layer = LocalRegression(3, 3, 3, (8, 8), padding=1, groups=3, device=device)
    xs = torch.randn(MAPPED, 2, 3, 8, 8, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(vmap(layer), fullgraph=True)
    torch.testing.assert_close(compiled(xs), vmap(layer)(xs), **TOLERANCES[torch.float32])
