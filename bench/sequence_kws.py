"""Keyword spotting on synthesized speech: a Conv1d TC-ResNet-style network over log-mel spectrograms, float
against lowbit's post-training presets and two quantization-aware recipes, with the file, the Engine and the
ONNX export checked against the torch model, and onnxruntime latency of float against w8a8.

    .venv/bin/python bench/sequence_kws.py            # the full run (bench/results/sequence_kws.json)
    .venv/bin/python bench/sequence_kws.py --quick    # smoke run: few voices, 1 epoch (sequence_kws-quick.json)
    .venv/bin/python bench/sequence_kws.py --epochs 12 --qat-epochs 4 --threads 2

``bench/sequence.py`` imports this file and calls ``run(args)``, which reads the options below that ``args``
holds (the rest at their defaults) and returns ``{"rows": [...], "table": markdown, ...}`` (JSON-serialisable).

Data (needs ``espeak-ng``: ``apt-get install -y espeak-ng``): the ten Speech Commands keywords (yes no up down
left right on off stop go), an ``unknown`` class of Speech Commands' auxiliary words (bed, bird, cat, ...) and a
``silence`` class (background noise alone), 12 classes as in Speech Commands' standard task. Every word is
synthesized by ``espeak-ng -w`` with each voice = accent x voice variant (:data:`ACCENTS` x :data:`VARIANTS`,
192 voices), ``--takes`` times per keyword and voice with a speed (130-210 words/min) and pitch (25-75) drawn per
take, and ``--unknown-takes`` auxiliary words per voice, drawn the same way (seed ``SEEDS["synthesis"]``),
resampled from 22.05 to 16 kHz and trimmed of silence; cached as one npz under
``$LOWBIT_CACHE/bench-sequence-kws/`` (default ``~/.cache/lowbit``), keyed by the word lists, voices, takes,
seed and espeak-ng's version. The split is by voice variant: the variants in :data:`TEST_VARIANTS` (6 of 24, in
all 8 accents) are heard only in the test set, so every test speaker is unseen in training (accents are shared).

Each example is a 1 s clip at 16 kHz: the word at a uniform random offset in the window (time shift), a gain
drawn in [0.25, 1], and background noise (white, pink or brown, drawn per clip) at an SNR drawn in [5, 30] dB
(10% of clips clean); silence clips are noise alone at an RMS drawn in [1e-3, 0.1]. Training takes
``--train-copies`` augmented copies of every training utterance (seed ``SEEDS["train_augment"]``), the test set
one copy of every test utterance (seed ``SEEDS["test_augment"]``). Features: log-mel spectrogram, 40 mel bands
(HTK mel scale, 20 Hz - 8 kHz), 25 ms Hann window, 10 ms hop, 512-point FFT (``torch.stft`` and a filterbank
built here), log(mel power + 1e-6), normalised by the training set's mean and standard deviation: input
``[B, 40, 101]``.

Model (:class:`KWSNet`, after Choi et al. 2019, TC-ResNet, arXiv:1904.03814): a Conv1d stem over the 40 mel
channels (time is the convolution axis), three residual blocks (Conv1d k=9 + BatchNorm1d + ReLU, twice; strided
blocks with a 1x1 projection shortcut), a depthwise dilated block (depthwise Conv1d k=3 dilation 2 + pointwise
Conv1d, residual), global average over time, Linear head. Trained with lowbit's Trainer (Adam 1e-3, cosine,
batch 128, ``--epochs``, seed ``SEEDS["training"]``) on the CPU; the checkpoint is cached in
``$LOWBIT_CACHE/bench-sequence-kws/`` keyed by data, epochs and seed, so reruns skip training.

Settings, each through lowbit's public API on the same data:

- post-training (``lowbit.quantize`` with the preset, ``lowbit.calibrate`` on ``--calib`` training examples):
  w8a8, w4a8, w4a8-ptq (AdaRound, ``--adaround-steps`` per layer), and the weight-only group-wise presets
  w4g128, w3-kmeans-g64, w2-log-g64 (groups run over a conv's ``(c_in, tap)`` pairs);
- quantization-aware (``lowbit.recipes``: the recipe's quantizers, optimizer, schedule and callbacks through
  ``stage_model`` / ``trainer_for``, fine-tuned from the float model for ``--qat-epochs``): ``bwn`` (binary
  weights alpha sign(W), float activations) and ``ternary`` (TWN), first and last layers float as the recipes say.

Per row: test accuracy, top-1 agreement with the float model, the share of MACs in quantized layers
(``quantize_report``), bits per weight of the conv / linear weights read from the saved ``.lowbit`` file (the
byte count ``lowbit inspect`` prints, :func:`lowbit.serialize.inspect_file`), and the predictions of the model
loaded back from the file alone (``lowbit.load``) and of lowbit's torch-free Engine, against the torch model.
The float and w8a8 models are exported to ONNX (``lowbit.export.to_onnx``) and run by onnxruntime: argmax
agreement with torch, and the median latency at batch 1 and 64 (``--rounds`` interleaved rounds of ~0.2 s,
``--threads`` threads), both in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and bench/onnx.py would shadow the onnx package
BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import wave  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy.signal import resample_poly  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data import make_loader  # noqa: E402
from lowbit.data.sources import cache_dir  # noqa: E402

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: Speech Commands' auxiliary words, the "unknown" class
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine", "one",
                 "seven", "sheila", "six", "three", "tree", "two", "wow", "zero")
CLASSES = (*KEYWORDS, "unknown", "silence")
UNKNOWN, SILENCE = len(KEYWORDS), len(KEYWORDS) + 1
ACCENTS = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc")
#: espeak-ng voice variants (``-v accent+variant``); a speaker is one accent with one variant
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
            "klatt4", "Andy", "Annie", "Denis", "Jacky", "Lee", "Mike", "david", "linda")
#: variants heard only in the test set (in every accent)
TEST_VARIANTS = ("m4", "m7", "f2", "klatt2", "Annie", "david")
SPEED, PITCH = (130, 210), (25, 75)
RATE, CLIP = 16000, 16000
N_MELS, N_FFT, WIN, HOP = 40, 512, 400, 160
FRAMES = CLIP // HOP + 1
SEEDS = {"synthesis": 0, "train_augment": 1, "test_augment": 2, "training": 0, "calibration": 0, "qat": 0}
PTQ_SETTINGS = ("w8a8", "w4a8", "w4a8-ptq", "w4g128", "w3-kmeans-g64", "w2-log-g64")
QAT_RECIPES = ("bwn", "ternary")
ESPEAK_HELP = ("espeak-ng is not installed; the keyword-spotting benchmark synthesizes its speech with it. "
               "Install it with `apt-get install -y espeak-ng` (Debian / Ubuntu; as root) and run again.")


# ---------------------------------------------------------------------------------------------- synthesis


def espeak_version() -> str:
    """espeak-ng's version line; SystemExit with the install command when it is missing."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit(ESPEAK_HELP)
    return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout.strip()


def check_variants(version: str, variants: tuple[str, ...]) -> None:
    """espeak-ng takes an unknown variant silently (the default voice): refuse any the data directory lacks."""
    data = Path(version.split("Data at:")[-1].strip())
    missing = [v for v in variants if not (data / "voices" / "!v" / v).is_file()]
    if missing:
        raise SystemExit(f"espeak-ng ({data}) has no voice variant(s) {', '.join(missing)}")


def read_wav(path: Path) -> np.ndarray:
    """A mono 16-bit WAV file as float32 in [-1, 1] at 16 kHz (espeak-ng writes 22.05 kHz)."""
    with wave.open(str(path)) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
    audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768
    if rate != RATE:
        g = np.gcd(rate, RATE)
        audio = resample_poly(audio, RATE // g, rate // g).astype(np.float32)
    return audio


def trim(audio: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """The part between the first and last sample above ``threshold`` x peak, at most 1 s."""
    loud = np.flatnonzero(np.abs(audio) > threshold * np.abs(audio).max())
    return audio[loud[0]:loud[-1] + 1][:CLIP] if len(loud) else audio[:CLIP]


def utterances(accents: tuple[str, ...], variants: tuple[str, ...], takes: int, unknown_takes: int,
               seed: int) -> list[dict]:
    """What to synthesize: per voice, every keyword ``takes`` times and ``unknown_takes`` auxiliary words, each
    with a speed and pitch drawn from a generator seeded by (seed, voice index)."""
    plan = []
    for v, (accent, variant) in enumerate((a, b) for a in accents for b in variants):
        rng = np.random.default_rng([seed, v])
        words = [(w, k) for k, w in enumerate(KEYWORDS) for _ in range(takes)]
        words += [(UNKNOWN_WORDS[i], UNKNOWN) for i in rng.integers(0, len(UNKNOWN_WORDS), unknown_takes)]
        for word, label in words:
            plan.append({"voice": f"{accent}+{variant}", "variant": variant, "word": word, "label": label,
                         "speed": int(rng.integers(SPEED[0], SPEED[1] + 1)),
                         "pitch": int(rng.integers(PITCH[0], PITCH[1] + 1))})
    return plan


def synthesize(item: dict, work: Path, index: int) -> np.ndarray:
    path = work / f"{index}.wav"
    subprocess.run(["espeak-ng", "-v", item["voice"], "-s", str(item["speed"]), "-p", str(item["pitch"]),
                    "-w", str(path), item["word"]], check=True, capture_output=True)
    audio = trim(read_wav(path))
    path.unlink()
    return audio


def speech_set(args: argparse.Namespace) -> tuple[dict, dict]:
    """The synthesized utterances (from the cache when an earlier run made them) and what describes them."""
    version = espeak_version()
    check_variants(version, args.variants)
    plan = utterances(args.accents, args.variants, args.takes, args.unknown_takes, SEEDS["synthesis"])
    key = hashlib.sha256(json.dumps([version, KEYWORDS, UNKNOWN_WORDS, plan]).encode()).hexdigest()[:16]
    path = cache_dir() / "bench-sequence-kws" / f"speech-{key}.npz"
    info = {"espeak_ng": version.split("Data at:")[0].strip(), "accents": list(args.accents),
            "variants": list(args.variants), "test_variants": [v for v in args.variants if v in TEST_VARIANTS],
            "voices": len(args.accents) * len(args.variants), "takes": args.takes,
            "unknown_takes": args.unknown_takes, "utterances": len(plan), "cache": str(path),
            "from_cache": path.is_file()}
    if not path.is_file():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as work, ThreadPoolExecutor(max(1, args.threads)) as pool:
            clips = list(tqdm(pool.map(lambda pair: synthesize(pair[1], Path(work), pair[0]), enumerate(plan)),
                              total=len(plan), desc="espeak-ng", unit="word"))
        lengths = np.array([len(c) for c in clips])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path.with_suffix(".tmp.npz"), audio=(np.concatenate(clips) * 32767).astype(np.int16),
                            lengths=lengths, labels=np.array([p["label"] for p in plan]),
                            variants=np.array([p["variant"] for p in plan]), words=np.array([p["word"] for p in plan]))
        os.replace(path.with_suffix(".tmp.npz"), path)
        info["synthesis_seconds"] = time.perf_counter() - start
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    offsets = np.concatenate([[0], np.cumsum(data["lengths"])])
    data["clips"] = [data["audio"][a:b].astype(np.float32) / 32767 for a, b in zip(offsets[:-1], offsets[1:])]
    info["mean_utterance_s"] = float(data["lengths"].mean() / RATE)
    return data, info


# ------------------------------------------------------------------------------------------ augmentation


def colored_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS noise with power spectrum 1 / f^beta, beta drawn from 0 (white), 1 (pink), 2 (brown)."""
    beta = rng.integers(0, 3)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1]
    noise = np.fft.irfft(spectrum / f ** (beta / 2), n)
    return (noise / np.sqrt(np.mean(noise ** 2))).astype(np.float32)


def augmented(clip: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """One 1 s example: the clip at a random offset, a random gain and background noise (None: silence)."""
    noise = colored_noise(rng, CLIP)
    if clip is None:
        return noise * np.float32(10 ** rng.uniform(-3, -1))
    out = np.zeros(CLIP, np.float32)
    start = rng.integers(0, CLIP - len(clip) + 1)
    out[start:start + len(clip)] = clip * np.float32(rng.uniform(0.25, 1.0) / np.abs(clip).max())
    if rng.random() < 0.9:
        rms = np.sqrt(np.mean(out[start:start + len(clip)] ** 2))
        out += noise * np.float32(rms / 10 ** (rng.uniform(5, 30) / 20))
    return out


def examples(data: dict, chosen: np.ndarray, copies: int, silence: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Audio [N, 16000] and labels of ``copies`` augmented copies of the chosen utterances and ``silence`` noise
    clips per copy, each from a generator seeded by (seed, copy, index)."""
    audio, labels = [], []
    for c in range(copies):
        for i in chosen:
            audio.append(augmented(data["clips"][i], np.random.default_rng([seed, c, int(i)])))
            labels.append(int(data["labels"][i]))
        for j in range(silence):
            audio.append(augmented(None, np.random.default_rng([seed, c, len(data["labels"]) + j])))
            labels.append(SILENCE)
    return np.stack(audio), np.array(labels)


# ---------------------------------------------------------------------------------------------- features


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = RATE, fmin: float = 20.0,
                   fmax: float = 8000.0) -> torch.Tensor:
    """Triangular filters [n_mels, n_fft / 2 + 1] evenly spaced on the HTK mel scale m = 2595 log10(1 + f / 700),
    each rising from its left neighbour's centre to 1 at its own and falling to 0 at its right neighbour's."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (bins - left) / (centre - left), (right - bins) / (right - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0, None).astype(np.float32))


def log_mel(audio: np.ndarray, chunk: int = 1024) -> torch.Tensor:
    """[N, 16000] audio -> [N, 40, 101] log(mel power + 1e-6): 25 ms Hann window, 10 ms hop, centred frames."""
    bank, window = mel_filterbank(), torch.hann_window(WIN)
    out = []
    for part in torch.from_numpy(audio).split(chunk):
        spec = torch.stft(part, N_FFT, HOP, WIN, window, center=True, return_complex=True).abs() ** 2
        out.append(torch.log(bank @ spec + 1e-6))
    return torch.cat(out)


def kws_data(args: argparse.Namespace) -> tuple[dict, dict]:
    """Training / calibration / test features and labels, split by voice variant."""
    data, info = speech_set(args)
    test_voice = np.isin(data["variants"], TEST_VARIANTS)
    train_idx, test_idx = np.flatnonzero(~test_voice), np.flatnonzero(test_voice)
    voices = len(args.accents) * len(args.variants)
    per_voice_silence = max(1, round(args.unknown_takes * 3 / 4))
    train_voices = voices * (1 - len(info["test_variants"]) / len(args.variants))
    start = time.perf_counter()
    train_audio, train_y = examples(data, train_idx, args.train_copies, round(per_voice_silence * train_voices),
                                    SEEDS["train_augment"])
    test_audio, test_y = examples(data, test_idx, 1, round(per_voice_silence * (voices - train_voices)),
                                  SEEDS["test_augment"])
    train_x, test_x = log_mel(train_audio), log_mel(test_audio)
    mean, std = float(train_x.mean()), float(train_x.std())
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SEEDS["calibration"]))
    calib = train_x[order[:args.calib]]
    counts = np.bincount(train_y, minlength=len(CLASSES))
    info.update(train_examples=len(train_y), test_examples=len(test_y), calibration_examples=len(calib),
                train_per_class=dict(zip(CLASSES, counts.tolist())),
                test_per_class=dict(zip(CLASSES, np.bincount(test_y, minlength=len(CLASSES)).tolist())),
                feature_mean=mean, feature_std=std, features_seconds=time.perf_counter() - start,
                input_shape=[N_MELS, FRAMES])
    return {"train": (train_x, torch.from_numpy(train_y)), "test": (test_x, torch.from_numpy(test_y)),
            "calib": list(calib.split(64))}, info


# ------------------------------------------------------------------------------------------------- model


class Block(nn.Module):
    """Conv1d k + BN + ReLU, Conv1d k + BN, plus the input (a 1x1 conv + BN where shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int = 9):
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, 1, kernel // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm1d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class DilatedBlock(nn.Module):
    """Depthwise Conv1d k=3 dilation 2 + BN + ReLU, pointwise Conv1d + BN, plus the input, ReLU."""

    def __init__(self, channels: int, dilation: int = 2):
        super().__init__()
        self.depthwise = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation, groups=channels,
                                   bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.pointwise = nn.Conv1d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.pointwise(F.relu(self.bn1(self.depthwise(x))))))


class KWSNet(nn.Module):
    """TC-ResNet-style keyword spotter: [B, 40 mels, T] -> [B, classes] (time is the convolution axis)."""

    def __init__(self, width: int = 48, classes: int = len(CLASSES)):
        super().__init__()
        w1, w2, w3 = width, width * 3 // 2, width * 2
        self.stem = nn.Sequential(nn.Conv1d(N_MELS, w1, 3, padding=1, bias=False), nn.BatchNorm1d(w1), nn.ReLU())
        self.blocks = nn.Sequential(Block(w1, w1, 1), Block(w1, w2, 2), Block(w2, w3, 2), DilatedBlock(w3))
        self.head = nn.Linear(w3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=2))


def trained_model(data: dict, info: dict, args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """KWSNet trained by lowbit's Trainer, from the cache when an earlier run trained it on the same data."""
    from lowbit.train import Trainer, seed_everything

    seed = SEEDS["training"]
    seed_everything(seed)
    model = KWSNet(args.width)
    key = hashlib.sha256(json.dumps([info["cache"], info["train_examples"], args.train_copies]).encode()).hexdigest()
    out_dir = cache_dir() / "bench-sequence-kws" / f"kwsnet-w{args.width}-{key[:12]}-e{args.epochs}-s{seed}"
    cached = (out_dir / "last.safetensors").is_file()
    loader = make_loader(*data["train"], batch_size=128, shuffle=True, seed=seed)
    start = time.perf_counter()
    Trainer(model, loader, None, epochs=args.epochs, optimizer="adam", lr=1e-3, seed=seed, out_dir=out_dir,
            resume=True, progress=True).fit()
    params = sum(p.numel() for p in model.parameters())
    return model.eval(), {"trainer": "lowbit.train.Trainer", "optimizer": "adam", "lr": 1e-3, "schedule": "cosine",
                          "batch_size": 128, "epochs": args.epochs, "seed": seed, "width": args.width,
                          "parameters": params, "checkpoint": str(out_dir / "last.safetensors"),
                          "from_cache": cached, "seconds": None if cached else time.perf_counter() - start}


def qat_model(float_model: nn.Module, name: str, data: dict, info: dict,
              args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """``float_model`` fine-tuned with lowbit recipe ``name`` (its quantizers, optimizer, schedule, callbacks)
    for ``--qat-epochs``; checkpoints cached beside the float model's. Also how many layers have sign weights
    and how many of them the recipe's latent-weight clipping reached."""
    from lowbit.quantizers import Quantizer
    from lowbit.recipes import ClipLatentWeights, get_recipe
    from lowbit.recipes.driver import stage_model, trainer_for
    from lowbit.recipes.table import SIGN_WEIGHTS
    from lowbit.train import ddp, seed_everything

    recipe = get_recipe(name)
    seed_everything(SEEDS["qat"])
    model = stage_model(copy.deepcopy(float_model).train(), recipe.stages[-1], recipe)
    ddp.prepare_quantizers(model, data["train"][0][:recipe.batch_size])
    loader = make_loader(*data["train"], batch_size=recipe.batch_size, shuffle=True, seed=SEEDS["qat"])
    out_dir = Path(info["training"]["checkpoint"]).parent / f"qat-{name}-e{args.qat_epochs}-s{SEEDS['qat']}"
    trainer = trainer_for(model, recipe, (loader, None), args.qat_epochs, recipe.lr, SEEDS["qat"], out_dir, True)
    trainer.fit(resume=True)
    clipped = [len(c.layers) for c in trainer.callbacks if isinstance(c, ClipLatentWeights)]
    signs = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight_quantizer", None), Quantizer)
             and m.weight_quantizer.name in SIGN_WEIGHTS]
    return model.eval(), {"sign_weight_layers": len(signs), "latent_clip": recipe.latent_clip,
                          "latent_clip_layers": clipped[0] if clipped else None,
                          "history": trainer.history}


# ----------------------------------------------------------------------------------------------- measure


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(b) for b in x.split(batch)])


def file_bits(model: nn.Module, path: Path) -> dict:
    """Bits per weight of the conv / linear weights as stored in the file (``lowbit inspect``'s byte count)."""
    from lowbit.serialize import inspect_file

    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Linear))}
    info = inspect_file(path)
    rows = [r for r in info["tensors"] if r["name"] in weights]
    stored, numel = sum(r["bytes"] for r in rows), sum(r["numel"] for r in rows)
    return {"bits_per_weight": 8 * stored / numel, "weight_bytes": stored, "weights": numel,
            "file_bytes": info["file_bytes"], "codecs": sorted({r["chain"] for r in rows})}


def agreement(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> dict:
    a, b = np.asarray(a), np.asarray(b)
    return {"argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(a - b).max())}


def checks(model: nn.Module, logits: torch.Tensor, x: torch.Tensor, path: Path, threads: int) -> dict:
    """The model saved to ``path``, loaded back alone and run by the Engine: agreement with its torch logits."""
    from lowbit.runtime import Engine

    out: dict = {}
    lowbit.save(model, path, example_input=x[:1])
    out.update(file_bits(model, path))
    try:
        out["reload"] = agreement(logits, logits_of(lowbit.load(path), x))
    except Exception as e:  # noqa: BLE001  -- recorded in the row; the run goes on
        out["reload"] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    try:
        engine = Engine(path, threads=threads)
        xs = x.numpy()
        out["engine"] = agreement(logits, np.concatenate([engine.run(xs[i:i + 256]) for i in range(0, len(xs), 256)]))
    except Exception as e:  # noqa: BLE001
        out["engine"] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    return out


def score(logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict:
    pred = logits.argmax(1)
    kw = labels < UNKNOWN
    return {"accuracy": float((pred == labels).float().mean()),
            "keyword_accuracy": float((pred[kw] == labels[kw]).float().mean()),
            "agreement_with_float": float((pred == reference.argmax(1)).float().mean())}


def mac_fraction(model: nn.Module, config, example: torch.Tensor) -> float | None:
    return lowbit.quantize_report(model, config, example_input=example).mac_fraction


def ptq_row(setting: str, model: nn.Module, data: dict, reference: torch.Tensor, work: Path,
            args: argparse.Namespace) -> tuple[dict, nn.Module | None]:
    from lowbit.config import PRESETS, QuantConfig

    row = {"setting": setting, "kind": "post-training", "how": f"preset {setting}"}
    config = copy.deepcopy(PRESETS[setting])
    if "adaround" in config.get("ptq", []):
        config["ptq_options"] = {"adaround": {"steps": args.adaround_steps}}
        row["how"] += f" (AdaRound, {args.adaround_steps} steps per layer)"
    config = QuantConfig.from_dict(config)
    x, y = data["test"]
    start = time.perf_counter()
    try:
        quantized = lowbit.calibrate(lowbit.quantize(copy.deepcopy(model), config), data["calib"])
        row["seconds"] = time.perf_counter() - start
        row["mac_fraction"] = mac_fraction(model, config, x[:1])
        logits = logits_of(quantized, x)
        row.update(score(logits, y, reference))
        row.update(checks(quantized, logits, x, work / f"{setting}.lowbit", args.threads))
    except Exception as e:  # noqa: BLE001
        if args.verbose:
            traceback.print_exc()
        return {**row, "status": "error", "why": f"{type(e).__name__}: {str(e).strip()[:300]}"}, None
    return {**row, "status": "ok"}, quantized


def qat_row(name: str, model: nn.Module, data: dict, info: dict, reference: torch.Tensor, work: Path,
            args: argparse.Namespace) -> dict:
    from lowbit.recipes import get_recipe

    recipe = get_recipe(name)
    row = {"setting": name, "kind": "quantization-aware",
           "how": f"recipe {name} ({recipe.paper.split(',')[0]}...), {args.qat_epochs} epochs from float",
           "paper": recipe.paper}
    x, y = data["test"]
    start = time.perf_counter()
    try:
        trained, row["training"] = qat_model(model, name, data, info, args)
        row["seconds"] = time.perf_counter() - start
        row["mac_fraction"] = mac_fraction(model, recipe.config, x[:1])
        logits = logits_of(trained, x)
        row.update(score(logits, y, reference))
        row.update(checks(trained, logits, x, work / f"{name}.lowbit", args.threads))
    except Exception as e:  # noqa: BLE001
        if args.verbose:
            traceback.print_exc()
        return {**row, "status": "error", "why": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    return {**row, "status": "ok"}


# -------------------------------------------------------------------------------------------------- ONNX


def onnx_checks(model: nn.Module, quantized: nn.Module, data: dict, work: Path, args: argparse.Namespace) -> dict:
    """Float and w8a8 exported by lowbit and run by onnxruntime: agreement with torch and latency, interleaved."""
    import onnxruntime as ort

    from lowbit.export import export_onnx

    x = data["test"][0]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    out: dict = {"onnxruntime": ort.__version__, "threads": args.threads, "rounds": args.rounds}
    sessions = {}
    for name, m in (("float", model), ("w8a8", quantized)):
        path = export_onnx(m, work / f"{name}.onnx", x[:1])
        s = sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = s.get_inputs()[0].name
        result = np.concatenate([s.run(None, {feed: b.numpy()})[0] for b in x.split(256)])
        out[name] = {"onnx_bytes": path.stat().st_size, **agreement(logits_of(m, x), result),
                     "ops": sorted({n.op_type for n in __import__("onnx").load(str(path)).graph.node})}
    out["latency_ms"] = {}
    for batch in (1, 64):
        feeds = {k: {s.get_inputs()[0].name: x[:batch].numpy()} for k, s in sessions.items()}
        for k, s in sessions.items():
            per_call(s, feeds[k], 0.1)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for k, s in sessions.items():
                times[k].append(per_call(s, feeds[k]))
        med = {k: 1e3 * statistics.median(t) for k, t in times.items()}
        out["latency_ms"][f"batch{batch}"] = {**med, "speedup": med["float"] / med["w8a8"]}
    return out


def per_call(session, feed: dict, seconds: float = 0.2) -> float:
    """Mean seconds per ``session.run`` over about ``seconds`` of back-to-back calls."""
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        session.run(None, feed)
        calls += 1
    return elapsed / calls


# ---------------------------------------------------------------------------------------------- table


def w8a8_checks(doc: dict) -> dict | None:
    """The deployment checks of the w8a8 model: MAC share >= 95%, and the file, Engine and ONNX predictions."""
    row = next((r for r in doc["rows"] if r["setting"] == "w8a8" and r["status"] == "ok"), None)
    if row is None:
        return None
    onnx = doc.get("onnx", {}).get("w8a8", {})
    return {"mac_fraction": row["mac_fraction"], "mac_fraction_at_least_95": row["mac_fraction"] >= 0.95,
            "reloaded_file_agreement": row["reload"].get("argmax_agreement"),
            "engine_agreement": row["engine"].get("argmax_agreement"),
            "onnxruntime_agreement": onnx.get("argmax_agreement")}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def agree(check: dict | None) -> str:
    if not check:
        return "-"
    if "error" in check:
        return "error"
    return f"{pct(check['argmax_agreement'])} ({check['max_abs_logit_diff']:.1e})"


def table(doc: dict) -> str:
    f = doc["float"]
    lines = ["| setting | how | test acc | keyword acc | agree w/ float | MACs quantized | bits / weight (file) | "
             "file bytes | reloaded file = torch | Engine = torch |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| float | lowbit.train.Trainer, {doc['training']['epochs']} epochs | {pct(f['accuracy'])} | "
             f"{pct(f['keyword_accuracy'])} | 100.0% | - | {f.get('bits_per_weight', 32):.2f} | "
             f"{f.get('file_bytes', '-')} | {agree(f.get('reload'))} | {agree(f.get('engine'))} |"]
    for r in doc["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['setting']} | {r['how']} | {r['status']}: {r['why']} |" + " |" * 7)
            continue
        lines.append(f"| {r['setting']} | {r['how']} | {pct(r['accuracy'])} | {pct(r['keyword_accuracy'])} | "
                     f"{pct(r['agreement_with_float'])} | {pct(r['mac_fraction'])} | {r['bits_per_weight']:.2f} | "
                     f"{r['file_bytes']} | {agree(r['reload'])} | {agree(r['engine'])} |")
    c = doc.get("w8a8_checks")
    if c:
        lines += ["", f"w8a8: {pct(c['mac_fraction'])} of MACs quantized (>= 95%: "
                  f"{'yes' if c['mac_fraction_at_least_95'] else 'NO'}); argmax agreement with the torch model: "
                  f"reloaded file {pct(c['reloaded_file_agreement'])}, Engine {pct(c['engine_agreement'])}, "
                  f"onnxruntime {pct(c['onnxruntime_agreement'])}"]
    o = doc.get("onnx")
    if o and "error" not in o:
        lines += ["", f"| ONNX (onnxruntime {o['onnxruntime']}, {o['threads']} thread(s)) | argmax = torch "
                  "(max logit diff) | batch 1 ms | batch 64 ms |", "|---|---|---|---|"]
        for k in ("float", "w8a8"):
            lines.append(f"| {k} | {agree(o[k])} | {o['latency_ms']['batch1'][k]:.3f} | "
                         f"{o['latency_ms']['batch64'][k]:.3f} |")
        lines.append(f"| float / w8a8 | | {o['latency_ms']['batch1']['speedup']:.2f}x | "
                     f"{o['latency_ms']['batch64']['speedup']:.2f}x |")
    elif o:
        lines += ["", f"ONNX: error: {o['error']}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--epochs", type=int, default=10, help="float training epochs (default 10)")
    p.add_argument("--qat-epochs", type=int, default=3, help="QAT fine-tuning epochs per recipe (default 3)")
    p.add_argument("--width", type=int, default=48, help="channels of the first block (default 48)")
    p.add_argument("--takes", type=int, default=3, help="takes of each keyword per voice (default 3)")
    p.add_argument("--unknown-takes", type=int, default=4, help="auxiliary words per voice (default 4)")
    p.add_argument("--train-copies", type=int, default=3, help="augmented copies of each training utterance "
                   "(default 3)")
    p.add_argument("--calib", type=int, default=512, help="calibration examples (default 512)")
    p.add_argument("--adaround-steps", type=int, default=200, help="AdaRound steps per layer (default 200)")
    p.add_argument("--settings", nargs="+", default=list(PTQ_SETTINGS), choices=list(PTQ_SETTINGS))
    p.add_argument("--recipes", nargs="+", default=list(QAT_RECIPES), help="QAT recipes (default bwn ternary)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved onnxruntime timing rounds (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch, Engine, onnxruntime and espeak-ng threads "
                   "(default 1: on a shared machine 2 threads trained 5x slower than 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 accents x 8 variants, 1 take, 1 epoch, "
                   "1 QAT epoch, 20 AdaRound steps, 3 timing rounds")
    p.add_argument("--out", help="results JSON (default bench/results/sequence_kws.json; --quick: "
                   "sequence_kws-quick.json)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    return p


def options(args: argparse.Namespace | None) -> argparse.Namespace:
    """This script's options: its defaults, replaced by those ``args`` holds (``bench/sequence.py``'s)."""
    opts = parser().parse_args([])
    for k, v in vars(args or argparse.Namespace()).items():
        if hasattr(opts, k) and v is not None:
            setattr(opts, k, v)
    opts.accents, opts.variants = ACCENTS, VARIANTS
    if opts.quick:
        opts.accents = ACCENTS[:2]
        opts.variants = ("m1", "m2", "f1", "klatt", "m4", "f2", "klatt2", "Annie")
        opts.takes, opts.unknown_takes, opts.train_copies, opts.calib = 1, 2, 2, 128
        opts.epochs, opts.qat_epochs, opts.adaround_steps, opts.rounds = 1, 1, 20, 3
    return opts


def run(args: argparse.Namespace | None = None) -> dict:
    """The benchmark (see the module docstring); returns the results with a markdown ``table``."""
    args = options(args)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = list(os.getloadavg())
    data, info = kws_data(args)
    model, info["training"] = trained_model(data, info, args)
    x, y = data["test"]
    reference = logits_of(model, x)
    doc = {"command": " ".join(["bench/sequence_kws.py", *sys.argv[1:]]) if __name__ == "__main__" else None,
           "settings": {k: v for k, v in vars(args).items() if k != "verbose"}, "seeds": SEEDS,
           "classes": list(CLASSES), "data": {k: v for k, v in info.items() if k != "training"},
           "training": info["training"], "float": score(reference, y, reference), "rows": []}
    doc["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "python": platform.python_version(), "torch": torch.__version__, "lowbit": lowbit.__version__}
    w8a8 = None
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(args.settings) + len(args.recipes) + 2,
                                                    unit="row") as bar:
        work = Path(tmp)
        bar.set_postfix_str("float file")
        doc["float"].update(checks(model, reference, x, work / "float.lowbit", args.threads))
        bar.update()
        for setting in args.settings:
            bar.set_postfix_str(setting)
            row, quantized = ptq_row(setting, model, data, reference, work, args)
            w8a8 = quantized if setting == "w8a8" else w8a8
            doc["rows"].append(row)
            bar.update()
        for name in args.recipes:
            bar.set_postfix_str(f"QAT {name}")
            doc["rows"].append(qat_row(name, model, data, info, reference, work, args))
            bar.update()
        bar.set_postfix_str("ONNX")
        if w8a8 is not None:
            try:
                doc["onnx"] = onnx_checks(model, w8a8, data, work, args)
            except Exception as e:  # noqa: BLE001
                if args.verbose:
                    traceback.print_exc()
                doc["onnx"] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
        bar.update()
    for r in doc["rows"]:
        if r["status"] == "error":
            tqdm.write(f"{r['setting']}: {r['why']}")
    doc["w8a8_checks"] = w8a8_checks(doc)
    doc["load_average"] = {"start": load_start, "end": list(os.getloadavg())}
    doc["seconds"] = time.perf_counter() - started
    doc["table"] = table(doc)
    return doc


def main() -> None:
    args = parser().parse_args()
    out = Path(args.out or BENCH / "results" / ("sequence_kws-quick.json" if args.quick else "sequence_kws.json"))
    doc = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(doc["table"])
    print(f"\n{doc['seconds']:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
