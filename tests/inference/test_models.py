import torch

from inference.convexity import ConvexityNet, _CircularConv, folded_strip_net
from inference.gradcam import class_activation, grad_cam
from inference.models import (
    AggregatorConfig,
    EfficientNetLite,
    StudyAggregator,
    build_slice_model,
    folded_for_inference,
    fused_convolutions_available,
    imagenet_weights_path,
)


def test_imagenet_weights_install_from_the_registry_packages() -> None:
    for variant in ("efficientnet_lite0", "efficientnet_lite1"):
        assert imagenet_weights_path(variant).is_file()


def test_both_architectures_load_their_imagenet_weights_exactly() -> None:
    for variant in ("efficientnet_lite0", "efficientnet_lite1"):
        model = build_slice_model(variant)
        checkpoint = torch.load(imagenet_weights_path(variant), weights_only=True)
        assert torch.equal(model.conv_stem.weight, checkpoint["_conv_stem.weight"])
        assert torch.equal(model.conv_head.weight, checkpoint["_conv_head.weight"])


def test_the_interface_is_forward_features_forward_head_forward() -> None:
    model = EfficientNetLite("efficientnet_lite0").eval()
    x = torch.rand(2, 3, 96, 96)
    features = model.forward_features(x)
    assert features.shape == (2, 1280, 3, 3)
    assert model.forward_head(features).shape == (2, 6)
    assert torch.allclose(model(x), model.forward_head(features))


def test_grad_cam_gives_one_map_per_class_in_unit_range() -> None:
    model = EfficientNetLite("efficientnet_lite0").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
    maps = grad_cam([model], [features], [0, 3], size=64)
    assert set(maps) == {0, 3}
    assert maps[0].shape == (2, 64, 64)
    assert maps[0].min() >= 0.0 and maps[0].max() <= 1.0


def test_the_closed_form_grad_cam_equals_the_autograd_one() -> None:
    torch.manual_seed(0)
    members = [
        build_slice_model(v, output_stride=16).eval()
        for v in ("efficientnet_lite0", "efficientnet_lite1")
    ]
    for model in members:
        torch.nn.init.normal_(model.fc.weight, std=0.05)
        torch.nn.init.normal_(model.fc.bias, std=0.5)
    x = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        features = [m.forward_features(x) for m in members]
        maps = [m.forward_maps(f) for m, f in zip(members, features, strict=True)]
    assert maps[0].shape == (3, 6, 6, 6)
    # the maps' mean over locations is the slice logit
    assert torch.allclose(maps[0].mean(dim=(2, 3)), members[0].forward_head(features[0]), atol=1e-5)
    reference = grad_cam(members, features, [0, 2, 5], size=96)
    for c in (0, 2, 5):
        fast = class_activation(members, maps, c, size=96)
        assert torch.allclose(fast, reference[c], atol=1e-4), c
        assert fast.max() >= 0.5  # not trivially flat (one member at least peaks at 1)


def test_the_aggregator_reads_any_number_of_slices() -> None:
    aggregator = StudyAggregator(AggregatorConfig(input_dim=8)).eval()
    for slices in (1, 7, 40):
        study, per_slice = aggregator(
            torch.randn(1, slices, 8), torch.ones(1, slices, dtype=torch.bool)
        )
        assert study.shape == (1, 6)
        assert per_slice.shape == (1, slices, 6)


def test_the_dense_last_stage_is_the_same_stage_sampled_more_finely() -> None:
    model = EfficientNetLite("efficientnet_lite0").eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        coarse = model.forward_features(x)  # (1, 1280, 4, 4)
        dense = model.forward_features(x, output_stride=16)  # (1, 1280, 8, 8)
    assert dense.shape[-1] == 2 * coarse.shape[-1]
    # away from the zero-padded border the "a trous" computation reproduces every coarse value
    assert torch.allclose(dense[..., 2:-2:2, 2:-2:2], coarse[..., 1:-1, 1:-1], atol=1e-5)


def _random_statistics(model: torch.nn.Module) -> None:
    """Batch norms as after training: running statistics and affine weights away from 0 and 1."""
    generator = torch.Generator().manual_seed(3)
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            shape = layer.running_mean.shape
            layer.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
            layer.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            layer.weight.data.copy_(0.5 + torch.rand(shape, generator=generator))
            layer.bias.data.copy_(0.1 * torch.randn(shape, generator=generator))


def test_folded_networks_compute_what_the_trained_ones_do_and_leave_them_as_they_are() -> None:
    """The predictor runs copies with each batch norm folded into its convolution and each
    convolution fused with its ReLU6 or residual sum (faster on CPU): the same features, dense
    stage and class maps within float rounding, and the trained network (what a package saves)
    keeps its batch norms."""
    x = torch.rand(3, 3, 96, 96)
    assert fused_convolutions_available()  # this torch's CPU build: the fused path is tested
    for stride in (32, 16):
        model = EfficientNetLite("efficientnet_lite0", output_stride=stride).eval()
        _random_statistics(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        folded = folded_for_inference(model)
        assert folded.fused and not model.fused
        with torch.no_grad():
            want = model.forward_features(x)
            got = folded.forward_features(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(folded.forward_maps(got), model.forward_maps(want))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 10
        assert model.state_dict().keys() == before.keys()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_a_folded_strip_network_gives_the_trained_ones_logits() -> None:
    net = ConvexityNet(width=8).eval()
    _random_statistics(net)
    strips = torch.rand(2, 4, 64, 360)
    folded = folded_strip_net(net)
    with torch.no_grad():
        want = net(strips)
        got = folded(strips)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(layer.fused for layer in folded.modules() if isinstance(layer, _CircularConv))
    assert not any(getattr(layer, "fused", False) for layer in net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_heatmaps_are_upsampled_on_the_feature_centres_whatever_the_image_size() -> None:
    """Feature i of a stride-s stage is centred on input pixel s * i. Where s does not divide
    the image size (200 px at stride 32: 7 features), mapping pixel p to p * h / size shifted
    the map by up to 20 px; evidence in the last feature column now peaks on its centre."""
    import torch

    from inference.gradcam import upsample

    for size, stride in ((200, 32), (200, 16), (192, 32), (256, 16)):
        columns = -(-size // stride)
        cam = torch.zeros(1, columns, columns)
        cam[0, :, -1] = 1.0
        full = upsample(cam, size, stride)[0, 0]
        last_centre = stride * (columns - 1)
        assert float(full[last_centre]) == 1.0, (size, stride)
        assert float(full[stride * (columns - 2)]) == 0.0, (size, stride)
