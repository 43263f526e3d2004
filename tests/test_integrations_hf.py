"""The Hugging Face Trainer integration (fsam_fused.integrations.huggingface) against a
manual F-SAM loop on the same micro-batches.

Tiny BERT- and GPT-2-shaped models built from configs (random weights, no downloads,
dropout off so both runs see the same function). The Trainer's data order is recorded (its
``get_batch_samples``) and replayed by the oracle: the loop of docs/training-loops.md
(every micro-batch's loss / k, backward; ``first_step``; the same micro-batches again at
``w + e``; clip; ``second_step``), written here without the Trainer. The weights are
compared after every optimizer step. Skipped without the ``hf`` extra.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os

import pytest
import torch

from fsam_fused import FSAM, EveryK, bn_frozen

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("accelerate") is None,
    reason="needs the hf extra (transformers, accelerate)",
)

if not pytestmark.args[0]:
    import transformers

    from fsam_fused.integrations.huggingface import FSAMTrainer

FSAM_KW = {"rho": 0.05, "sigma": 1.0, "lmbda": 0.6}
VOCAB, SEQ = 50, 10


def bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


class BNNet(torch.nn.Module):
    """A BatchNorm model in the Trainer's calling convention (inputs by name, a loss out)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 3),
        )

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)}


def text_data(n, kind, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        if kind == "bert":
            label = torch.randint(0, 3, (), generator=g)
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label})
        else:
            # The first label is never a target (the loss shifts labels by one); -100 says
            # so, and makes the Trainer's token count per cycle (num_items_in_batch: the
            # micro-batch losses are sums over it) the oracle's, whether or not this
            # transformers counts shifted labels (5.25 does not for this config).
            labels = ids.clone()
            labels[0] = -100
            rows.append({"input_ids": ids, "labels": labels})
    return rows


def bn_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(6, generator=g) * 2 + 1, "labels": torch.randint(0, 3, (), generator=g)}
        for _ in range(n)
    ]


class Snapshots(transformers.TrainerCallback if not pytestmark.args[0] else object):
    def __init__(self):
        self.params = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})


def make_trainer(model, data, tmp_path, fp16_scaler=None, fsam_kw=None, **args):
    """An FSAMTrainer that records the micro-batches of every cycle (to replay them) and
    snapshots the weights after every optimizer step. ``fp16_scaler``: accelerate gives no
    GradScaler on the CPU (fp16 there is silently fp32); this hands it one, with autocast
    fp16, as it sets itself up on CUDA."""

    class Recording(FSAMTrainer):
        cycles = []

        def get_batch_samples(self, it, n, device):
            batches, items = super().get_batch_samples(it, n, device)
            self.cycles.append([{k: v.clone() for k, v in b.items()} for b in batches])
            return batches, items

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if fp16_scaler is not None:
                self.accelerator.scaler = fp16_scaler
                self.accelerator.native_amp = True

    defaults = dict(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4,
        gradient_accumulation_steps=3, max_steps=4, learning_rate=0.05, optim="sgd",
        optim_args="momentum=0.9", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=3,
    )  # fmt: skip
    targs = transformers.TrainingArguments(**{**defaults, **args})
    snaps = Snapshots()
    trainer = Recording(
        model=model,
        args=targs,
        train_dataset=data,
        fsam_kwargs=FSAM_KW if fsam_kw is None else fsam_kw,
        callbacks=[snaps],
    )
    trainer.cycles = []
    if isinstance(model, transformers.BertForSequenceClassification):
        # Its forward takes **kwargs, so the Trainer thinks it divides its loss by
        # num_items_in_batch (it does not: a plain mean) and leaves out the division by the
        # number of micro-batches: k times the gradient, in both passes alike. Treat it as a
        # model without loss kwargs, so the Trainer normalises as the oracle does.
        trainer.model_accepts_loss_kwargs = False
    return trainer, snaps


def manual(model, cycles, base, base_kw, clip=0.0, dtype=None, scaler=None, schedule=None):
    """The oracle: the documented F-SAM loop with accumulation, no Trainer."""
    opt = FSAM(model.parameters(), base, **FSAM_KW, **base_kw, schedule=schedule)
    model.train()
    cast = (
        (lambda: torch.autocast("cpu", dtype=dtype))
        if dtype is not None
        else contextlib.nullcontext
    )
    out = []
    for cycle in cycles:
        k = len(cycle)
        for second in (False, True):
            with bn_frozen(model) if second else contextlib.nullcontext():
                for mb in cycle:
                    with cast():
                        loss = model(**mb)["loss"] / k
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            if not second and not opt.first_step(zero_grad=True, grad_scaler=scaler):
                break  # a schedule's cheap step: no second pass
        if clip > 0:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        else:
            opt.second_step(zero_grad=True)
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def assert_same_trajectory(got, want, rtol, atol):
    assert len(got) == len(want) > 1
    for step, (g, w) in enumerate(zip(got, want)):
        for name in w:
            torch.testing.assert_close(
                g[name], w[name], rtol=rtol, atol=atol,
                msg=lambda m: f"step {step + 1}, {name}: {m}",
            )  # fmt: skip
    # The trajectory moved: a Trainer that never stepped would not pass by accident.
    first = want[0]
    assert any(not torch.equal(first[n], want[-1][n]) for n in first)


# SGD is linear in the gradient: a wrongly normalised pass shows (AdamW's step would hide a
# constant factor).
SGD = (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_trainer_accumulation_matches_manual_loop(kind, tmp_path):
    """gradient_accumulation_steps=3, 4 optimizer steps: every micro-batch in both passes
    (the issue's case: a plain subclass raised "first_step() called twice"). GPT-2 also
    clips (max_grad_norm), which acts on the second gradient, before the base step; BERT
    does not (clipping would hide a wrongly normalised pass: F-SAM's perturbation is
    normalised too)."""
    torch.manual_seed(0)
    model = bert() if kind == "bert" else gpt2()
    ref = copy.deepcopy(model)
    clip = 0.05 if kind == "gpt2" else 0.0
    trainer, snaps = make_trainer(model, text_data(48, kind, 1), tmp_path, max_grad_norm=clip)
    trainer.train()
    assert trainer.state.global_step == 4
    assert [len(c) for c in trainer.cycles] == [3] * 4
    want = manual(ref, trainer.cycles, *SGD, clip=clip)
    assert_same_trajectory(snaps.params, want, rtol=1e-5, atol=1e-6)
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, FSAM) and isinstance(opt.base_optimizer, torch.optim.SGD)


def test_trainer_with_a_schedule_skips_the_second_pass_on_cheap_steps(tmp_path):
    """schedule=EveryK(2) through fsam_kwargs: cycles 1 and 3 perturb (two passes over their
    3 micro-batches), 2 and 4 take the cheap step (one pass); the trajectory is the manual
    loop's with the same schedule."""
    torch.manual_seed(0)
    model = bert()
    ref = copy.deepcopy(model)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    kw = {**FSAM_KW, "schedule": EveryK(2)}
    trainer, snaps = make_trainer(model, text_data(48, "bert", 1), tmp_path, fsam_kw=kw)
    trainer.train()
    assert trainer.state.global_step == 4
    assert len(forwards) == 4 * 3 + 2 * 3
    want = manual(ref, trainer.cycles, *SGD, schedule=EveryK(2))
    assert_same_trajectory(snaps.params, want, rtol=1e-5, atol=1e-6)
    assert trainer.optimizer.optimizer.last_perturbed is False


def test_trainer_bf16_matches_manual_autocast_loop(tmp_path):
    """bf16=True: accelerate's autocast around each forward, both passes; the oracle runs the
    same loop under torch.autocast(bfloat16)."""
    torch.manual_seed(1)
    model = bert()
    ref = copy.deepcopy(model)
    trainer, snaps = make_trainer(model, text_data(48, "bert", 2), tmp_path, bf16=True)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    want = manual(ref, trainer.cycles, *SGD, dtype=torch.bfloat16)
    assert_same_trajectory(snaps.params, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init_scale", [2.0**8, 2.0**24])
def test_trainer_fp16_through_accelerates_scaler(init_scale, tmp_path):
    """fp16: first_step gets accelerate's GradScaler, the Trainer clips after unscaling and
    its optimizer.step() is scaler.step + update. At 2**24 the first step overflows in
    fp16 and is skipped (weights unchanged), the scale backs off and training goes on, as
    in the oracle with its own GradScaler. (accelerate gives no GradScaler on the CPU: the
    test hands it one, with fp16 autocast, as accelerate sets itself up on CUDA.)"""
    torch.manual_seed(2)
    model = bert()
    ref, start = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    trainer, snaps = make_trainer(
        model, text_data(96, "bert", 3), tmp_path, fp16=True, fp16_scaler=scaler,
        max_grad_norm=0.05, max_steps=8,
    )  # fmt: skip
    trainer.train()
    oracle_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    want = manual(ref, trainer.cycles, *SGD, clip=0.05, dtype=torch.float16, scaler=oracle_scaler)
    assert_same_trajectory(snaps.params, want, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == oracle_scaler.get_scale()
    skipped = all(torch.equal(snaps.params[0][n], start[n]) for n in snaps.params[0])
    assert skipped == (init_scale > 2.0**16)


def test_trainer_batchnorm_counts_first_pass_only(tmp_path):
    """The second forward (at w + e) updates no running statistics: after 4 steps of 3
    micro-batches every BatchNorm counted 12 batches, and its running mean and variance are
    the oracle's."""
    torch.manual_seed(3)
    model = BNNet()
    ref = copy.deepcopy(model)
    trainer, snaps = make_trainer(model, bn_data(48, 4), tmp_path)
    trainer.train()
    want = manual(ref, trainer.cycles, *SGD)
    assert_same_trajectory(snaps.params, want, rtol=1e-5, atol=1e-6)
    bn, ref_bn = model.net[1], ref.net[1]
    assert int(bn.num_batches_tracked) == 12 == int(ref_bn.num_batches_tracked)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)


def test_trainer_builds_fsam_around_the_selected_optimizer(tmp_path):
    """optim="adamw_torch" with weight decay: FSAM wraps torch's AdamW with the Trainer's
    parameter groups (biases and LayerNorm without decay) and F-SAM's settings."""
    model = bert()
    trainer, _ = make_trainer(
        model, text_data(8, "bert", 5), tmp_path, optim="adamw_torch", weight_decay=0.01
    )
    opt = trainer.create_optimizer()
    assert isinstance(opt, FSAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert (opt.sigma, opt.lmbda) == (FSAM_KW["sigma"], FSAM_KW["lmbda"])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["rho"] == FSAM_KW["rho"] and g["lr"] == 0.05 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_trainer_refuses_a_base_that_is_not_an_optimizer_class(tmp_path):
    trainer, _ = make_trainer(bert(), text_data(8, "bert", 5), tmp_path)
    trainer.optimizer_cls_and_kwargs = (lambda params, **kw: None, {})
    with pytest.raises(TypeError, match="torch.optim.Optimizer class as F-SAM's base"):
        trainer.create_optimizer()


def test_trainer_second_pass_error_restores_the_weights(tmp_path):
    """An error in the second pass (here: the second forward of the first cycle) leaves the
    weights where the first pass found them, not at w + e."""
    torch.manual_seed(4)
    model = BNNet()
    start = copy.deepcopy(model.state_dict())
    trainer, _ = make_trainer(model, bn_data(48, 6), tmp_path)
    calls = {"n": 0}

    def fail_on_fourth(module, args):
        calls["n"] += 1
        if calls["n"] == 4:  # 3 first-pass forwards, then the second pass's first
            raise RuntimeError("boom in the second pass")

    model.net[0].register_forward_pre_hook(fail_on_fourth)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), start[name]), name


def test_trainer_ddp_two_processes_match_single_process_global_batch(tmp_path):
    """Two gloo processes on 127.0.0.1 (tests/hf_ddp_worker.py), 2 micro-batches of 2 per
    rank and cycle, 3 steps: both ranks hold the same weights after every step, and they
    are single-process F-SAM on the global batch (every rank's micro-batches, each loss /
    (k * world size)), as DDP's mean of the ranks' gradients makes them."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(
        os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(here),
    )  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(here, "hf_ddp_worker.py"), str(tmp_path)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert all(p.returncode == 0 for p in procs), "\n".join(t[-3000:] for t in logs)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["ddp"] == "DistributedDataParallel"
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert all(torch.equal(a[n], b[n]) for n in a)
    model = bert()
    model.load_state_dict(ranks[0]["init"], strict=False)
    # The global batch of each cycle: micro-batch i of every rank, each loss / (k * 2).
    cycles = [
        [mb for i in range(len(c0)) for mb in (c0[i], c1[i])]
        for c0, c1 in zip(ranks[0]["cycles"], ranks[1]["cycles"])
    ]
    want = manual(model, cycles, *SGD)
    assert_same_trajectory(ranks[0]["params"], want, rtol=1e-5, atol=1e-6)
