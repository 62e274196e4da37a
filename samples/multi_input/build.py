"""Build the multi-input sample: a BERT-like encoder block and its npy calibration lists.

Usage::

    python samples/multi_input/build.py [--out samples/multi_input] [--samples 32]
    xquant -c samples/multi_input/config.json

The model (``bert_block.onnx``) has three inputs, as a BERT encoder exported from a
framework does:

* ``input_ids`` int64 [1, 16] -> Gather(word embeddings)
* ``token_type_ids`` int64 [1, 16] -> Gather(token-type embeddings)
* ``attention_mask`` float32 [1, 16] (1 = token, 0 = padding) -> additive attention bias

Embeddings (word + type + position) -> LayerNorm (decomposed, opset 13) -> single-head
self-attention (Q/K/V MatMul, scaled scores + mask bias, Softmax, context MatMul, output
projection, residual) -> feed-forward (MatMul, Add, Relu, MatMul, Add, residual) ->
masked mean over the tokens -> ``pooled`` float32 [1, 32].

Weights come from a fixed seed with the statistics of a trained model (embedding rows of
norm ~1, Xavier-scaled projections, small biases), so activation ranges look like a real
encoder's rather than like uniform noise.

Calibration data: ``data/<input>/sample_NNN.npy`` and one list per input,
``data/<input>.txt``; line k of each list is the same sample (a sentence of random length
with padding at the end, its segment ids and its mask).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEQ = 16
HIDDEN = 32
FFN = 64
VOCAB = 200
INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def build_model(seed: int = 0) -> onnx.ModelProto:
    """The BERT-like block as an ``onnx.ModelProto`` (opset 13)."""
    rng = np.random.default_rng(seed)

    def dense(fan_in: int, fan_out: int) -> np.ndarray:
        return rng.normal(0, np.sqrt(2.0 / (fan_in + fan_out)), (fan_in, fan_out)).astype(np.float32)

    def bias(size: int) -> np.ndarray:
        return rng.normal(0, 0.02, (size,)).astype(np.float32)

    arrays = {
        "word_embeddings": rng.normal(0, 1.0 / np.sqrt(HIDDEN), (VOCAB, HIDDEN)).astype(np.float32),
        "type_embeddings": rng.normal(0, 0.5 / np.sqrt(HIDDEN), (2, HIDDEN)).astype(np.float32),
        "position_embeddings": rng.normal(0, 0.5 / np.sqrt(HIDDEN), (1, SEQ, HIDDEN)).astype(np.float32),
        "ln_gamma": (1.0 + rng.normal(0, 0.05, (HIDDEN,))).astype(np.float32),
        "ln_beta": rng.normal(0, 0.02, (HIDDEN,)).astype(np.float32),
        "wq": dense(HIDDEN, HIDDEN), "bq": bias(HIDDEN),
        "wk": dense(HIDDEN, HIDDEN), "bk": bias(HIDDEN),
        "wv": dense(HIDDEN, HIDDEN), "bv": bias(HIDDEN),
        "wo": dense(HIDDEN, HIDDEN), "bo": bias(HIDDEN),
        "w1": dense(HIDDEN, FFN), "b1": bias(FFN),
        "w2": dense(FFN, HIDDEN), "b2": bias(HIDDEN),
        "eps": np.array(1e-5, np.float32),
        "two": np.array(2.0, np.float32),
        "one": np.array(1.0, np.float32),
        "neg_big": np.array(-10000.0, np.float32),
        "inv_sqrt_d": np.array(1.0 / np.sqrt(HIDDEN), np.float32),
        "axes_1": np.array([1], np.int64),
        "axes_2": np.array([2], np.int64),
    }
    n = helper.make_node
    nodes = [
        # embeddings
        n("Gather", ["word_embeddings", "input_ids"], ["word"], name="word_gather"),
        n("Gather", ["type_embeddings", "token_type_ids"], ["type"], name="type_gather"),
        n("Add", ["word", "type"], ["emb0"], name="emb_add_type"),
        n("Add", ["emb0", "position_embeddings"], ["emb1"], name="emb_add_pos"),
        # LayerNorm over the hidden axis, decomposed (opset 13 has no LayerNormalization)
        n("ReduceMean", ["emb1"], ["ln_mean"], axes=[-1], keepdims=1, name="ln_mean"),
        n("Sub", ["emb1", "ln_mean"], ["ln_centered"], name="ln_sub"),
        n("Pow", ["ln_centered", "two"], ["ln_sq"], name="ln_pow"),
        n("ReduceMean", ["ln_sq"], ["ln_var"], axes=[-1], keepdims=1, name="ln_var"),
        n("Add", ["ln_var", "eps"], ["ln_var_eps"], name="ln_add_eps"),
        n("Sqrt", ["ln_var_eps"], ["ln_std"], name="ln_sqrt"),
        n("Div", ["ln_centered", "ln_std"], ["ln_norm"], name="ln_div"),
        n("Mul", ["ln_norm", "ln_gamma"], ["ln_scaled"], name="ln_scale"),
        n("Add", ["ln_scaled", "ln_beta"], ["hidden"], name="ln_shift"),
        # self-attention, one head
        n("MatMul", ["hidden", "wq"], ["q0"], name="q_proj"),
        n("Add", ["q0", "bq"], ["q"], name="q_bias"),
        n("MatMul", ["hidden", "wk"], ["k0"], name="k_proj"),
        n("Add", ["k0", "bk"], ["k"], name="k_bias"),
        n("MatMul", ["hidden", "wv"], ["v0"], name="v_proj"),
        n("Add", ["v0", "bv"], ["v"], name="v_bias"),
        n("Transpose", ["k"], ["k_t"], perm=[0, 2, 1], name="k_transpose"),
        n("MatMul", ["q", "k_t"], ["scores0"], name="qk"),
        n("Mul", ["scores0", "inv_sqrt_d"], ["scores1"], name="scale_scores"),
        n("Sub", ["one", "attention_mask"], ["pad"], name="mask_invert"),
        n("Mul", ["pad", "neg_big"], ["mask_bias0"], name="mask_bias"),
        n("Unsqueeze", ["mask_bias0", "axes_1"], ["mask_bias"], name="mask_unsqueeze"),
        n("Add", ["scores1", "mask_bias"], ["scores"], name="mask_add"),
        n("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
        n("MatMul", ["probs", "v"], ["context"], name="context"),
        n("MatMul", ["context", "wo"], ["attn0"], name="o_proj"),
        n("Add", ["attn0", "bo"], ["attn"], name="o_bias"),
        n("Add", ["attn", "hidden"], ["res1"], name="attn_residual"),
        # feed-forward
        n("MatMul", ["res1", "w1"], ["ff0"], name="ffn_up"),
        n("Add", ["ff0", "b1"], ["ff1"], name="ffn_up_bias"),
        n("Relu", ["ff1"], ["ff2"], name="ffn_relu"),
        n("MatMul", ["ff2", "w2"], ["ff3"], name="ffn_down"),
        n("Add", ["ff3", "b2"], ["ff4"], name="ffn_down_bias"),
        n("Add", ["ff4", "res1"], ["encoded"], name="ffn_residual"),
        # masked mean over the tokens
        n("Unsqueeze", ["attention_mask", "axes_2"], ["mask3"], name="mask_expand"),
        n("Mul", ["encoded", "mask3"], ["masked"], name="mask_tokens"),
        n("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=0, name="pool"),
    ]
    graph = helper.make_graph(
        nodes, "bert_block",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, SEQ]),
         helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, [1, SEQ]),
         helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, [1, SEQ])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, HIDDEN])],
        [numpy_helper.from_array(array, name) for name, array in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="xquant-sample")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def make_sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One tokenized "sentence pair": [CLS] a [SEP] b [SEP] then padding."""
    length = int(rng.integers(6, SEQ + 1))
    first = int(rng.integers(2, length - 2))
    ids = np.zeros((1, SEQ), np.int64)
    ids[0, :length] = rng.integers(3, VOCAB, length)
    ids[0, 0], ids[0, first], ids[0, length - 1] = 1, 2, 2  # [CLS], [SEP], [SEP]
    types = np.zeros((1, SEQ), np.int64)
    types[0, first + 1:length] = 1
    mask = np.zeros((1, SEQ), np.float32)
    mask[0, :length] = 1.0
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def write_samples(folder: Path, count: int, seed: int = 1) -> dict[str, Path]:
    """``count`` samples as npy files (with the batch dim) and one list per input."""
    rng = np.random.default_rng(seed)
    lists: dict[str, list[str]] = {name: [] for name in INPUTS}
    for name in INPUTS:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        for name, array in make_sample(rng).items():
            relative = f"{name}/sample_{index:03d}.npy"
            np.save(folder / relative, array)
            lists[name].append(relative)
    paths = {}
    for name, lines in lists.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(), str(args.out / "bert_block.onnx"))
    write_samples(args.out / "data", args.samples)
    print(f"wrote {args.out / 'bert_block.onnx'} and {args.samples} samples under {args.out / 'data'}")


if __name__ == "__main__":
    main()
