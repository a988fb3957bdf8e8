"""The README's "Does it work?" tables are copies of rows of the results files that the printed commands write.

The sweep table is a column subset of experiments/results/toy/ring_sweep.md; every other README table row must be a
row of a results table with the same header. Reruns that change the numbers must update the README too.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = ["experiments/results/toy/ring.md", "experiments/results/toy/ring_batches.md",
           "experiments/results/toy/ring_sweep.md", "experiments/results/robustness/shapes.md",
           "experiments/results/claims/cpu.md"]
# README sweep column -> (sampler, column index in a sweep SW2 row [sampler, method, NFE 5, 10, 20, 50])
SWEEP_COLUMNS = {"DDPM 10": ("ddpm", 3), "DDIM 10": ("ddim", 3), "DDIM 50": ("ddim", 5), "Heun 9": ("heun", 3),
                 "Heun 49": ("heun", 5)}


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def tables(text):
    """Markdown tables as lists of rows of stripped cells (separator rows dropped)."""
    out, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if "---" not in line:
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            out.append(current)
            current = []
    return out


def test_readme_tables_match_results_files():
    readme = read("README.md")
    section = readme[readme.index("## Does it work?"):]
    result_tables = [t for path in RESULTS for t in tables(read(path))]
    sweep = [row for t in tables(read("experiments/results/toy/ring_sweep.md")) for row in t]
    checked = 0
    for header, *body in tables(section):
        if header[0].startswith("AT setting"):  # the sweep's column subset; the last column is Heun's exposure gap
            for row in body:
                for name, cell in zip(header[1:], row[1:]):
                    sampler, col = SWEEP_COLUMNS.get(name, ("heun", 2))
                    width = 6 if name in SWEEP_COLUMNS else 4
                    source = [r for r in sweep if len(r) == width and r[:2] == [sampler, row[0]]]
                    assert source and source[0][col] == cell, (row[0], name, cell)
                    checked += 1
            continue
        rows = [r for t in result_tables if t[0] == header for r in t[1:]]
        assert rows, f"no results table has the header {header}"
        for row in body:
            assert row in rows, row
            checked += 1
    assert checked > 100


def test_readme_images_part_copies_the_claims_file():
    """The "images at CIFAR's dimension" part shows rows of experiments/results/claims/cpu.md (at least the DDIM row
    of every arm and the paired differences of the pre-registered rule) and the file's mechanical verdict lines."""
    readme = read("README.md")
    start = readme.index("### Claim (1) in the paper's regime")
    part = readme[start:readme.index("\n### ", start + 1)]
    results = read("experiments/results/claims/cpu.md")
    rows = {tuple(r) for t in tables(results) for r in t[1:]}
    shown = [tuple(r) for t in tables(part) for r in t[1:]]
    assert shown and all(r in rows for r in shown)
    names = {r[:2] for r in shown}
    for arm in ("standard N", "standard 3N", "replay", "AT", "AT sqrt_d", "IP"):
        assert ("ddim", arm) in names, arm
    assert ("AT - standard 3N", "ddim") in names and ("AT - replay", "ddim") in names
    verdicts = [line for line in results.splitlines() if line.startswith("- AT")]
    assert len(verdicts) == 2 and all(line in part.splitlines() for line in verdicts)
