"""state_dict conventions as torch's own optimizer tests state them (test/test_optim.py): state_dict
and load_state_dict hooks, non-parameter entries in ``state``, group flags an older
checkpoint lacks, ``param_names``; the ``fsam`` format version; SAM and F-SAM checkpoints
loaded into each other; copies and pickles with hooks; a CPU checkpoint on CUDA."""

import copy
import io
import pickle

import pytest
import torch

from fsam_fused import FSAM, SAM, checkpoint


def _net(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    ).to(device=device, dtype=torch.float64)


def _data(seed, n, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 4, generator=g, dtype=torch.float64).to(device),
            torch.randn(8, 2, generator=g, dtype=torch.float64).to(device),
        )
        for _ in range(n)
    ]


def _steps(net, opt, data):
    for x, y in data:
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.second_step(zero_grad=True)


def _fsam(net, base=torch.optim.SGD, named=False, **kw):
    kw = {"lr": 0.05, "momentum": 0.9, **kw} if base is torch.optim.SGD else {"lr": 1e-2, **kw}
    params = net.named_parameters() if named else net.parameters()
    return FSAM(params, base, rho=0.1, sigma=0.8, lmbda=0.7, **kw)


def _stepped(n=2, **kw):
    net = _net()
    opt = _fsam(net, **kw)
    _steps(net, opt, _data(1, n))
    return net, opt


def _snapshot(net, opt):
    return copy.deepcopy(
        (
            [p.detach() for p in net.parameters()],
            [dict(opt.state[p]) if p in opt.state else None for p in net.parameters()],
            opt.base_optimizer.state_dict(),
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            (opt.sigma, opt.lmbda, opt.ema_order),
        )
    )


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if torch.is_tensor(x):
            assert torch.equal(x, y)
        elif isinstance(x, dict):
            assert x.keys() == y.keys()
            _same(list(x.values()), list(y.values()))
        elif isinstance(x, (list, tuple)):
            _same(x, y)
        else:
            assert x == y


# ---------------------------------------------------------------- state_dict hooks (torch's)


def _pre_hook(opt):
    opt.state["test"] = 1


def _post_hook(opt, sd):
    # torch's test hook, plus: the post-hook sees the whole dict, FSAM's entries included.
    assert {"base_optimizer", "fsam"} <= set(sd)
    sd["ran_state_dict_pre_hook"] = "test" in sd["state"]
    sd["state"].pop("test", None)
    return sd


def test_state_dict_pre_hook_may_add_a_non_parameter_entry():
    net, opt = _stepped()
    opt.register_state_dict_pre_hook(_pre_hook)
    sd = opt.state_dict()
    assert sd["state"]["test"] == 1
    assert sd["state"][0]["ema"].shape == (3, 4)
    # The entry survives a round trip (torch copies non-parameter state as it is) and the
    # optimizer still steps with it in its state.
    other = _fsam(_net())
    other.load_state_dict(copy.deepcopy(sd))
    assert other.state["test"] == 1
    _steps(net, opt, _data(2, 1))


def test_state_dict_post_hook_sees_the_whole_dict_and_may_return_a_new_one():
    net, opt = _stepped()
    opt.register_state_dict_post_hook(_post_hook)
    assert opt.state_dict()["ran_state_dict_pre_hook"] is False
    opt.register_state_dict_pre_hook(_pre_hook)
    sd = opt.state_dict()
    assert sd["ran_state_dict_pre_hook"] is True and "test" not in sd["state"]
    replaced = {"replaced": True}
    h = opt.register_state_dict_post_hook(lambda o, s: replaced)
    assert opt.state_dict() is replaced
    h.remove()
    first = opt.register_state_dict_post_hook(lambda o, s: dict(s, order=["first"]), prepend=True)
    assert opt.state_dict()["order"] == ["first"]
    first.remove()


# ---------------------------------------------------------------- load_state_dict hooks


def _load_pre_hook1(opt, sd):
    sd["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(opt, sd):
    mine = copy.deepcopy(sd)
    mine["param_groups"][0]["lr"] = 0.003
    return mine


def _load_post_hook(opt):
    opt.state["ran_load_state_dict_pre_hook2"] = opt.param_groups[0]["lr"] == 0.003
    opt.state["ran_load_state_dict_post_hook"] = True


def test_load_state_dict_pre_hooks_run_in_order_and_prepend():
    net, opt = _stepped()
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_load_pre_hook1)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.002  # one group dict for both
    opt.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002  # hook1 runs after the prepended hook2


def test_load_state_dict_pre_hook_sees_the_dict_as_given():
    net, opt = _stepped()
    sd = opt.state_dict()
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, s: seen.append(sorted(s)))
    opt.load_state_dict(sd)
    assert seen == [["base_optimizer", "fsam", "param_groups", "state"]]


def test_load_state_dict_post_hook_runs_after_loading():
    net, opt = _stepped()
    opt.register_load_state_dict_post_hook(_load_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is False
    assert opt.state["ran_load_state_dict_post_hook"] is True
    opt.register_load_state_dict_pre_hook(_load_pre_hook2)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is True
    _steps(net, opt, _data(3, 1))  # still steps with non-parameter entries in its state


def test_load_state_dict_pre_hook_gets_a_shallow_copy():
    net, opt = _stepped()
    sd = opt.state_dict()
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, s: seen.append(s is sd) or s.update(extra=1))
    opt.load_state_dict(sd)
    assert seen == [False] and "extra" not in sd


# ---------------------------------------------------------------- older checkpoints


# The flags torch's optimizer database marks "not in the original version" (torch 2.13's
# common_optimizers.py, not_og_supported_flags).
FLAGS = {
    torch.optim.SGD: ("foreach", "differentiable", "fused", "maximize"),
    torch.optim.Adam: ("foreach", "maximize", "capturable", "differentiable", "fused"),
    torch.optim.AdamW: ("foreach", "maximize", "capturable", "differentiable", "fused"),
}


@pytest.mark.parametrize("base", list(FLAGS), ids=lambda c: c.__name__)
def test_a_checkpoint_without_newer_group_flags_loads_and_resumes_exactly(base):
    net, opt = _stepped(base=base)
    old = copy.deepcopy(opt.state_dict())
    for groups in (old["param_groups"], old["base_optimizer"]["param_groups"]):
        for g in groups:
            for flag in FLAGS[base]:
                g.pop(flag, None)
    # What torch itself fills in: the base optimizer class loading the same old groups.
    probe = base([torch.zeros(1, requires_grad=True) for _ in net.parameters()], lr=0.1)
    probe.load_state_dict({"state": {}, "param_groups": copy.deepcopy(old["param_groups"])})

    net_b = copy.deepcopy(net)
    opt_b = _fsam(net_b, base=base, maximize=True)  # a constructor default is not a fill
    opt_b.load_state_dict(old)
    for flag in FLAGS[base]:
        assert opt_b.param_groups[0][flag] == probe.param_groups[0][flag], flag
    data = _data(4, 3)
    _steps(net, opt, data)
    _steps(net_b, opt_b, data)
    for a, b in zip(net.parameters(), net_b.parameters()):
        assert torch.equal(a, b)


def test_a_group_without_rho_is_named():
    net, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["rho"]
    before = _snapshot(net, opt)
    with pytest.raises(ValueError, match="param group 0 has no 'rho'"):
        opt.load_state_dict(sd)
    _same(_snapshot(net, opt), before)


# ---------------------------------------------------------------- param_names


@pytest.mark.parametrize("named0", [True, False])
@pytest.mark.parametrize("named1", [True, False])
def test_param_names_are_kept_as_torch_keeps_them(named0, named1):
    net, opt = _stepped(named=named0)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = _fsam(net, named=named1)
    opt2.load_state_dict(sd)
    _steps(net, opt2, _data(5, 1))
    names = opt2.state_dict()["param_groups"][0].get("param_names")
    want = [n for n, _ in net.named_parameters()]
    assert names == (want if named0 or named1 else None)
    assert opt2.base_optimizer.param_groups is opt2.param_groups


def test_saved_param_names_replace_the_optimizers():
    net, opt = _stepped(named=True)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["param_names"] = [f"renamed{i}" for i in range(6)]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["param_names"] == [f"renamed{i}" for i in range(6)]


# ---------------------------------------------------------------- the format version


@pytest.mark.parametrize(
    "version, match",
    [
        (None, "no 'version'"),
        (checkpoint.VERSION + 1, "newer fsam-fused"),
        ("1", "not a format"),
        (0, "not a format"),
        (True, "not a format"),
    ],
)
def test_the_format_version_is_checked_before_anything_changes(version, match):
    net, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    if version is None:
        del sd["fsam"]["version"]
    else:
        sd["fsam"]["version"] = version
    sd["fsam"]["sigma"] = 0.3
    sd["param_groups"][0]["lr"] = 1.0
    before = _snapshot(net, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _same(_snapshot(net, opt), before)


# ---------------------------------------------------------------- SAM and F-SAM


def test_sam_refuses_an_fsam_checkpoint_and_the_recipe_in_its_message_works():
    net, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    sam_net = copy.deepcopy(net)
    sam = SAM(sam_net.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    before = _snapshot(sam_net, sam)
    with pytest.raises(ValueError, match=r"SAM cannot load an F-SAM checkpoint \(sigma=0.8"):
        sam.load_state_dict(sd)
    _same(_snapshot(sam_net, sam), before)
    assert sam.sigma == 0.0
    # Only an EMA (sigma set to 0 by hand) is refused too.
    with pytest.raises(ValueError, match="an EMA for 6 parameters"):
        sam.load_state_dict(dict(sd, fsam=dict(sd["fsam"], sigma=0.0)))

    # The recipe the message gives: plain SAM from here on, with the base optimizer's state.
    sd["fsam"]["sigma"] = 0.0
    for s in sd["state"].values():
        s.pop("ema")
    # (Each load gets its own copy: torch's load_state_dict keeps the dict's tensors when no
    # cast is needed, so two optimizers loading one dict would share momentum buffers.)
    sam.load_state_dict(copy.deepcopy(sd))
    ref = copy.deepcopy(net)
    ref_opt = _fsam(ref)
    with pytest.warns(UserWarning, match="plain SAM's"):
        ref_opt.load_state_dict(copy.deepcopy(sd))
    data = _data(6, 3)
    _steps(sam_net, sam, data)
    _steps(ref, ref_opt, data)
    assert ref_opt.sigma == 0.0
    for a, b in zip(sam_net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert not any("ema" in s for s in sam.state.values())


def test_fsam_loading_a_sam_checkpoint_runs_sam_and_says_so():
    net = _net()
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    _steps(net, sam, _data(7, 2))
    sd = copy.deepcopy(sam.state_dict())
    net_b = copy.deepcopy(net)
    opt = _fsam(net_b)
    with pytest.warns(UserWarning, match="plain SAM's .sigma = 0.*set opt.sigma"):
        opt.load_state_dict(sd)
    assert opt.sigma == 0.0
    data = _data(8, 2)
    _steps(net, sam, data)
    _steps(net_b, opt, data)
    for a, b in zip(net.parameters(), net_b.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- copies


def test_pickle_and_deepcopy_drop_hooks_as_torch_does():
    net, opt = _stepped()
    opt.register_state_dict_pre_hook(lambda o: None)  # a lambda cannot be pickled
    opt.register_load_state_dict_post_hook(lambda o: None)
    opt.register_step_pre_hook(lambda o, a, k: None)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    sgd.register_state_dict_pre_hook(lambda o: None)
    assert len(copy.deepcopy(sgd)._optimizer_state_dict_pre_hooks) == 0  # torch's behaviour
    names = ("_optimizer_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert all(len(getattr(clone, n)) == 0 for n in names)
        assert len(clone._optimizer_step_pre_hooks) == 0
        assert clone.state_dict()["fsam"] == opt.state_dict()["fsam"]
    assert len(opt._optimizer_state_dict_pre_hooks) == 1  # the original keeps its hooks


def test_torch_save_with_weights_only_reads_a_state_dict_with_names_and_extra_entries():
    net, opt = _stepped(named=True)
    opt.register_state_dict_pre_hook(_pre_hook)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["state"]["test"] == 1
    assert loaded["param_groups"][0]["param_names"] == [n for n, _ in net.named_parameters()]


@pytest.mark.cuda
def test_a_cpu_checkpoint_loads_onto_cuda():
    net, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    net_c = copy.deepcopy(net).cuda()
    opt_c = _fsam(net_c)
    opt_c.load_state_dict(sd)
    assert all(s["ema"].device.type == "cuda" for s in opt_c.state.values())
    data = _data(9, 2)
    _steps(net, opt, data)
    _steps(net_c, opt_c, [(x.cuda(), y.cuda()) for x, y in data])
    for a, b in zip(net.parameters(), net_c.parameters()):
        # The norm's squares are summed in float32 (on each device in its own order): the
        # scale may differ by float32 rounding; a lost or misplaced EMA would be off by 1e-3.
        torch.testing.assert_close(a, b.cpu(), rtol=1e-6, atol=1e-8)


def test_indices_are_torchs_also_for_a_repeated_group():
    """torch's test_state_dict_deterministic extends param_groups with themselves; the
    indices must stay the base optimizer's (torch's own numbering)."""
    net, opt = _stepped()
    extra = [torch.zeros(2, requires_grad=True) for _ in range(2)]
    # A repeated parameter, then new ones: torch counts the repeat in its numbering.
    opt.param_groups.append({**opt.param_groups[0], "params": [net[0].weight, extra[0]]})
    opt.param_groups.append({**opt.param_groups[0], "params": [extra[1]]})
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [
        g["params"] for g in sd["base_optimizer"]["param_groups"]
    ]


def _equal(a, b, path=""):
    if torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (path, set(a) ^ set(b))
        for k in a:
            _equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{path}/{i}")
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("named0", [True, False])
@pytest.mark.parametrize("named1", [True, False])
def test_state_dict_is_deterministic_with_or_without_names(named0, named1):
    """torch's test_state_dict_deterministic: equal runs give equal state_dicts once the
    groups' param_names are removed (names live in FSAM's groups only, not in the base's)."""
    net, opt = _stepped(named=named0)
    net_c = copy.deepcopy(net)
    opt_c = _fsam(net_c, named=named1)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    data = _data(11, 3)
    _steps(net, opt, data)
    _steps(net_c, opt_c, data)

    def without_names(sd):
        sd = copy.deepcopy(sd)
        for g in sd["param_groups"]:
            g.pop("param_names", None)
        return sd

    _equal(without_names(opt.state_dict()), without_names(opt_c.state_dict()))
