"""The default projection end to end: ``waldo index build`` without ``--projection`` fits
PCA-whitened locals and a 1024-d global descriptor whitened against the photos' augmented views
on the photos it indexes, and the index finds each product.

Small: the validation photos of five grocery products (26 photos, 234 feature vectors for a
128-d fit), and held-out test photos of each as queries.
"""

from __future__ import annotations

import json

import pytest
import torch

from waldo.api import MODEL_FOLDER, Waldo
from waldo.cli import main
from waldo.data.datasets import read_labels_csv
from waldo.models.checkpoint import load_model

# Banana, Bravo orange juice, Pineapple, Oatly oat milk, Carrots (as the service tests).
PRODUCTS = ("6", "29", "23", "45", "62")


@pytest.fixture(scope="module")
def built(grocery_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pca") / "index"
    code = main(["index", "build", "--data", str(grocery_dir), "--where", "split=val",
                 "--where", f"instance_id={','.join(PRODUCTS)}", "--out", str(out), "--workers", "0", "--quiet"])
    assert code == 0
    return out


def test_the_default_projection_is_a_fitted_pca_whitening(built, grocery_dir, capsys):
    capsys.readouterr()
    assert main(["index", "info", "--index", str(built), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # The PCA fit, not the random fallback taken when there are fewer vectors than dimensions.
    assert info["model"]["projection"] == f"views-whiten(shrink=3,views=2x26):{grocery_dir}:26 images"
    assert info["count"] == 26 and info["model"]["pooling"] == "avg" and info["model"]["global_dim"] == 1024
    model, _ = load_model(built / MODEL_FOLDER)
    assert model.global_proj.weight.shape == (1024, model.local_proj.weight.shape[1])
    for weight in (model.local_proj.weight[:, :, 0, 0].double(),):  # (128, C): components / sqrt(eigenvalue)
        gram = weight @ weight.T
        # Whitened principal axes: orthogonal rows whose norms grow as the eigenvalues shrink.
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-5 * gram.diagonal().max()
        assert torch.all(torch.diff(gram.diagonal()) >= -1e-6 * gram.diagonal().max())  # float32 ties
    assert model.local_proj.weight.shape[0] == 128


def test_held_out_photos_find_their_product(built, grocery_dir):
    """The first 10 test photos of each product as queries: 45 of the 50 find their product
    first on the project's machine (a random projection: 46); the bar leaves two photos to
    floating-point differences between machines."""
    records = read_labels_csv(grocery_dir).records
    engine = Waldo.open(built)
    try:
        found = [engine.search(r.path, k=1).hits[0].identity == product
                 for product in PRODUCTS
                 for r in [r for r in records if r.identity == product and r.attrs.get("split") == "test"][:10]]
    finally:
        engine.store.close()
    assert len(found) == 50 and sum(found) >= 43, sum(found)
