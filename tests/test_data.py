"""Checks of data.py: CIFAR-10 reading, verifying, safe extraction and download (on tiny tarballs written here
in the official format, never from the network), the shapes set, random batches, image folders, grids, CLI
errors. The CLI's normal run is tested on a lone copy of data.py in tests/test_standalone.py."""

import hashlib
import math
import io
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

BATCH_SIZES = (3, 2, 4, 1, 2)  # images per data_batch_i; the real files hold 10,000 each


def write_batches(folder: Path, width: int = 3072) -> list:
    """Write data_batch_1..5 in the official layout (a dict with bytes keys, numpy uint8 data); return the data arrays.

    The official files are Python 2 protocol-2 pickles, whose byte strings need no global. Python 3 writes bytes at
    protocol 2 through _codecs.encode, which the safe reader refuses, so we write protocol 4: the same globals as
    the official files (numpy's _reconstruct, ndarray, dtype) and nothing else."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = []
    for i, n in enumerate(BATCH_SIZES, start=1):
        array = rng.integers(0, 256, (n, width), dtype=np.uint8)
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"data": array,
                 b"labels": [int(x) for x in rng.integers(0, 10, n)], b"filenames": [b"x.png"] * n}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f, protocol=4)
        arrays.append(array)
    return arrays


def expected_hwc(arrays: list) -> np.ndarray:
    return np.concatenate(arrays).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def tarball(tmp_path):
    """A tiny cifar-10-python.tar.gz outside any data dir, and the arrays it holds."""
    arrays = write_batches(tmp_path / "src" / "cifar-10-batches-py")
    path = tmp_path / "src" / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return path, arrays


@pytest.fixture
def no_network(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data.py tried to download")
    monkeypatch.setattr(data.urllib.request, "urlopen", fail)


def test_cifar_tarball_is_read_back_exactly(tarball, tmp_path, monkeypatch, no_network):
    """A verified official-format tarball is extracted and gives every pixel back, CHW rows -> HWC images."""
    path, arrays = tarball
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(data, "CIFAR10_MD5", md5(path))
    images = data.load_cifar10(str(data_dir))
    assert images.dtype == np.uint8 and images.shape == (sum(BATCH_SIZES), 32, 32, 3)
    np.testing.assert_array_equal(images, expected_hwc(arrays))
    # Row layout by hand: channel c, row y, column x sits at c * 1024 + y * 32 + x
    assert images[3, 5, 7, 2] == arrays[1][0, 2 * 1024 + 5 * 32 + 7]
    assert sorted(os.listdir(data_dir)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar_tarball_with_wrong_md5_is_refused_and_kept(tarball, tmp_path, no_network):
    """A tarball whose MD5 is not the official one is refused with both hashes named, and not deleted."""
    path, _ = tarball
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / path.name).write_bytes(path.read_bytes())
    with pytest.raises(data.DatasetError) as info:
        data.load_cifar10(str(data_dir))
    message = str(info.value)
    assert "corrupt" in message and data.CIFAR10_MD5 in message and md5(path) in message
    assert "delete" in message and "\n" not in message
    assert os.listdir(data_dir) == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_tarball_is_refused(tmp_path, monkeypatch, kind, no_network):
    """A tarball with a ../ member, an absolute path or a link is refused and nothing is written outside data_dir."""
    data_dir = tmp_path / "deep" / "data"
    data_dir.mkdir(parents=True)
    path = data_dir / "cifar-10-python.tar.gz"
    name = {"dotdot": "../evil", "absolute": str(tmp_path / "abs_evil"), "symlink": "cifar-10-batches-py/x"}[kind]
    with tarfile.open(path, "w:gz") as tar:
        member = tarfile.TarInfo(name)
        if kind == "symlink":
            member.type, member.linkname = tarfile.SYMTYPE, str(tmp_path / "target")
            tar.addfile(member)
        else:
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
    monkeypatch.setattr(data, "CIFAR10_MD5", md5(path))
    with pytest.raises(data.DatasetError, match="refusing"):
        data.load_cifar10(str(data_dir))
    assert not (data_dir.parent / "evil").exists() and not (tmp_path / "abs_evil").exists()
    assert os.listdir(data_dir) == ["cifar-10-python.tar.gz"]  # no temp folder left behind


def test_extracted_folder_is_used_without_download(tmp_path, no_network):
    """An extracted cifar-10-batches-py/ folder is read directly, with no download attempted."""
    arrays = write_batches(tmp_path / "data" / "cifar-10-batches-py")
    np.testing.assert_array_equal(data.load_cifar10(str(tmp_path / "data")), expected_hwc(arrays))


def test_batch_with_wrong_shape_is_refused(tmp_path, no_network):
    """A batch whose rows are not 3 x 32 x 32 = 3072 bytes is refused with a clear message."""
    write_batches(tmp_path / "data" / "cifar-10-batches-py", width=3000)
    with pytest.raises(data.DatasetError, match="3072"):
        data.load_cifar10(str(tmp_path / "data"))


def test_download_from_file_url_is_verified(tarball, tmp_path, monkeypatch):
    """Downloading (here from a file:// URL) lands the tarball after an MD5 check; a wrong MD5 leaves nothing."""
    path, arrays = tarball
    monkeypatch.setattr(data, "CIFAR10_URL", path.as_uri())
    monkeypatch.setattr(data, "CIFAR10_MD5", "0" * 32)
    data_dir = tmp_path / "fresh"
    with pytest.raises(data.DatasetError, match="0" * 32):
        data.load_cifar10(str(data_dir))
    assert os.listdir(data_dir) == []  # the temp file was deleted
    monkeypatch.setattr(data, "CIFAR10_MD5", md5(path))
    np.testing.assert_array_equal(data.load_cifar10(str(data_dir)), expected_hwc(arrays))
    assert md5(data_dir / "cifar-10-python.tar.gz") == md5(path)
    assert sorted(os.listdir(data_dir)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_unreachable_url_says_where_to_put_the_tarball(tmp_path, monkeypatch):
    """A failed download names the full path for a hand-placed tarball and the offline shapes dataset."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data, "CIFAR10_URL", "http://127.0.0.1:9/none.tar.gz")
    with pytest.raises(data.DatasetError) as info:
        data.load_cifar10(str(tmp_path / "data"))
    message = str(info.value)
    assert os.path.abspath(tmp_path / "data" / "cifar-10-python.tar.gz") in message
    assert "--dataset shapes" in message and "\n" not in message
    assert os.listdir(tmp_path / "data") == []


def test_make_shapes_is_deterministic_and_varied():
    """make_shapes is a function of the seed, differs across seeds, spans the pixel range and has a stable prefix."""
    a, b, c = data.make_shapes(200, seed=1), data.make_shapes(200, seed=1), data.make_shapes(200, seed=2)
    assert a.shape == (200, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    assert a.min() < 10 and a.max() > 245 and a.std() > 40
    assert all(len(np.unique(image.reshape(-1, 3), axis=0)) > 2 for image in a)  # a shape on every background
    np.testing.assert_array_equal(data.make_shapes(20, seed=1), a[:20])
    assert data.make_shapes(4, image_size=16).shape == (4, 16, 16, 3)


def test_random_batch_range_shape_and_determinism():
    """random_batch gives float32 (B, 3, S, S) x0 in [-1, 1], the same for the same generator seed."""
    images = torch.from_numpy(data.make_shapes(50)).permute(0, 3, 1, 2)
    first = data.random_batch(images, 16, torch.Generator().manual_seed(0))
    again = data.random_batch(images, 16, torch.Generator().manual_seed(0))
    other = data.random_batch(images, 16, torch.Generator().manual_seed(1))
    assert first.shape == (16, 3, 32, 32) and first.dtype == torch.float32
    assert first.min() >= -1 and first.max() <= 1 and first.min() == -1 and first.max() == 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_random_batch_flips_half_the_samples():
    """With flip=True each sample is the image or its mirror, each about half the time; flip=False never mirrors."""
    image = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    image[..., 2:] = 255  # left half black, right half white
    x0 = data.random_batch(image, 400, torch.Generator().manual_seed(0))
    flipped = x0[:, 0, 0, 0] == 1
    assert torch.equal(x0[flipped], image.flip(3).float().div(127.5).sub(1).expand(int(flipped.sum()), -1, -1, -1))
    assert torch.equal(x0[~flipped], image.float().div(127.5).sub(1).expand(int((~flipped).sum()), -1, -1, -1))
    assert 150 < int(flipped.sum()) < 250
    assert (data.random_batch(image, 100, torch.Generator().manual_seed(0), flip=False)[:, 0, 0, 0] == -1).all()


def test_load_folder_crops_and_resizes(tmp_path):
    """load_folder walks subfolders, takes png/jpg/bmp of any size and gives sorted uint8 (N, S, S, 3)."""
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 50), (255, 0, 0)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "imgs" / "sub" / "b.JPG")
    Image.new("L", (20, 30), 200).save(tmp_path / "imgs" / "c.bmp")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    images = data.load_folder(str(tmp_path / "imgs"), image_size=16)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], np.full((16, 16, 3), (255, 0, 0)))  # a.png < c.bmp < sub/b.JPG
    np.testing.assert_array_equal(images[1], np.full((16, 16, 3), 200))
    assert np.abs(images[2].astype(int) - (0, 0, 255)).max() < 8  # JPEG is lossy
    tensor = data.load_dataset(f"folder:{tmp_path / 'imgs'}", image_size=16)
    assert tensor.shape == (3, 3, 16, 16) and torch.equal(tensor, torch.from_numpy(images).permute(0, 3, 1, 2))


def test_load_folder_refuses_empty_missing_and_broken(tmp_path):
    """An empty or missing folder, or an unreadable image, raises DatasetError naming the problem."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match="no images"):
        data.load_folder(str(tmp_path / "empty"))
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.load_folder(str(tmp_path / "missing"))
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(data.DatasetError, match="broken.png"):
        data.load_folder(str(tmp_path / "empty"))


def test_load_dataset_dispatch():
    """load_dataset returns uint8 (N, 3, S, S) for shapes and lists the choices for an unknown name."""
    images = data.load_dataset("shapes", num_shapes=8, seed=3)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(data.make_shapes(8, seed=3)).permute(0, 3, 1, 2))
    with pytest.raises(data.DatasetError, match="cifar10, shapes, silhouettes or folder:PATH"):
        data.load_dataset("nosuch")


def test_save_image_grid(tmp_path):
    """save_image_grid writes a PNG with 2 px padding, mapping -1 -> 0, 0 -> 128 and 1 -> 255."""
    x0 = torch.tensor([-1.0, 0.0, 1.0, 5.0]).repeat_interleave(3)[:10].view(10, 1, 1, 1).expand(10, 3, 8, 8)
    data.save_image_grid(x0, str(tmp_path / "grid.png"))
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 10 + 2, 4 * 10 + 2, 3)  # ceil(sqrt(10)) = 4 columns, 3 rows
    assert grid[2, 2, 0] == 0 and grid[2, 12 + 2 * 10, 0] == 128 and grid[12, 12 + 10, 0] == 255
    assert grid[12 + 10, 12, 0] == 255  # 5.0 is clamped to 1
    data.save_image_grid(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), str(tmp_path / "u8.png"), nrow=5)
    assert Image.open(tmp_path / "u8.png").size == (5 * 10 + 2, 12)
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "u8.png"]  # no temp files left
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.save_image_grid(x0, str(tmp_path / "missing" / "grid.png"))


def test_save_image_grid_scale_repeats_pixels(tmp_path):
    """scale=2 writes every pixel (and the padding) as a 2 x 2 block: the grid is the unscaled one, enlarged."""
    x = torch.randint(0, 256, (3, 3, 5, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data.save_image_grid(x, str(tmp_path / "one.png"))
    data.save_image_grid(x, str(tmp_path / "two.png"), scale=2)
    one, two = (np.asarray(Image.open(tmp_path / f)) for f in ("one.png", "two.png"))
    assert two.shape == (2 * (2 * (5 + 2) + 2), 2 * (2 * (5 + 2) + 2), 3)  # 2 x 2 tiles of 5 px, 2 px padding, x2
    assert (two[:4] == 0).all() and (two[:, :4] == 0).all()  # the padding, 4 px wide
    assert np.array_equal(two[4:14:2, 4:14:2], x[0].permute(1, 2, 0).numpy())  # the first image, every other pixel
    for dy in (0, 1):
        for dx in (0, 1):
            assert np.array_equal(two[dy::2, dx::2], one)
    assert data.grid_scale(16) == 2 and data.grid_scale(32) == 1 and data.grid_scale(64) == 1
    with pytest.raises(data.DatasetError, match="scale"):
        data.save_image_grid(x, str(tmp_path / "bad.png"), scale=0)


def test_silhouettes_are_one_white_shape_of_the_stated_area_on_black():
    """silhouettes (data.make_shapes docstring): 16x16 by default, grey only (R = G = B), black background, one white
    shape with r ~ U[8k, 14k] px. Its white mass (coverage) must match the closed-form area of the disc (pi r^2), the
    square (half-side r: 4 r^2) or the equilateral triangle (circumradius R = 1.25 r: 3 sqrt(3) R^2 / 4), for the
    images whose shape lies wholly inside the frame; kind, centre and r are read from the same uniform table."""
    images = data.load_dataset("silhouettes", num_shapes=64, seed=5)
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    assert (images.amax(dim=(1, 2, 3)) == 255).all()  # r >= 4 px: every shape covers some pixels fully
    n, S = 200, 64  # larger images, so that anti-aliasing is a small part of the area
    big = data.make_shapes(n, seed=5, image_size=S, silhouettes=True)[..., 0].astype(np.float64) / 255
    u = np.random.default_rng(5).random((n, 33))[:, 9:17]  # the first shape slot: kind, cx, cy, r, ...
    kind, cx, cy = (3 * u[:, 0]).astype(int), S * (0.2 + 0.6 * u[:, 1]), S * (0.2 + 0.6 * u[:, 2])
    r = (S / 32) * (8 + 6 * u[:, 3])
    reach = np.where(kind == 0, r, np.where(kind == 1, math.sqrt(2) * r, 1.25 * r))  # farthest point from the centre
    inside = (cx - reach > 0) & (cx + reach < S) & (cy - reach > 0) & (cy + reach < S)
    triangle = 3 * math.sqrt(3) / 4 * (1.25 * r) ** 2
    area = np.where(kind == 0, math.pi * r ** 2, np.where(kind == 1, 4 * r ** 2, triangle))
    assert inside.sum() >= 20 and set(kind[inside]) == {0, 1, 2}
    np.testing.assert_allclose(big.sum(axis=(1, 2))[inside], area[inside], rtol=0.01)
    assert data.make_shapes(4, seed=5, image_size=16).std(axis=-1).max() > 0  # shapes itself stays in colour


def test_cli_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    """An unknown --dataset exits 1 with one `error:` line on stderr and no traceback (in-process, to save time)."""
    monkeypatch.setattr(sys, "argv", ["data.py", "--dataset", "nosuch", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit) as info:
        data.main(data.parse_args())
    stderr = capsys.readouterr().err
    assert info.value.code == 1 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "Traceback" not in stderr and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", data.POINT_SETS)
def test_point_sets_deterministic_inside_the_clip_range(name):
    """The 2-D point sets are float32 (N, 2), a function of the seed, and lie in [-1, 1]^2 (the samplers' clip)."""
    a, b, c = data.make_points(name, 20000, 1), data.make_points(name, 20000, 1), data.make_points(name, 20000, 2)
    assert a.shape == (20000, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and np.abs(a).max() < 1
    tensor = data.load_dataset(name, num_points=50, seed=3)
    assert tensor.dtype == torch.float32 and torch.equal(tensor, torch.from_numpy(data.make_points(name, 50, 3)))


def test_point_sets_follow_their_stated_densities():
    """ring: 8 equal modes at radius 0.7 with std 0.05; checkerboard: uniform on the 8 cells with row + col even."""
    ring = data.make_points("ring", 80000, 0).astype(np.float64)
    mode = np.round(np.arctan2(ring[:, 1], ring[:, 0]) / (2 * math.pi / 8)) % 8
    assert np.bincount(mode.astype(int), minlength=8) / len(ring) == pytest.approx([1 / 8] * 8, abs=0.01)
    centre = 0.7 * np.stack([np.cos(2 * math.pi * mode / 8), np.sin(2 * math.pi * mode / 8)], 1)
    assert (ring - centre).std(0) == pytest.approx([0.05, 0.05], rel=0.02)
    board = data.make_points("checkerboard", 80000, 0).astype(np.float64) / 0.45 + 2  # cells of side 1 in [0, 4]^2
    col, row = np.floor(board[:, 0]), np.floor(board[:, 1])
    assert ((col + row) % 2 == 0).all() and board.min() >= 0 and board.max() <= 4
    cells = np.bincount((4 * row + col).astype(int), minlength=16)
    assert cells[cells > 0] / len(board) == pytest.approx([1 / 8] * 8, abs=0.01)


def test_random_batch_of_points_is_rows_without_flips(tmp_path):
    """random_batch on a float (N, d) tensor returns rows as they are; save_scatter writes a grey-scale PNG."""
    points = torch.arange(20, dtype=torch.float32).view(10, 2) / 20
    batch = data.random_batch(points, 64, torch.Generator().manual_seed(0))
    assert batch.shape == (64, 2) and batch.dtype == torch.float32
    assert all(any(torch.equal(row, p) for p in points) for row in batch)
    data.save_scatter(points, str(tmp_path / "s.png"), size=32)
    with Image.open(tmp_path / "s.png") as image:
        assert image.size == (32, 32) and image.mode == "L" and np.asarray(image).min() == 0
