"""zeal.moe in one process: DeepSpeed's gating rules (against loop references written from the
rules, and against DeepSpeed's own functions where DeepSpeed is installed), the index-based
dispatch against the dense einsum formulation, names, parameter groups and argument errors.
Multi-rank training against a dense torch reference: test_multirank.py (ranks/moe_engine.py)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zeal
from zeal.moe import sharded_moe
from zeal.moe.layer import MoE
from zeal.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

HERE = Path(__file__).parent


def logits_of(seed, tokens=24, experts=4):
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * 2


def routes_of(combine):
    """{(token, expert): (slot, weight)} from a dense combine_weights [s, e, c]."""
    out = {}
    for s, e, c in combine.nonzero().tolist():
        out[(s, e)] = (c, combine[s, e, c].item())
    return out


def test_capacity_is_ceil_of_tokens_per_expert_times_factor_at_least_min_capacity():
    gates = torch.zeros(10, 4)
    assert sharded_moe._capacity(gates, 1.0, 0).item() == 3  # ceil(2.5)
    assert sharded_moe._capacity(gates, 0.5, 0).item() == 2  # ceil(1.25)
    assert sharded_moe._capacity(gates, 0.5, 4).item() == 4
    assert sharded_moe._capacity(gates, 2.0, 1).item() == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top2_drops_by_position_after_every_first_choice(seed):
    # The rule: capacity = ceil(s / e x 2 x factor); an expert's slots go to first choices in token
    # order, then to second choices in token order; a route past the capacity is dropped; each
    # token's kept gates are renormalised over its two choices (dropped ones count as 0).
    logits = logits_of(seed)
    factor = 0.5
    l_aux, combine, dispatch, counts = sharded_moe.top2gating(logits.clone(), factor, 1, top2_2nd_expert_sampling=False)
    gates = F.softmax(logits, dim=1)
    s, e = gates.shape
    capacity = int(torch.ceil(torch.tensor(s / e * factor * 2)))
    first = gates.argmax(1).tolist()
    second = gates.masked_fill(F.one_hot(gates.argmax(1), e).bool(), float("-inf")).argmax(1).tolist()
    used = [0] * e
    slot = {}
    for choice in (first, second):
        for t in range(s):
            x = choice[t]
            if used[x] < capacity:
                slot[(t, x)] = used[x]
            used[x] += 1
    want = {}
    for t in range(s):
        g1 = gates[t, first[t]].item() if (t, first[t]) in slot else 0.0
        g2 = gates[t, second[t]].item() if (t, second[t]) in slot else 0.0
        denom = max(g1 + g2, torch.finfo(torch.float32).eps)
        for x, g in ((first[t], g1), (second[t], g2)):
            if (t, x) in slot and g > 0:
                want[(t, x)] = (slot[(t, x)], g / denom)
    got = routes_of(combine)
    assert got.keys() == want.keys()
    for key, (c, w) in want.items():
        assert got[key][0] == c and abs(got[key][1] - w) <= 1e-6, (key, got[key], (c, w))
    assert len(want) < 2 * s, "the capacity dropped nothing: the case is not exercised"
    assert torch.equal(dispatch, combine.bool())
    assert counts.tolist() == [first.count(x) + second.count(x) for x in range(e)]  # before dropping
    me = gates.mean(0)
    ce = F.one_hot(torch.tensor(first), e).float().mean(0)
    assert abs(l_aux.item() - (me * ce).mean().item() * e * e) <= 1e-6


def test_top1_random_token_selection_keeps_the_largest_draws():
    # The rule: an over-full expert keeps the `capacity` tokens with the largest uniform draw (one
    # draw per token and expert, torch.rand in the generator's order); kept tokens take slots in
    # token order; the weight is the token's softmax probability (not renormalised).
    logits = logits_of(5)
    s, e = logits.shape
    torch.manual_seed(11)
    l_aux, combine, _, counts = sharded_moe.top1gating(logits, 0.5, 1)
    torch.manual_seed(11)
    draw = torch.rand(s, e)
    gates = F.softmax(logits, dim=1)
    capacity = int(torch.ceil(torch.tensor(s / e * 0.5)))
    choice = gates.argmax(1).tolist()
    want = {}
    for x in range(e):
        mine = [t for t in range(s) if choice[t] == x]
        kept = sorted(sorted(mine, key=lambda t: -draw[t, x].item())[:capacity])
        for c, t in enumerate(kept):
            want[(t, x)] = (c, gates[t, x].item())
    got = routes_of(combine)
    assert got.keys() == want.keys()
    assert all(got[k][0] == want[k][0] and abs(got[k][1] - want[k][1]) <= 1e-6 for k in want)
    assert len(want) < s
    assert counts.tolist() == [choice.count(x) for x in range(e)]
    assert abs(l_aux.item() - (gates.mean(0) * F.one_hot(torch.tensor(choice), e).float().mean(0)).sum().item() * e) < 1e-6


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_topk_drops_by_position_or_by_probability(policy):
    logits = logits_of(9, tokens=20, experts=5)
    k, factor = 3, 0.5
    _, combine, _, _ = sharded_moe.topkgating(logits, k, factor, 1, drop_policy=policy)
    gates = F.softmax(logits, dim=1)
    s, e = gates.shape
    capacity = int(torch.ceil(torch.tensor(s / e * factor * k)))
    chosen = [set(gates[t].topk(k).indices.tolist()) for t in range(s)]
    kept = set()
    for x in range(e):
        mine = [t for t in range(s) if x in chosen[t]]
        if policy == "probs":
            mine = sorted(mine, key=lambda t: -gates[t, x].item())
        kept |= {(t, x) for t in mine[:capacity]}
    want = {}
    for x in range(e):
        for c, t in enumerate(sorted(t for t in range(s) if (t, x) in kept)):
            total = sum(gates[t, y].item() for y in range(e) if (t, y) in kept)
            want[(t, x)] = (c, gates[t, x].item() / total)
    got = routes_of(combine)
    assert got.keys() == want.keys()
    assert all(got[key][0] == want[key][0] and abs(got[key][1] - want[key][1]) <= 1e-6 for key in want)
    assert len(want) < k * s


def test_gating_equals_deepspeeds_own_functions():
    # Every gating variant, seeded alike, against deepspeed.moe.sharded_moe (the pinned benchmark
    # peer) in a separate process: the same tensors bit for bit, random draws included.
    try:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            pytest.skip("DeepSpeed is not installed (scripts/install-bench-deps installs the pinned one)")
    except ValueError:
        pytest.skip("DeepSpeed is not importable here")
    proc = subprocess.run([sys.executable, str(HERE / "moe_gating_vs_deepspeed.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "GATING-OK" in proc.stdout, proc.stdout + proc.stderr


def test_dispatch_by_index_equals_the_dense_einsum_form():
    # MOELayer moves tokens by index; DeepSpeed's defining form is dispatch = einsum(sec,sm->ecm),
    # combine = einsum(sec,ecm->sm) over the gating's dense tensors. Same output and gradients, with
    # tokens dropped (capacity factor 0.5, top-2, residual PR-MoE on).
    torch.manual_seed(0)
    expert = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.GELU(), torch.nn.Linear(9, 6))
    layer = MoE(6, expert, num_experts=4, ep_size=1, k=2, capacity_factor=0.5, min_capacity=1, use_residual=True,
                top2_2nd_expert_sampling=False)
    for i, e in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        for p in e.parameters():
            p.data.normal_(generator=torch.Generator().manual_seed(i))
    x = torch.randn(2, 10, 6, requires_grad=True)
    out, l_aux, counts = layer(x)
    (out.square().sum() + l_aux).backward()
    got_grads = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]

    layer.zero_grad()
    x.grad = None
    flat = x.reshape(-1, 6)
    logits = F.linear(flat, layer.deepspeed_moe.gate.wg.weight)
    l_aux2, combine, dispatch, _ = sharded_moe.top2gating(logits, 0.5, 1, top2_2nd_expert_sampling=False)
    dispatched = torch.einsum("sec,sm->ecm", dispatch.float(), flat)
    expert_out = torch.stack([e(dispatched[i]) for i, e in enumerate(layer.deepspeed_moe.experts.deepspeed_experts)])
    y = torch.einsum("sec,ecm->sm", combine, expert_out).reshape(x.shape)
    coef = F.softmax(layer.coefficient(x), dim=-1)
    y = y * coef[..., 0:1] + layer.mlp(x) * coef[..., 1:]
    torch.testing.assert_close(out, y, rtol=1e-6, atol=1e-6)
    (y.square().sum() + l_aux2).backward()
    want_grads = [p.grad for p in layer.parameters()] + [x.grad]
    for g, w in zip(got_grads, want_grads):  # relative to each gradient's largest element (sums reorder)
        assert ((g - w).abs().max() / w.abs().max()).item() <= 1e-5, (g, w)
    assert int(counts.sum()) == 2 * 20 and int(dispatch.sum()) < 2 * 20  # tokens were dropped


def test_names_marks_and_optimizer_groups_are_deepspeeds():
    expert = torch.nn.Linear(4, 4)
    layer = MoE(4, expert, num_experts=2, ep_size=1, k=1, use_residual=True, min_capacity=0)
    names = set(layer.state_dict())
    assert {"deepspeed_moe.gate.wg.weight", "deepspeed_moe.experts.deepspeed_experts.0.weight",
            "deepspeed_moe.experts.deepspeed_experts.1.bias", "mlp.weight", "coefficient.weight"} <= names
    experts = list(layer.deepspeed_moe.experts.parameters())
    assert all(is_moe_param(p) and p.group_name == "ep_size_1" and p.zeal_split_axes == ("expert",) for p in experts)
    assert not is_moe_param(layer.deepspeed_moe.gate.wg.weight)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(layer.parameters()), "name": "dense", "lr": 0.1})
    assert [g["name"] for g in groups] == ["dense", "ep_size_1"] and groups[1]["moe"] and groups[1]["lr"] == 0.1
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in experts}
    assert all(not is_moe_param(p) for p in groups[0]["params"])
    # zeal.initialize takes those groups (a DeepSpeed MoE script passes them as model_parameters).
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.add_module("moe", layer)
    model.forward = lambda x: layer(model[0](x))[0]
    engine, *_ = zeal.initialize(model=model, model_parameters=split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "dense", "lr": 0.1}),
        config={"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.1}}})
    loss = engine(torch.randn(2, 4)).sum()
    engine.backward(loss)
    engine.step()


def test_bad_arguments_name_the_argument():
    expert = torch.nn.Linear(4, 4)
    with pytest.raises(zeal.ConfigError, match=r"num_experts \(3\) must be a positive multiple of ep_size \(2\)"):
        MoE(4, expert, num_experts=3, ep_size=2)
    with pytest.raises(zeal.ConfigError, match="noisy_gate_policy must be None, 'Jitter' or 'RSample', got 'Gumbel'"):
        MoE(4, expert, num_experts=2, noisy_gate_policy="Gumbel")
    with pytest.raises(zeal.ConfigError, match="expert parallel size 2 must divide the world size 1"):
        MoE(4, expert, num_experts=2, ep_size=2)
    with pytest.raises(zeal.ConfigError, match="drop_policy"):
        sharded_moe.topkgating(logits_of(0), 3, 1.0, 1, drop_policy="random")


def test_aux_loss_free_bias_balances_the_load_and_leaves_the_weights_alone():
    # A router that sends nearly every token to expert 0. With expert_bias_update_rate the bias on
    # the selection scores moves after every training forward (down for the over-loaded expert, up
    # for the others) until the load spreads; the combine weight stays the token's softmax
    # probability of the expert it went to (the bias steers selection only).
    torch.manual_seed(0)
    layer = MoE(8, torch.nn.Linear(8, 8), num_experts=4, k=1, capacity_factor=4.0, eval_capacity_factor=4.0,
                min_capacity=0, use_rts=False, expert_bias_update_rate=0.05)
    gate = layer.deepspeed_moe.gate
    gate.wg.weight.data = torch.randn(4, 8) * 0.1
    gate.wg.weight.data[0] += 0.5
    x = torch.randn(64, 8) + 1.0
    first = layer(x)[2].tolist()
    assert first[0] >= 60, first
    total = torch.zeros(4)
    for i in range(60):  # the sign rule settles into a cycle: judge the load over its last 30 forwards
        counts = layer(x)[2]
        if i >= 30:
            total += counts
    share = (total / total.sum()).tolist()
    assert max(share) <= 0.5 and min(share) >= 0.1, (first, share, gate.expert_bias.tolist())
    assert gate.expert_bias[0] < 0 < gate.expert_bias[1:].min()
    layer.eval()  # no update in eval: the same routes twice
    l_aux, combine, _, _ = gate(x)
    bias = gate.expert_bias.clone()
    assert torch.equal(gate(x)[1], combine) and torch.equal(gate.expert_bias, bias)
    probs = F.softmax(x @ gate.wg.weight.t(), dim=1)
    chosen = (probs + bias).argmax(dim=1)
    torch.testing.assert_close(combine.sum(dim=2).gather(1, chosen[:, None]).squeeze(1),
                               probs.gather(1, chosen[:, None]).squeeze(1))
    assert "deepspeed_moe.gate.expert_bias" in layer.state_dict()
    assert "deepspeed_moe.gate.expert_bias" not in MoE(8, torch.nn.Linear(8, 8), 4).state_dict()
    with pytest.raises(zeal.ConfigError, match="expert_bias_update_rate"):
        MoE(8, torch.nn.Linear(8, 8), num_experts=4, k=2, expert_bias_update_rate=0.1)


def test_router_z_loss_is_added_to_l_aux():
    torch.manual_seed(0)
    plain = MoE(8, torch.nn.Linear(8, 8), num_experts=4, k=2, min_capacity=0, top2_2nd_expert_sampling=False)
    with_z = MoE(8, torch.nn.Linear(8, 8), num_experts=4, k=2, min_capacity=0, top2_2nd_expert_sampling=False,
                 router_z_loss_coef=0.1)
    with_z.load_state_dict(plain.state_dict())
    x = torch.randn(16, 8)
    logits = x @ plain.deepspeed_moe.gate.wg.weight.t()
    z = torch.logsumexp(logits, dim=1).square().mean()
    torch.testing.assert_close(with_z(x)[1] - plain(x)[1], 0.1 * z)


def test_demo_gpt_with_moe_blocks_adds_the_aux_losses():
    # The demo's --moe: every block's MLP an MoE layer; the loss is the cross-entropy plus 0.01 x
    # the layers' l_aux, and moe_stats reports their mean and the tokens per expert.
    sys.path.insert(0, str(HERE.parents[1] / "examples" / "python"))
    from gpt import GPT

    torch.manual_seed(0)
    model = GPT(20, block=16, width=32, layers=2, heads=2, moe=4, ep=1)
    idx = torch.randint(0, 20, (3, 16))
    torch.manual_seed(1)  # the same draws (Gumbel-sampled second experts) in both forwards
    loss = model(idx, idx)
    torch.manual_seed(1)
    logits = model(idx)
    aux = [b.l_aux for b in model.blocks]
    ce = F.cross_entropy(logits.reshape(-1, 20), idx.reshape(-1))
    torch.testing.assert_close(loss, ce + 0.01 * sum(aux))
    mean_aux, per_expert = model.moe_stats()
    assert abs(mean_aux - sum(a.item() for a in aux) / 2) < 1e-6
    assert sum(per_expert) == 2 * 2 * 3 * 16  # top-2 routes of every token in each of 2 layers
    assert not hasattr(model.blocks[0], "mlp") and len(list(model.blocks[0].moe.deepspeed_moe.experts.deepspeed_experts)) == 4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dropless_dispatch_equals_the_capacity_dispatch_when_nothing_drops(k):
    # One process, ep 1: the dropless path (routes sorted by expert, each expert run once on its
    # rows) against the capacity path with drop_tokens=False (the same routes and weights, padded
    # buffers): the same output and gradients; and a token masked out by used_token adds nothing.
    torch.manual_seed(0)
    expert = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.GELU(), torch.nn.Linear(9, 6))
    args = dict(num_experts=4, k=k, min_capacity=0, drop_tokens=False, top2_2nd_expert_sampling=False, use_rts=False)
    padded = MoE(6, expert, **args)
    dropless = MoE(6, expert, dropless=True, **args)
    for i, e in enumerate(padded.deepspeed_moe.experts.deepspeed_experts):
        for p in e.parameters():
            p.data.normal_(generator=torch.Generator().manual_seed(i))
    dropless.load_state_dict(padded.state_dict())
    x = torch.randn(2, 9, 6)
    got, want = dropless(x), padded(x)
    # (the dropless experts run as grouped GEMMs: the bias added after the product, not fused)
    assert ((got[0] - want[0]).abs().max() / want[0].abs().max()).item() <= 1e-5
    assert torch.equal(got[2], want[2])
    got[0].square().sum().backward()
    want[0].square().sum().backward()
    for (name, a), b in zip(dropless.named_parameters(), padded.parameters()):
        assert ((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)).item() <= 1e-5, name


@pytest.mark.parametrize("hidden", [16, 10])
def test_dropless_grouped_gemm_equals_the_per_expert_loop(hidden):
    # Experts of the Linear-activation-Linear shape run as two grouped GEMMs over all their rows
    # (torch._grouped_mm where the layout allows: hidden 16; a loop of matmuls inside the same
    # autograd function otherwise: hidden 10). Output and every gradient equal to calling each
    # expert on its own rows; one expert gets no row.
    from zeal.moe.sharded_moe import _mlp_experts

    torch.manual_seed(0)
    expert = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 8))
    layers = [MoE(8, expert, num_experts=4, k=2, min_capacity=0, top2_2nd_expert_sampling=False, dropless=True)
              for _ in range(2)]
    for i, e in enumerate(layers[0].deepspeed_moe.experts.deepspeed_experts):
        for p in e.parameters():
            p.data.normal_(generator=torch.Generator().manual_seed(i))
    layers[0].deepspeed_moe.gate.wg.weight.data[3] = -50.0  # expert 3: no token
    layers[1].load_state_dict(layers[0].state_dict())
    layers[0].deepspeed_moe.grouped_gemm = True  # (the default on host tensors is the loop)
    layers[1].deepspeed_moe.grouped_gemm = False
    assert _mlp_experts(layers[0].deepspeed_moe.experts.deepspeed_experts) is not None
    x = torch.randn(30, 8).abs()
    outs = [layer(x) for layer in layers]
    assert outs[0][2][3] == 0
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for out, layer in zip(outs, layers):
        (out[0].square().sum() + out[1]).backward()
    for (name, a), b in zip(layers[0].named_parameters(), layers[1].parameters()):
        assert ((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)).item() <= 1e-5, name
