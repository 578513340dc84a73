"""Local encoder weights: ``model.weights_path=<file>`` (safetensors or a PyTorch state dict).

The route a user with downloaded ImageNet weights takes when the machine is offline, and the route the
embedded benchmark's pretext-pretrained encoder takes. Hand-written because smp/timm load weights only by
name from a hub (``encoder_weights="imagenet"``) or from a full-model checkpoint of their own layout; a plain
encoder state dict saved by another tool needs the prefix handling and the one-line mismatch report below,
and a timm classifier checkpoint the name mapping of smp's ``tu-`` encoders (:func:`timm_checkpoint_names`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from brpg_lightning.errors import BRPGInputError

log = logging.getLogger(__name__)

PREFIXES = ("module.", "model.", "student.", "encoder.", "backbone.")
"""Leading key prefixes stripped (repeatedly) when the keys do not match the encoder as they are."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``'d dict (``{"state_dict": ...}`` unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise BRPGInputError(f"model.weights_path={path}: no such file (expected safetensors or a state dict)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file
        # torch's own text is not repeated: it suggests weights_only=False, which runs any code a pickle holds
        if "Weights only load failed" in str(exc):
            reason = ("it holds Python objects besides tensors, which are never unpickled here (that would run "
                      "the code they hold); save the tensors alone: torch.save(model.state_dict(), path) or "
                      "safetensors")
        else:
            reason = f"not a safetensors file or a torch.save'd state dict ({type(exc).__name__})"
        raise BRPGInputError(f"model.weights_path={path}: cannot read weights: {reason}") from None
    for key in ("state_dict", "model", "encoder"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BRPGInputError(f"model.weights_path={path}: expected a mapping of parameter names to tensors")
    return state


def _strip(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """The keys with known prefixes stripped one level at a time; the level that best matches ``own`` wins."""
    best, current = state, state
    while True:
        stripped = {}
        for key, value in current.items():
            prefix = next((p for p in PREFIXES if key.startswith(p)), "")
            stripped[key[len(prefix):]] = value
        if stripped.keys() == current.keys():
            return best
        current = stripped
        if len(own & set(current)) > len(own & set(best)):
            best = current


def timm_checkpoint_names(own: dict[str, torch.Tensor] | list[str]) -> dict[str, str]:
    """timm checkpoint name -> encoder key, for smp's ``tu-`` encoders (empty for others).

    smp keeps the timm network under ``model.``, and timm's ``features_only`` wrapper flattens top-level
    ``Sequential`` children (``stem.0`` -> ``stem_0``, ``blocks.3`` -> ``blocks_3``), so a checkpoint of the
    timm classifier (``timm.create_model(name, pretrained=True).state_dict()``) matches neither as it is.

    Example:
        >>> timm_checkpoint_names(["model.stem_0.conv.weight", "model.layer1.0.bn1.weight"])["stem.0.conv.weight"]
        'model.stem_0.conv.weight'
    """
    out: dict[str, str] = {}
    for key in own:
        if not key.startswith("model."):
            continue
        inner = key.removeprefix("model.")
        out[inner] = key
        head, _, rest = inner.partition(".")
        match = re.fullmatch(r"(.+)_(\d+)", head)
        if match and rest:
            out.setdefault(f"{match[1]}.{match[2]}.{rest}", key)
    return out


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> str:
    """Load ``path`` into ``encoder`` (non-strict) and return the one-line summary it also logs.

    Raises:
        BRPGInputError: missing or unreadable file, no key in common with the encoder, or a shape mismatch
            (names the first mismatching key with both shapes).
    """
    raw = read_state_dict(path)
    own = encoder.state_dict()
    state = _strip(raw, set(own))
    names = timm_checkpoint_names(own)
    if names:
        bare = _strip(raw, set(names))
        if len(set(names) & set(bare)) > len(set(own) & set(state)):
            state = {names.get(k, f"model.{k}"): v for k, v in bare.items()}
    matched = [k for k in state if k in own]
    if not matched:
        example = next(iter(state), "<empty>")
        raise BRPGInputError(
            f"model.weights_path={path}: no key matches the encoder (file has e.g. {example!r}, "
            f"encoder expects e.g. {next(iter(own))!r})"
        )
    for key in matched:
        if state[key].shape != own[key].shape:
            raise BRPGInputError(
                f"model.weights_path={path}: {key} has shape {tuple(state[key].shape)}, "
                f"the encoder expects {tuple(own[key].shape)}"
            )
    result = encoder.load_state_dict({k: state[k] for k in matched}, strict=False)
    missing, unexpected = list(result.missing_keys), [k for k in state if k not in own]
    summary = (
        f"loaded encoder weights from {path}: {len(matched)}/{len(own)} tensors, "
        f"{len(missing)} missing{' (e.g. ' + missing[0] + ')' if missing else ''}, "
        f"{len(unexpected)} unexpected{' (e.g. ' + unexpected[0] + ')' if unexpected else ''}"
    )
    log.info(summary)
    return summary
