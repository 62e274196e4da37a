"""The float model: loading, simplification, and the inputs calibration must feed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.utils

from . import rewrite, runtime
from .config import InputConfig
from .data import InputSpec
from .engine.forms import at_least_opset_13, default_opset
from .errors import ModelError

log = logging.getLogger("xquant.model")

QDQ_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
}


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load and sanity-check a float ONNX model (a path or an in-memory proto); opset < 13 is converted to 13."""
    return read_model(source)[0]


def read_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, list[Path]]:
    """:func:`load_model`, and the external-data files the model file names (the model holds their
    data once loaded, and no longer says where it came from: the run must not write over them)."""
    external: list[Path] = []
    if isinstance(source, onnx.ModelProto):
        model = source
        where = "the given model"
    else:
        path = Path(source)
        where = str(path)
        if path.is_dir():
            raise ModelError(f"onnx_model {path} is a folder: give the path of the .onnx file")
        if not path.is_file():
            raise ModelError(f"onnx_model {path} does not exist")
        try:
            model = onnx.load(str(path), load_external_data=False)
            external = _external_data_files(path, model)
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise ModelError(f"onnx_model {path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    return _checked(model, where), external


def _external_data_files(path: Path, model: onnx.ModelProto) -> list[Path]:
    from onnx import external_data_helper

    every = getattr(external_data_helper, "_get_all_tensors", None)  # subgraphs' and Constant nodes' too
    locations: set[str] = set()
    for tensor in every(model) if every is not None else model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return [path.parent / location for location in sorted(locations)]


def _checked(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """The model, once it is a float model xquant can quantize (at opset 13 or later)."""
    if not model.graph.node:
        raise ModelError(f"{where} has an empty graph: is it an ONNX model?")
    problem = _invalid(model)
    if problem:
        raise ModelError(f"{where} is not a valid ONNX model: {problem}; export it again or fix the graph")
    quantized = sorted({node.op_type for node in model.graph.node if node.op_type in QDQ_OPS})
    if quantized:
        raise ModelError(
            f"{where} is already quantized (it contains {', '.join(quantized)}); give xquant the float model"
        )
    half = _half_precision(model)
    if half:
        raise ModelError(
            f"{where} is a float16/bfloat16 model ({', '.join(half[:3])}"
            f"{' ...' if len(half) > 3 else ''}): xquant quantizes float32 models; "
            "give it the float32 model (or convert this one to float32 first)"
        )
    opset = default_opset(model)
    try:
        return at_least_opset_13(model)
    except Exception as exc:
        raise ModelError(
            f"{where} is at opset {opset}; converting it to opset 13 failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
            "export it again at opset 13 or later"
        ) from None


def _invalid(model: onnx.ModelProto) -> str | None:
    """What is wrong with the graph (an op no opset has, a tensor nothing makes, an output no node
    writes, an opset from the future), or None. onnx's checker says it; a model the checker
    refuses but onnxruntime loads (a declared output without a shape) is taken as valid."""
    newest = onnx.defs.onnx_opset_version()
    if default_opset(model) > newest:
        return f"its opset {default_opset(model)} is newer than any the installed onnx knows"
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        problem = " ".join(str(exc).split())
    except ValueError:  # over 2 GB as one message: the checker cannot take it, onnxruntime will tell
        return None
    else:  # the checker does not know ops of other domains: can onnxruntime run them?
        if all(node.domain in ("", "ai.onnx", "ai.onnx.ml") for node in model.graph.node):
            return None
        problem = "nodes of other domains"
    try:
        from .runtime import onnxruntime_session

        onnxruntime_session(model, threads=1)
    except Exception as exc:  # onnxruntime raises its own exception types: it cannot load the model either
        if problem == "nodes of other domains":
            return f"onnxruntime cannot load it: {' '.join(str(exc).split())[:300]}"
        return f"onnx's checker says: {problem[:300]}"
    return None


def _half_precision(model: onnx.ModelProto) -> list[str]:
    """Inputs, outputs and initializers stored as float16/bfloat16 (PPQ's float ops fail on them)."""
    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    graph = model.graph
    values = [
        f"{kind} {value.name}"
        for kind, group in (("input", graph.input), ("output", graph.output))
        for value in group
        if value.type.tensor_type.elem_type in half
    ]
    return values + [f"initializer {init.name}" for init in graph.initializer if init.data_type in half]


def simplify(model: onnx.ModelProto, keep: Iterable[str] = (), cache: OnnxsimCache | None = None) -> onnx.ModelProto:
    """onnxsim the model (on failure warn and go on with the original), then the exact rewrites of
    :mod:`xquant_core.rewrite`, which leave the tensors named in ``keep`` as they are. ``cache``:
    where onnxsim's result for this model is kept between runs (:class:`OnnxsimCache`)."""
    simplified = cache.load() if cache is not None else None
    if simplified is None:
        try:
            onnxsim = runtime.import_onnxsim()
            with _native_output_to_log("onnxsim"):
                simplified, ok = onnxsim.simplify(model)
        except Exception as exc:  # onnxsim raises many kinds of errors on exotic graphs
            log.warning(
                "onnxsim failed (%s: %s); going on with the original graph",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            simplified, ok = model, True
        if not ok:
            log.warning("onnxsim could not validate the simplified model; going on with the original graph")
            simplified = model
        elif cache is not None and simplified is not model:
            cache.store(simplified)
    keep = set(keep)
    return rewrite.fold_affine_into_conv(rewrite.fuse_hard_activations(simplified, keep), keep)


class OnnxsimCache:
    """onnxsim's result for one model, kept between runs: the daily loop quantizes the same model
    again and again (a calibration setting, the report's ``custom_setting``), and a hit spares
    importing onnxsim (0.11 s: 0.8.1 loads ~60 modules, sympy kept out by
    :func:`.runtime.import_onnxsim`) and running it (0.1-0.5 s on the zoo's models). The model is
    the same bytes either way (the entry holds onnxsim's output as it gave it, followed by its
    SHA-256: a damaged entry is a miss, and is rewritten).

    Keyed by the SHA-256 of the model's bytes, of what simplifies it (xquant's, onnxsim's, onnx's,
    protobuf's and onnxruntime's versions, onnxsim's ``ONNXSIM_*`` settings) and of the call. Kept
    in ``$XQUANT_CACHE_DIR`` (an empty value turns it off), else ``$XDG_CACHE_HOME/xquant`` or
    ``~/.cache/xquant``, under ``onnxsim/``; after each write the least recently used entries go
    beyond ``MAX_BYTES``. Failures to read or write it only cost the time."""

    MAX_BYTES = 1 << 30
    MAX_MODEL_BYTES = 256 << 20
    CALL = "onnxsim.simplify(model)"  #: what :func:`simplify` asks of onnxsim (change with it)
    SUFFIX = ".onnxsim"

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def for_model(cls, model: onnx.ModelProto) -> OnnxsimCache | None:
        """The model's entry; None when caching is off or the model is too big to keep twice."""
        folder = cls.folder()
        if folder is None or model.ByteSize() > cls.MAX_MODEL_BYTES:
            return None
        digest = hashlib.sha256(model.SerializeToString())
        digest.update(json.dumps([cls.CALL, *_simplifier_versions(), *_onnxsim_settings()]).encode())
        return cls(folder / f"{digest.hexdigest()}{cls.SUFFIX}")

    @staticmethod
    def folder() -> Path | None:
        configured = os.environ.get("XQUANT_CACHE_DIR")
        if configured is not None:
            return Path(configured).expanduser().absolute() / "onnxsim" if configured.strip() else None
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):  # unset, empty or relative: ignored, as the XDG spec says
            base = os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "xquant" / "onnxsim"

    @property
    def hit(self) -> bool:
        return self.path.is_file()

    def load(self) -> onnx.ModelProto | None:
        """The cached model, or None (no entry; an entry that does not check out, which is removed)."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return None
        content, digest = data[:-32], data[-32:]
        try:
            if hashlib.sha256(content).digest() != digest:
                raise ValueError("its checksum does not match")
            model = onnx.load_from_string(content)
        except Exception as exc:  # damaged: onnxsim runs again and rewrites it
            log.debug("onnxsim cache %s not used (%s)", self.path, exc)
            with contextlib.suppress(OSError):
                self.path.unlink()
            return None
        with contextlib.suppress(OSError):  # a read-only cache still serves
            os.utime(self.path)  # recently used
        log.debug("onnxsim's result read from %s", self.path)
        return model

    def store(self, model: onnx.ModelProto) -> None:
        """Write the entry whole (a temporary file renamed: a reader never sees part of one)."""
        part = None
        try:
            content = model.SerializeToString()
            if len(content) > self.MAX_MODEL_BYTES:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path.parent, suffix=".part", delete=False) as handle:
                part = handle.name
                handle.write(content + hashlib.sha256(content).digest())
            os.chmod(part, 0o644)  # as other cache files (mkstemp makes them 0600)
            os.replace(part, self.path)
            self._trim()
        except (OSError, ValueError) as exc:  # a read-only home, a full disk: run without it
            log.debug("onnxsim cache %s not written (%s)", self.path, exc)
            if part is not None:
                with contextlib.suppress(OSError):
                    os.unlink(part)

    def _trim(self) -> None:
        """Entries beyond ``MAX_BYTES``, least recently used first, and parts a killed run left."""
        folder = self.path.parent
        for part in folder.glob("*.part"):
            with contextlib.suppress(OSError):
                if time.time() - part.stat().st_mtime > 3600:
                    part.unlink()
        total = 0
        for entry in sorted(folder.glob(f"*{self.SUFFIX}"), key=lambda entry: entry.stat().st_mtime, reverse=True):
            total += entry.stat().st_size
            if total > self.MAX_BYTES and entry != self.path:
                entry.unlink(missing_ok=True)


def _simplifier_versions() -> list[str]:
    """What decides onnxsim's output besides the model: the packages (onnx and protobuf are
    loaded; onnxruntime and xquant by their modules, whatever their distributions are named)."""
    from importlib import metadata

    import google.protobuf
    import onnxruntime

    from ._version import __version__

    try:
        onnxsim = metadata.version("onnxsim")
    except metadata.PackageNotFoundError:
        onnxsim = "-"
    return [__version__, onnxsim, onnx.__version__, google.protobuf.__version__, onnxruntime.__version__]


def _onnxsim_settings() -> list[str]:
    return sorted(f"{name}={value}" for name, value in os.environ.items() if name.startswith("ONNXSIM"))


@contextlib.contextmanager
def _native_output_to_log(what: str):
    """What native code writes to stdout/stderr (onnxsim's "WARNING: failed to run ... op" lines,
    onnxruntime's colour-coded logs) goes to the debug log instead of the user's terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                log.debug("%s said:\n%s", what, text)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs of the graph (initializers listed as inputs excluded)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _model_shape(value: onnx.ValueInfoProto) -> list[int | str | None]:
    dims = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or None)
    return dims


def resolve_inputs(model: onnx.ModelProto, configs: Sequence[InputConfig], inputs_key: str) -> list[InputSpec]:
    """Match the config's per-input settings with the model's inputs."""
    values = graph_inputs(model)
    names = [value.name for value in values]
    if len(configs) != len(values):
        raise ModelError(
            "Calibration input_parametres size should equal to model inputs size. "
            f"The config has {len(configs)} entr{'y' if len(configs) == 1 else 'ies'} in {inputs_key}, "
            f"the model has {len(values)} input(s): {', '.join(names)}"
        )
    chosen = [cfg.input_name if cfg.input_name is not None else value.name for cfg, value in zip(configs, values)]
    if len(set(chosen)) != len(chosen):  # before each input's shape is looked at: that is not the problem
        raise ModelError(f"{inputs_key} names the same model input twice: {', '.join(chosen)}")
    specs = []
    for cfg, value in zip(configs, values):
        where = f"{inputs_key}[{cfg.index}]"
        if cfg.input_name is not None:
            if cfg.input_name not in names:
                raise ModelError(
                    f"{where}.input_name '{cfg.input_name}' is not a model input; "
                    f"the model's inputs are: {', '.join(names)}"
                )
            value = values[names.index(cfg.input_name)]
        elem_type = value.type.tensor_type.elem_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
        except Exception:
            raise ModelError(f"model input '{value.name}' has an unsupported element type {elem_type}") from None
        if cfg.dtype is not None and cfg.dtype != dtype:
            raise ModelError(
                f"{where}.dtype is {cfg.dtype} but model input '{value.name}' is {dtype}; "
                "the model's type is used: remove dtype"
            )
        model_shape = _model_shape(value)
        shape: tuple[int, ...]
        if cfg.input_shape is not None:
            shape = tuple(cfg.input_shape)
            if len(shape) != len(model_shape) or any(isinstance(m, int) and m != s for m, s in zip(model_shape, shape)):
                raise ModelError(
                    f"{where}.input_shape {list(shape)} does not fit model input '{value.name}' of shape {model_shape}"
                )
        else:
            dims: list[int] = []
            for axis, dim in enumerate(model_shape):
                if isinstance(dim, int):
                    dims.append(dim)
                elif axis == 0:
                    dims.append(1)  # symbolic batch
                else:
                    raise ModelError(
                        f"model input '{value.name}' has a symbolic dimension '{dim}' at axis {axis}; "
                        f"set {where}.input_shape"
                    )
            shape = tuple(dims)
        specs.append(InputSpec(name=value.name, shape=shape, dtype=dtype, config=cfg))
    return specs


def fix_input_shapes(model: onnx.ModelProto, specs: Sequence[InputSpec]) -> onnx.ModelProto:
    """Write the calibration shapes into the model's inputs (symbolic batch -> fixed).

    Not in a model with subgraphs: onnxruntime infers shapes in untaken If branches too, and
    a branch written for another rank (Silero VAD has one) makes the model fail to load.
    """
    if any(
        attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for node in model.graph.node
        for attribute in node.attribute
    ):
        return model
    by_name = {spec.name: spec for spec in specs}
    for value in model.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        declared = _model_shape(value)
        for dim, size in zip(value.type.tensor_type.shape.dim, spec.shape):
            dim.Clear()
            dim.dim_value = size
        if any(not isinstance(dim, int) for dim in declared):
            log.warning(
                "input %s has dynamic dimensions %s: the quantized model takes %s, the calibration shape "
                "(onnxsim and the exported graph work out shapes for it); quantize once per shape you run",
                value.name,
                [dim if isinstance(dim, int) else str(dim) for dim in declared],
                list(spec.shape),
            )
    return model


# --------------------------------------------------------------------------- truncation
TRUNCATE_FAILED = "truncate graph failed."


def split_at(model: onnx.ModelProto, cut: Sequence[str]) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
    """Split ``model`` at the ``cut`` tensors (``truncate_var_names``).

    Returns the upper model (the nodes needed to compute the cut tensors, which become its
    outputs along with any model output computed there) and the nodes below the cut, to
    be re-attached in float by :func:`reattach`.
    """
    duplicates = sorted({name for name in cut if list(cut).count(name) > 1})
    if duplicates:
        raise ModelError(f"{TRUNCATE_FAILED} truncate_var_names lists {', '.join(duplicates)} more than once")
    producers = {out: index for index, node in enumerate(model.graph.node) for out in node.output}
    known = set(producers) | {value.name for value in model.graph.input}
    missing = [name for name in cut if name not in known]
    if missing:
        raise ModelError(
            f"{TRUNCATE_FAILED} var name(s) not in the graph: {', '.join(missing)} "
            "(names are those of the model after onnxsim; set skip_onnxsim to keep every original name)"
        )
    upper: set[int] = set()
    stack = [producers[name] for name in cut if name in producers]
    while stack:
        index = stack.pop()
        if index in upper:
            continue
        upper.add(index)
        stack.extend(producers[name] for name in model.graph.node[index].input if name in producers)
    lower = [node for index, node in enumerate(model.graph.node) if index not in upper]
    if not lower:
        raise ModelError(f"{TRUNCATE_FAILED} nothing lies below {', '.join(cut)}: the cut does not split the graph")
    if not upper:
        raise ModelError(
            f"{TRUNCATE_FAILED} nothing lies above {', '.join(cut)} (a model input): "
            "nothing would be quantized; name tensors inside the graph"
        )
    upper_outputs = {out for index in upper for out in model.graph.node[index].output}
    crossing = sorted({name for node in lower for name in node.input if name in upper_outputs} - set(cut))
    if crossing:
        raise ModelError(
            f"{TRUNCATE_FAILED} tensor(s) {', '.join(crossing)} also cross from above the cut to below "
            "it: add them to truncate_var_names"
        )

    inferred = onnx.shape_inference.infer_shapes(model)
    known_types = {value.name for value in list(inferred.graph.value_info) + list(inferred.graph.output)}
    graph_outputs = [value.name for value in model.graph.output]
    outputs = list(cut) + [name for name in graph_outputs if name in upper_outputs and name not in cut]
    for name in outputs:
        if name not in known_types:
            raise ModelError(f"{TRUNCATE_FAILED} the type of tensor {name} cannot be inferred")
    used = {name for index in upper for name in model.graph.node[index].input}
    inputs = [value.name for value in model.graph.input if value.name in used]
    upper_model = onnx.utils.Extractor(inferred).extract_model(inputs, outputs)
    return upper_model, lower


def reattach(
    quantized_upper: onnx.ModelProto, original: onnx.ModelProto, lower: Sequence[onnx.NodeProto]
) -> onnx.ModelProto:
    """The quantized upper part plus the float nodes below the cut, with the original interface."""
    upper_names = {init.name for init in quantized_upper.graph.initializer}
    renamed: dict[str, str] = {}
    lower_inits = []
    needed = {name for node in lower for name in node.input}
    for init in original.graph.initializer:
        if init.name not in needed:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        if init.name in upper_names:  # a weight shared across the cut: keep the float copy apart
            renamed[init.name] = copy.name = f"{init.name}_float"
        lower_inits.append(copy)
    lower_nodes = []
    for node in lower:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for position, name in enumerate(copy.input):
            if name in renamed:
                copy.input[position] = renamed[name]
        lower_nodes.append(copy)
    graph = onnx.helper.make_graph(
        list(quantized_upper.graph.node) + lower_nodes,
        original.graph.name,
        list(original.graph.input),
        list(original.graph.output),
        list(quantized_upper.graph.initializer) + lower_inits,
        value_info=list(quantized_upper.graph.value_info),
    )
    opsets: dict[str, int] = {}
    for opset in list(quantized_upper.opset_import) + list(original.opset_import):
        opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    merged = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
        ir_version=quantized_upper.ir_version,
    )
    merged.producer_name, merged.producer_version = quantized_upper.producer_name, quantized_upper.producer_version
    merged.metadata_props.extend(quantized_upper.metadata_props)
    return merged


def keep_metadata(quantized: onnx.ModelProto, float_model: onnx.ModelProto) -> None:
    """Carry the float model's ``metadata_props`` (and doc strings) into the quantized one, before the keys the
    exporter wrote (``xquant_version`` ...), which win a clash. Runtimes read them: an Ultralytics
    export's class names, stride and image size are what its loader takes from the file."""
    props = {prop.key: prop.value for prop in float_model.metadata_props}
    props.update((prop.key, prop.value) for prop in quantized.metadata_props)
    onnx.helper.set_model_props(quantized, props)
    for mine, theirs in ((quantized, float_model), (quantized.graph, float_model.graph)):
        if theirs.doc_string and not mine.doc_string:  # set only when there is one: an empty one is bytes too
            mine.doc_string = theirs.doc_string
