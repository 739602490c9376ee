"""Models larger than memory: one transformer block in memory at a time, the rest on disk.

``load_offloaded`` builds the model on the ``meta`` device (no memory), loads only the tensors that
sit outside the block stack (embeddings, final norm, lm_head), and attaches a ``BlockOffloader``
(``model.strataprune_offload``) that reads a block's tensors from the safetensors checkpoint
when the block is needed and drops them afterwards:

- the calibration engine holds each block while it measures, prunes and re-runs it
  (``with offloader.hold(i)``); a pruned block is written to a working shard in a temporary
  folder and later reads of that block come from there (``reset()`` forgets every change, which
  is how the host goes back to the dense model between trials);
- any other forward (capturing block inputs, perplexity) goes through forward hooks that load a
  block just before it runs and release it just after, so a full forward holds one block;
- ``save_pretrained`` writes the model one block per shard with a standard
  ``model.safetensors.index.json``, so ``from_pretrained`` reads the result like any checkpoint.

Reads and writes stream tensor by tensor (strataprune/models/tensorfile.py): no memory map whose touched pages
would accumulate in the resident set, and no serialised copy of a block on the way to disk.

The checkpoint is read again throughout the run, by path: ``verify_unchanged`` compares each of its
files' identity (device, inode, size, mtime) with what it was when the model was opened, before every
block read and around the save, so a checkpoint that another process replaced meanwhile (another run
writing its output there) stops the run with an error instead of mixing two models' weights.

Limits: safetensors checkpoints only; checkpoint keys must equal the model's state-dict keys
(true for checkpoints written by transformers' ``save_pretrained``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from strataprune.contract.errors import ConfigError, DataError
from strataprune.models.tensorfile import load_tensors, read_header, save_tensors


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """State-dict key -> safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / "model.safetensors"
    if single.exists():
        return {key: single for key in read_header(single)[0]}
    raise DataError(
        f"model.offload needs a safetensors checkpoint; '{folder}' has neither model.safetensors nor model.safetensors.index.json"
    )


def read_tensors(files: Mapping[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    """Read ``keys`` from their files, each straight into a new tensor (no memory map held open)."""
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(files[key], []).append(key)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        out.update(load_tensors(path, names))
    return out


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


class BlockOffloader:
    """Loads, releases, rewrites and saves the blocks of a model that lives on the meta device."""

    def __init__(self, model: nn.Module, folder: Path, block_names: list[str], device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.folder = folder
        self.block_names = list(block_names)  # module name of every block, e.g. "model.layers.3"
        self.num_blocks = len(self.block_names)
        self.device = device
        self.dtype = dtype
        self.base = checkpoint_files(folder)
        self._identity = self._fingerprint()
        self.overlay: dict[str, Path] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="strataprune-offload-"))
        self.loaded: set[int] = set()
        self.pinned: set[int] = set()
        self.dirty: set[int] = set()
        self.loads = 0
        self._keys = {i: self._block_keys(i) for i in range(self.num_blocks)}
        self._in_blocks = {key for keys in self._keys.values() for key in keys}
        self._shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}

    # ---------------------------------------------------------------- keys
    def _block_keys(self, index: int) -> list[str]:
        head = f"{self.block_names[index]}."
        keys = [k for k, v in self.model.state_dict(keep_vars=True).items() if k.startswith(head) and v.is_meta]
        missing = [k for k in keys if k not in self.base]
        if missing:
            raise DataError(
                f"checkpoint '{self.folder}' has no tensor '{missing[0]}' (model.offload needs keys equal to the model's)"
            )
        return keys

    def files(self) -> dict[str, Path]:
        return {**self.base, **self.overlay}

    # ---------------------------------------------------------------- the checkpoint must not change under us
    def _checkpoint_paths(self) -> list[Path]:
        extra = [self.folder / name for name in ("model.safetensors.index.json", "config.json") if (self.folder / name).exists()]
        return sorted(set(self.base.values())) + extra

    def _fingerprint(self) -> dict[str, tuple[int, int, int, int] | None]:
        identity: dict[str, tuple[int, int, int, int] | None] = {}
        for path in self._checkpoint_paths():
            try:
                st = path.stat()
                identity[str(path)] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                identity[str(path)] = None
        return identity

    def verify_unchanged(self) -> None:
        """Raise DataError if a file of the checkpoint was replaced, rewritten or removed since the model was opened."""
        now = self._fingerprint()
        changed = [Path(p).name for p, before in self._identity.items() if now.get(p) != before]
        if changed:
            raise DataError(
                f"the model '{self.folder}' changed on disk during this run ({', '.join(changed[:3])} replaced or rewritten, "
                "e.g. by another run writing its output there); this run read parts of it and nothing is saved: "
                "run again on a model folder that nothing rewrites meanwhile"
            )

    # ---------------------------------------------------------------- one block
    def load(self, index: int) -> None:
        if index in self.loaded:
            return
        self.verify_unchanged()
        for key, tensor in read_tensors(self.files(), self._keys[index]).items():
            _set_tensor(self.model, key, tensor.to(device=self.device, dtype=self._shapes[key][1]))
        self.loaded.add(index)
        self.loads += 1

    def release(self, index: int) -> None:
        if index not in self.loaded:
            return
        if index in self.dirty:
            self._write(index)
        for key in self._keys[index]:
            shape, dtype = self._shapes[key]
            _set_tensor(self.model, key, torch.empty(shape, dtype=dtype, device="meta"))
        self.loaded.discard(index)

    def mark_dirty(self, index: int) -> None:
        """The weights of a loaded block were changed: keep the change when it is released."""
        self.dirty.add(index)

    def _write(self, index: int) -> None:
        state = self.model.state_dict()
        tensors = {key: state[key] for key in self._keys[index]}
        path = self.workdir / f"block-{index:05d}.safetensors"
        save_tensors(tensors, path)
        for key in tensors:
            self.overlay[key] = path
        self.dirty.discard(index)

    @contextmanager
    def hold(self, index: int) -> Iterator[None]:
        """Keep block ``index`` in memory for the duration (forward hooks leave it alone)."""
        self.load(index)
        self.pinned.add(index)
        try:
            yield
        finally:
            self.pinned.discard(index)
            self.release(index)

    def reset(self) -> None:
        """Forget every change: later reads come from the original checkpoint again."""
        for index in list(self.loaded):
            self.dirty.discard(index)
            self.release(index)
        self.overlay.clear()
        for path in self.workdir.glob("block-*.safetensors"):
            path.unlink()

    # ---------------------------------------------------------------- hooks
    def install_hooks(self, blocks: list[nn.Module]) -> None:
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda _m, _a, i=index: self.load(i))
            block.register_forward_hook(lambda _m, _a, _o, i=index: None if i in self.pinned else self.release(i))

    # ---------------------------------------------------------------- reads without loading
    def dense_tensor(self, key: str) -> torch.Tensor:
        """A tensor of the original checkpoint, in the model's dtype."""
        self.verify_unchanged()
        return read_tensors(self.base, [key])[key].to(self._shapes[key][1])

    # ---------------------------------------------------------------- save
    def save_pretrained(self, out: Path) -> None:
        """One shard per block plus one for everything else, with a standard index."""
        out = Path(out)
        self.verify_unchanged()
        for index in list(self.loaded):
            self.release(index)
        shards = self.num_blocks + 1
        weight_map: dict[str, str] = {}
        total = 0
        state = self.model.state_dict()
        # only what the checkpoint had: a tied lm_head and non-persistent buffers are rebuilt on load
        rest = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k in self.base and k not in self._in_blocks}
        for index in range(self.num_blocks):
            name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            tensors = {k: v.to(self._shapes[k][1]) for k, v in read_tensors(self.files(), self._keys[index]).items()}
            save_tensors(tensors, out / name, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({k: name for k in tensors})
            del tensors
        name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
        save_tensors(rest, out / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in rest.values())
        weight_map.update({k: name for k in rest})
        self.verify_unchanged()  # the blocks above were read from it while it was being written
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
        self.model.config.save_pretrained(out)
        generation = getattr(self.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(out)

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __del__(self) -> None:  # the working shards are scratch space
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class DenseWeights(Mapping):
    """name -> dense (out, in) weight of a prunable matrix, read from the checkpoint on demand."""

    def __init__(self, offloader: BlockOffloader, modules: Mapping[str, nn.Module], adapter: Any) -> None:
        self.offloader = offloader
        self.modules = modules
        self.adapter = adapter  # knows how a module stores its matrix (e.g. GPT-2's Conv1D keeps (in, out))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.adapter.as_matrix(self.modules[name], self.offloader.dense_tensor(f"{name}.weight"))

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def load_offloaded(folder: Path, adapter: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Build ``adapter``'s model on the meta device (``adapter.load_empty``) and load only the non-block tensors.

    The blocks are the adapter's (``adapter.blocks``); nothing here knows a model family.
    """
    from strataprune.runtime.memory import return_freed_blocks_to_the_os

    return_freed_blocks_to_the_os()  # blocks are loaded and freed one after another
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"model.offload needs a local model folder with safetensors weights, got '{folder}'")
    try:
        loaded = adapter.load_empty(str(folder), dtype=dtype)
    except NotImplementedError:
        raise ConfigError(
            f"model adapter '{adapter.name}' cannot build a model without its weights, so model.offload is not available for it"
        ) from None
    model = loaded.model
    names = block_names(model, adapter.blocks(model))
    offloader = BlockOffloader(model, folder, names, device, dtype)
    outside = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta and k not in offloader._in_blocks]
    present = [k for k in outside if k in offloader.base]
    for key, tensor in read_tensors(offloader.base, present).items():
        _set_tensor(model, key, tensor.to(device=device, dtype=dtype))
    model.tie_weights()
    still_meta = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta and k not in offloader._in_blocks]
    if still_meta:
        raise DataError(f"checkpoint '{folder}' has no tensor '{still_meta[0]}' (model.offload needs keys equal to the model's)")
    for buffer in model.buffers():  # rotary tables etc. were built on the CPU at init
        if buffer.device != device and not buffer.is_meta:
            buffer.data = buffer.data.to(device)
    offloader.install_hooks(list(adapter.blocks(model)))
    model.strataprune_offload = offloader  # type: ignore[assignment]
    loaded.source = str(folder)
    loaded.description = {**loaded.description, "offload": True}
    return loaded


def block_names(model: nn.Module, blocks: Any) -> list[str]:
    """The module name of every block the adapter returned (in its order)."""
    names = {id(module): name for name, module in model.named_modules()}
    missing = [i for i, block in enumerate(blocks) if id(block) not in names]
    if missing:
        raise DataError(f"block {missing[0]} of the adapter's block list is not a submodule of the model")
    return [names[id(block)] for block in blocks]


def offloader_of(model: nn.Module) -> BlockOffloader | None:
    return getattr(model, "strataprune_offload", None)
