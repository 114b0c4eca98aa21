"""The package namespace: ``steerkern.<name>`` calls the public function even where a submodule
of the same name has been imported (and so bound as the package's attribute) first."""

import subprocess
import sys

CHECK = """
import steerkern.capture, steerkern.extract  # binds the modules as package attributes
import steerkern
from tests.test_extract import PAIRS, CharTokenizer
from tests.tiny_models import build_tiny_model
model = build_tiny_model("llama")
vector = steerkern.extract(model, CharTokenizer(), PAIRS, layers=[1], progress=False)
acts = steerkern.capture(model, CharTokenizer(), ["hello"], [1], progress=False)
print(type(vector).__name__, tuple(acts[1].shape))
"""


def test_functions_named_like_their_modules_stay_callable():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["SteeringVector", "(1,", "1,", "64)"]
