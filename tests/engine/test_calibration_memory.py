"""Peak memory of a whole CLI run does not grow with the number of calibration samples.

A small CNN on a 1x3x224x224 input (602 KB per sample), 100 and then 1000 calibration
samples (a list cycling through 10 npy files), minmax, finetune_level 0: the peak RSS of
the ``xquant`` process (``os.wait4``'s ``ru_maxrss``) with 1000 samples must stay within
1.5x of the one with 100. ``benchmarks/calibration_memory.py`` measures the same on the
MobileNetV2 sample with real photos.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

MAX_RATIO = 1.5


def write_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.2, (4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], strides=[4, 4], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["output"])]
    graph = helper.make_graph(nodes, "wide_input",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def peak_rss_mib(folder: Path, samples: int) -> float:
    (folder / f"list_{samples}.txt").write_text("".join(f"s{i % 10}.npy\n" for i in range(samples)))
    config = {
        "model_parameters": {"onnx_model": "m.onnx", "working_dir": "out", "output_prefix": f"m{samples}",
                             "skip_onnxsim": True},
        "calibration_parameters": {"calibration_step": samples, "calibration_device": "cpu",
                                   "calibration_type": "minmax",
                                   "input_parametres": [{"file_type": "npy", "data_list_path": f"list_{samples}.txt"}]},
        "quantization_parameters": {"analysis_enable": False, "finetune_level": 0},
    }
    (folder / f"cfg_{samples}.json").write_text(json.dumps(config))
    child = subprocess.Popen([sys.executable, "-m", "xquant", "-c", str(folder / f"cfg_{samples}.json")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder)
    output = child.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    return usage.ru_maxrss / 1024.0


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_calibration_samples(tmp_path):
    write_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    for index in range(10):
        np.save(tmp_path / f"s{index}.npy", rng.normal(0, 1, (3, 224, 224)).astype(np.float32))
    small, large = peak_rss_mib(tmp_path, 100), peak_rss_mib(tmp_path, 1000)
    print(f"peak RSS: 100 samples {small:.0f} MiB, 1000 samples {large:.0f} MiB, ratio {large / small:.2f}")
    assert large <= MAX_RATIO * small, f"100 samples: {small:.0f} MiB, 1000 samples: {large:.0f} MiB"
