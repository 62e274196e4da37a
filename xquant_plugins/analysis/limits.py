"""The report's thresholds and budgets: what is flagged, how many batches and elements it measures."""

from __future__ import annotations

#: a row is flagged above this noise-to-signal power ratio
FLAG_SNR = 0.1
#: ... or below this cosine similarity
FLAG_COSINE = 0.99
#: calibration batches run through both models at most
DEFAULT_MAX_BATCHES = 8
#: calibration batches the "Next step" candidates are measured on at most
CANDIDATE_BATCHES = 16
#: held-back samples (listed after the first ``calibration_step``) the headline outputs are measured on at most
HELD_BACK_MAX = 256
#: ... and the "Next step" candidates
HELD_BACK_CANDIDATES = 32
#: elements per tensor in its float histogram at most (over all batches)
DEFAULT_MAX_ELEMENTS = 65536
#: the report's float and quantized copies of the probed tensors alive at once at most (bytes, per
#: batch): past it the models run in segments (:mod:`.segments`)
SEGMENT_BYTES = 64 * 2**20
#: after the first batch, run only as many batches as fit in this fraction of the quantization time
TIME_FRACTION = 0.25
#: bins of the float histogram sparkline
HISTOGRAM_BINS = 10
#: ops labelled in the chart and the summary's custom_setting suggestions
CHART_LABELS = 5
MAX_SUGGESTIONS = 2
#: a further suggestion must add at least this share of the first one's SNR growth
SECONDARY_SHARE = 0.25

QDQ_TYPES = ("QuantizeLinear", "DequantizeLinear")
_SPARK = "▁▂▃▄▅▆▇█"
_SPARK_EMPTY = "·"
