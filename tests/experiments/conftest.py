"""Fixtures for the studies: a tiny reranker model folder (64 px keeps a study to seconds)."""

from __future__ import annotations

import pytest
import torch

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches are dominated by thread hand-off on a busy 2-core machine; one thread is faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A reranker folder: untrained lite0 at 64 px (2 x 2 locals), random projection, tiny RRT."""
    from waldo.models.untrained import untrained_model
    from waldo.rerank.rrt import RerankingTransformer, RRTConfig
    from waldo.rerank.rrt_checkpoint import save_reranker

    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=SIZE,
                                    progress=False)
    torch.manual_seed(0)
    rrt = RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=32))
    return save_reranker(tmp_path_factory.mktemp("tiny") / "best", model, config, rrt, grid=(2, 2),
                         training={"fusion_weight": 0.5})
