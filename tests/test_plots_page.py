"""`dvc plots show` writes a page that works offline: vega from plots/vega/, not a CDN, and every
plot and figure in the order plots/page.html gives."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np

from .conftest import ROOT, run
from .test_pipeline import FIGURES

HISTORY = ("epoch,train_loss,val_kl,val_loss,val_neg_elbo,val_recon\n"
           "0,200.5,4.1,190.2,190.2,186.1\n1,180.3,5.0,175.9,175.9,170.9\n")


def test_plots_page_loads_vega_locally_and_orders_every_plot(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / "plots", repo / "plots")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "metrics").mkdir()
    (repo / "metrics" / "train_history.csv").write_text(HISTORY)
    (repo / "figures").mkdir()
    for name in FIGURES:
        matplotlib.image.imsave(repo / "figures" / name, np.zeros((4, 4)))
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["dvc", "plots", "show"], repo)

    page = (repo / "dvc_plots" / "index.html").read_text()
    scripts = re.findall(r'<script src="([^"]+)"', page)
    local = [src for src in scripts if not src.startswith("https://")]
    assert [Path(src).name for src in local] == [
        "vega-5.20.2.min.js", "vega-lite-5.2.0.min.js", "vega-embed-6.18.2.min.js"]
    assert all((repo / "dvc_plots" / src).resolve().is_file() for src in local)
    assert "cdn.jsdelivr.net/npm/vega@" not in page  # DVC's own script tags are left out

    ordered = [div for div, _ in sorted(re.findall(r"#(\S+) \{ order: (\d+); \}", page), key=lambda m: int(m[1]))]
    shown = re.findall(r'<div\s+id\s*=\s*"([^"]+)"', page)
    assert sorted(shown) == sorted(ordered), "every plot on the page has a place in plots/page.html"
    assert ordered[:3] == ["Loss_per_epoch__nats_per_image_", "Validation_-ELBO_terms__nats_per_image_",
                           "figures_training_curves_png"]
