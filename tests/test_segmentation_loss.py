import pytest
import torch
import torch.nn.functional as F

from radflow.tasks.segmentation.loss import DiceCELoss, dice_ce_loss, region_targets, soft_dice

monai_losses = pytest.importorskip("monai.losses")


def _random_case(seed: int, n: int = 2, k: int = 4, shape=(6, 7, 5)):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, k, *shape, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, k, (n, *shape), generator=generator)
    return logits, labels


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_monai_dice_ce(batch_dice, include_background, seed):
    logits, labels = _random_case(seed)
    monai = monai_losses.DiceCELoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        batch=batch_dice,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        lambda_dice=0.7,
        lambda_ce=1.3,
    )
    expected = monai(logits.float(), labels.unsqueeze(1))
    ours = dice_ce_loss(
        logits,
        labels,
        include_background=include_background,
        batch_dice=batch_dice,
        lambda_dice=0.7,
        lambda_ce=1.3,
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_regions_agree_with_monai_sigmoid_dice_plus_bce(batch_dice):
    _, labels = _random_case(2)
    regions = [(1, 2, 3), (2, 3), (3,)]  # BraTS: whole tumour, tumour core, enhancing
    logits = 2 * torch.randn(2, 3, *labels.shape[1:], generator=torch.Generator().manual_seed(3))
    targets = region_targets(labels, regions)
    assert torch.equal(targets[:, 0].bool(), labels > 0)
    assert torch.equal(targets[:, 1].bool(), (labels == 2) | (labels == 3))
    assert torch.equal(targets[:, 2].bool(), labels == 3)
    dice = monai_losses.DiceLoss(sigmoid=True, batch=batch_dice, smooth_nr=1e-5, smooth_dr=1e-5)
    expected = dice(logits, targets) + F.binary_cross_entropy_with_logits(logits, targets)
    ours = dice_ce_loss(logits, labels, regions=regions, batch_dice=batch_dice)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_perfect_prediction_has_dice_loss_near_zero_and_wrong_one_near_one():
    labels = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    labels[:, 2:5, 2:5, 2:5] = 1
    labels[1, 6:, 6:, 6:] = 2
    confident = 30 * F.one_hot(labels, 3).movedim(-1, 1).float()
    perfect = dice_ce_loss(confident, labels, lambda_ce=0.0)
    assert 0 <= perfect.item() < 1e-6
    assert dice_ce_loss(confident, labels).item() < 1e-6  # cross-entropy ~ 0 too
    wrong = 30 * F.one_hot((labels + 1) % 3, 3).movedim(-1, 1).float()
    assert dice_ce_loss(wrong, labels, lambda_ce=0.0).item() == pytest.approx(1.0, abs=1e-6)


def test_hand_computed_dice_of_one_class():
    # class 1 covers 4 voxels; the prediction puts probability 1 on 2 of them and on 2
    # others: Dice = (2 * 2 + smooth) / (4 + 4 + smooth)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, :4] = 1
    predicted = torch.zeros(1, 4, 4, dtype=torch.long)
    predicted[0, 0, :2] = 1
    predicted[0, 1, :2] = 1
    one_hot = F.one_hot(predicted, 2).movedim(-1, 1).float()
    dice = soft_dice(one_hot, F.one_hot(labels, 2).movedim(-1, 1).float(), smooth=1e-5)
    assert dice[1].item() == pytest.approx((4 + 1e-5) / (8 + 1e-5), rel=1e-6)
    loss = dice_ce_loss(50 * one_hot, labels, lambda_ce=0.0)  # background excluded
    assert loss.item() == pytest.approx(1 - (4 + 1e-5) / (8 + 1e-5), rel=1e-5)


def test_batch_dice_scores_a_class_where_it_occurs():
    # case 0 has class 1, case 1 has none; the network predicts both exactly
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    labels[0, 1:4, 1:4] = 1
    logits = 30 * F.one_hot(labels, 2).movedim(-1, 1).float()
    assert dice_ce_loss(logits, labels, batch_dice=True, lambda_ce=0).item() < 1e-6
    # per case, the empty case scores Dice = smooth / smooth = 1 here too ...
    assert dice_ce_loss(logits, labels, batch_dice=False, lambda_ce=0).item() < 1e-4
    # ... but a single false-positive voxel in it costs half the loss per case
    logits[1, :, 0, 0] = torch.tensor([0.0, 30.0])
    per_case = dice_ce_loss(logits, labels, batch_dice=False, lambda_ce=0).item()
    batch = dice_ce_loss(logits, labels, batch_dice=True, lambda_ce=0).item()
    assert per_case == pytest.approx(0.5, abs=1e-4)
    assert batch == pytest.approx(1 - 18 / 19, abs=1e-4)  # 2*9 / (10 + 9)


def test_ignored_voxels_change_nothing():
    logits, labels = _random_case(4, k=3)
    labels[:, :2] = 255
    loss = DiceCELoss(ignore_index=255, include_background=True)
    base = loss(logits, labels)
    changed = logits.clone()
    changed[:, :, :2] = 100 * torch.randn_like(changed[:, :, :2])
    torch.testing.assert_close(loss(changed, labels), base)
    # and equals the loss of the kept voxels alone
    torch.testing.assert_close(base, loss(logits[:, :, 2:], labels[:, 2:]))
    regional = DiceCELoss(ignore_index=255, regions=[(1, 2), (2,)])
    logits2 = logits[:, :2]
    torch.testing.assert_close(
        regional(logits2, labels), regional(logits2[:, :, 2:], labels[:, 2:])
    )


def test_bf16_logits_are_scored_in_float32_and_backpropagate():
    logits, labels = _random_case(5)
    logits = logits.to(torch.bfloat16).requires_grad_()
    loss = dice_ce_loss(logits, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_shape_mismatch_is_a_clear_error():
    logits, labels = _random_case(6)
    with pytest.raises(ValueError, match="without the channel axis"):
        dice_ce_loss(logits, labels[:, :3])
    with pytest.raises(ValueError, match="2 regions but 4 output channels"):
        dice_ce_loss(logits, labels, regions=[(1,), (2,)])


def test_module_form_takes_the_functions_options_and_refuses_others():
    logits, labels = _random_case(7)
    options = {"batch_dice": False, "lambda_ce": 0.5, "include_background": True}
    torch.testing.assert_close(DiceCELoss(**options)(logits, labels),
                               dice_ce_loss(logits, labels, **options))  # fmt: skip
    with pytest.raises(TypeError, match="batch_dic"):
        DiceCELoss(batch_dic=True)
