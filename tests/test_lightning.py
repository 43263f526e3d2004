"""Lightning (docs/training-loops.md): the manual-optimization recipe with 32-bit, bf16 and
fp16 mixed precision (both passes, global_step advancing, max_steps and step-based
checkpoints firing, resume through the Trainer bit-exactly); automatic optimization training
F-SAM bit for bit like the manual recipe (32-true, bf16-mixed), and stopping with a clear
error where it cannot (fp16, gradient accumulation). Skipped without the `lightning` extra."""

import contextlib
import os

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

from fsam_fused import FSAM, EveryK, bn_frozen  # noqa: E402


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :1] * 0.5 - x[:, 1:2]).detach() + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False
    )


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.fc2 = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class ManualFSAM(L.LightningModule):
    """The documented recipe."""

    schedule = None  # a factory: FSAM's schedule= (None: every step)

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.net = Net()
        self.losses = []

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16 only
        loss = self.loss(batch)
        self.manual_backward(loss)  # first pass, at w
        if opt.first_step(zero_grad=True, grad_scaler=scaler):  # False: a cheap step
            with bn_frozen(self.net):  # second pass, at w + e
                self.manual_backward(self.loss(batch))
        opt.step()  # restore + base step (scaler.step under fp16); advances global_step
        opt.zero_grad()
        self.losses.append(loss.detach())

    def configure_optimizers(self):
        return FSAM(
            self.parameters(),
            torch.optim.SGD,
            rho=0.05,
            lr=0.05,
            momentum=0.9,
            schedule=None if self.schedule is None else self.schedule(),
        )


class AutomaticFSAM(ManualFSAM):
    """The automatic-optimization recipe: FSAM runs the closure twice; the second time the
    weights are perturbed, and BatchNorm is kept out of it as in the manual recipe."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = True

    def training_step(self, batch, batch_idx):
        frozen = self.optimizers().perturbed  # True in the second pass
        with bn_frozen(self.net) if frozen else contextlib.nullcontext():
            loss = self.loss(batch)
        if not frozen:
            self.losses.append(loss.detach())
        return loss


def _trainer(tmp_path, precision, max_steps, **kw):
    plugins = []
    if precision == "16-mixed":
        # Lightning turns Trainer(precision="16-mixed") on CPU into bf16-mixed; the plugin
        # with a CPU GradScaler runs real fp16 autocast on CPU.
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugins = [
            MixedPrecision(
                "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10)
            )
        ]
        precision = None
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        precision=precision,
        plugins=plugins,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kw,
    )


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_manual_recipe_trains_counts_steps_and_resumes(tmp_path, precision):
    ckpt = L.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ck"), every_n_train_steps=3, save_top_k=-1
    )
    model = ManualFSAM()
    w0 = [p.detach().clone() for p in model.parameters()]
    tr = _trainer(tmp_path, precision, 6, callbacks=[ckpt])
    tr.fit(model, _data())
    assert tr.global_step == 6, "max_steps must stop after 6 FSAM steps"
    assert int(model.net.bn.num_batches_tracked) == 6, "one BatchNorm update per step"
    assert sorted(os.listdir(tmp_path / "ck")) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"]
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt = tr.optimizers[0]
    assert isinstance(opt, FSAM) and opt.found_nonfinite().item() == 0.0
    assert all("ema" in s for s in opt.state.values())
    # Resume from step 3 (the end of epoch 0: 3 batches an epoch) through the Trainer: the
    # same weights and state as the uninterrupted run, bit for bit.
    resumed = ManualFSAM()
    tr2 = _trainer(tmp_path / "r", precision, 6)
    tr2.fit(resumed, _data(), ckpt_path=str(tmp_path / "ck" / "epoch=0-step=3.ckpt"))
    assert tr2.global_step == 6
    for p, q in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for (_p, s), (_q, t) in zip(opt.state.items(), tr2.optimizers[0].state.items()):
        torch.testing.assert_close(s["ema"], t["ema"], rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_automatic_optimization_equals_the_manual_recipe(tmp_path, precision):
    runs = {}
    for cls in (ManualFSAM, AutomaticFSAM):
        model = cls()
        tr = _trainer(tmp_path / cls.__name__, precision, 6)
        tr.fit(model, _data())
        assert tr.global_step == 6
        runs[cls] = (model, tr.optimizers[0])
    (m, om), (a, oa) = runs[ManualFSAM], runs[AutomaticFSAM]
    for p, q in zip(m.state_dict().values(), a.state_dict().values()):  # weights and BN stats
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for s_, t in zip(om.state.values(), oa.state.values()):
        torch.testing.assert_close(s_["ema"], t["ema"], rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(m.losses), torch.stack(a.losses), rtol=0, atol=0)
    assert int(a.net.bn.num_batches_tracked) == 6, "one BatchNorm update per step"


def test_automatic_optimization_with_accumulation_is_refused(tmp_path):
    model = AutomaticFSAM()
    w = [p.detach().clone() for p in model.parameters()]
    tr = _trainer(tmp_path, "32-true", 4, accumulate_grad_batches=2)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches"):
        tr.fit(model, _data())
    assert tr.global_step == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


def test_automatic_optimization_fp16_stops_at_step_0_with_the_recipe(tmp_path):
    model = AutomaticFSAM()
    tr = _trainer(tmp_path, "16-mixed", 4)
    with pytest.raises(RuntimeError, match="first_step") as err:
        tr.fit(model, _data())
    assert "Lightning" in str(err.value)
    w = [p.detach().clone() for p in model.parameters()]
    assert tr.global_step == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


class ManualEvery2(ManualFSAM):
    schedule = staticmethod(lambda: EveryK(2))


class AutomaticEvery2(AutomaticFSAM):
    schedule = staticmethod(lambda: EveryK(2))


def test_a_schedule_under_both_recipes_and_resume(tmp_path):
    """EveryK(2): the manual recipe and automatic optimization (step(closure), which skips
    the closure's second call on cheap steps) agree bit for bit; a run resumed from a
    Lightning checkpoint continues the schedule bit for bit."""
    ckpt = L.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ck"), every_n_train_steps=3, save_top_k=-1
    )
    runs = {}
    for cls in (ManualEvery2, AutomaticEvery2):
        model = cls()
        forwards = []
        model.net.register_forward_pre_hook(lambda *a, f=forwards: f.append(1))
        cb = [ckpt] if cls is ManualEvery2 else []
        tr = _trainer(tmp_path / cls.__name__, "32-true", 6, callbacks=cb)
        tr.fit(model, _data())
        assert tr.global_step == 6 and len(forwards) == 6 + 3  # steps 0, 2, 4 perturb
        runs[cls] = (model, tr.optimizers[0])
    (m, om), (a, oa) = runs[ManualEvery2], runs[AutomaticEvery2]
    for p, q in zip(m.state_dict().values(), a.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert om.schedule.steps == oa.schedule.steps == 6
    resumed = ManualEvery2()
    tr2 = _trainer(tmp_path / "r", "32-true", 6)
    tr2.fit(resumed, _data(), ckpt_path=str(tmp_path / "ck" / "epoch=0-step=3.ckpt"))
    assert tr2.optimizers[0].schedule.steps == 6
    for p, q in zip(m.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
