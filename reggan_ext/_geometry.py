"""Argument normalization shared by the functional op, the module and the references."""

import operator
from typing import Optional, Sequence, Tuple, Union

IntPair = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int]]


def _integer(value) -> int:
    """value as an int if it is one (numpy and 0-d tensor integers too, bools not)."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a size")
    return operator.index(value)


def positive_int(value, name: str) -> int:
    try:
        integer = _integer(value)
    except TypeError:
        integer = 0
    if integer < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return integer


def pair(value: IntPair, name: str, minimum: Optional[int] = None) -> Tuple[int, int]:
    """(height, width) from an int or a pair of ints, each at least minimum if given."""
    try:
        values = ((_integer(value),) * 2 if hasattr(value, "__index__")
                  else tuple(_integer(v) for v in value))
    except TypeError:
        values = ()
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if minimum is not None and min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return values


def explicit_padding(
    padding: Padding, kernel_size: IntPair, stride: IntPair, dilation: IntPair
) -> Tuple[int, int, int, int]:
    """Padding as (top, bottom, left, right), resolving 'same' and 'valid' as nn.Conv2d does:
    'same' puts the extra row/column of an even dilated extent at the bottom/right."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        if pair(stride, "stride") != (1, 1):
            raise ValueError("padding='same' is not supported for strided layers (as in nn.Conv2d)")
        sides = []
        for k, d in zip(pair(kernel_size, "kernel_size"), pair(dilation, "dilation")):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return tuple(sides)
    pad_h, pad_w = pair(padding, "padding")
    return (pad_h, pad_h, pad_w, pad_w)


def output_size(
    input_size: IntPair,
    kernel_size: IntPair,
    stride: IntPair,
    padding: Tuple[int, int, int, int],
    dilation: IntPair,
) -> Tuple[int, int]:
    """nn.Conv2d's output size for explicit (top, bottom, left, right) padding."""
    sizes = []
    for axis, (n, k, s, d) in enumerate(
        zip(pair(input_size, "input_size"), pair(kernel_size, "kernel_size"),
            pair(stride, "stride"), pair(dilation, "dilation"))
    ):
        padded = n + padding[2 * axis] + padding[2 * axis + 1]
        extent = d * (k - 1) + 1
        if extent > padded:
            raise ValueError(
                f"the dilated kernel ({extent}) is larger than the padded input ({padded}) "
                f"along {'height' if axis == 0 else 'width'}"
            )
        sizes.append((padded - extent) // s + 1)
    return tuple(sizes)
