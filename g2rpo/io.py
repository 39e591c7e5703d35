"""Atomic file and directory writes, and safe weight loading.

A reader must never see half a checkpoint: every file is written under a temporary name in the
same directory and moved into place with ``os.replace``; directories are filled under a temporary
name and renamed as a whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path`` to write to; on success it is synced and moved onto ``path``.

    A reader sees either the old or the complete new file; on an exception the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either the old or the complete new content."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    On an exception the temporary directory is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old.{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_png(path: str | Path, image) -> None:
    """Write a PIL image, or a ``[3, H, W]`` float tensor in [0, 1], as PNG, atomically."""
    import io

    if isinstance(image, torch.Tensor):
        from PIL import Image

        array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_png_grid(path: str | Path, images: torch.Tensor, columns: int = 4) -> None:
    """Images ``[M, 3, H, W]`` in [0, 1] as one PNG grid (``columns`` per row, 2 px padding), atomically."""
    from torchvision.utils import make_grid

    write_png(path, make_grid(images.float().cpu(), nrow=columns, padding=2))


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Save a state dict as safetensors, atomically, streamed to disk tensor by tensor.

    A tensor is copied only where safetensors needs it: when it is not contiguous or is a view of a
    larger or shared storage.
    """
    from safetensors.torch import save_file

    tensors, storages = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        if (not tensor.is_contiguous() or storage.data_ptr() in storages
                or storage.nbytes() != tensor.numel() * tensor.element_size()):
            tensor = tensor.contiguous().clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor.cpu()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_state_dict_file(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file, or a pickled torch file with ``weights_only=True``.

    A checkpoint in the ``{"state_dict": ...}`` layout (HPS, open_clip training) is unwrapped.
    Errors name the file and what it was expected to hold.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{what}: cannot read {path} ({type(exc).__name__}: {exc}); is the file complete?") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} does not hold a state dict of tensors")
    return state
