"""The ensemble's pooled slice embeddings per study, kept on disk for the commands that refit
what sits on top of frozen networks: `ich convexity` (the fusion's ensemble scores), `ich
refit-heads` and `ich atlas build`. Their network pass is almost all of their time (a 40-slice
study takes seconds on a 2-core CPU), and a second run on the same studies, with another seed,
``--fuse`` or reader, or a package whose heads were refitted, needs the same embeddings.

The key is what decides the embeddings: the networks' weights except the linear heads (a head
is applied to the cached embeddings afresh, so a refitted package reads the same entries), their
output stride, the device kind (CUDA runs under autocast), the schema of this computation, and
the bytes of the study's model input. An entry is a float32 array (members, slices, 1280) named
by that hash: no identifier, but derived from the study's pixels, so the folder belongs where
the studies themselves may be kept.

``ICH_FEATURE_CACHE`` names the folder (default ``~/.cache/ich/features``), or ``off``;
``ICH_FEATURE_CACHE_MB`` bounds it (default 2048: about 6000 studies of 40 slices and two
members), the least recently used entries going first. A damaged entry is computed again.
"""

import hashlib
import os
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from pathlib import Path

import numpy as np
import torch

from inference.models import EfficientNetLite

ENV_DIR = "ICH_FEATURE_CACHE"
ENV_MB = "ICH_FEATURE_CACHE_MB"
DEFAULT_MB = 2048
SCHEMA = "pooled-embeddings-1"  # changes when the computation does


def default_dir() -> Path:
    return Path.home() / ".cache" / "ich" / "features"


def networks_fingerprint(members: Sequence[EfficientNetLite], device: torch.device) -> str:
    """A hash of everything but the linear heads that decides the members' embeddings."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{SCHEMA}|{device.type}".encode())
    for model in members:
        digest.update(f"|{model.variant}|{model.output_stride}".encode())
        for name, value in model.state_dict().items():
            if name.startswith("fc."):
                continue
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


_ENTRY = re.compile(r"[0-9a-f]{40}\.npy")
_TEMPORARY = re.compile(r"tmp\w{8}\.tmp")  # tempfile.mkstemp's names


class FeatureCache:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MB * 2**20) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._warned = False

    @classmethod
    def from_env(cls) -> "FeatureCache | None":
        """The cache ``ICH_FEATURE_CACHE`` names (None when it is ``off``)."""
        where = os.environ.get(ENV_DIR, "").strip()
        if where.lower() == "off":
            return None
        megabytes = os.environ.get(ENV_MB, "").strip()
        try:
            limit = int(megabytes) if megabytes else DEFAULT_MB
        except ValueError:
            limit = 0
        if limit < 1:
            message = f"{ENV_MB} is a whole number of megabytes (1 or more), not {megabytes!r}"
            raise ValueError(message)
        return cls(Path(where) if where else default_dir(), limit * 2**20)

    def key(self, fingerprint: str, x: torch.Tensor) -> str:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(f"{fingerprint}|{tuple(x.shape)}|{x.dtype}".encode())
        digest.update(x.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def load(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The entry under ``key`` if it is there and whole (of ``shape``), else None. The cache
        is best-effort: an entry it cannot read is computed again."""
        path = self._path(key)
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            array = None
        except (OSError, ValueError, EOFError):  # empty, truncated or not an array
            array = None
            self._remove(path)
        if array is not None and (array.shape != shape or array.dtype != np.float32):
            array = None
            self._remove(path)
        if array is None:
            self.misses += 1
            return None
        with suppress(OSError):  # pruned meanwhile by another process, or not ours
            os.utime(path)  # recently used
        self.hits += 1
        return torch.from_numpy(array)

    def store(self, key: str, embeddings: torch.Tensor) -> None:
        """Writes the entry whole or not at all, then trims the cache to its bound. A cache
        that cannot be written (a read-only home, a full disk) is warned about, not fatal."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # derived from pixels
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        except OSError as error:
            self._warn(error)
            return
        try:
            with os.fdopen(handle, "wb") as out:
                np.save(out, embeddings.detach().cpu().float().contiguous().numpy())
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except OSError as error:
            self._remove(Path(temporary))
            self._warn(error)
            return
        except BaseException:
            self._remove(Path(temporary))
            raise
        self.prune()

    def prune(self) -> None:
        """Trims the cache to its bound, least recently used first. Only the cache's own files
        are touched (an entry's name is its 40-digit hash under a folder of its first two),
        whatever else the folder it was pointed at holds."""
        stale = time.time() - 3600
        for path in self.root.glob("[0-9a-f][0-9a-f]/*.tmp"):  # left by a process that died
            with suppress(OSError):
                if _TEMPORARY.fullmatch(path.name) and path.stat().st_mtime < stale:
                    path.unlink()
        entries = []
        for path in self.root.glob("[0-9a-f][0-9a-f]/*.npy"):
            if not _ENTRY.fullmatch(path.name) or not path.name.startswith(path.parent.name):
                continue
            try:
                stat = path.stat()
            except OSError:  # removed by another process
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            self._remove(path)
            total -= size

    def _remove(self, path: Path) -> None:
        with suppress(OSError):  # another user's entry: left as it is
            path.unlink(missing_ok=True)

    def _warn(self, error: OSError) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"feature cache {self.root} cannot be written ({error}): going on without it"
                f" (set {ENV_DIR} to another folder, or to off)",
                stacklevel=3,
            )


@torch.no_grad()
def member_outputs(
    networks: Sequence[EfficientNetLite],
    x: torch.Tensor,
    device: torch.device,
    *,
    batch_size: int,
    cache: FeatureCache | None = None,
    fingerprint: str | None = None,
    heads: Sequence[EfficientNetLite] | None = None,
    mixed_precision: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice logits (M, N, 6) and pooled embeddings (M, N, E) of one study's model input x
    (N, 3, S, S): ``networks`` run on it (or the embeddings come from ``cache``, under
    ``fingerprint``, which must be ``networks_fingerprint`` of them), and each member's linear
    head, that of ``heads`` if given, reads its embeddings, as ``forward_head`` does.

    ``mixed_precision``: on CUDA, networks and heads run under bfloat16 autocast, as the
    predictor runs them (off: float32, what training fits the study level on)."""
    heads = list(heads or networks)
    half = mixed_precision and device.type == "cuda"
    key = None
    embeddings = None
    if cache is not None:
        if fingerprint is None:
            raise ValueError("a cached pass needs the networks' fingerprint")
        key = cache.key(f"{fingerprint}|autocast={half}", x)
        shape = (len(networks), len(x), networks[0].embedding_dim)
        embeddings = cache.load(key, shape)
    if embeddings is None:
        parts = []
        with autocast(device) if half else nullcontext():
            for chunk in torch.split(x, batch_size):
                chunk = chunk.to(device)
                parts.append(
                    torch.stack([m.pool(m.forward_features(chunk)).float().cpu() for m in networks])
                )
        embeddings = torch.cat(parts, dim=1)
        if cache is not None and key is not None:
            cache.store(key, embeddings)
    with autocast(device) if half else nullcontext():
        logits = torch.stack(
            [
                m.fc(e.to(m.fc.weight.device)).float().cpu()
                for m, e in zip(heads, embeddings, strict=True)
            ]
        )
    return logits, embeddings


def autocast(device: torch.device) -> AbstractContextManager:
    """bfloat16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
