"""The engine's one door to PPQ and torch: no other module of xquant's core imports either (issue 14).

- :mod:`.compat`: ``import_ppq``, PPQ 0.6.6 imported on today's protobuf/onnx, quietly;
- :mod:`.ppq_ir`: PPQ's IR: parse, dispatch, executor, passes, hooks, ranges, ops kept float;
- :mod:`.ops`: the op implementations PPQ 0.6.6 gets wrong, installed into its forward table;
- :mod:`.tensors`: the torch functions the algorithms call (tensors from arrays, grad mode,
  threads, histograms, the kernels of bias correction).

Nothing is imported here: torch and PPQ load when a run needs them, not with ``import xquant``.
"""
