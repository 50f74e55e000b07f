"""Global-descriptor losses on hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from waldo.train.losses import LOSSES, MarginContrastiveLoss, SoftmaxContrastiveLoss

# Four unit vectors in 2-D with simple dot products:
#   g0·g1 = 0, g0·g2 = -1, g0·g3 = 0.6, g1·g2 = 0, g1·g3 = 0.8, g2·g3 = -0.6
VECTORS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])


def _anchor_loss(positive: list[float], others: list[float]) -> float:
    """-log(softmax mass on the positives) at temperature 1, from one row's similarities."""
    return -math.log(sum(math.exp(s) for s in positive) / sum(math.exp(s) for s in positive + others))


def test_softmax_contrastive_by_hand():
    labels = torch.tensor([0, 0, 1, 1])
    expected = [
        _anchor_loss([0.0], [-1.0, 0.6]),  # anchor 0: positive g1; negatives g2, g3
        _anchor_loss([0.0], [0.0, 0.8]),  # anchor 1: positive g0
        _anchor_loss([-0.6], [-1.0, 0.0]),  # anchor 2: positive g3
        _anchor_loss([-0.6], [0.6, 0.8]),  # anchor 3: positive g2
    ]
    loss = SoftmaxContrastiveLoss(temperature=1.0)(VECTORS, labels)
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-5)


def test_softmax_contrastive_sums_several_positives_and_matches_naive_at_t005():
    generator = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(12, 8, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4])  # anchor 11 has no positive
    similarity = (embeddings @ embeddings.T / 0.05).exp()  # float64: e^20 is fine here
    similarity.fill_diagonal_(0.0)
    probabilities = similarity / similarity.sum(dim=1, keepdim=True)
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(12, dtype=torch.bool)
    per_anchor = -(probabilities * same).sum(dim=1).log()
    expected = per_anchor[:11].mean().item()
    loss = SoftmaxContrastiveLoss()(embeddings.float(), labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_softmax_contrastive_ignores_anchors_without_positives():
    labels = torch.tensor([0, 0, 1, 2])  # anchors 2 and 3 have no positive
    expected = (_anchor_loss([0.0], [-1.0, 0.6]) + _anchor_loss([0.0], [0.0, 0.8])) / 2
    loss = SoftmaxContrastiveLoss(temperature=1.0)(VECTORS, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_no_positive_anywhere_gives_a_zero_with_grad():
    embeddings = VECTORS.clone().requires_grad_(True)
    for loss_fn in (SoftmaxContrastiveLoss(), MarginContrastiveLoss(neg_margin=0.1)):
        loss = loss_fn(embeddings, torch.tensor([0, 1, 2, 3]))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))
        embeddings.grad = None
    single = SoftmaxContrastiveLoss()(embeddings[:1], torch.tensor([5]))
    assert single.item() == 0.0


def test_softmax_contrastive_is_stable_at_tiny_temperature():
    embeddings = F.normalize(torch.randn(6, 4), dim=1).requires_grad_(True)
    loss = SoftmaxContrastiveLoss(temperature=1e-4)(embeddings, torch.tensor([0, 0, 1, 1, 2, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(embeddings.grad).all()


def test_margin_contrastive_by_hand():
    # Cosine distances d = 1 - cos. Positives (0,1): d = 1, (2,3): d = 1.6 -> costs 1 and 1.6.
    # Negatives with neg_margin 0.5: (0,2) d = 2 -> 0, (0,3) d = 0.4 -> 0.1, (1,2) d = 1 -> 0,
    # (1,3) d = 0.2 -> 0.3. Mean over active pairs: (1 + 1.6) / 2 + (0.1 + 0.3) / 2 = 1.5.
    loss = MarginContrastiveLoss(pos_margin=0.0, neg_margin=0.5)(VECTORS, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(1.5, rel=1e-5)
    # pos_margin 1.2 leaves only (2,3) active: 0.4; the negative side is unchanged.
    loss = MarginContrastiveLoss(pos_margin=1.2, neg_margin=0.5)(VECTORS, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(0.4 + 0.2, rel=1e-5)
    # Scaling a vector does not matter: the distance is cosine.
    loss = MarginContrastiveLoss()(VECTORS * torch.tensor([[2.0], [1.0], [3.0], [0.5]]), torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(1.5, rel=1e-5)


@pytest.mark.parametrize("name", ["softmax-contrastive", "margin-contrastive"])
def test_a_gradient_step_lowers_the_loss(name):
    loss_fn = LOSSES.create(name)
    generator = torch.Generator().manual_seed(1)
    embeddings = F.normalize(torch.randn(16, 8, generator=generator), dim=1).requires_grad_(True)
    labels = torch.arange(16) // 4
    before = loss_fn(embeddings, labels)
    before.backward()
    with torch.no_grad():
        stepped = embeddings - 1e-3 * embeddings.grad
    assert loss_fn(stepped, labels).item() < before.item()


def test_registry_and_validation():
    assert LOSSES.names() == ["margin-contrastive", "softmax-contrastive"]
    assert isinstance(LOSSES.create("softmax-contrastive", temperature=0.1), SoftmaxContrastiveLoss)
    with pytest.raises(ValueError, match="temperature"):
        SoftmaxContrastiveLoss(temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        SoftmaxContrastiveLoss()(VECTORS, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        SoftmaxContrastiveLoss()(VECTORS[0], torch.tensor([0]))
