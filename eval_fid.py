"""Fréchet Inception Distance (FID), computed exactly as pytorch-fid 0.3.0 computes it.

Paper: Wang et al. 2025, arXiv:2502.17099v1; FID is the sample-quality metric of its experiments (50k samples
       vs the 50k CIFAR-10 training images; docs/method.md §7).
Borrowed: FID = Fréchet distance of two Gaussians fitted to Inception pool3 features (Heusel et al. 2017,
       arXiv:1706.08500); the closed form for Gaussians is Dowson & Landau 1982. Network, weights and
       preprocessing: pytorch-fid 0.3.0 (Seitzer 2020), a PyTorch port of the TensorFlow graph
       inception-2015-12-05 (Inception-v3, Szegedy et al. 2016) that TTUR, the original FID code, used.
Uses: data.py (only for --ref cifar10).     Used by: nothing (entry script).
Run:  python eval_fid.py samples.npz --ref cifar10                  # 50k samples vs CIFAR-10 train
      python eval_fid.py run_a/samples.npz run_b/samples.npz --batch-size 200
      python eval_fid.py small_a.npz small_b.npz --device cpu          # 200 images each: 1-3 min on 2 CPU cores
      python eval_fid.py a_stats.npz b_stats.npz                       # two saved (mu, sigma): no weights needed

Weights: pt_inception-2015-12-05-6726825d.pth (about 91 MB), pytorch-fid's release file. Taken from --weights,
else from the cache dir (--cache-dir, default $XDG_CACHE_HOME/adv_diffusion or ~/.cache/adv_diffusion). When it
is missing there it is downloaded from WEIGHTS_URL, announced on stderr (never silently), and its SHA-256 is
checked. Without network, put the file in the cache dir by hand (the error message prints the full path).
Images are scored as uint8 (what the sampler writes and PNGs hold), so samples are quantised before scoring,
as with pytorch-fid on a folder of PNGs.

Symbols: feature mean μ -> mu, feature covariance Σ -> sigma (pytorch-fid's names; here sigma is a covariance
matrix, not EDM's noise level), pool3 features -> feats (N, 2048).
"""
import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
# Torch-hub convention: the 8 hex digits in the file name are the start of the file's SHA-256. Only this
# prefix is published, so it is all we can check.
WEIGHTS_SHA256_PREFIX = "6726825d"
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # pytorch-fid's


class FIDError(Exception):
    """A bad input or a missing/corrupt weights file; the CLI prints it as one `error: ...` line."""


# The FID Inception-v3. Module attribute names are torchvision's, so the state-dict keys are exactly those of
# pytorch-fid's weight file (e.g. `Mixed_5b.branch_pool.conv.weight`) and load_state_dict(strict=True) works.

class ConvBN(nn.Module):
    """torchvision's BasicConv2d: conv without bias -> BatchNorm (TF's eps 0.001) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    # TF's average pool ignores the zero padding: count_include_pad=False (PyTorch's default divides by 9).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def max_pool_3x3(x):
    # The last block of the TF graph max-pools here (pytorch-fid: probably a bug in the graph; FID inherits it).
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):  # 35x35 blocks Mixed_5b..5d
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):  # grid reduction 35 -> 17, Mixed_6a (torchvision's block unchanged)
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # 17x17 blocks Mixed_6b..6e, factorised 7x7 convolutions
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):  # grid reduction 17 -> 8, Mixed_7a (torchvision's block unchanged)
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8 blocks Mixed_7b (pool=avg_pool_3x3) and Mixed_7c (pool=max_pool_3x3)
    def __init__(self, c_in: int, pool):
        super().__init__()
        self.pool = pool  # a plain function, so it adds nothing to the state dict
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        return torch.cat([self.branch1x1(x), b3, b3d, self.branch_pool(self.pool(x))], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in TF graph inception-2015-12-05; forward returns the 2048-d pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool=avg_pool_3x3)
        self.Mixed_7c = InceptionE(2048, pool=max_pool_3x3)
        self.fc = nn.Linear(2048, 1008)  # the graph's 1008-class head: unused by FID, kept so the file loads strictly

    def forward(self, x):
        """x: (N, 3, H, W) uint8 in [0, 255] or float in [0, 1], any H, W. Returns (N, 2048) float32."""
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        # pytorch-fid: bilinear resize (no antialiasing) to 299x299, then [0, 1] -> [-1, 1]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for stem in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = stem(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # (N, 2048, 8, 8) after Mixed_7c
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # pool3: (N, 2048)


# Weights: explicit path, else cache, else an announced, hash-checked download.

def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adv_diffusion"


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(dest: Path) -> None:
    """Download WEIGHTS_URL to dest via a temp file; hash-check, then rename atomically."""
    print(f"downloading the FID Inception weights (~91 MB) from {WEIGHTS_URL} to {dest}", file=sys.stderr)
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(WEIGHTS_URL, timeout=60) as response:
            with tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                      desc="weights") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if not digest.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
            raise FIDError(f"the download from {WEIGHTS_URL} has SHA-256 {digest.hexdigest()[:8]}..., expected "
                           f"{WEIGHTS_SHA256_PREFIX}...; deleted it")
        os.replace(tmp, dest)
        tmp = None
    except (OSError, http.client.HTTPException) as e:
        raise FIDError(f"could not download the FID Inception weights ({e}); download {WEIGHTS_URL} by hand "
                       f"and save it as {dest} (or pass --weights PATH)") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def find_weights(weights_path=None, cache_dir=None, check_hash: bool = True) -> tuple[Path, str]:
    """(path, sha256) of the weights: --weights, else the cache, downloading into it only when missing.

    A user's --weights file with the wrong hash is refused but left in place (not ours to delete); a cached one
    is refused and deleted, so the next run downloads a fresh copy. check_hash=False (--no-hash-check) applies
    to --weights only and exists for tests with random weights: such FIDs are comparable with nothing.
    """
    mine = weights_path is not None
    path = Path(weights_path) if mine else Path(cache_dir or default_cache_dir()) / WEIGHTS_NAME
    if mine and not path.is_file():
        raise FIDError(f"weights file not found: {path}")
    if not path.is_file():
        download_weights(path)
    digest = sha256_of(path)
    if digest.startswith(WEIGHTS_SHA256_PREFIX) or (mine and not check_hash):
        return path, digest
    found = f"{path} has SHA-256 {digest[:8]}..., expected {WEIGHTS_SHA256_PREFIX}... ({WEIGHTS_NAME})"
    if mine:
        raise FIDError(f"{found}; refusing to use it (file left in place)")
    path.unlink()
    raise FIDError(f"cached weights {found}; deleted the file, run again to download {WEIGHTS_URL}")


def load_inception(weights_path=None, cache_dir=None, device="cpu", check_hash: bool = True) -> FIDInceptionV3:
    """The FID Inception in eval mode on `device`; `model.weights_sha256` keys the cached reference stats."""
    path, digest = find_weights(weights_path, cache_dir, check_hash)
    model = FIDInceptionV3()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)  # 472 keys, or 566 with BN's num_batches_tracked
    except Exception as e:  # unpickling and key/shape mismatches raise many different types
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FIDError(f"{path} is not an FID Inception state dict: {first_line}") from e
    model.weights_sha256 = digest
    return model.to(device).eval().requires_grad_(False)


# Statistics (mu, sigma) of the pool3 features, and the Fréchet distance between two Gaussians.

def check_images(images, name: str) -> np.ndarray:
    images = np.asarray(images)
    if not (images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3):
        raise FIDError(f"{name}: expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) < 2:
        raise FIDError(f"{name}: need at least 2 images for a covariance, got {len(images)}")
    return images


@torch.no_grad()
def compute_statistics(images: np.ndarray, model: nn.Module, batch_size: int = 50,
                       device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """images: uint8 (N, H, W, 3). Returns mu (2048,) and the unbiased covariance sigma (2048, 2048), float64."""
    images = check_images(images, "images")
    feats = np.empty((len(images), 2048), dtype=np.float64)  # float32 features collected in float64, like pytorch-fid
    # Deviation: pytorch-fid leaves cuDNN's TF32 convolutions on (PyTorch's default on Ampere and later). On an H200
    # that moved features by 6e-4 and a test FID by 7e-4 (relative); in fp32, GPU and CPU agree to 3e-6, at ~1/3 speed.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for start in tqdm(range(0, len(images), batch_size), desc="Inception features", unit="batch"):
            batch = torch.from_numpy(images[start:start + batch_size]).to(device).permute(0, 3, 1, 2)  # (B, 3, H, W)
            feats[start:start + len(batch)] = model(batch).cpu().numpy()
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ1 Σ2)^(1/2)) via eigenvalues, float64.

    With R = Σ1^(1/2), Σ1 Σ2 = R (R Σ2) has the eigenvalues of (R Σ2) R = R Σ2 R (AB and BA share them), a
    symmetric PSD matrix; so they are real and >= 0, and tr((Σ1 Σ2)^(1/2)) is the sum of their square roots.
    Clipping at 0 removes the tiny negative round-off of rank-deficient covariances (N < 2049 images); the
    positive round-off left over gives |FID| ~ 1e-6 tr(Σ) for identical stats of a handful of images.
    """
    try:
        w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
        R = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Σ1^(1/2)
        A = R @ sigma2 @ R
        return float(np.sqrt(np.clip(np.linalg.eigvalsh((A + A.T) / 2), 0, None)).sum())
    except np.linalg.LinAlgError:  # LAPACK did not converge; the caller retries with an offset
        return float("nan")


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """FID = |mu1 - mu2|^2 + tr(Σ1) + tr(Σ2) - 2 tr((Σ1 Σ2)^(1/2)), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                       f"{sigma2.shape} (expected (D,) and (D, D))")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise FIDError("statistics contain NaN or inf")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    if not np.isfinite(tr_covmean):
        # pytorch-fid's safeguard (never seen to trigger with this eigen route on finite input): offset BOTH
        # covariances by eps*I and retry; it changes FID by ~1e-6 relative.
        print(f"FID: singular product; adding {eps} to the diagonal of both covariances", file=sys.stderr)
        offset = eps * np.eye(d)
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
        if not np.isfinite(tr_covmean):
            raise FIDError("tr((Σ1 Σ2)^(1/2)) is not finite even with the eps offset")
    # Heusel et al. 2017 (FID); Dowson & Landau 1982 (Fréchet distance of Gaussians)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# Inputs: an npz of uint8 images (arr_0), a folder of images, a stats npz (mu, sigma), or `cifar10`.

def read_input(source: str):
    """Return ("stats", (mu, sigma)), ("images", uint8 NHWC) or ("cifar10", None) without running the network."""
    if source == "cifar10":
        return "cifar10", None
    path = Path(source)
    if path.is_dir():
        return "images", read_folder(path)
    if not path.is_file():
        raise FIDError(f"no such file or folder: {source}")
    try:
        npz = np.load(path)  # a .npy file gives a plain array instead
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise FIDError(f"{source}: expected an .npz file (arr_0, or mu and sigma), got a plain array file")
        with npz:
            if "mu" in npz and "sigma" in npz:
                return "stats", (npz["mu"], npz["sigma"])
            if "arr_0" not in npz:
                raise FIDError(f"{source}: npz has neither `arr_0` (images) nor `mu` and `sigma` (statistics); "
                               f"keys: {sorted(npz.keys())}")
            images = npz["arr_0"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not numpy, truncated, pickled objects
        raise FIDError(f"{source}: cannot read as .npz ({e})") from e
    return "images", check_images(images, source)


def read_folder(folder: Path) -> np.ndarray:
    """All images directly in `folder` (sorted names, like pytorch-fid), as uint8 RGB (N, H, W, 3).

    pytorch-fid batches the images without resizing them first, so a folder with mixed sizes fails there; we
    require one size for the whole folder. It is held in memory: 50k CIFAR-sized images take 150 MB.
    """
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FIDError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
    images = []
    for p in files:  # no progress bar, so that a bad folder ends in one error line
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB")))
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise FIDError(f"{p}: cannot read image ({e})") from e
        if images[-1].shape != images[0].shape:
            (h0, w0), (h, w) = images[0].shape[:2], images[-1].shape[:2]
            raise FIDError(f"{folder}: images differ in size ({files[0].name} is {h0}x{w0}, {p.name} is {h}x{w}); "
                           "resize them to one size first")
    return check_images(np.stack(images), str(folder))


def save_statistics(path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write mu, sigma to exactly `path` (np.savez on a name would append .npz), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    os.replace(tmp, path)


def cifar10_statistics(model, data_dir, cache_dir, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of the 50k CIFAR-10 training images, computed once per weights file and cached."""
    cached = Path(cache_dir) / f"fid_stats_cifar10_train_{model.weights_sha256[:16]}.npz"
    if cached.is_file():
        with np.load(cached) as npz:
            return npz["mu"], npz["sigma"]
    try:
        import data  # only here: the other inputs need nothing from this repo
        images = data.load_cifar10(data_dir)
    except ImportError as e:
        raise FIDError(f"`cifar10` needs data.py next to eval_fid.py ({e})") from e
    except data.DatasetError as e:
        raise FIDError(str(e)) from e
    print(f"computing CIFAR-10 train statistics once; cached at {cached}", file=sys.stderr)
    mu, sigma = compute_statistics(check_images(images, "cifar10"), model, batch_size, device)
    save_statistics(cached, mu, sigma)
    return mu, sigma


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FID exactly as pytorch-fid 0.3.0 (Inception pool3, 2048-d).")
    p.add_argument("inputs", nargs="+", help="one or two of: npz of uint8 images (arr_0, N x H x W x 3), "
                   "folder of images, stats npz (mu, sigma), or the word cifar10 (CIFAR-10 train via data.py)")
    p.add_argument("--ref", default=None, help="second input, e.g. cifar10 (the paper's protocol: 50k samples vs "
                   "the 50k training images)")
    p.add_argument("--save-stats", default=None, help="write mu, sigma of the first input to this .npz")
    p.add_argument("--data-dir", default="./data", help="where data.py finds CIFAR-10; default ./data")
    p.add_argument("--weights", default=None, help=f"path to {WEIGHTS_NAME}; default: the cache dir")
    p.add_argument("--cache-dir", default=None, help="weights and cached CIFAR-10 stats; default "
                   "$XDG_CACHE_HOME/adv_diffusion or ~/.cache/adv_diffusion")
    p.add_argument("--no-hash-check", action="store_true", help="accept a --weights file whose SHA-256 does not "
                   f"start with {WEIGHTS_SHA256_PREFIX} (tests with random weights; FID is then meaningless)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default cuda if available")
    p.add_argument("--batch-size", type=int, default=50, help="Inception batch; pytorch-fid's default 50 "
                   "(last batch may be smaller; results depend on it only through float32 round-off)")
    return p.parse_args(argv)


def run(args) -> None:
    sources = args.inputs + ([args.ref] if args.ref else [])
    if len(sources) > 2 or (len(sources) == 1 and not args.save_stats):
        raise FIDError(f"give two inputs to compare (or one with --save-stats), got {len(sources)}")
    if args.batch_size < 1:
        raise FIDError("--batch-size must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise FIDError(f"--device {args.device} but CUDA is not available here; use --device cpu")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    inputs = [read_input(s) for s in sources]  # every cheap check before the network is loaded
    if any(kind != "stats" for kind, _ in inputs):
        model = load_inception(args.weights, cache_dir, args.device, check_hash=not args.no_hash_check)
    stats = []
    for source, (kind, value) in zip(sources, inputs):
        if kind == "stats":
            stats.append(value)
        elif kind == "cifar10":
            stats.append(cifar10_statistics(model, args.data_dir, cache_dir, args.batch_size, args.device))
        else:
            print(f"{source}: {len(value)} images of {value.shape[1]}x{value.shape[2]}", file=sys.stderr)
            stats.append(compute_statistics(value, model, args.batch_size, args.device))
    if args.save_stats:
        save_statistics(args.save_stats, *stats[0])
        print(f"saved the statistics of {sources[0]} to {args.save_stats}", file=sys.stderr)
    if len(stats) == 2:
        print(f"FID: {frechet_distance(*stats[0], *stats[1])}")


def main(args) -> None:
    try:
        run(args)
    except FIDError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(parse_args())
