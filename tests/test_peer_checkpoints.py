"""Resuming in FSAM from the checkpoints of the SAM optimizers users switch from: davda54's SAM
(tests/peers/davda54_sam.py, its code unchanged), the authors' FriendlySAM
(fsam_fused/published.py) and pytorch_optimizer's FriendlySAM. Each peer runs a few steps,
its state_dict goes through torch.save/torch.load(weights_only=True), FSAM loads it and
continues; the oracle is the peer itself continuing (when the user kept the base optimizer's
state too) or resuming from its own checkpoint (when not: their state_dict does not hold it,
so their own resume starts the base optimizer afresh as well)."""

import copy
import io

import pytest
import torch
from peers.davda54_sam import SAM as Davda54SAM
from pytorch_optimizer import SAM as PyOptSAM
from pytorch_optimizer import FriendlySAM as PyOptFriendlySAM

from fsam_fused import FSAM, SAM
from fsam_fused.peers import PeerCheckpointWarning
from fsam_fused.published import FriendlySAM as AuthorsFriendlySAM

BASE = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(
        torch.float64
    )


def _groups(net, rho=0.1):
    """Two groups with their own rho: the state must land on the right parameters."""
    first, *rest = net
    return [
        {"params": list(first.parameters())},
        {"params": list(net[2].parameters()), "rho": 2 * rho},
    ]


def _data(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 5, generator=g, dtype=torch.float64),
            torch.randn(8, 3, generator=g, dtype=torch.float64),
        )
        for _ in range(n)
    ]


def _steps(net, opt, data):
    for x, y in data:
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.second_step(zero_grad=True)


def _saved(sd):
    """Through a file, as a user's checkpoint is (and readable with weights_only=True)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _close(net_a, net_b):
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        # FSAM sums the norm's squares in float32 (for float64 weights too), the peers in
        # float64: the scale differs by float32 rounding (1e-7 relative) and the weights by
        # about 1e-9 after a few steps. A lost EMA or momentum buffer moves them by 1e-3.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


PEERS = {
    "davda54": (
        lambda groups: Davda54SAM(groups, torch.optim.SGD, rho=0.1, **BASE),
        lambda groups: SAM(groups, torch.optim.SGD, rho=0.3, lr=1.0),
    ),
    "authors": (
        lambda groups: AuthorsFriendlySAM(
            groups, torch.optim.SGD, rho=0.1, sigma=0.8, lmbda=0.7, **BASE
        ),
        lambda groups: FSAM(groups, torch.optim.SGD, rho=0.3, sigma=0.8, lmbda=0.7, lr=1.0),
    ),
    "pytorch_optimizer": (
        lambda groups: PyOptFriendlySAM(
            groups, torch.optim.SGD, rho=0.1, sigma=0.8, lmbda=0.7, foreach=False, **BASE
        ),
        lambda groups: FSAM(groups, torch.optim.SGD, rho=0.3, sigma=1.0, lmbda=0.9, lr=1.0),
    ),
    "pytorch_optimizer_foreach": (
        lambda groups: PyOptFriendlySAM(
            groups, torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.7, foreach=True, **BASE
        ),
        lambda groups: FSAM(groups, torch.optim.SGD, rho=0.3, sigma=0.5, lmbda=0.9, lr=1.0),
    ),
    # Its state is its base optimizer's: always carried (no "alone" case).
    "pytorch_optimizer_sam": (
        lambda groups: PyOptSAM(groups, torch.optim.SGD, rho=0.1, foreach=False, **BASE),
        lambda groups: SAM(groups, torch.optim.SGD, rho=0.3, lr=1.0),
    ),
}
CASES = [(p, b) for p in PEERS for b in (True, False) if (p, b) != ("pytorch_optimizer_sam", False)]


@pytest.mark.parametrize("peer, with_base", CASES)
def test_fsam_continues_a_peers_run(peer, with_base):
    make_peer, make_fsam = PEERS[peer]
    net = _net()
    theirs = make_peer(_groups(net))
    _steps(net, theirs, _data(1, 3))
    sd = theirs.state_dict()
    # pytorch_optimizer 4.x saves the base optimizer's state under 'base_optimizer' (an
    # older version did not: "alone" removes it); for the others, the recipe puts the pair
    # the user saved in one dict.
    if peer == "pytorch_optimizer_sam":
        assert set(sd["state"][0]) == {"momentum_buffer"}
    elif "pytorch_optimizer" in peer:
        assert "base_optimizer" in sd
        if not with_base:
            del sd["base_optimizer"]
    elif with_base:
        sd = dict(sd, base_optimizer=theirs.base_optimizer.state_dict())
    sd = _saved(sd)
    if not with_base:  # the oracle: the peer resuming from its own checkpoint
        net_o = copy.deepcopy(net)
        theirs = make_peer(_groups(net_o))
        theirs.load_state_dict(copy.deepcopy(sd))
        net = net_o

    net_f = copy.deepcopy(net)
    ours = make_fsam(_groups(net_f, rho=0.3))  # rho and lr replaced by the checkpoint's
    with pytest.warns(PeerCheckpointWarning) as caught:
        ours.load_state_dict(sd)
    message = str(caught[0].message)
    assert ours.param_groups[1]["rho"] == 0.2 and ours.param_groups[0]["lr"] == 0.05
    assert ours.base_optimizer.param_groups is ours.param_groups
    if peer in ("davda54", "pytorch_optimizer_sam"):
        assert not any(ours.state.values())
    else:
        assert "the EMA 'momentum' of 4 parameter(s)" in message
        assert (ours.sigma, ours.lmbda) == (theirs.param_groups[0].get("sigma", 0.8), 0.7)
        for p in net_f.parameters():
            assert ours.state[p]["ema"].dtype == torch.float64
    if peer in ("davda54", "authors"):
        assert "'old_p'" in message.split("Not imported")[1]
    assert ("starts afresh" in message) != with_base

    data = _data(2, 4)
    _steps(net, theirs, data)
    _steps(net_f, ours, data)
    _close(net, net_f)


def test_the_authors_ema_is_what_fsam_would_have_kept():
    """Switching from the authors' code after 3 steps equals FSAM from the start (same EMA
    order, same first-sight rule), within float64 rounding."""
    net = _net(3)
    net_f = copy.deepcopy(net)
    theirs = AuthorsFriendlySAM(
        _groups(net), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.6, **BASE
    )
    ours_all_along = FSAM(_groups(net_f), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.6, **BASE)
    data = _data(4, 6)
    _steps(net, theirs, data[:3])
    _steps(net_f, ours_all_along, data[:3])
    switched = FSAM(_groups(net), torch.optim.SGD, sigma=1.0, lmbda=0.6, **BASE)
    with pytest.warns(PeerCheckpointWarning):
        switched.load_state_dict(
            _saved(dict(theirs.state_dict(), base_optimizer=theirs.base_optimizer.state_dict()))
        )
    _steps(net, switched, data[3:])
    _steps(net_f, ours_all_along, data[3:])
    _close(net, net_f)


def test_a_sam_checkpoint_into_fsam_starts_its_ema_and_says_so():
    net = _net()
    theirs = Davda54SAM(_groups(net), torch.optim.SGD, rho=0.1, **BASE)
    _steps(net, theirs, _data(5, 2))
    base_sd = copy.deepcopy(theirs.base_optimizer.state_dict())
    sd = _saved(dict(theirs.state_dict(), base_optimizer=base_sd))
    net_f, net_o = copy.deepcopy(net), copy.deepcopy(net)
    ours = FSAM(_groups(net_f), torch.optim.SGD, sigma=0.9, lmbda=0.5, **BASE)
    with pytest.warns(PeerCheckpointWarning, match="an EMA .the checkpoint holds none"):
        ours.load_state_dict(sd)
    assert (ours.sigma, ours.lmbda) == (0.9, 0.5)
    # The oracle: a fresh FSAM given the base optimizer's state by hand.
    oracle = FSAM(_groups(net_o), torch.optim.SGD, rho=0.1, sigma=0.9, lmbda=0.5, **BASE)
    oracle.base_optimizer.load_state_dict(copy.deepcopy(base_sd))
    data = _data(6, 3)
    _steps(net_f, ours, data)
    _steps(net_o, oracle, data)
    for a, b in zip(net_f.parameters(), net_o.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("peer", ["authors", "pytorch_optimizer"])
def test_sam_refuses_a_friendlysam_checkpoint(peer):
    net = _net()
    theirs = PEERS[peer][0](_groups(net))
    _steps(net, theirs, _data(7, 2))
    sam = SAM(_groups(net), torch.optim.SGD, lr=1.0)
    with pytest.raises(ValueError, match="SAM cannot load an F-SAM checkpoint"):
        sam.load_state_dict(theirs.state_dict())
    assert sam.sigma == 0.0 and sam.param_groups[0]["lr"] == 1.0 and not sam.state


def _pyopt_sd():
    net = _net()
    theirs = PEERS["pytorch_optimizer"][0](_groups(net))
    _steps(net, theirs, _data(8, 2))
    return net, copy.deepcopy(theirs.state_dict())


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda sd: sd["param_groups"][1].update(sigma=0.5), "different sigma or lmbda"),
        (lambda sd: sd["state"][0].update(old_p=torch.zeros(4, 5)), "saved between first_step"),
        (lambda sd: sd["state"][0].update(exp_avg=torch.zeros(4, 5)), r"\['exp_avg'\]"),
        (lambda sd: [g.pop("rho") for g in sd["param_groups"]], "not an FSAM state_dict"),
        (lambda sd: sd["state"][0].update(momentum=torch.zeros(5, 4)), "EMA"),
        (
            lambda sd: sd.update(base_optimizer=torch.optim.Adam(_net().parameters()).state_dict()),
            "param groups of other sizes",
        ),
    ],
)
def test_a_bad_peer_checkpoint_is_refused_before_anything_changes(corrupt, match):
    net, sd = _pyopt_sd()
    corrupt(sd)
    ours = FSAM(_groups(net), torch.optim.SGD, sigma=0.3, lr=1.0)
    with pytest.raises(ValueError, match=match):
        ours.load_state_dict(sd)
    assert ours.sigma == 0.3 and ours.param_groups[0]["lr"] == 1.0 and not ours.state


def test_a_peers_base_state_of_another_optimizer_is_refused():
    net = _net()
    theirs = AuthorsFriendlySAM(_groups(net), torch.optim.Adam, rho=0.1, lr=1e-3)
    _steps(net, theirs, _data(9, 2))
    sd = dict(theirs.state_dict(), base_optimizer=theirs.base_optimizer.state_dict())
    ours = FSAM(_groups(net), torch.optim.SGD, lr=1.0, momentum=0.9)
    with pytest.raises(ValueError, match="another optimizer"):
        ours.load_state_dict(sd)
    assert not ours.state


def test_a_16_bit_peers_ema_loads_as_saved_and_steps_in_float32():
    net = _net().to(torch.bfloat16)
    theirs = AuthorsFriendlySAM(
        _groups(net), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.7, lr=0.05
    )
    data = [(x.bfloat16(), y.bfloat16()) for x, y in _data(10, 3)]
    _steps(net, theirs, data[:2])
    ours = FSAM(_groups(net), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.7, lr=0.05)
    with pytest.warns(PeerCheckpointWarning):
        ours.load_state_dict(_saved(theirs.state_dict()))
    for p in net.parameters():
        assert torch.equal(ours.state[p]["ema"], theirs.state[p]["momentum"])
    _steps(net, ours, data[2:])
    assert all(ours.state[p]["ema"].dtype == torch.float32 for p in net.parameters())


def test_ema_order_becomes_the_authors_only_with_their_ema():
    net = _net()
    theirs = AuthorsFriendlySAM(_groups(net), torch.optim.SGD, rho=0.1, lr=0.05)
    sam = Davda54SAM(_groups(net), torch.optim.SGD, rho=0.1, lr=0.05)
    _steps(net, theirs, _data(12, 1))
    _steps(net, sam, _data(13, 1))
    for peer, order in ((sam, "paper"), (theirs, "official")):
        ours = FSAM(_groups(net), torch.optim.SGD, ema_order="paper", lr=0.05)
        with pytest.warns(PeerCheckpointWarning) as caught:
            ours.load_state_dict(peer.state_dict())
        assert ours.ema_order == order
        assert ("ema_order='official'" in str(caught[0].message)) == (order == "official")
