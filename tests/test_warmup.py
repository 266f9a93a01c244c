"""The learning-rate warm-up of train: its rates by hand, and the blow-up it prevents."""
import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc
from modeconn.data import TensorLoader


def test_warmup_trains_the_weights_of_a_hand_written_loop():
    # 2 epochs of 4 steps, warm-up 1.5 epochs = 6 steps, reference schedule over 2 epochs (factors 1.0, 0.01)
    torch.manual_seed(0)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    ref.load_state_dict(net.state_dict())
    loader = TensorLoader(x, y, 8, shuffle=True, seed=3)
    mc.train_model(net, loader, epochs=2, lr=0.1, momentum=0.9, weight_decay=1e-3, seed=3, warmup_epochs=1.5)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    step = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            factor = (1.0, 0.01)[epoch] * min(1.0, (step + 1) / 6)   # by hand
            for group in opt.param_groups:
                group["lr"] = 0.1 * factor
            opt.zero_grad()
            F.cross_entropy(ref(xb), yb).backward()
            opt.step()
            step += 1
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)


def _digits_28():
    """Digits upsampled to 28x28 (MNIST's size), standardised: where the BN CNN blew up at lr 0.05."""
    ds = mc.get_dataset("digits")
    x = F.interpolate(ds.x_train.float(), size=(28, 28), mode="bilinear", align_corners=False)
    return (x - x.mean()) / x.std(), ds.y_train


def test_warmup_prevents_the_early_blow_up_of_a_bn_cnn_at_lr_005():
    x, y = _digits_28()
    first = {}
    for warmup in (0.0, 1.0):
        for seed in (2, 8):
            torch.manual_seed(seed)
            net = mc.create_model("convnet_bn", (1, 28, 28), 10, width=16)
            loader = TensorLoader(x, y, 64, shuffle=True, seed=seed)
            history = mc.train_model(net, loader, epochs=1, lr=0.05, schedule="constant", seed=seed,
                                     warmup_epochs=warmup)
            first[warmup, seed] = history[0]["loss"]
    # log(10) = 2.30 is the loss at initialisation: without warm-up the first epoch averages far above it
    assert max(first[0.0, s] for s in (2, 8)) > 3.0, first
    assert max(first[1.0, s] for s in (2, 8)) < 1.5, first
