import subprocess
import sys
from pathlib import Path

import torch


def test_inference_imports_without_loading_django_or_the_web_app() -> None:
    web = "{'django', 'rest_framework', 'channels', 'celery', 'worklist', 'ichweb'}"
    code = (
        f"import sys, inference; print(sorted(m for m in sys.modules if m.split('.')[0] in {web}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_a_package_keeps_each_members_output_stride(tmp_path: Path) -> None:
    from inference.models import EfficientNetLite
    from inference.package import ModelPackage
    from inference.preprocess import PreprocessConfig

    members = [EfficientNetLite("efficientnet_lite0", output_stride=16).eval()]
    ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None).save(tmp_path / "m.pt")
    loaded = ModelPackage.load(tmp_path / "m.pt")
    assert loaded.members[0].output_stride == 16
    assert loaded.members[0].forward_features(torch.rand(1, 3, 64, 64)).shape[-1] == 4
