"""tools/affinity_label_stats.py: both AffinityNet label rules on one CAM, cell by cell."""
import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_psa_rule_pools_the_cell_where_the_top_left_rule_reads_one_corner_pixel():
    """A 10 x 10 px object (pixels 3..12) at stride 4: cells 1 and 2 lie inside it. Cell 3 covers
    pixels 12..15, of which only the first is object: its top-left pixel says object, PSA's pooled
    posteriors say background (ha -> 0)."""
    stats = _tool("affinity_label_stats")
    rng = np.random.default_rng(0)
    image = rng.uniform(100, 110, (16, 16, 3)).astype(np.uint8)
    image[3:13, 3:13] = (200, 40, 40)
    cams = np.zeros((1, 16, 16), np.float32)
    cams[0, 3:13, 3:13] = 1.0                       # class 3 (0-based key 2)
    cells = stats.rule_cells(image, np.array([2]), cams, (16, 16), 4, 24, 4, None)
    top, psa = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    top[1:, 1:] = 3
    psa[1:3, 1:3] = 3
    assert np.array_equal(cells["top_left"], top)
    assert np.array_equal(cells["psa"], psa)
