"""Training images as uint8 tensors, and random batches of x0 in [-1, 1] for the DPM and CM losses.

Paper: Wang et al. 2025, arXiv:2502.17099v1; the experiments train unconditional models on CIFAR-10 32x32.
Borrowed: random horizontal flips and the BOX-then-BICUBIC resize of image folders follow ADM's
          image_datasets.py (Dhariwal & Nichol 2021). The "shapes" and "silhouettes" sets are ours: tiny offline
          stand-ins.
Uses: nothing from this repo.     Used by: dpm_at.py, cm_at.py, eval_fid.py (--ref cifar10), experiments/.
Run: python data.py --dataset shapes --out grid.png   (full checks in tests/test_data.py)

Symbols: clean data sample -> x0, a (B, 3, H, W) float32 batch in [-1, 1]

We keep the whole dataset as one uint8 (N, 3, S, S) tensor (CIFAR-10 is 150 MB) so that it can sit on the
GPU, and `random_batch` draws from it with a torch.Generator: no DataLoader, no worker processes.
The 2-D point sets "ring" and "checkerboard" (densities known in closed form, for experiments/toy_experiment.py)
are float32 (N, 2) tensors instead; `random_batch` returns their rows as they are.
"""

import argparse
import contextlib
import hashlib
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from http.client import HTTPException

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DatasetError(Exception):
    """A bad dataset name, path or file; the message is one line meant for the user."""


# -----------------------------------------------------------------------------
# CIFAR-10: find the extracted folder, else verify and extract the tarball, else download it

def _md5(path: str) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    return md5.hexdigest()


@contextlib.contextmanager
def _atomic_file(path: str):
    """A binary temp file beside path, renamed onto path if the block succeeds and deleted if it raises, so that a
    crash or a failed check never leaves half a file under the final name."""
    fd, tmp_path = tempfile.mkstemp(prefix=".part-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _download(url: str, tar_path: str) -> None:
    """Stream url to a temp file beside tar_path, check its MD5, then rename it into place atomically."""
    md5 = hashlib.md5(usedforsecurity=False)
    try:
        os.makedirs(os.path.dirname(tar_path), exist_ok=True)
        with _atomic_file(tar_path) as f, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
            if md5.hexdigest() != CIFAR10_MD5:
                raise DatasetError(f"the file downloaded from {url} has MD5 {md5.hexdigest()}, expected "
                                   f"{CIFAR10_MD5}; it was deleted, try again")
    except (OSError, HTTPException) as e:  # URLError and socket timeouts are OSErrors
        raise DatasetError(f"could not download CIFAR-10 from {url} ({e}); put {CIFAR10_TARBALL} by hand at "
                           f"{os.path.abspath(tar_path)}, or use --dataset shapes, which works offline") from None


def _check_member(member: tarfile.TarInfo, tar_path: str) -> None:
    """Refuse members that could write outside the target folder (our check, on top of filter="data")."""
    parts = member.name.replace("\\", "/").split("/")
    if member.name.startswith(("/", "\\")) or os.path.isabs(member.name) or ".." in parts:
        raise DatasetError(f"{tar_path} holds an unsafe path {member.name!r}; refusing to extract it")
    if not (member.isfile() or member.isdir()):
        raise DatasetError(f"{tar_path} holds a link or special file {member.name!r}; refusing to extract it")


def _extract(tar_path: str, data_dir: str) -> None:
    """Extract into a temp folder inside data_dir, then move cifar-10-batches-py into place in one rename,
    so that an interrupted extraction never leaves a half-filled folder that we would trust next time."""
    tmp_dir = ""
    try:
        tmp_dir = tempfile.mkdtemp(prefix=".cifar-extract-", dir=data_dir)
        with tarfile.open(tar_path, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, tar_path)
            # filter="data" (Python 3.12, backported to 3.8.17+) also refuses unsafe members and modes
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp_dir, members=members, **safe)
        extracted = os.path.join(tmp_dir, CIFAR10_FOLDER)
        if not os.path.isdir(extracted):
            raise DatasetError(f"{tar_path} has no {CIFAR10_FOLDER}/ folder; is it the python version of CIFAR-10?")
        os.replace(extracted, os.path.join(data_dir, CIFAR10_FOLDER))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"could not extract {tar_path} ({e}); delete or replace it") from None
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)


# The only globals an official batch file names: a numpy array pickles as _reconstruct(ndarray, ...) with a dtype
# (numpy 1.x writes numpy.core.multiarray, numpy 2.x numpy._core.multiarray). Everything else in the file (the dict,
# bytes keys, the list of int labels, the list of bytes filenames) needs no global at all.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


class _BatchUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only _CIFAR_GLOBALS, so that a planted file cannot call os.system & co."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which no CIFAR-10 batch holds")
        return super().find_class(module, name)


def _read_batch(path: str) -> np.ndarray:
    """One official batch file -> uint8 (n, 32, 32, 3) HWC. Read without running code: the batches are pickles, and
    plain pickle.load would call whatever a planted file names, so _BatchUnpickler admits only numpy's arrays."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a corrupt pickle fails in many ways (UnpicklingError, EOFError, ValueError, ...)
        raise DatasetError(f"refusing to read {path} ({type(e).__name__}: {str(e)[:200]}); it is not an official "
                           f"CIFAR-10 batch: delete its folder and retry") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} holds a {type(batch).__name__}, expected a dict with data and labels")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: data has shape {getattr(data, 'shape', None)}, expected uint8 (n, 3072)")
    if labels is None or len(labels) != data.shape[0]:
        raise DatasetError(f"{path}: expected {data.shape[0]} labels, one per image")
    # Each row is the R plane, then G, then B, each 32x32 row-major: CHW -> HWC
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def load_cifar10(data_dir: str, download: bool = True) -> np.ndarray:
    """The 50,000 CIFAR-10 training images (data_batch_1..5, in order) as uint8 (N, 32, 32, 3).

    Lookup order: data_dir/cifar-10-batches-py/, else data_dir/cifar-10-python.tar.gz (MD5-checked, then
    extracted), else (if download) fetch the tarball from CIFAR10_URL first.
    """
    folder = os.path.join(data_dir, CIFAR10_FOLDER)
    tar_path = os.path.join(data_dir, CIFAR10_TARBALL)
    if not os.path.isdir(folder):
        if not os.path.isfile(tar_path):
            if not download:
                raise DatasetError(f"CIFAR-10 not found: put {CIFAR10_TARBALL} at {os.path.abspath(tar_path)}, "
                                   f"or use --dataset shapes, which works offline")
            _download(CIFAR10_URL, tar_path)
        try:
            got = _md5(tar_path)
        except OSError as e:
            raise DatasetError(f"cannot read {tar_path} ({e})") from None
        if got != CIFAR10_MD5:
            # We never delete a file the user may have put there by hand.
            raise DatasetError(f"{tar_path} is corrupt: MD5 is {got}, expected {CIFAR10_MD5}; delete it or "
                               f"replace it with the official file from {CIFAR10_URL}")
        _extract(tar_path, data_dir)
    batches = [_read_batch(os.path.join(folder, f"data_batch_{i}")) for i in range(1, 6)]
    return np.ascontiguousarray(np.concatenate(batches))


# -----------------------------------------------------------------------------
# An image folder, resized like ADM's center_crop_arr (we crop the square first, then resize)

def _square_resize(image: Image.Image, image_size: int) -> np.ndarray:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    # ADM: halve with BOX while the image is at least twice the target, so BICUBIC does not alias
    while image.size[0] >= 2 * image_size:
        image = image.resize((image.size[0] // 2,) * 2, resample=Image.BOX)
    return np.asarray(image.resize((image_size, image_size), resample=Image.BICUBIC))


def load_folder(path: str, image_size: int = 32) -> np.ndarray:
    """Every image under path (recursive, sorted), RGB, centre-cropped and resized: uint8 (N, S, S, 3)."""
    if not os.path.isdir(path):
        raise DatasetError(f"image folder {path} does not exist")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
    images = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    for i, file in enumerate(tqdm(files, desc="images", disable=len(files) < 1000)):
        try:
            with Image.open(file) as image:
                images[i] = _square_resize(image.convert("RGB"), image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"cannot read image {file} ({e})") from None
    return images


# -----------------------------------------------------------------------------
# Downsampled ImageNet 64x64 (Chrabaszcz, Loshchilov & Hutter 2017), the npz release IDDPM's ImageNet-64 models use:
# train_data_batch_1.npz ... train_data_batch_10.npz (in Imagenet64_train_part1/2_npz.zip), key "data": uint8 rows of
# 12,288 values, the R plane, then G, then B, each 64x64 row-major (the dataset's own loader stacks the three thirds).

IMAGENET64_FILES = ("train_data_batch_", "Imagenet64_train")
IMAGENET64_ROW = 3 * 64 * 64


def _npz_data_header(path: str) -> tuple:
    """(shape, dtype) of the "data" array of an .npz, from its .npy header, without reading the array."""
    with np.load(path, allow_pickle=False) as npz:
        if not isinstance(npz, np.lib.npyio.NpzFile) or "data" not in npz.files:
            raise ValueError("no 'data' array in it")
        with npz.zip.open("data.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    return shape, dtype


def load_imagenet64(path: str) -> np.ndarray:
    """Every training batch under path (recursive; batch 1, 2, ..., 10 in order) as uint8 (N, 3, 64, 64).

    The headers are read first, so that the 1.28M images (15.7 GB) are copied once into one array."""
    if not os.path.isdir(path):
        raise DatasetError(f"ImageNet 64x64 folder {path} does not exist")
    files = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names
             if name.startswith(IMAGENET64_FILES) and name.endswith(".npz")]
    files.sort(key=lambda f: (os.path.dirname(f), len(os.path.basename(f)), os.path.basename(f)))  # 2 before 10
    if not files:
        raise DatasetError(f"no train_data_batch_*.npz (downsampled ImageNet 64x64, npz release) found under {path}")
    counts = []
    for file in files:
        try:
            shape, dtype = _npz_data_header(file)
        except (OSError, ValueError, KeyError, EOFError) as e:  # not a zip, a truncated one, no data array, ...
            raise DatasetError(f"cannot read {file} ({type(e).__name__}: {e})") from None
        if dtype != np.uint8 or len(shape) != 2 or shape[1] != IMAGENET64_ROW:
            raise DatasetError(f"{file}: data is {dtype} of shape {shape}, expected uint8 rows of {IMAGENET64_ROW} "
                               f"values (64x64 RGB); is it the 64x64 release?")
        counts.append(shape[0])
    rows = np.empty((sum(counts), IMAGENET64_ROW), dtype=np.uint8)
    start = 0
    for file, n in zip(tqdm(files, desc="ImageNet 64x64", disable=len(files) < 2), counts):
        try:
            with np.load(file, allow_pickle=False) as npz:
                rows[start:start + n] = npz["data"]
        except (OSError, ValueError, EOFError) as e:
            raise DatasetError(f"cannot read {file} ({type(e).__name__}: {e})") from None
        start += n
    # channel-planar rows are CHW already: (N, 12288) -> (N, 3, 64, 64) without a copy
    return rows.reshape(-1, 3, 64, 64)


# -----------------------------------------------------------------------------
# "shapes" and "silhouettes": procedural toy datasets that need no download

def _gradient_t(u: np.ndarray, v: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Position in [0, 1] along direction theta, for u, v in [-0.5, 0.5] (0 and 1 at the extreme corners)."""
    cos, sin = np.cos(theta), np.sin(theta)
    return 0.5 + (u * cos + v * sin) / (np.abs(cos) + np.abs(sin))


def make_shapes(n: int, seed: int = 0, image_size: int = 32, silhouettes: bool = False) -> np.ndarray:
    """n procedural images, uint8 (n, S, S, 3), deterministic given seed, image_size and silhouettes.

    Parameters come from numpy.random.default_rng(seed), one row of 33 uniforms per image (so the
    first i images do not depend on n). With S = image_size and k = S / 32, each image is:
      1. Background: colours c0, c1 ~ U[0, 255]^3. With probability 1/2 it is plain c0; otherwise a linear
         gradient from c0 to c1 along a direction theta ~ U[0, 2 pi) spanning the whole image.
      2. Shapes: m ~ U{1, 2, 3} shapes, drawn in order (later on top). Each has a kind ~ U{disc, square,
         triangle}, centre ~ U[0.2 S, 0.8 S]^2, size r ~ U[4 k, 11 k] px and colour
         (b + o) mod 256, where b is the background colour at the centre and o ~ U[64, 192]^3, so every
         channel differs from the background there by at least 64 levels. A disc has radius r, an
         axis-aligned square has half-side r, and an equilateral triangle has circumradius 1.25 r and a
         rotation ~ U[0, 2 pi).
      3. Edges are anti-aliased with coverage clip(0.5 - d, 0, 1), d the signed distance to the edge in px.
    silhouettes=True (the "silhouettes" set, white shapes on black in the manner of dSprites, Matthey et al. 2017)
    reads the same uniforms but draws one shape (m = 1), white (255) on a black (0) background, with size
    r ~ U[8 k, 14 k] px. At 16x16 the demo UNet draws crisp shapes of this set within five minutes on one CPU core;
    on `shapes` it still draws soft blobs then (README, Set-up).
    """
    S, k = image_size, image_size / 32
    u = np.random.default_rng(seed).random((n, 33))
    c0, c1 = 255 * u[:, 0:3], 255 * u[:, 3:6]
    gradient = u[:, 6] < 0.5
    theta = 2 * math.pi * u[:, 7]
    m = np.ones(n, dtype=int) if silhouettes else 1 + (3 * u[:, 8]).astype(int)
    shape_u = u[:, 9:].reshape(n, 3, 8)  # per shape slot: kind, cx, cy, r, offset (3), rotation
    kind = (3 * shape_u[..., 0]).astype(int)  # 0 disc, 1 square, 2 triangle
    cx, cy = S * (0.2 + 0.6 * shape_u[..., 1]), S * (0.2 + 0.6 * shape_u[..., 2])
    r = k * ((8 + 6 * shape_u[..., 3]) if silhouettes else (4 + 7 * shape_u[..., 3]))
    offset = 64 + 128 * shape_u[..., 4:7]
    rotation = 2 * math.pi * shape_u[..., 7]
    c1 = np.where(gradient[:, None], c1, c0)
    t_centre = _gradient_t(cx / S - 0.5, cy / S - 0.5, theta[:, None])  # (n, 3)
    colour = (c0[:, None] + t_centre[..., None] * (c1 - c0)[:, None] + offset) % 256  # (n, 3 shapes, 3 RGB)
    if silhouettes:  # black background, white shape
        c0, c1, colour = np.zeros_like(c0), np.zeros_like(c1), np.full_like(colour, 255.0)

    # Render in float32, 1000 images at a time, to bound memory (a chunk is ~12 MB)
    c0, c1, colour, theta, cx, cy, r, rotation = (
        a.astype(np.float32) for a in (c0, c1, colour, theta, cx, cy, r, rotation))
    coords = np.arange(S, dtype=np.float32) + 0.5  # pixel centres
    out = np.empty((n, S, S, 3), dtype=np.uint8)
    for lo in range(0, n, 1000):
        sl = slice(lo, min(lo + 1000, n))
        t = _gradient_t(coords[None, None, :] / S - 0.5, coords[None, :, None] / S - 0.5, theta[sl, None, None])
        img = c0[sl, None, None] + t[..., None] * (c1 - c0)[sl, None, None]  # (b, S, S, 3)
        for j in range(3):
            dx = coords[None, None, :] - cx[sl, j, None, None]  # (b, 1, S)
            dy = coords[None, :, None] - cy[sl, j, None, None]  # (b, S, 1)
            rj, kj = r[sl, j, None, None], kind[sl, j, None, None]
            d_disc = np.sqrt(dx ** 2 + dy ** 2) - rj
            d_square = np.maximum(np.abs(dx), np.abs(dy)) - rj
            # Triangle: max over its 3 edge normals of (distance along the normal - inradius), inradius = R / 2
            along = [dx * np.cos(a) + dy * np.sin(a) for a in (rotation[sl, j, None, None] + i * 2 * math.pi / 3
                                                               for i in range(3))]
            d_triangle = np.maximum(np.maximum(along[0], along[1]), along[2]) - 0.625 * rj
            d = np.where(kj == 0, d_disc, np.where(kj == 1, d_square, d_triangle))
            alpha = np.clip(0.5 - d, 0, 1) * (j < m[sl, None, None])  # (b, S, S); 0 for unused slots
            img += alpha[..., None] * (colour[sl, j, None, None] - img)
        out[sl] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def shapes_labels(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The generator's own labels of make_shapes(n, seed, any image_size), read from the same uniforms (row i is
    image i): "count" m in {1, 2, 3} (n,); "kind" (n, 3) per slot in drawing order, 0 disc, 1 square, 2 triangle,
    -1 for an unused slot; "gradient" (n,) bool, False for a plain background. experiments/claim_images.py trains
    its feature network on them."""
    u = np.random.default_rng(seed).random((n, 33))  # the same draw as make_shapes: keep in sync
    count = 1 + (3 * u[:, 8]).astype(int)
    kind = (3 * u[:, 9:].reshape(n, 3, 8)[..., 0]).astype(int)
    kind = np.where(np.arange(3)[None, :] < count[:, None], kind, -1)
    return dict(count=count, kind=kind, gradient=u[:, 6] < 0.5)


# -----------------------------------------------------------------------------
# 2-D point sets with known densities, inside [-1, 1]^2 because the VP samplers clip x0_hat to [-1, 1]

POINT_SETS = ("ring", "checkerboard")


def make_points(name: str, n: int, seed: int = 0) -> np.ndarray:
    """n points of a 2-D density, float32 (n, 2), deterministic given seed.

    ring: the "8 Gaussians" toy rescaled: an equal mixture of N(c_k, 0.05^2 I), c_k = 0.7 (cos 2 pi k/8, sin 2 pi k/8).
    checkerboard: the 4x4 checkerboard of FFJORD (Grathwohl et al. 2019), uniform on the 8 cells (r, c) of
    [-2, 2]^2 with r + c even, scaled by 0.45 into [-0.9, 0.9]^2.
    """
    rng = np.random.default_rng(seed)
    if name == "ring":
        angle = 2 * math.pi * rng.integers(0, 8, n) / 8
        points = 0.7 * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.05 * rng.standard_normal((n, 2))
    elif name == "checkerboard":
        col = rng.integers(0, 4, n)
        row = 2 * rng.integers(0, 2, n) + col % 2  # row + col is even
        points = 0.45 * (np.stack([col, row], 1) - 2 + rng.random((n, 2)))
    else:
        raise DatasetError(f"unknown point set {name!r}; choose one of {', '.join(POINT_SETS)}")
    return points.astype(np.float32)


def save_scatter(points: torch.Tensor, path: str, size: int = 256) -> None:
    """Write (N, 2) points in [-1, 1]^2 as a size x size grey-scale density image (darker = more points)."""
    xy = points.detach().cpu().double().numpy()
    # rows run top to bottom, so y is flipped; points outside [-1, 1]^2 are dropped
    counts, _, _ = np.histogram2d(-xy[:, 1], xy[:, 0], bins=size, range=[[-1, 1], [-1, 1]])
    level = np.clip(counts / max(np.percentile(counts[counts > 0], 99), 1) if counts.any() else counts, 0, 1)
    Image.fromarray((255 * (1 - level)).astype(np.uint8)).save(path)


# -----------------------------------------------------------------------------
# The interface the training scripts use

def default_image_size(name: str) -> int:
    """S of a dataset's (3, S, S) images when none is asked for: 64 (imagenet64:DIR), 16 (silhouettes), else 32."""
    return 64 if name.startswith("imagenet64:") else 16 if name == "silhouettes" else 32


def grid_scale(image_size: int) -> int:
    """How much save_image_grid enlarges images smaller than 32 px (2 for 16x16), so that a grid stays visible."""
    return max(1, 32 // image_size)


def load_dataset(name: str, data_dir: str = "./data", seed: int = 0, num_shapes: int = 10000,
                 image_size: int | None = None, num_points: int = 100_000) -> torch.Tensor:
    """The dataset called "cifar10", "shapes", "silhouettes", "folder:PATH" (any image_size) or "imagenet64:DIR"
    (downsampled ImageNet 64x64 npz batches), as one uint8 (N, 3, S, S) tensor, S = image_size or
    default_image_size(name); a point set ("ring", "checkerboard") as float32 (num_points, 2)."""
    image_size = image_size or default_image_size(name)
    if name in POINT_SETS:
        return torch.from_numpy(make_points(name, num_points, seed))
    if name.startswith("imagenet64:") and name[len("imagenet64:"):]:
        if image_size != 64:
            raise DatasetError(f"imagenet64 images are 64x64, but image_size={image_size} was asked for")
        return torch.from_numpy(load_imagenet64(name[len("imagenet64:"):]))  # (N, 3, 64, 64) already
    if name == "cifar10":
        if image_size != 32:
            raise DatasetError(f"cifar10 images are 32x32, but image_size={image_size} was asked for")
        images = load_cifar10(data_dir)
    elif name in ("shapes", "silhouettes"):
        images = make_shapes(num_shapes, seed, image_size, silhouettes=name == "silhouettes")
    elif name.startswith("folder:") and name[len("folder:"):]:
        images = load_folder(name[len("folder:"):], image_size)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose cifar10, shapes, silhouettes or folder:PATH (images), "
                           f"imagenet64:DIR (downsampled ImageNet 64x64 npz batches), or {' / '.join(POINT_SETS)} "
                           f"(2-D points)")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)


def random_batch(images: torch.Tensor, batch_size: int, generator: torch.Generator,
                 flip: bool = True) -> torch.Tensor:
    """x0: batch_size images drawn uniformly with replacement, each flipped left-right with p = 1/2.

    images is uint8 (N, 3, S, S); everything stays on images.device (generator must live there too), with
    no host sync. Returns float32 (B, 3, S, S) in [-1, 1]. A floating-point tensor (a point set, (N, d)) is
    already x0: its rows are returned as they are, never flipped.
    """
    index = torch.randint(0, images.shape[0], (batch_size,), generator=generator, device=images.device)
    if images.is_floating_point():
        return images[index]  # (B, d)
    x0 = images[index].float() / 127.5 - 1  # (B, 3, S, S)
    if flip:
        mirror = torch.rand(batch_size, generator=generator, device=images.device) < 0.5
        x0 = torch.where(mirror[:, None, None, None], x0.flip(3), x0)
    return x0


def save_image_grid(images: torch.Tensor, path: str, nrow: int | None = None, scale: int = 1) -> None:
    """Write (B, 3, H, W) images, float in [-1, 1] or uint8, as one PNG grid with 2 px black padding, every pixel
    repeated scale x scale times (nearest neighbour: 16x16 images stay crisp and visible)."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise DatasetError(f"expected images of shape (B, 3, H, W) with B > 0, got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if nrow is not None and nrow < 1:
        raise DatasetError(f"nrow must be at least 1, got {nrow}")
    if scale < 1:
        raise DatasetError(f"scale must be at least 1, got {scale}")
    B, _, H, W = images.shape
    ncol = min(nrow or math.ceil(math.sqrt(B)), B)
    nrows, pad = math.ceil(B / ncol), 2
    grid = np.zeros((nrows * (H + pad) + pad, ncol * (W + pad) + pad, 3), dtype=np.uint8)
    hwc = images.cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    for i in range(B):
        top, left = pad + (i // ncol) * (H + pad), pad + (i % ncol) * (W + pad)
        grid[top:top + H, left:left + W] = hwc[i]
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DatasetError(f"cannot write {path}: folder {folder} does not exist")
    try:
        with _atomic_file(path) as f:
            Image.fromarray(grid).save(f, format="PNG")
    except OSError as e:
        raise DatasetError(f"cannot write {path} ({e})") from None


# -----------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Save a grid of real training images.")
    parser.add_argument("--dataset", default="shapes", help="cifar10, shapes, silhouettes, folder:PATH, ring or "
                                                            "checkerboard; default shapes")
    parser.add_argument("--data-dir", default="./data", help="where CIFAR-10 is found or downloaded to")
    parser.add_argument("--out", default="grid.png", help="PNG file to write")
    parser.add_argument("--num", type=int, default=64, help="how many images to show")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shapes dataset")
    return parser.parse_args()


def main(args: argparse.Namespace) -> None:
    try:
        if args.num < 1:
            raise DatasetError(f"--num must be at least 1, got {args.num}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):  # fail before a long download
            raise DatasetError(f"cannot write {args.out}: its folder does not exist")
        images = load_dataset(args.dataset, args.data_dir, seed=args.seed)
        print(f"{args.dataset}: {images.shape[0]} samples, shape {tuple(images.shape)}, {images.dtype}")
        if images.is_floating_point():  # a point set: all of it as one scatter image
            save_scatter(images, args.out)
            print(f"wrote a scatter image of {images.shape[0]} points to {args.out}")
            return
        save_image_grid(images[:args.num], args.out, scale=grid_scale(images.shape[-1]))
        print(f"wrote {min(args.num, images.shape[0])} images to {args.out}")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(parse_args())
