"""Checkpoints on disk: saved so that equal weights hash equally, and loaded with
`weights_only=True`, so a file carrying pickled code is refused, never run. The train stage, the
evaluation, the judging classifier and the served model all load through here."""

from __future__ import annotations

import io
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError
from .files import FileRefusedError, open_bounded
from .model import VAE

WRITTEN_BY = "pass a .ckpt file the train stage wrote"
# The default model's checkpoint is ~1 MB (weights and AdamW's two moments). hidden_dims
# [8192, 8192], config.py's widest layers twice, makes 1.8 GB; a file past 4 GiB is not one of ours.
MAX_CHECKPOINT_BYTES = 2**32
CHECKPOINT_FILE = f"a PyTorch checkpoint of at most {MAX_CHECKPOINT_BYTES:,} bytes"


class UnsafeCheckpointError(PipelineError):
    """A file that would run pickled code if loaded without weights_only: never ignored."""


def checkpoint_bytes(obj: Any) -> bytes:
    """torch.save's bytes, the same wherever they are written: saved to a path, torch names the
    zip's inner folder after the file (a random temp name here), so equal content hashed unequal."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def portable_checkpoint_bytes(path: Path) -> bytes:
    """A Lightning checkpoint's bytes as they hash the same in every clone for the same weights
    (dvc.lock records the hash): the callback states name the checkpoint folder by its name
    alone, not the absolute path Lightning records. Every string is interned: pickle writes a
    string once per object, and a resumed training's history holds the keys it loaded, not the
    ones it made, so equal states pickled unequally."""
    folder = str(Path(path).parent.resolve())

    def relative(value):
        if isinstance(value, str):
            return sys.intern(value.replace(folder, Path(folder).name))
        if isinstance(value, dict):
            return {relative(k): relative(v) for k, v in value.items()}
        if type(value) in (list, tuple):  # not a named tuple
            return type(value)(relative(v) for v in value)
        return value

    with open_bounded(path, MAX_CHECKPOINT_BYTES, CHECKPOINT_FILE) as file:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    return checkpoint_bytes(relative(saved))


def load_checkpoint(path: Path | str, keys: tuple[str, ...] = ("state_dict", "hyper_parameters")) -> dict:
    """A checkpoint's contents, loaded with weights_only=True: one carrying pickled code is
    refused, never run. Every way it can be wrong is one PipelineError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{path}: a directory, not a checkpoint file; {WRITTEN_BY}, such as "
                            "models/best.ckpt")
    if not path.exists():  # a FIFO or a device exists: open_bounded names what it is
        raise PipelineError(f"{path}: no such checkpoint file; run `dvc repro train` first, or {WRITTEN_BY}")
    try:
        # Opened only once known to be a regular file of a checkpoint's size: a FIFO or /dev/zero
        # in its place would block or fill the memory.
        with open_bounded(path, MAX_CHECKPOINT_BYTES, CHECKPOINT_FILE) as file, \
                warnings.catch_warnings():  # torch warns about unusual pickle protocols: noise here
            warnings.simplefilter("ignore")
            saved = torch.load(file, map_location="cpu", weights_only=True)
    except FileRefusedError as err:
        raise PipelineError(f"{err}; {WRITTEN_BY}") from None
    except pickle.UnpicklingError as err:
        # weights_only names the blocked class ("GLOBAL posix.system") only for pickled code;
        # random bytes or a text file fail on an opcode instead.
        if "GLOBAL" in str(err):
            raise UnsafeCheckpointError(f"{path}: refused, it holds more than tensors and plain "
                                        "values (pickled code); load only checkpoints you trust") from None
        raise PipelineError(f"{path}: not a PyTorch checkpoint; {WRITTEN_BY}") from None
    except Exception:  # noqa: BLE001  the unpickler of an arbitrary file fails in arbitrary ways
        raise PipelineError(f"{path}: empty, truncated or not a PyTorch checkpoint; {WRITTEN_BY}") from None
    if not isinstance(saved, dict) or not set(keys) <= saved.keys():
        raise PipelineError(f"{path}: not a Lightning checkpoint of this project (a bare "
                            f"state_dict?); {WRITTEN_BY}")
    return saved


def load_vae(checkpoint: Path | str) -> VAE:
    """The VAE (or AE) of a train-stage checkpoint, in eval mode, without importing Lightning."""
    saved = load_checkpoint(checkpoint)
    hp, state = saved["hyper_parameters"], saved["state_dict"]
    try:
        weights = {k.removeprefix("vae."): v for k, v in state.items() if k.startswith("vae.")}
        # Built on the meta device, which allocates nothing, and given the file's own tensors:
        # hyperparameters that ask for huge layers cost no memory before the shapes are checked.
        with torch.device("meta"):
            vae = VAE(list(hp["hidden_dims"]), int(hp["latent_dim"]), variational=hp.get("kind", "vae") != "ae")
        vae.load_state_dict(weights, assign=True)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
        # load_state_dict's first line only says "Error(s) in loading"; the next names the tensor.
        reason = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()),
                      str(err).strip()).rstrip(".")
        raise PipelineError(f"{checkpoint}: its weights do not match its hyperparameters "
                            f"({reason}); {WRITTEN_BY}") from None
    if bad := [name for name, w in weights.items() if w.dtype != torch.float32 or not w.isfinite().all()]:
        raise PipelineError(f"{checkpoint}: weight {bad[0]} is not all finite float32 numbers; "
                            f"{WRITTEN_BY}")
    return vae.eval()
