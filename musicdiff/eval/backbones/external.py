"""The reference backbones of the Stable Audio protocol, run through their official packages on LOCAL weight files.

Each engine takes prepared numpy audio and returns numpy arrays; this module imports only numpy at the top, so
it also runs inside another Python environment (musicdiff.eval.backbones.worker), which OpenL3 needs: its
TensorFlow/kapre pins do not install beside JAX. Packages are imported when an engine is built; a missing package
or weight file raises MissingBackbone naming the package, the file and docs/evaluation.md.

- OpenL3Engine: `openl3` (TF/Keras) with `openl3_audio_mel256_music.h5` via
  load_audio_embedding_model_from_path(path, "mel256", 512); get_audio_embedding(hop_size=0.5, center=True)
  resamples to 48 kHz itself. Stereo: L and R embedded separately and concatenated (1024-d); mono -> 512-d.
- PaSSTEngine: `hear21passt` (torch) `get_basic_model(mode="logits")` with the weight file
  `passt-s-f128-p16-s10-ap.476-swa.pt` placed in a private torch-hub cache so nothing is downloaded; 10-s windows
  every 5 s as stable-audio-metrics cuts them, logits averaged over windows, softmax over the 527 classes.
- ClapEngine: `laion_clap` (torch) CLAP_Module (fusion for 630k-audioset-fusion-best.pt, else HTSAT-base) loaded
  from the local checkpoint with `text_branch.embeddings.position_ids` dropped; RoBERTa config, weights and
  tokenizer from a local `roberta-base` directory (laion_clap otherwise fetches them from the Hugging Face hub).
  Audio is round-tripped through int16; fusion crops of audio longer than 10 s are random, so numpy is seeded.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DOCS = "docs/evaluation.md"
PASST_WEIGHT_FILE = "passt-s-f128-p16-s10-ap.476-swa.pt"
OPENL3_WEIGHT_FILE = "openl3_audio_mel256_music.h5"
CLAP_WEIGHT_FILE = "630k-audioset-fusion-best.pt"


class MissingBackbone(RuntimeError):
    """A backbone's package or weight file is not available. The message says what to install or download."""


def require_file(path: str, key: str, expected_name: str) -> Path:
    if not path:
        raise MissingBackbone(f"{key} is empty: download {expected_name} (see {DOCS}) and pass its local path as "
                              f"--{key}=PATH")
    file = Path(path).expanduser()
    if not file.exists():
        raise MissingBackbone(f"{key}={path}: no such file; download {expected_name} (see {DOCS}) and pass its "
                              f"local path")
    return file


def require_package(module: str, package: str, purpose: str, python_key: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingBackbone(
            f"{purpose} needs the Python package '{package}' ({err}); install it (pip install {package}) in this "
            f"environment, or in a separate one whose interpreter you pass as --{python_key}=/path/to/python "
            f"(see {DOCS})") from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences a package's prints (hear21passt prints its whole architecture)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _stack_channels(clip: np.ndarray) -> np.ndarray:
    x = np.asarray(clip, np.float32)
    return x[None] if x.ndim == 1 else x


class OpenL3Engine:
    def __init__(self, weights: str, content_type: str = "music", input_repr: str = "mel256",
                 embedding_size: int = 512, hop_seconds: float = 0.5, sample_rate: int = 44100,
                 batch_size: int = 16, config_key: str = "config.backbones.openl3"):
        path = require_file(weights, f"{config_key}.weights", f"openl3_audio_{input_repr}_{content_type}.h5")
        self.openl3 = require_package("openl3", "openl3", "the OpenL3 backbone", f"{config_key}.python")
        self.model = self.openl3.models.load_audio_embedding_model_from_path(str(path), input_repr, embedding_size)
        self.hop_seconds, self.sample_rate, self.batch_size = float(hop_seconds), int(sample_rate), int(batch_size)

    def analyze(self, clips: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        results = []
        for clip in clips:
            channels = _stack_channels(clip)
            per_channel, _ = self.openl3.get_audio_embedding(
                [c for c in channels], [self.sample_rate] * len(channels), model=self.model, center=True,
                hop_size=self.hop_seconds, batch_size=self.batch_size, verbose=False)
            results.append(dict(frames=np.concatenate(per_channel, axis=1).astype(np.float64)))
        return results


class _PatchStft:
    """hear21passt calls torch.stft without return_complex, which newer torch requires (as AudioCraft patches)."""

    def __init__(self, torch: Any):
        self.torch = torch
        self.original = torch.stft

    def __enter__(self):
        original = self.original

        def stft(*args, **kwargs):
            kwargs.setdefault("return_complex", False)
            return original(*args, **kwargs)

        self.torch.stft = stft

    def __exit__(self, *exc):
        self.torch.stft = self.original


@contextlib.contextmanager
def _torch_hub_with(torch: Any, weight_file: Path, hub_name: str) -> Iterator[None]:
    """A private torch-hub directory whose checkpoints/ holds `weight_file` as `hub_name`, so load_state_dict_from_url
    finds it and never downloads."""
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="musicdiff_hub_") as hub:
        (Path(hub) / "checkpoints").mkdir()
        os.symlink(weight_file.resolve(), Path(hub) / "checkpoints" / hub_name)
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)


class PaSSTEngine:
    SAMPLE_RATE = 32000
    WINDOW_SECONDS = 10.0
    STEP_SECONDS = 5.0
    MIN_FRACTION = 0.15  # shorter final windows are zero-padded only above 15 % of a window (as in SA)

    def __init__(self, weights: str, device: str = "cpu", config_key: str = "config.backbones.passt"):
        path = require_file(weights, f"{config_key}.weights", PASST_WEIGHT_FILE)
        self.torch = require_package("torch", "torch", "the PaSST backbone", f"{config_key}.python")
        base = require_package("hear21passt.base", "hear21passt", "the PaSST backbone", f"{config_key}.python")
        with _torch_hub_with(self.torch, path, PASST_WEIGHT_FILE), _quiet():
            try:
                self.model = base.get_basic_model(mode="logits")
            except Exception as err:  # a download attempt (renamed release file) surfaces as a network error
                raise MissingBackbone(f"{config_key}.weights={weights}: hear21passt could not load it ({err}); the "
                                      f"file must be {PASST_WEIGHT_FILE} from the PaSST release (see {DOCS})") from None
        self.device = device
        self.model.eval().to(device)

    def window_logits(self, audio: np.ndarray) -> np.ndarray:
        """[windows, 527] logits of mono 32 kHz audio, windowed as stable-audio-metrics does."""
        x = np.asarray(audio, np.float32).reshape(-1)
        window, step = int(self.WINDOW_SECONDS * self.SAMPLE_RATE), int((self.WINDOW_SECONDS - self.STEP_SECONDS)
                                                                        * self.SAMPLE_RATE)
        logits = []
        for start in range(0, max(step, len(x) - step), step):
            piece = x[start:start + window]
            if len(piece) < window and len(piece) > self.MIN_FRACTION * window:
                piece = np.pad(piece, (0, window - len(piece)))
            with self.torch.no_grad(), _PatchStft(self.torch), _quiet():
                out = self.model(self.torch.from_numpy(np.ascontiguousarray(piece))[None].to(self.device))
            logits.append(out.squeeze(0).cpu().numpy().astype(np.float64))
        return np.stack(logits)

    def analyze(self, clips: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        results = []
        for clip in clips:
            logits = self.window_logits(clip)
            # The window-mean logits double as a 527-d clip embedding (FD over PaSST logits is an extra, not SA).
            results.append({"frames": logits, "logits:audioset": logits})
        return results


@contextlib.contextmanager
def _local_roberta(transformers: Any, roberta_dir: Path) -> Iterator[None]:
    """Points laion_clap's `from_pretrained('roberta-base')` calls at a local directory while the model is built."""
    patched = []
    for name in ("RobertaTokenizer", "RobertaModel", "RobertaConfig", "AutoTokenizer", "AutoModel", "AutoConfig"):
        cls = getattr(transformers, name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            continue
        original = cls.from_pretrained.__func__

        def local(klass, name_or_path, *args, _original=original, **kwargs):
            if str(name_or_path) == "roberta-base":
                name_or_path = str(roberta_dir)
            return _original(klass, name_or_path, *args, **kwargs)

        cls.from_pretrained = classmethod(local)
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.from_pretrained = classmethod(original)


class ClapEngine:
    SAMPLE_RATE = 48000

    def __init__(self, weights: str, roberta_dir: str, device: str = "cpu", seed: int = 0,
                 config_key: str = "config.backbones.clap"):
        path = require_file(weights, f"{config_key}.weights", CLAP_WEIGHT_FILE)
        roberta = require_file(roberta_dir, f"{config_key}.roberta_dir",
                               "the roberta-base directory (config.json, vocab.json, merges.txt, model weights)")
        self.torch = require_package("torch", "torch", "the CLAP backbone", f"{config_key}.python")
        laion_clap = require_package("laion_clap", "laion-clap", "the CLAP backbone", f"{config_key}.python")
        factory = require_package("laion_clap.clap_module.factory", "laion-clap", "the CLAP backbone",
                                  f"{config_key}.python")
        transformers = require_package("transformers", "transformers", "the CLAP backbone", f"{config_key}.python")
        fusion = "fusion" in path.name
        with _local_roberta(transformers, roberta):
            self.module = laion_clap.CLAP_Module(enable_fusion=fusion, amodel="HTSAT-tiny" if fusion else "HTSAT-base",
                                                 device=device)
        state = factory.load_state_dict(str(path))
        state.pop("text_branch.embeddings.position_ids", None)  # LAION-CLAP issue #118
        self.module.model.load_state_dict(state)
        self.module.eval()
        self.seed = int(seed)

    def analyze(self, clips: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        results = []
        for index, clip in enumerate(clips):
            mono = np.asarray(clip, np.float32).reshape(1, -1)
            mono = (np.clip(mono, -1.0, 1.0) * 32767.0).astype(np.int16).astype(np.float32) / 32767.0
            np.random.seed(self.seed + index)  # fusion's random crops of audio longer than 10 s
            with self.torch.no_grad():
                embedding = self.module.get_audio_embedding_from_data(x=self.torch.from_numpy(mono), use_tensor=True)
            joint = embedding.squeeze(0).cpu().numpy().astype(np.float64)
            results.append(dict(frames=joint[None], joint=joint))
        return results

    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(prompts), 64):  # batches of 64, as stable-audio-metrics embeds captions
            with self.torch.no_grad():
                emb = self.module.get_text_embedding(list(prompts[start:start + 64]), use_tensor=True)
            out.append(emb.cpu().numpy().astype(np.float64))
        return np.concatenate(out)


ENGINES = {"openl3": OpenL3Engine, "passt": PaSSTEngine, "clap": ClapEngine}
