"""Gradient-norm recording (radflow.gradients) against gradients computed by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from radflow.gradients import GradientRecorder, weighted_layers
from radflow.models.resnet import build_resnet


class _Scaler:
    """The two methods of torch.amp.GradScaler the recorder reads."""

    def __init__(self, scale: float, enabled: bool):
        self.scale, self.enabled = scale, enabled

    def is_enabled(self) -> bool:
        return self.enabled

    def get_scale(self) -> float:
        return self.scale


def _two_linear_layers() -> nn.Sequential:
    """f(x) = W2 (W1 x), no biases, known weights."""
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]]))
        net[1].weight.copy_(torch.tensor([[2.0, -1.0]]))
    return net


def test_recorded_norms_are_the_analytic_gradient_norms():
    net = _two_linear_layers()
    x = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 2.0]])  # two cases
    t = np.array([1.0, -3.0])
    w1 = net[0].weight.detach().numpy().astype(float)
    w2 = net[1].weight.detach().numpy().astype(float)
    # by hand: h = W1 x, f = W2 h, L = mean((f - t)^2)
    h = x @ w1.T  # (2 cases, 2)
    f = (h @ w2.T)[:, 0]
    d_f = 2 * (f - t) / len(t)  # dL/df per case
    grad_w2 = d_f @ h  # sum over cases of dL/df * h^T
    grad_w1 = (d_f[:, None] * w2).T @ x  # sum over cases of W2^T dL/df x^T
    recorder = GradientRecorder(early_steps=1)
    recorder.start(net, total_steps=3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    xt, tt = torch.tensor(x, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    expected = []
    for step in range(3):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(net(xt)[:, 0], tt)
        loss.backward()
        expected.append([net[0].weight.grad.norm().item(), net[1].weight.grad.norm().item()])
        recorder.after_backward(step, _Scaler(4.0, enabled=step == 2))  # step 2: scaled
        optimizer.step()
        recorder.after_step(step, 1, loss.item())
    table = recorder.gradient_table()
    init = table[table["snapshot"] == "init"]
    assert list(init["layer"]) == ["0", "1"] and list(init["index"]) == [1, 2]
    assert init["grad_norm"].tolist() == pytest.approx(
        [np.linalg.norm(grad_w1), np.linalg.norm(grad_w2)], rel=1e-6
    )
    # after one update: the gradient of step 1 (the one computed at the updated weights)
    early = table[table["snapshot"] == "early"]
    assert early["step"].unique().tolist() == [1]
    assert early["grad_norm"].tolist() == pytest.approx(expected[1], rel=1e-6)
    assert expected[1] != pytest.approx(expected[0])  # the weights did move
    end = table[table["snapshot"] == "end"]
    assert end["grad_norm"].tolist() == pytest.approx([v / 4 for v in expected[2]], rel=1e-6)
    steps = recorder.step_table()
    assert steps["step"].tolist() == [0, 1, 2] and steps["epoch"].tolist() == [1, 1, 1]
    f0 = ((x @ w1.T @ w2.T)[:, 0] - t) ** 2
    assert steps["train_loss"].iloc[0] == pytest.approx(f0.mean())


def test_short_runs_still_get_an_end_snapshot():
    recorder = GradientRecorder(early_steps=10)
    recorder.start(_two_linear_layers(), total_steps=4)
    assert recorder._snapshot_at == {0: ["init"], 3: ["end"]}
    recorder.start(_two_linear_layers(), total_steps=1)
    assert recorder._snapshot_at == {0: ["init", "end"]}
    with pytest.raises(ValueError, match="early_steps"):
        GradientRecorder(0)


def test_layers_run_from_input_to_output_with_projections_marked():
    layers = weighted_layers(build_resnet(18, base_width=4))
    main = [layer for layer in layers if layer.path == "main"]
    assert [layer.index for layer in main] == list(range(1, 19))  # 18 weighted layers
    assert main[0].name == "conv1" and main[-1].name == "fc" and main[-1].kind == "linear"
    projections = [layer for layer in layers if layer.path == "projection"]
    assert [p.name for p in projections] == [f"layer{k}.0.downsample.0" for k in (2, 3, 4)]
    # a projection shares the index of its block's last convolution
    by_name = {layer.name: layer.index for layer in layers}
    assert by_name["layer2.0.downsample.0"] == by_name["layer2.0.conv2"]
