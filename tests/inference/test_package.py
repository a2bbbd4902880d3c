import subprocess
import sys


def test_inference_imports_without_loading_django_or_the_web_app() -> None:
    web = "{'django', 'rest_framework', 'channels', 'celery', 'worklist', 'ichweb'}"
    code = (
        f"import sys, inference; print(sorted(m for m in sys.modules if m.split('.')[0] in {web}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
