"""QualiCLIP (Agnolucci et al. 2024), a no-reference image quality score in [0, 1] (higher is
better), through pyiqa. pyiqa downloads its weights on first use, which reggan never lets it do:
the metric runs only when pyiqa is installed and both of its files are already in torch's hub
folder, and is unavailable with a message saying how to provide them otherwise."""

import hashlib
import importlib.util
from pathlib import Path
from typing import Dict, Union

import torch

from reggan.metrics._assets import require_module
from reggan.metrics.images import Images, as_rgb_uint8
from reggan.metrics.result import MetricResult, MetricUnavailable

# Where pyiqa 0.1.x looks (pyiqa.archs.qualiclip_arch and pyiqa.archs.clip_model), under
# torch.hub.get_dir() (TORCH_HOME/hub, by default ~/.cache/torch/hub).
CLIP_RN50 = ("clip/RN50.pt", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762")
QUALICLIP = "pyiqa/QualiCLIP.pth"


def qualiclip_weight_files() -> Dict[str, Path]:
    hub = Path(torch.hub.get_dir())
    return {"CLIP ResNet-50": hub / CLIP_RN50[0], "QualiCLIP": hub / QUALICLIP}


def _check_setup() -> None:
    """Raises MetricUnavailable listing everything QualiCLIP lacks here."""
    problems = []
    if importlib.util.find_spec("pyiqa") is None:
        problems.append("pyiqa is not installed (`pip install pyiqa`; it needs a torchvision that "
                        "imports beside the installed torch)")
    files = qualiclip_weight_files()
    missing = [path for path in files.values() if not path.is_file()]
    if missing:
        problems.append(
            "its weight files are missing, and reggan never downloads them: "
            + ", ".join(str(p) for p in missing) + ". On a machine with internet access run "
            "`python -c \"import pyiqa; pyiqa.create_metric('qualiclip')\"`, then copy clip/RN50.pt "
            f"and pyiqa/QualiCLIP.pth from its torch hub folder (~/.cache/torch/hub) into "
            f"{files['QualiCLIP'].parent.parent} here (set TORCH_HOME to use another folder)")
    else:
        clip = files["CLIP ResNet-50"]
        digest = hashlib.sha256(clip.read_bytes()).hexdigest()
        if digest != CLIP_RN50[1]:  # pyiqa would try to download it again
            problems.append(f"{clip} is corrupt (sha256 {digest[:12]}..., expected "
                            f"{CLIP_RN50[1][:12]}...); copy it again")
    if problems:
        raise MetricUnavailable("QualiCLIP: " + "; ".join(problems))


def qualiclip(images: Images, device: Union[str, torch.device] = "cpu") -> MetricResult:
    """Mean QualiCLIP score of `images`; raises MetricUnavailable (with what to do) when pyiqa
    or its weights are absent."""
    _check_setup()
    pyiqa = require_module("pyiqa", "pyiqa", "QualiCLIP")
    rgb = as_rgb_uint8(images)
    if not rgb:
        raise ValueError("images: QualiCLIP needs at least one image")
    metric = pyiqa.create_metric("qualiclip", device=torch.device(device), as_loss=False)
    scores = []
    with torch.no_grad():
        for image in rgb:
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(device)
            scores.append(float(metric(x).reshape(-1)[0]))
    return MetricResult("qualiclip", sum(scores) / len(scores), {"n": len(scores)})
