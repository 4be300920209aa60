"""Argument normalization shared by the functional op, the module and the references."""

from typing import Sequence, Tuple, Union

IntPair = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int]]


def pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value


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
