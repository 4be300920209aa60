"""Closed-form ridge fit of a LocalRegression layer from streamed data.

The layer is linear in its weights and every output pixel has its own small problem. For output
channel o and output pixel p the design row z[n, p] holds the D = C_in/groups * kH * kW inputs
the layer reads for p (as its padding_mode pads them), then a 1 if the layer has a bias, and

    w[o, p] = argmin_w  sum_n (y[n, o, p] - w . z[n, p])^2 + lam * ||P w||^2,

with P the identity, or the identity without the bias entry when penalize_bias=False. The normal
equations (G_p + lam P) w = r[o, p] share G_p = sum_n z z^T among the output channels of a group.

RidgeFitter streams batches through the ridge_accumulate_ kernel into sufficient statistics,
kept with the pixel index last, in `dtype` (float64 by default):

    gram      (groups, D(D+1)/2, H_out, W_out)  lower triangle of G_p, packed row by row
    cross     (C_out, D, H_out, W_out)          r[o, p] = sum_n z y
    target_sq (C_out, H_out, W_out)             sum_n y^2
    count                                       number of samples

that is, itemsize(dtype) * H_out * W_out * (groups * D(D+1)/2 + C_out * (D + 1)) bytes (twice
that once validation statistics exist), independent of the number of samples; no unfolded copy
of the data is made. On the CPU, small batches wait for an update in a space of at most
min(64 MiB, the statistics' bytes) per set of statistics (RidgeFitter.update). solve() runs the
batched LDL^T (root-free Cholesky) kernel ridge_solve.

Float32 statistics (dtype=torch.float32) halve the memory and double the kernel's speed but
lose about 7 digits: with G's condition number kappa the weights carry a relative error of
about kappa * 1e-7 (the tests hold them to 1e-3 on well-conditioned problems). Keep float64
unless memory forces the change.
"""

import math
import numbers
from collections.abc import Sequence as SequenceABC
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from reggan_ext.modules import LocalRegression
from reggan_ext.ops import check_device_supported

_ops = torch.ops.reggan_ext
_SELECT = ("gcv", "validation")
_SCOPES = ("pixel", "global")
# Entries of the unpacked per-pixel matrices that the validation scores handle at once (bounds
# their temporaries to a few tens of MB).
_SELECTION_ELEMENTS = 1 << 22
# Input bytes that small CPU batches are gathered into before one update sums them (see
# RidgeFitter.update); at most the statistics' own bytes.
_GATHER_BYTES = 64 << 20

Lambda = Union[float, torch.Tensor]


def _packed_indices(d: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each entry of the packed layout: the lower triangle row by row."""
    rows, cols = torch.tril_indices(d, d, device=device)
    return rows, cols


def _unpack(packed: torch.Tensor, d: int) -> torch.Tensor:
    """(groups, D(D+1)/2, pixels) packed triangles -> (groups, pixels, D, D) symmetric."""
    groups, _, pixels = packed.shape
    rows, cols = _packed_indices(d, packed.device)
    full = packed.new_empty(groups, pixels, d, d)
    entries = packed.transpose(1, 2)
    full[..., rows, cols] = entries
    full[..., cols, rows] = entries
    return full


def _check_lambda(value: float, name: str = "lam") -> float:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def _geometry(layer: LocalRegression) -> dict:
    """What a layer's design rows depend on: statistics of layers with equal geometry add up."""
    return {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
            "kernel_size": layer.kernel_size, "input_size": layer.input_size,
            "stride": layer.stride, "padding (left, right, top, bottom)": layer._explicit_pad,
            "dilation": layer.dilation, "groups": layer.groups,
            "padding_mode": layer.padding_mode, "bias": layer.bias is not None}


def _geometry_difference(mine: dict, theirs: dict) -> str:
    return ", ".join(f"{key} {theirs[key]} (expected {value})" for key, value in mine.items()
                     if theirs.get(key) != value)


def _check_scope(scope: str, method: str) -> None:
    if scope not in _SCOPES:
        raise ValueError(f"RidgeFitter.{method}: scope must be one of {_SCOPES}, got {scope!r}")


class _Gathered:
    """Small batches copied side by side for one update to sum (RidgeFitter.update)."""

    def __init__(self):
        self.x = self.y = None
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, capacity: int) -> None:
        if self.x is None or self.x.dtype != x.dtype or self.x.shape[0] != capacity:
            self.x = x.new_empty((capacity, *x.shape[1:]))
            self.y = y.new_empty((capacity, *y.shape[1:]))
        end = self.count + x.shape[0]
        self.x[self.count:end].copy_(x.detach())
        self.y[self.count:end].copy_(y.detach())
        self.count = end

    def take(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The gathered batches as one, or None; the space is then free again."""
        if not self.count:
            return None
        batch = self.x[:self.count], self.y[:self.count]
        self.count = 0
        return batch


class RidgeFitter:
    """Sufficient statistics of the ridge fit of `layer`, streamed from any number of batches.

    Args:
        layer: the LocalRegression layer to fit; its geometry (and padding_mode) defines the
            design rows. The statistics live on its device.
        penalize_bias: whether lam also shrinks the bias (as in masked regression); False
            leaves it free.
        dtype: dtype of the statistics, torch.float64 (default) or torch.float32.

    update(x, y) adds a batch: x (N, C_in, H, W) is the layer's input and y (N, C_out, H_out,
    W_out) the output it should produce. solve(lam) returns (weight, bias) in the layer's
    layout and in `dtype`; fit_(layer, lam) writes them into a layer.
    """

    def __init__(self, layer: LocalRegression, penalize_bias: bool = True,
                 dtype: torch.dtype = torch.float64):
        if not isinstance(layer, LocalRegression):
            raise TypeError(f"RidgeFitter: layer must be a reggan_ext.LocalRegression, got "
                            f"{type(layer).__name__}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"RidgeFitter: dtype must be torch.float32 or torch.float64, got {dtype}")
        self._layer = layer
        self.geometry = _geometry(layer)
        self.penalize_bias = bool(penalize_bias)
        self.dtype = dtype
        self.device = layer.weight.device
        self.has_bias = layer.bias is not None
        self.groups = layer.groups
        self.taps = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        self.unknowns = self.taps + int(self.has_bias)
        self.out_per_group = layer.out_channels // layer.groups
        # The summed statistics ("validation" None until update_validation) and the small
        # batches gathered for them but not yet summed.
        self._sums = {"statistics": self._zeros(), "validation": None}
        self._gathered = {"statistics": _Gathered(), "validation": _Gathered()}

    # Statistics -------------------------------------------------------------------------

    def _zeros(self) -> dict:
        d, (h, w) = self.unknowns, self._layer.output_size
        factory = dict(dtype=self.dtype, device=self.device)
        return {
            "gram": torch.zeros(self.groups, d * (d + 1) // 2, h, w, **factory),
            "cross": torch.zeros(self._layer.out_channels, d, h, w, **factory),
            "target_sq": torch.zeros(self._layer.out_channels, h, w, **factory),
            "count": torch.zeros((), dtype=torch.int64, device=self.device),
        }

    @property
    def count(self) -> int:
        """Number of samples accumulated."""
        return int(self._sums["statistics"]["count"]) + self._gathered["statistics"].count

    @property
    def statistics(self) -> dict:
        """The running statistics (gram, cross, target_sq, count); see the module docstring."""
        return self._statistics

    @property
    def _statistics(self) -> dict:
        self._sum_gathered("statistics")
        return self._sums["statistics"]

    @property
    def _validation(self) -> Optional[dict]:
        self._sum_gathered("validation")
        return self._sums["validation"]

    def _check_batch(self, x: torch.Tensor, y: torch.Tensor, method: str):
        layer = self._layer
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"RidgeFitter.{method}: {name} must be a tensor, got "
                                f"{type(t).__name__}")
        expected_x = (layer.in_channels, *layer.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected_x:
            raise ValueError(f"RidgeFitter.{method}: expected x of shape (N, {expected_x[0]}, "
                             f"{expected_x[1]}, {expected_x[2]}) for this layer, got "
                             f"{tuple(x.shape)}")
        expected_y = (layer.out_channels, *layer.output_size)
        if y.dim() != 4 or tuple(y.shape[1:]) != expected_y:
            raise ValueError(f"RidgeFitter.{method}: expected y of shape (N, {expected_y[0]}, "
                             f"{expected_y[1]}, {expected_y[2]}) (the layer's output), got "
                             f"{tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"RidgeFitter.{method}: x has {x.shape[0]} samples but y has "
                             f"{y.shape[0]}; they must match")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"RidgeFitter.{method}: x must be float32 or float64, got {x.dtype}")
        if y.dtype != x.dtype:
            raise ValueError(f"RidgeFitter.{method}: y has dtype {y.dtype} but x has {x.dtype}; "
                            "they must match")
        for name, t in (("x", x), ("y", y)):
            check_device_supported(t, name)
            if t.device != self.device:
                raise ValueError(f"RidgeFitter.{method}: {name} is on {t.device} but the "
                                 f"statistics are on {self.device} (the layer's device)")

    def _accumulate(self, statistics: dict, x: torch.Tensor, y: torch.Tensor) -> None:
        layer = self._layer
        padded, padding = layer.pad_input(x)
        _ops.ridge_accumulate_(statistics["gram"], statistics["cross"], statistics["target_sq"],
                               padded, y, layer.kernel_size, layer.stride, padding,
                               layer.dilation, layer.groups, self.has_bias)
        statistics["count"] += x.shape[0]

    def _sums_of(self, which: str) -> dict:
        """The summed statistics `which`, zeros made on first use (validation)."""
        if self._sums[which] is None:
            self._sums[which] = self._zeros()
        return self._sums[which]

    def _add(self, which: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.dtype == torch.float32 and x.dtype == torch.float64:
            x, y = x.float(), y.float()
        gathered = self._gathered[which]
        capacity = self._gather_capacity(x, y)
        if gathered.count and (gathered.x.dtype != x.dtype or
                               gathered.count + x.shape[0] > capacity):
            self._sum_gathered(which)
        if not x.shape[0] or 2 * x.shape[0] > capacity:
            self._accumulate(self._sums_of(which), x, y)
        else:
            gathered.add(x, y, capacity)

    def _gather_capacity(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Samples of batches like (x, y) that are gathered before one update sums them: none
        on a GPU, where the statistics' memory is fast enough."""
        if x.device.type != "cpu":
            return 0
        budget = min(_GATHER_BYTES, sum(t.nbytes for t in self._sums["statistics"].values()))
        return budget // ((math.prod(x.shape[1:]) + math.prod(y.shape[1:])) * x.element_size())

    def _sum_gathered(self, which: str) -> None:
        batch = self._gathered[which].take()
        if batch is not None:
            self._accumulate(self._sums_of(which), *batch)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> "RidgeFitter":
        """Adds the batch (x, y): x (N, C_in, H, W), y (N, C_out, H_out, W_out), float32 or
        float64, on the layer's device. Returns self.

        An update reads and writes all the statistics. For a small layer that costs less than a
        sample; for RGB 128 x 128 images at k = 5 (149 MB of statistics) as much as summing
        dozens of samples. So on the CPU, a batch whose x and y take at most half of
        min(64 MiB, the statistics' bytes) is copied into a space of that size, beside the
        batches before it, and one update sums them when the space is full or the statistics
        are next read (statistics, state_dict, solve, merge, all_reduce). The statistics are
        those of that one update: the same, bit for bit, as if the caller had passed the
        gathered batches as one."""
        self._check_batch(x, y, "update")
        self._add("statistics", x, y)
        return self

    def update_validation(self, x: torch.Tensor, y: torch.Tensor) -> "RidgeFitter":
        """Adds (x, y) to the validation statistics that solve(select='validation') scores
        lambda with, as update does. Returns self."""
        self._check_batch(x, y, "update_validation")
        self._add("validation", x, y)
        return self

    def _pairs(self):
        sets = [("", self._statistics)]
        if self._validation is not None:
            sets.append(("validation.", self._validation))
        return sets

    def state_dict(self) -> dict:
        """The statistics (and validation statistics, if any) and the geometry of the layer
        they belong to, to resume a fit later."""
        state = {"geometry": dict(self.geometry)}
        for prefix, stats in self._pairs():
            for key, value in stats.items():
                state[prefix + key] = value.clone()
        return state

    def load_state_dict(self, state: dict) -> "RidgeFitter":
        """Replaces the statistics with those of state_dict(), which must come from a fitter of
        a layer with this one's geometry."""
        has_validation = any(k.startswith("validation.") for k in state)
        expected = [("", self._zeros())] + ([("validation.", self._zeros())] if has_validation
                                            else [])
        keys = {"geometry"} | {prefix + key for prefix, stats in expected for key in stats}
        if set(state) != keys:
            raise ValueError(f"RidgeFitter.load_state_dict: expected keys {sorted(keys)}, got "
                             f"{sorted(state)}")
        self._check_geometry(state["geometry"], "RidgeFitter.load_state_dict: the statistics "
                             "are those of another layer geometry: ")
        loaded = []
        for prefix, template in expected:
            stats = {}
            for key, zeros in template.items():
                value = state[prefix + key]
                if not isinstance(value, torch.Tensor) or value.shape != zeros.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                    raise ValueError(f"RidgeFitter.load_state_dict: {prefix + key} must have "
                                     f"shape {tuple(zeros.shape)} for this layer, got {shape}")
                stats[key] = value.to(device=self.device, dtype=zeros.dtype, copy=True)
            loaded.append(stats)
        self._sums = {"statistics": loaded[0], "validation": loaded[1] if has_validation else None}
        for gathered in self._gathered.values():
            gathered.take()  # dropped: the loaded statistics replace theirs too
        return self

    def _check_compatible(self, other: "RidgeFitter", method: str) -> None:
        if not isinstance(other, RidgeFitter):
            raise TypeError(f"RidgeFitter.{method}: expected a RidgeFitter, got "
                            f"{type(other).__name__}")
        self._check_geometry(other.geometry, f"RidgeFitter.{method}: the other fitter's layer "
                             "has another geometry: ")
        if other.dtype != self.dtype or other.device != self.device:
            raise ValueError(f"RidgeFitter.{method}: the other fitter has {other.dtype} "
                             f"statistics on {other.device}, this one {self.dtype} on "
                             f"{self.device}; they must match")

    def _check_geometry(self, geometry: dict, message: str) -> None:
        """Raises ValueError, message then the differences, unless geometry is the layer's."""
        if geometry != self.geometry:
            raise ValueError(message + _geometry_difference(self.geometry, geometry))

    def merge(self, other: "RidgeFitter") -> "RidgeFitter":
        """Adds another fitter's statistics (same layer geometry, dtype and device) to these.
        Returns self."""
        self._check_compatible(other, "merge")
        for which, theirs in (("statistics", other._statistics),
                              ("validation", other._validation)):
            if theirs is not None:
                sums = self._sums_of(which)
                for key, value in theirs.items():
                    sums[key] += value
        return self

    def all_reduce(self, group=None) -> "RidgeFitter":
        """Sums the statistics over the ranks of a torch.distributed process group (every rank
        must call it); afterwards each rank holds the statistics of all the data. Returns self."""
        import torch.distributed as dist

        flag = torch.tensor([self._validation is not None], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item():
            self._sums_of("validation")
        for _, stats in self._pairs():
            for value in stats.values():
                dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        return self

    # Solving ----------------------------------------------------------------------------

    @property
    def _penalize_last(self) -> bool:
        return self.penalize_bias or not self.has_bias

    def _lambda_value(self, value, name: str = "lam") -> float:
        value = _check_lambda(value, name)
        if value > torch.finfo(self.dtype).max:
            raise ValueError(f"RidgeFitter: {name} = {value} overflows the fitter's {self.dtype} "
                             "statistics")
        return value

    def _lambda_map(self, lam: Lambda) -> torch.Tensor:
        shape = (self.groups, *self._layer.output_size)
        if isinstance(lam, torch.Tensor) and lam.dim() > 0:
            if tuple(lam.shape) != shape:
                raise ValueError(f"RidgeFitter.solve: a lambda map must have shape {shape} "
                                 f"(groups, H_out, W_out), got {tuple(lam.shape)}")
            if not lam.is_floating_point():
                raise ValueError(f"RidgeFitter.solve: a lambda map must be a floating-point "
                                f"tensor, got {lam.dtype}")
            # The solve has no gradient with respect to lambda (as for a number).
            lam = lam.detach().to(device=self.device, dtype=self.dtype)
            if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
                raise ValueError(f"RidgeFitter.solve: a lambda map must be finite and >= 0 in "
                                 f"the fitter's {self.dtype}")
            return lam
        return torch.full(shape, self._lambda_value(lam), dtype=self.dtype, device=self.device)

    def _check_ready(self) -> None:
        if self.count == 0:
            raise RuntimeError("RidgeFitter.solve: no data; call update(x, y) (or merge, "
                               "load_state_dict) before solving")

    def _check_finite(self, stats: dict, which: str, method: str) -> None:
        """Raises, saying how many pixel systems they affect, for non-finite statistics."""
        finite = torch.isfinite(stats["gram"]).all(1)
        for key in ("cross", "target_sq"):
            per_system = stats[key].reshape(self.groups, -1, *stats[key].shape[-2:])
            finite &= torch.isfinite(per_system).all(1)
        bad = int((~finite).sum())
        if bad:
            data = "x or y" if which == "statistics" else "the validation x or y"
            raise RuntimeError(f"RidgeFitter.{method}: the {which} of {bad} of {finite.numel()} "
                               f"pixel systems are not finite (NaN or Inf in {data}, or overflow "
                               "of float32 statistics)")

    def _raise_failure(self, info: torch.Tensor, solution: torch.Tensor) -> None:
        """Explains failed systems. Non-finite statistics need no check of their own on the way
        to a success: a NaN or Inf in G fails its system's pivot test (the tolerance becomes
        Inf or a pivot NaN), one in r or yy makes the solution non-finite."""
        failed = int((info != 0).sum())
        if not failed and bool(torch.isfinite(solution).all()):
            return
        self._check_finite(self._statistics, "statistics", "solve")
        if failed:
            raise RuntimeError(
                f"RidgeFitter.solve: {failed} of {info.numel()} pixel systems are not "
                "numerically positive definite (fewer independent samples than the "
                f"{self.unknowns} unknowns, inputs constant over the batch, or taps that only "
                "read zero padding); use lam > 0")
        raise RuntimeError("RidgeFitter.solve: the solution overflowed; use a larger lam")

    def _surely_singular(self, lam_map: torch.Tensor) -> torch.Tensor:
        """Systems that cannot be solved whatever rounding does: lam = 0 with fewer samples than
        unknowns. (The kernel's pivot test catches exact rank deficiency, and deficiency in
        general only as far as rounding lets a pivot show it.)"""
        return (lam_map == 0) & (self.count < self.unknowns)

    def _solve_map(self, lam_map: torch.Tensor, statistics: Optional[dict] = None):
        stats = self._statistics if statistics is None else statistics
        return _ops.ridge_solve(stats["gram"], stats["cross"], lam_map, self._penalize_last)

    def _split(self, solution: torch.Tensor):
        layer = self._layer
        weight = solution[:, :self.taps].reshape(layer.weight.shape)
        bias = solution[:, self.taps] if self.has_bias else None
        return weight, bias

    def solve(self, lam, select: Optional[str] = None, scope: str = "global"):
        """The ridge solution for lam.

        With select=None, lam is a number >= 0 (or a (groups, H_out, W_out) map of them, one per
        pixel system) and solve returns (weight, bias) (bias None for a layer without one).

        With select='gcv' or 'validation', lam is a sequence of candidates; solve picks one by
        generalized cross-validation computed from the statistics alone, or by the exact error
        on the validation statistics (update_validation), and returns (weight, bias, chosen).
        scope='global' picks one lambda for the whole layer (chosen is that candidate, a
        float); scope='pixel' picks one per pixel system (chosen is a (groups, H_out, W_out)
        map in the fitter's dtype). See lambda_scores for the criteria. Ties go to the earlier
        candidate.

        Raises RuntimeError, saying how many pixel systems failed, when a system cannot be
        solved: lam = 0 with fewer samples than unknowns, a pivot of the factorization at or
        below D * eps * (largest diagonal entry) (exact rank deficiency such as a tap that
        only reads zero padding or inputs constant over the batch; rank deficiency that
        rounding hides from the pivots is beyond any unpivoted factorization), or statistics
        that are not finite. Weights are never NaN in silence.
        """
        if select is None:
            _check_scope(scope, "solve")
            lam_map = self._lambda_map(lam)
            self._check_ready()
            chosen = None
        else:
            scores, candidates = self._scores(lam, select, scope, "solve")
            best = scores.argmin(0)
            if scope == "global":
                chosen = candidates[int(best)]
                lam_map = self._lambda_map(chosen)
            else:
                chosen = torch.tensor(candidates, dtype=self.dtype, device=self.device)[best]
                lam_map = chosen
        singular = int(self._surely_singular(lam_map).sum())
        if singular:
            raise RuntimeError(
                f"RidgeFitter.solve: {singular} of {lam_map.numel()} pixel systems have lam = 0 "
                f"with {self.count} samples for {self.unknowns} unknowns, so they are singular; "
                "use lam > 0")
        solution, info = self._solve_map(lam_map)
        self._raise_failure(info, solution)
        weight, bias = self._split(solution)
        return (weight, bias) if select is None else (weight, bias, chosen)

    def fit_(self, layer: LocalRegression, lam, select: Optional[str] = None,
             scope: str = "global"):
        """Writes solve(lam, select, scope)'s weight and bias into layer (a LocalRegression of
        the same geometry) and returns the lambda used: lam, or the chosen one."""
        if not isinstance(layer, LocalRegression):
            raise TypeError(f"RidgeFitter.fit_: layer must be a reggan_ext.LocalRegression, got "
                            f"{type(layer).__name__}")
        self._check_geometry(_geometry(layer), "RidgeFitter.fit_: layer must have the geometry "
                             "of the fitted one: ")
        result = self.solve(lam, select, scope)
        with torch.no_grad():
            layer.weight.copy_(result[0])
            if self.has_bias:
                layer.bias.copy_(result[1])
        return lam if select is None else result[2]

    # Lambda selection -------------------------------------------------------------------

    def lambda_scores(self, candidates: Sequence[float], select: str = "gcv",
                      scope: str = "pixel") -> torch.Tensor:
        """The criterion solve(candidates, select, scope) minimizes: shape (K,) for
        scope='global', (K, groups, H_out, W_out) for scope='pixel'.

        For a set S of (output channel, pixel) fits (one pixel system's outputs for 'pixel',
        all of them for 'global') with n samples each, m = n |S| targets, residual sum of
        squares RSS and hat-matrix traces tr:
          'gcv':        GCV = m * RSS / (m - sum tr)^2 (inf when m <= sum tr or a system
                        cannot be solved). Per candidate, one batched factorization gives the
                        solution w and RSS = yy - w . r - lam ||P w||^2, another the trace
                        tr H = D - lam * tr(P (G + lam P)^-1). (An eigendecomposition of each
                        G would serve every candidate at once, but torch.linalg.eigh runs
                        LAPACK matrix by matrix: about a millisecond per 26 x 26 system.)
          'validation': sum over S of the validation error sum_n (y - w . z)^2 =
                        yy_val - 2 w . r_val + w^T G_val w, inf where a system cannot be solved.
        An unpenalized bias (penalize_bias=False) is exact in both. A score is also inf where
        the solution overflows. Non-finite statistics (NaN or Inf in the training or validation
        data) and validation statistics without samples raise RuntimeError.
        """
        return self._scores(candidates, select, scope, "lambda_scores")[0]

    def _scores(self, candidates, select, scope, method):
        if select not in _SELECT:
            raise ValueError(f"RidgeFitter.{method}: select must be one of {_SELECT} or None, "
                             f"got {select!r}")
        _check_scope(scope, method)
        if getattr(candidates, "ndim", None) == 1:  # a tensor or numpy array
            candidates = candidates.tolist()
        if isinstance(candidates, str) or not isinstance(candidates, SequenceABC) or \
                not candidates:
            raise ValueError(f"RidgeFitter.{method}: with select={select!r}, lam must be a "
                             "non-empty sequence of candidate lambdas")
        values = [self._lambda_value(c, "each candidate lambda") for c in candidates]
        self._check_ready()
        self._check_finite(self._statistics, "statistics", method)
        if select == "gcv":
            rss, traces = self._gcv_terms(values)
            targets = torch.tensor(float(self.count), dtype=self.dtype, device=self.device)
            if scope == "global":
                rss, traces = rss.sum((1, 2, 3)), traces.sum((1, 2, 3))
                targets = targets * self._statistics["target_sq"].numel()
            else:
                targets = targets * self.out_per_group
            room = targets - traces
            scores = torch.where(room > 0, targets * rss / room.clamp_min(1e-300) ** 2,
                                 math.inf)
        else:
            validation = self._validation
            if validation is None or not int(validation["count"]):
                raise RuntimeError(f"RidgeFitter.{method}: select='validation' needs validation "
                                   "samples; call update_validation(x, y) with some first")
            self._check_finite(validation, "validation statistics", method)
            errors = self._validation_errors(values)
            scores = errors.sum((1, 2, 3)) if scope == "global" else errors
        # From finite statistics, a NaN score comes from a solution that overflowed.
        return torch.where(scores.isnan(), math.inf, scores), values

    def _pixel_chunks(self):
        pixels = self._statistics["target_sq"][0].numel()
        step = max(1, _SELECTION_ELEMENTS // (self.groups * self.unknowns ** 2))
        return [(p, min(p + step, pixels)) for p in range(0, pixels, step)]

    def _gcv_terms(self, lams: Sequence[float]):
        """RSS summed over each system's outputs (inf where the system cannot be solved) and
        out_per_group * tr(H), per candidate: two (K, groups, H_out, W_out) tensors."""
        stats, d, og = self._statistics, self.unknowns, self.out_per_group
        shape = (self.groups, *self._layer.output_size)
        cross = stats["cross"].reshape(self.groups, og, d, *shape[1:])
        target_sq = stats["target_sq"].reshape(self.groups, og, *shape[1:])
        penalized = d if self._penalize_last else d - 1
        rss, traces = [], []
        for lam in lams:
            lam_map = torch.full(shape, lam, dtype=self.dtype, device=self.device)
            w, info = self._solve_map(lam_map)
            inverse, trace_info = _ops.ridge_inverse_trace(stats["gram"], lam_map,
                                                           self._penalize_last)
            w = w.reshape(cross.shape)
            # (G + lam P) w = r, so w^T G w = w.r - lam ||P w||^2 and
            # RSS = yy - 2 w.r + w^T G w = yy - w.r - lam ||P w||^2.
            fit = (w * cross).sum(2) + lam * w[:, :, :penalized].pow(2).sum(2)
            failed = (info != 0) | (trace_info != 0) | self._surely_singular(lam_map)
            rss.append(torch.where(failed, math.inf, (target_sq - fit).sum(1).clamp_min(0)))
            # tr H = tr(G (G + lam P)^-1) = D - lam tr(P (G + lam P)^-1).
            traces.append(og * (d - lam * inverse))
        return torch.stack(rss), torch.stack(traces)

    def _validation_errors(self, lams: Sequence[float]) -> torch.Tensor:
        """Validation error of each candidate summed over each system's outputs:
        (K, groups, H_out, W_out), inf where the system cannot be solved."""
        val, d, og = self._validation, self.unknowns, self.out_per_group
        shape = (self.groups, *self._layer.output_size)
        errors = []
        gram = val["gram"].flatten(2)
        for lam in lams:
            lam_map = torch.full(shape, lam, dtype=self.dtype, device=self.device)
            w, info = self._solve_map(lam_map)
            info = torch.where(self._surely_singular(lam_map), 1, info)
            w = w.reshape(self.groups, og, d, -1)
            linear = (w * val["cross"].reshape(self.groups, og, d, -1)).sum(2)
            quadratic = torch.empty_like(linear)
            for p0, p1 in self._pixel_chunks():
                g = _unpack(gram[..., p0:p1], d)                    # (groups, pc, D, D)
                wc = w[..., p0:p1].permute(0, 3, 1, 2)               # (groups, pc, Og, D)
                quadratic[..., p0:p1] = ((wc @ g) * wc).sum(-1).transpose(1, 2)
            error = (val["target_sq"].reshape(self.groups, og, -1) - 2 * linear + quadratic)
            error = error.sum(1).reshape(shape)
            errors.append(torch.where(info == 0, error, math.inf))
        return torch.stack(errors)


def fit_local_regression(layer: LocalRegression, batches: Iterable, lam, *,
                         select: Optional[str] = None, scope: str = "global",
                         validation: Optional[Iterable] = None, penalize_bias: bool = True,
                         dtype: torch.dtype = torch.float64):
    """Fits layer in place by ridge regression over batches, an iterable of (x, y) pairs, and
    returns the lambda used (the chosen one when select is 'gcv' or 'validation'; validation
    batches then come from `validation`). See RidgeFitter."""
    fitter = RidgeFitter(layer, penalize_bias=penalize_bias, dtype=dtype)
    for x, y in batches:
        fitter.update(x, y)
    if validation is not None:
        for x, y in validation:
            fitter.update_validation(x, y)
    return fitter.fit_(layer, lam, select=select, scope=scope)


def ridge_loss(layer: LocalRegression, x: torch.Tensor, y: torch.Tensor, lam: float,
               penalize_bias: bool = True) -> torch.Tensor:
    """(sum of squared errors of layer(x) against y + lam * ||W||^2) / y.numel(): the mean
    squared error plus the ridge penalty, scaled so that on a dataset (x, y) its minimizer is
    exactly RidgeFitter(layer, penalize_bias).update(x, y).solve(lam). ||W||^2 includes the
    bias when penalize_bias. For mini-batches of B out of N samples, pass lam * B / N."""
    lam = _check_lambda(lam)
    penalty = layer.weight.pow(2).sum()
    if penalize_bias and layer.bias is not None:
        penalty = penalty + layer.bias.pow(2).sum()
    return ((layer(x) - y).pow(2).sum() + lam * penalty) / y.numel()


# Pure-PyTorch references (the oracles of the tests, the baselines of the benchmarks) --------


def ridge_statistics_reference(layer: LocalRegression, x: torch.Tensor, y: torch.Tensor,
                               dtype: torch.dtype = torch.float64) -> dict:
    """The statistics of RidgeFitter(layer, dtype=dtype).update(x, y), from an unfolded copy of
    the data and one batched matrix product per pixel."""
    padded, padding = layer.pad_input(x.to(dtype))
    n = x.shape[0]
    columns = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, padding=padding,
                       stride=layer.stride)
    groups, pixels = layer.groups, columns.shape[-1]
    z = columns.reshape(n, groups, -1, pixels)
    if layer.bias is not None:
        z = torch.cat([z, z.new_ones(n, groups, 1, pixels)], 2)
    d = z.shape[2]
    zt = z.permute(1, 3, 0, 2).reshape(groups * pixels, n, d)
    full = torch.bmm(zt.transpose(1, 2), zt).reshape(groups, pixels, d, d)
    rows, cols = _packed_indices(d, x.device)
    targets = y.to(dtype).reshape(n, groups, -1, pixels)
    cross = torch.einsum("ngap,ngop->goap", z, targets)
    shape = layer.output_size
    return {
        "gram": full[..., rows, cols].transpose(1, 2).reshape(groups, -1, *shape),
        "cross": cross.reshape(layer.out_channels, d, *shape),
        "target_sq": targets.pow(2).sum(0).reshape(layer.out_channels, *shape),
        "count": torch.tensor(n, device=x.device),
    }


def ridge_solve_reference(gram: torch.Tensor, cross: torch.Tensor, lam: torch.Tensor,
                          penalize_last: bool):
    """ridge_solve with torch.linalg.cholesky_ex + cholesky_solve (LAPACK per matrix).
    Returns (solution, info) like the kernel."""
    groups, _, h, w = gram.shape
    d = cross.shape[1]
    full = _unpack(gram.flatten(2), d)                                 # (groups, P, D, D)
    shift = torch.ones(d, dtype=gram.dtype, device=gram.device)
    if not penalize_last:
        shift[-1] = 0
    full = full + torch.diag_embed(lam.reshape(groups, -1, 1) * shift)
    factor, info = torch.linalg.cholesky_ex(full)
    rhs = cross.reshape(groups, -1, d, h * w).permute(0, 3, 2, 1)      # (groups, P, D, Og)
    solution = torch.cholesky_solve(rhs, factor)
    return solution.permute(0, 3, 2, 1).reshape(cross.shape), info.reshape(groups, h, w)


def reference_fit(layer: LocalRegression, batches: Iterable, lam: float,
                  penalize_bias: bool = True, dtype: torch.dtype = torch.float64):
    """(weight, bias) of the ridge fit by the pure-PyTorch references: unfold + bmm Gram per
    batch, then torch.linalg.cholesky + cholesky_solve."""
    total = None
    for x, y in batches:
        stats = ridge_statistics_reference(layer, x, y, dtype)
        total = stats if total is None else {k: total[k] + stats[k] for k in total}
    groups = layer.groups
    lam_map = torch.full((groups, *layer.output_size), float(lam), dtype=dtype,
                         device=total["gram"].device)
    solution, _ = ridge_solve_reference(total["gram"], total["cross"], lam_map,
                                        penalize_bias or layer.bias is None)
    taps = layer.in_channels // groups * layer.kernel_size[0] * layer.kernel_size[1]
    weight = solution[:, :taps].reshape(layer.weight.shape)
    return weight, (solution[:, taps] if layer.bias is not None else None)
