"""Silero VAD (silero-vad 6.2.3's ``silero_vad.onnx``, opset 16: an If on ``sr`` with one
LSTM-based subgraph per sample rate).

Inputs: ``input`` [1, 576] float32 = 64 samples of context + 512 new samples at 16 kHz,
``state`` [2, 1, 128] float32, ``sr`` int64 scalar (16000). Outputs: ``output`` [1, 1] speech
probability, ``stateN`` [2, 1, 128] the next state. As silero_vad's ``OnnxWrapper`` does it
(:func:`stream`): at the start of an utterance state and context are zeros; each call feeds
``concat(context, chunk)``, then state <- stateN and context <- the last 64 samples of that
input; the last chunk is zero-padded to 512. Speech = probability > 0.5.

Audio: English sentences synthesized with Debian's espeak-ng (22050 Hz, resampled to 16 kHz in
numpy), three per utterance with pauses between them, a speech gain and low Gaussian noise
(fixed seeds), so there are speech and non-speech chunks. Calibration samples are chunks of
the calibration utterances as the FP32 model meets them (every 8th chunk, the state the FP32
model carried there), one npy per input and sample; the evaluation streams whole evaluation
utterances through each model, each carrying its own state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import material
from .common import Bench, read_list, session, write_list

RATE = 16000
CHUNK, CONTEXT = 512, 64
SPEECH = 0.5
CALIB_EVERY = 8

CALIB_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A rainbow is a division of white light into many beautiful colors.",
    "Birds of a feather flock together, or so they say.",
    "She sells sea shells by the sea shore every summer.",
    "The train to the airport leaves every twenty minutes.",
)
EVAL_SENTENCES = (
    "We will meet at the library after lunch tomorrow.",
    "The museum is closed on Mondays during the winter.",
    "Turn left at the second traffic light and park behind the bank.",
    "My sister plays the violin in the city orchestra.",
    "Could you repeat the last number, please?",
    "The weather forecast promises sunshine for the whole weekend.",
)
#: (voice, words per minute, pitch, gain) per sentence: calibration / evaluation
CALIB_VOICES = (("en-us", 165, 50, 0.8), ("en-gb+f3", 150, 60, 0.5), ("en-us+m3", 175, 40, 0.9),
                ("en+f2", 160, 70, 0.6), ("en-gb", 145, 45, 0.7), ("en-us+f4", 170, 55, 0.4))
EVAL_VOICES = (("en-gb+m2", 160, 45, 0.7), ("en-us+f2", 155, 65, 0.5), ("en-us", 150, 50, 0.85),
               ("en+m4", 170, 40, 0.6), ("en-gb+f4", 165, 60, 0.75), ("en-us+m1", 145, 55, 0.45))
PAUSES_S = (0.5, 0.9, 1.3, 0.7)  # before, between and after the three sentences
NOISE = 0.003


def synthesize(sentences: Sequence[str], voices, folder: Path) -> List[np.ndarray]:
    """Each sentence at 16 kHz (espeak-ng, resampled), with its voice's gain applied; the
    22050 Hz originals are kept in ``folder``."""
    out = []
    for k, (text, (voice, speed, pitch, gain)) in enumerate(zip(sentences, voices)):
        raw, rate = material.espeak(text, voice, speed, pitch, folder / f"sentence{k}_22k.wav")
        out.append(material.resample(raw, rate, RATE) * gain)
    return out


def utterances(sentences: List[np.ndarray], seed: int) -> List[np.ndarray]:
    """Groups of three sentences with :data:`PAUSES_S` of silence, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, len(sentences), 3):
        parts = [np.zeros(int(PAUSES_S[0] * RATE), np.float32)]
        for k, s in enumerate(sentences[start:start + 3]):
            parts += [s, np.zeros(int(PAUSES_S[k + 1] * RATE), np.float32)]
        audio = np.concatenate(parts)
        out.append((audio + rng.normal(0, NOISE, audio.shape)).astype(np.float32))
    return out


def stream(sess, audio: np.ndarray) -> List[Tuple[Dict[str, np.ndarray], List[np.ndarray]]]:
    """Run one utterance chunk by chunk as silero_vad's OnnxWrapper does; returns
    (feed, outputs) per chunk."""
    pad = (-len(audio)) % CHUNK
    audio = np.concatenate([audio, np.zeros(pad, np.float32)])
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, CONTEXT), np.float32)
    sr = np.array(RATE, dtype=np.int64)
    steps = []
    for start in range(0, len(audio), CHUNK):
        x = np.concatenate([context, audio[None, start:start + CHUNK]], axis=1)
        feed = {"input": x, "state": state, "sr": sr}
        out, state_n = sess.run(["output", "stateN"], feed)
        steps.append((feed, [out, state_n]))
        state, context = state_n, x[:, -CONTEXT:]
    return steps


class SileroVad(Bench):
    key = "silero_vad"
    title = "Silero VAD 6.2.3 (If + LSTM, 3 inputs)"
    model_file = "silero_vad.onnx"
    origin = "PyPI silero-vad 6.2.3, `silero_vad/data/silero_vad.onnx`"
    headline = "speech decisions equal"
    sources = ("espeak-ng sentences (Debian), 3 per utterance with pauses and noise: calibration = "
               "every 8th chunk (input, state, sr npy) of 2 utterances of 6 calibration sentences as "
               "FP32 streams them; evaluation = 2 utterances of 6 other sentences and voices, streamed "
               "whole")

    def input_entries(self, split: str) -> List[Dict]:
        if split != "calib":
            raise ValueError("the VAD is evaluated on streamed utterances (eval/list.txt), not npy lists")
        shapes = {"input": [1, CONTEXT + CHUNK], "state": [2, 1, 128]}
        return [dict({"input_name": name, "file_type": "npy"},
                     **({"input_shape": shapes[name]} if name in shapes else {}),
                     data_list_path=f"calib/{name}.txt") for name in ("input", "state", "sr")]

    def write_utterances(self, split: str, sentences, voices, seed: int) -> Tuple[List[np.ndarray], List[Path]]:
        """Synthesize the split's utterances and save them as 16 kHz wav files."""
        folder = self.folder / split
        audio = utterances(synthesize(sentences, voices, folder / "speech"), seed)
        return audio, [material.write_wav(folder / f"utt{k}.wav", u, RATE) for k, u in enumerate(audio)]

    def write_calibration_chunks(self, audio: List[np.ndarray]) -> List[Path]:
        """Every :data:`CALIB_EVERY`-th chunk as FP32 streams the utterances: one npy per input
        and chunk, and one list per input (line k of each list is chunk k)."""
        sess = session(self.model_path)
        chunks = [feed for u in audio for feed, _ in stream(sess, u)][::CALIB_EVERY]
        files = []
        for name in ("input", "state", "sr"):
            paths = [self.folder / "calib" / name / f"chunk{k:03d}.npy" for k in range(len(chunks))]
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            for path, feed in zip(paths, chunks):
                np.save(path, feed[name])
            write_list(self.folder / "calib" / f"{name}.txt", paths)
            files += paths + [self.folder / "calib" / f"{name}.txt"]
        return files

    def build(self) -> None:
        def make():
            material.clean_folder(self.folder, "*.npy")
            calib_audio, calib_wavs = self.write_utterances("calib", CALIB_SENTENCES, CALIB_VOICES, seed=9)
            _, eval_wavs = self.write_utterances("eval", EVAL_SENTENCES, EVAL_VOICES, seed=10)
            write_list(self.folder / "eval" / "list.txt", eval_wavs)
            return (calib_wavs + eval_wavs + [self.folder / "eval" / "list.txt"]
                    + self.write_calibration_chunks(calib_audio))
        material.build_once(self.key, {"v": 2, "every": CALIB_EVERY, "pauses": PAUSES_S, "noise": NOISE,
                                       "calib": [CALIB_SENTENCES, CALIB_VOICES],
                                       "eval": [EVAL_SENTENCES, EVAL_VOICES]}, make)

    def eval_feeds(self) -> List[Dict[str, np.ndarray]]:
        return [{"audio": material.read_wav(p)[0]} for p in read_list(self.folder / "eval" / "list.txt")]

    def evaluate(self, model_path: Path, feeds) -> List[List[np.ndarray]]:
        """Per chunk [output, stateN], every utterance streamed with the model's own state."""
        sess = session(model_path)
        return [outputs for feed in feeds for _, outputs in stream(sess, feed["audio"])]

    def counts(self) -> Dict[str, int]:
        calib = len(read_list(self.folder / "calib" / "input.txt"))
        chunks = sum(-(-len(f["audio"]) // CHUNK) for f in self.eval_feeds())
        return {"calib": calib, "eval": chunks}

    def task_metrics(self, fp32, quant, eval_inputs) -> Dict[str, str]:
        f = np.array([s[0].item() > SPEECH for s in fp32])
        q = np.array([s[0].item() > SPEECH for s in quant])
        return {"speech decisions equal": f"{100.0 * np.mean(f == q):.2f} %",
                "FP32 / INT8 speech chunks": f"{int(f.sum())} / {int(q.sum())} of {len(f)}",
                "max |dP(speech)|": f"{max(abs(a[0].item() - b[0].item()) for a, b in zip(fp32, quant)):.3f}"}
