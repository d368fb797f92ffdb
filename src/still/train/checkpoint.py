"""Checkpoints: weights as safetensors, state as JSON, written atomically, verified on load.

A checkpoint is a directory `ckpt-<step>/` holding

    model.safetensors    the model's state dict
    state.safetensors    every other tensor: optimizer moments, torch RNG states, extra tensors
    state.json           everything else: step, optimizer hyper-parameters, scheduler, Python and
                         NumPy RNG states, history, extra JSON state
    config.json          the run's config (data only)
    manifest.json        the SHA-256 of each file above; written last

The directory is assembled under a temporary name and renamed into place once complete, so a
crash at any moment leaves the previous checkpoints intact. Loading never unpickles: safetensors
and JSON only, so a checkpoint cannot run code. A checkpoint whose manifest is missing or whose
hashes do not match is refused with a message saying which file is damaged.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from still.errors import StillError
from still.train.io import _fsync_dir, atomic_write_text, normal_mode, process_alive, sha256_file

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{8,})$")
_FILES = ("model.safetensors", "state.safetensors", "state.json", "config.json")


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {k[len("extra/") :]: v for k, v in self.tensors.items() if k.startswith("extra/")}


# ----------------------------------------------------------------------------- serialisation


def _split_optimizer(state_dict: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Optimizer state dict -> (JSON part, tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    json_state: dict[str, dict[str, Any]] = {}
    for pid, pstate in state_dict["state"].items():
        entry = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{pid}/{key}"] = value
            else:
                entry[key] = value
        json_state[str(pid)] = entry
    return {"state": json_state, "param_groups": state_dict["param_groups"]}, tensors


def check_savable(model: dict, optimizer: dict | None = None, scheduler: dict | None = None) -> None:
    """A `StillError` naming what `save_checkpoint` could not write of these state dicts: a model
    entry that is not a tensor (a module's extra state, say: safetensors holds tensors only), or a
    value in the optimizer's settings or the scheduler's state that JSON cannot hold (a tensor
    learning rate, say)."""
    for name, value in model.items():
        if not isinstance(value, torch.Tensor):
            raise StillError(f"the model's state dict holds {name!r} as a {type(value).__name__}, which a "
                             "checkpoint cannot hold: its weights file holds tensors only")
    parts = {"optimizer": _split_optimizer(optimizer)[0] if optimizer is not None else None, "scheduler": scheduler}
    for what, part in parts.items():
        where = _not_json(part, "")
        if where is not None:
            raise StillError(f"the {what}'s state dict holds {where}, which a checkpoint's JSON cannot hold "
                             "(give settings such as the learning rate as Python numbers)")


def _not_json(value: Any, path: str) -> str | None:
    """Where in `value` the first thing is that `json.dumps` cannot write (path and type), or None."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return f"the key {key!r} at {path or 'its top'}"
            found = _not_json(item, f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        return next((f for i, item in enumerate(value) if (f := _not_json(item, f"{path}[{i}]")) is not None), None)
    return f"{path} = a {type(value).__name__}"


def _join_optimizer(json_part: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict[str, Any]] = {int(pid): dict(entry) for pid, entry in json_part["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": json_part["param_groups"]}


def _rng_to_json(rng: dict, prefix: str = "rng/") -> tuple[dict, dict[str, torch.Tensor]]:
    version, internal, gauss = rng["python"]
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    json_part = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {f"{prefix}torch": rng["torch"]}
    for i, s in enumerate(rng.get("cuda", [])):
        tensors[f"{prefix}cuda/{i}"] = s
    for key in ("torch_ranks", "cuda_ranks"):  # data parallel: every rank's own stream, by rank
        for r, s in enumerate(rng.get(key, [])):
            tensors[f"{prefix}{key}/{r}"] = s
    if "shards" in rng:  # (`Trainer`: the threads a step's draws were split across)
        json_part["shards"] = int(rng["shards"])
    if "epoch_start" in rng:  # the states as the checkpoint's epoch began (`Trainer`: a resumed epoch's batches)
        json_part["epoch_start"], more = _rng_to_json(rng["epoch_start"], f"{prefix}epoch_start/")
        tensors.update(more)
    return json_part, tensors


def _numbered(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    found = {int(k[len(prefix):]): v for k, v in tensors.items()
             if k.startswith(prefix) and k[len(prefix):].isdigit()}
    return [found[i] for i in sorted(found)]


def _rng_from_json(json_part: dict, tensors: dict[str, torch.Tensor], prefix: str = "rng/") -> dict:
    version, internal, gauss = json_part["python"]
    kind, keys, pos, has_gauss, cached = json_part["numpy"]
    rng = {
        "python": (version, tuple(internal), gauss),
        "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
        "torch": tensors[f"{prefix}torch"],
    }
    for key in ("cuda", "torch_ranks", "cuda_ranks"):
        found = _numbered(tensors, f"{prefix}{key}/")
        if found:
            rng[key] = found
    if isinstance(json_part.get("shards"), int):
        rng["shards"] = json_part["shards"]
    if "epoch_start" in json_part:
        rng["epoch_start"] = _rng_from_json(json_part["epoch_start"], tensors, f"{prefix}epoch_start/")
    return rng


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    try:
        save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as e:  # (safetensors says a full disk with its own error: an OSError, as any other)
        raise OSError(f"cannot write {path}: {e}") from None
    normal_mode(path)  # (safetensors makes it private: a probe's shared run lent no weights)


# ----------------------------------------------------------------------------- saving

_TEMPORARY = re.compile(r"^\.ckpt-\d{8,}\.(tmp|old)-(\d+)$")


def written_here(name: str) -> bool:
    """Whether `name`, in a checkpoint folder, is one still writes there: a checkpoint `ckpt-<step>`,
    one set aside as damaged (`ckpt-<step>.damaged`, `-2` ...: `latest_checkpoint`), or a temporary
    of `save_checkpoint`'s (`.ckpt-<step>.tmp-<pid>`, `.old-<pid>`)."""
    return bool(_WRITTEN.match(name) or _TEMPORARY.match(name))


_WRITTEN = re.compile(r"^ckpt-\d{8,}(\.damaged(-\d+)?)?$")


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete half-written checkpoints left by writers that died (SIGKILL, power loss)."""
    for path in directory.iterdir():
        match = _TEMPORARY.match(path.name)
        if not match or int(match.group(2)) == os.getpid():
            continue
        if not process_alive(int(match.group(2))):  # (a writer still running: left alone)
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict | None = None,
    scheduler: dict | None = None,
    rng: dict | None = None,
    state: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    config: dict[str, Any] | None = None,
    keep: int | None = 2,
    optimizer_class: str | None = None,
) -> Path:
    """Write checkpoint `ckpt-<step>` under `directory` atomically; keep the newest `keep`.

    `model`, `optimizer` and `scheduler` are state dicts; `rng` is `still.train.seed.rng_state()`,
    with, under data parallelism, every rank's torch generator states as "torch_ranks" (and
    "cuda_ranks"), lists indexed by rank, and as "epoch_start" another such dict: the states as
    the checkpoint's epoch began (a `Trainer` resumed within an epoch draws its batches from them);
    `state` is JSON-ready data (counters, history); `extra_tensors` are saved beside the optimizer
    state (the recurrent memories of a language model, for example); `optimizer_class`, the
    optimizer's class ("torch.optim.adam.Adam"), lets a resume refuse another.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    final = directory / f"ckpt-{step:08d}"
    tmp = directory / f".ckpt-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors: dict[str, torch.Tensor] = {}
        json_state: dict[str, Any] = {"format": FORMAT, "step": step, "state": state or {}}
        if optimizer_class is not None:
            json_state["optimizer_class"] = optimizer_class
        if optimizer is not None:
            json_state["optimizer"], opt_tensors = _split_optimizer(optimizer)
            tensors.update(opt_tensors)
        if scheduler is not None:
            json_state["scheduler"] = scheduler
        if rng is not None:
            json_state["rng"], rng_tensors = _rng_to_json(rng)
            tensors.update(rng_tensors)
        for name, value in (extra_tensors or {}).items():
            tensors[f"extra/{name}"] = value
        _save_tensors(model, tmp / "model.safetensors")
        _save_tensors(tensors, tmp / "state.safetensors")
        try:
            text = json.dumps(json_state)
        except (TypeError, ValueError):  # (state added by an optimizer's step, which `check_savable` could not see)
            raise StillError(f"the checkpoint's state holds {_not_json(json_state, '')}, which its JSON cannot "
                             "hold") from None
        (tmp / "state.json").write_text(text, encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=2), encoding="utf-8")
        for name in _FILES:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        manifest = {"format": FORMAT, "step": step, "files": {n: sha256_file(tmp / n) for n in _FILES}}
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a re-run): swap it out
            old = directory / f".ckpt-{step:08d}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old_ckpt in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old_ckpt, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- loading


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint directories under `directory`, oldest first (verified or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | Path) -> dict:
    """Return the manifest of checkpoint `path`, or raise `StillError` saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise StillError(f"checkpoint {path} does not exist or is not a checkpoint directory")
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise StillError(f"checkpoint {path} is incomplete or damaged: "
                         "manifest.json is missing or unreadable") from None
    for name in _FILES:
        if name not in files:
            raise StillError(f"checkpoint {path} is damaged: its manifest does not list {name}")
        file = path / name
        if not file.is_file():
            raise StillError(f"checkpoint {path} is damaged: {name} is missing")
        if sha256_file(file) != files[name]:
            raise StillError(f"checkpoint {path} is damaged: {name} does not match its SHA-256 in the manifest")
    return manifest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify one checkpoint directory (safetensors and JSON only: nothing is unpickled)."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    try:
        model = load_file(str(path / "model.safetensors"), device=str(map_location))
        tensors = load_file(str(path / "state.safetensors"), device="cpu")
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, SafetensorError) as e:
        raise StillError(f"checkpoint {path} cannot be read: {e}") from None
    return Checkpoint(path=path, step=int(manifest["step"]), model=model, state=state, tensors=tensors, config=config)


def latest_checkpoint(directory: str | Path, log=None, set_aside: bool = False) -> Checkpoint | None:
    """The newest checkpoint under `directory` that verifies; damaged ones are skipped and reported.
    With `set_aside` (a run resuming), each damaged one is also renamed `<name>.damaged`, kept for a
    look but out of the rotation: else, newer than the checkpoint the run goes on from, it would
    count among the newest `keep` and a good one would be deleted in its place."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except StillError as e:
            message = f"{e}: skipped"
            if set_aside:
                # (not over one set aside before, of the same step: a probe's earlier copy was deleted)
                names = (f"{path.name}.damaged" + (f"-{n}" if n > 1 else "") for n in itertools.count(1))
                aside = next(path.with_name(name) for name in names if not path.with_name(name).exists())
                try:
                    os.replace(path, aside)
                    message += f", set aside as {aside.name}"
                except OSError as renaming:  # (read-only media: an older checkpoint is still there to load)
                    message += f", not set aside ({renaming.strerror or renaming})"
            if log is not None:
                log(message)
            else:
                warnings.warn(message, stacklevel=2)
    return None


def newest_config(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under `directory` whose config (the run's settings) reads as a dict,
    and that config; None where there is none. Only config.json is read, unverified: for what the
    run was made with, not to resume from (`latest_checkpoint` verifies)."""
    for path in reversed(list_checkpoints(directory)):
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict):
            return path, config
    return None


def optimizer_state(checkpoint: Checkpoint) -> dict | None:
    if "optimizer" not in checkpoint.state:
        return None
    return _join_optimizer(checkpoint.state["optimizer"], checkpoint.tensors)


def rng_state_of(checkpoint: Checkpoint) -> dict | None:
    if "rng" not in checkpoint.state:
        return None
    return _rng_from_json(checkpoint.state["rng"], checkpoint.tensors)


def load_model_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load with a message that names missing, unexpected and mis-shaped weights."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: {tuple(weights[k].shape)} in {source}, {tuple(own[k].shape)} in the model"
              for k in sorted(set(own) & set(weights)) if own[k].shape != weights[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append("wrong shape " + "; ".join(shapes[:5]))
    # another float width is cast, as `load_state_dict` does (a half-precision copy, say); integers,
    # bools or complex numbers for a float weight are no weights of it (they were cast unsaid)
    def kind(t: torch.Tensor) -> tuple[bool, bool]:
        return t.is_floating_point(), t.is_complex()

    kinds = [f"{k}: {weights[k].dtype} in {source}, {own[k].dtype} in the model"
             for k in sorted(set(own) & set(weights)) if kind(own[k]) != kind(weights[k])]
    if kinds:
        problems.append("wrong kind of number " + "; ".join(kinds[:5]))
    if problems:
        raise StillError(f"weights from {source} do not fit the model: " + "; ".join(problems)
                         + _wrapper_hint(set(own), set(weights)))
    module.load_state_dict(weights, strict=True)


_WRAPPERS = {"module.": "DistributedDataParallel", "_orig_mod.": "torch.compile"}


def _wrapper_hint(own: set[str], theirs: set[str]) -> str:
    """Where the names differ by a wrapper's prefix alone, say which (a probe: a model trained
    wrapped in DDP or torch.compile, resumed unwrapped, was told only that every weight differs)."""
    for prefix, wrapper in _WRAPPERS.items():
        for wrapped, plain, side in ((theirs, own, "saved"), (own, theirs, "given")):
            if wrapped and all(k.startswith(prefix) for k in wrapped) and {k[len(prefix):] for k in wrapped} == plain:
                return (f" (the names differ by {prefix!r} alone: the model was {side} wrapped in {wrapper}; "
                        "give the trainer the model as wrapped as the one that saved it)")
    return ""

