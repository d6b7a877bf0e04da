"""fusedlab.optim.Muon against torch.optim.Muon on the same gradient stream, and the optimizer contract."""
import copy
import math

import pytest
import torch

import fusedlab

SHAPES = [(64, 32), (32, 96), (64, 32), (48, 48)]  # two of one shape: batched together


def make_params(gen, shapes=SHAPES):
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]


def run(opt_cls, params, grads, **kw):
    opt = opt_cls(params, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return opt


def full_rank_grads(gen, steps, shapes=SHAPES):
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


# momentum 0.3: both lerps take their other formula (weights 0.7 and 0.3; 0.05 and 0.95 by default)
KWS = [{}, dict(nesterov=False, weight_decay=0.0, adjust_lr_fn="match_rms_adamw", lr=0.01), dict(momentum=0.3)]


@pytest.mark.parametrize("steps, tol", [(1, 0.03), (20, 0.05)])
@pytest.mark.parametrize("kw", KWS)
def test_matches_torch_muon(kw, steps, tol):
    gen = torch.Generator().manual_seed(1234)
    """On the same full-rank gradient stream, one step agrees with torch.optim.Muon's update to bf16 rounding
    (both orthogonalize in bf16: measured 2.2% of the update on average, at most 2.8% over 400 seeds, against
    the 3% bound; the seed is fixed) and 20 steps stay within a few percent of torch's accumulated update. (Rank-deficient gradients are a poor parity check: Newton-Schulz amplifies the
    rounding noise in their null space by its slope at zero, about 500, differently in any two bf16 codes.)"""
    ref_params = make_params(gen)
    ours_params = copy.deepcopy(ref_params)
    start = [p.detach().clone() for p in ref_params]
    grads = full_rank_grads(gen, steps)
    kw = dict(dict(lr=0.02), **kw)
    run(torch.optim.Muon, ref_params, grads, **kw)
    run(fusedlab.optim.Muon, ours_params, grads, ns_dtype=torch.bfloat16, **kw)
    for a, b, s in zip(ref_params, ours_params, start):
        assert ((a - b).norm() / (a - s).norm()).item() < tol


def test_grads_untouched_and_state_dict_roundtrip(gen):
    params = make_params(gen)
    grads = full_rank_grads(gen, 3)
    opt = run(fusedlab.optim.Muon, params, grads[:2], lr=0.02)
    g = [x.clone() for x in grads[2]]
    for p, x in zip(params, g):
        p.grad = x
    saved = copy.deepcopy(opt.state_dict())
    twin_params = copy.deepcopy(params)
    twin = fusedlab.optim.Muon(twin_params, lr=0.02)
    twin.load_state_dict(saved)
    for p, x in zip(twin_params, grads[2]):
        p.grad = x.clone()
    opt.step()
    twin.step()
    for p, x, y in zip(params, g, grads[2]):
        assert torch.equal(p.grad, y)  # not modified in place
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


def test_conv_weights_and_scheduler(gen):
    conv = torch.nn.Conv2d(4, 8, 3, bias=False)
    opt = fusedlab.optim.Muon(conv.parameters(), lr=0.1, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = conv.weight.detach().clone()
    conv(torch.randn(2, 4, 9, 9, generator=gen)).square().mean().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    delta = (conv.weight - before).reshape(8, -1)  # orthogonal rows, times lr: singular values near 0.1
    sv = torch.linalg.svdvals(delta.double())
    assert 0.04 < sv.min() and sv.max() < 0.13


def test_coefficient_names():
    p = torch.nn.Parameter(torch.randn(16, 16))
    p.grad = torch.randn(16, 16)
    fusedlab.optim.Muon([p], ns_coefficients="polar_express").step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("make, pattern", [
    (lambda p: fusedlab.optim.Muon([torch.nn.Parameter(torch.zeros(3))]), "1-D parameter"),
    (lambda p: fusedlab.optim.Muon([p], lr=math.nan), "lr must be a finite"),
    (lambda p: fusedlab.optim.Muon([p], momentum=math.inf), "momentum"),
    (lambda p: fusedlab.optim.Muon([p], weight_decay=-1), "weight_decay"),
    (lambda p: fusedlab.optim.Muon([p], ns_coefficients="newton"), "coefficients must be one of"),
    (lambda p: fusedlab.optim.Muon([p], adjust_lr_fn="spectral"), "adjust_lr_fn"),
    (lambda p: fusedlab.optim.Muon([p], ns_steps=100), "ns_steps"),
    (lambda p: fusedlab.optim.Muon([p], ns_method="polar"), "ns_method must be one of"),
    (lambda p: fusedlab.optim.Muon([p], ns_method="gram", backend="cpu"), "ns_method='gram' needs backend"),
])
def test_errors(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(torch.nn.Parameter(torch.zeros(4, 4)))


@pytest.mark.parametrize("group, pattern", [
    (dict(adjust_lr_fn="match_rms_adam"), "adjust_lr_fn"), (dict(lr=math.nan), "lr must be a finite"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(ns_steps=1000), "ns_steps"), (dict(ns_method="gramm"), "ns_method"),
    (dict(eps=math.inf), "eps"), (dict(ns_coefficients=(3.4, -4.7)), "one \\(a, b, c\\) triple"),
    (dict(params=[torch.nn.Parameter(torch.zeros(4))]), "1-D parameter")])
def test_param_groups_are_checked_and_a_rejected_group_is_not_kept(group, pattern):
    """Hyperparameters given per group get the constructor's checks; a group that fails them is not left in
    the optimizer (a caller that catches the error keeps stepping the others)."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = fusedlab.optim.Muon([p], lr=0.02)
    with pytest.raises(ValueError, match=pattern):
        opt.add_param_group(dict(dict(params=[torch.nn.Parameter(torch.randn(4, 4))]), **group))
    assert len(opt.param_groups) == 1
    p.grad = torch.randn(4, 4)
    opt.step()
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        fusedlab.optim.muon.adjusted_lr(0.1, "spectral", 4, 4)


def test_coefficients_and_steps_as_numpy_or_tensors():
    import numpy as np

    p = torch.nn.Parameter(torch.randn(8, 4))
    p.grad = torch.randn(8, 4)
    twin = torch.nn.Parameter(p.detach().clone())
    twin.grad = p.grad.clone()
    fusedlab.optim.Muon([p], ns_coefficients=(np.float64(3.4445), torch.tensor(-4.775, dtype=torch.float64), 2.0315),
                        ns_steps=np.int64(5)).step()
    fusedlab.optim.Muon([twin]).step()
    assert torch.equal(p, twin)


def test_loads_a_torch_muon_state_dict(gen):
    """Swapping the import keeps old checkpoints: torch.optim.Muon's state dict lacks this optimizer's extra
    group keys, which take their defaults; the momentum buffers carry over."""
    shapes = [(16, 8), (8, 24)]
    ours, theirs = make_params(gen, shapes), make_params(gen, shapes)
    for a, b in zip(ours, theirs):
        a.data.copy_(b.data)
    grads = full_rank_grads(gen, 2, shapes)
    torch_opt = torch.optim.Muon(theirs, lr=0.02)
    run_steps = lambda opt, params, gs: [setattr(p, "grad", g.clone()) for p, g in zip(params, gs)] and opt.step()  # noqa: E731
    run_steps(torch_opt, theirs, grads[0])
    opt = fusedlab.optim.Muon(ours, lr=0.02, ns_dtype=torch.bfloat16)
    for a, b in zip(ours, theirs):
        a.data.copy_(b.data)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # as from a file: no buffers shared with torch_opt
    assert opt.param_groups[0]["backend"] == "auto" and opt.param_groups[0]["ns_method"] == "auto"
    for a, b in zip(ours, theirs):
        assert torch.equal(opt.state[a]["momentum_buffer"], torch_opt.state[b]["momentum_buffer"])
    # the next step is the one this optimizer makes from those buffers and torch's hyperparameters
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    fresh = fusedlab.optim.Muon(twin, lr=0.02, ns_dtype=torch.bfloat16)
    for a, b in zip(twin, theirs):
        fresh.state[a]["momentum_buffer"] = torch_opt.state[b]["momentum_buffer"].clone()
    run_steps(opt, ours, grads[1])
    run_steps(fresh, twin, grads[1])
    for a, b in zip(ours, twin):
        assert torch.equal(a, b)


def test_ns_method_gram(gen):
    """Gram Newton-Schulz in the optimizer: the standard step in float64; in float32 on a batch of strongly
    rectangular matrices close to the standard step, which is what "auto" runs on CPUs."""
    shapes = [(24, 96), (96, 24), (24, 96), (32, 32)]
    params = make_params(gen, shapes)
    params = [torch.nn.Parameter(p.detach().double()) for p in params]
    twin = copy.deepcopy(params)
    grads = [[g.double() for g in gs] for gs in full_rank_grads(gen, 3, shapes)]
    run(fusedlab.optim.Muon, params, grads, lr=0.02, ns_dtype=torch.float64, ns_method="gram")
    run(fusedlab.optim.Muon, twin, grads, lr=0.02, ns_dtype=torch.float64, ns_method="standard")
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    shapes = [(256, 768), (256, 768)]
    grads = full_rank_grads(gen, 1, shapes)
    auto = make_params(gen, shapes)
    gram, standard = copy.deepcopy(auto), copy.deepcopy(auto)
    run(fusedlab.optim.Muon, auto, grads, lr=0.02, ns_dtype=torch.float32)
    run(fusedlab.optim.Muon, gram, grads, lr=0.02, ns_dtype=torch.float32, ns_method="gram")
    run(fusedlab.optim.Muon, standard, grads, lr=0.02, ns_dtype=torch.float32, ns_method="standard")
    for a, b, c in zip(auto, gram, standard):
        assert torch.equal(a, c)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-6)
        assert not torch.equal(b, c)  # the Gram path did run


def test_sparse_grad_rejected():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    p.grad = torch.zeros(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fusedlab.optim.Muon([p]).step()


def test_muon_with_aux_adam_matches_its_parts(gen):
    model = torch.nn.Sequential(torch.nn.Embedding(12, 16), torch.nn.Linear(16, 24), torch.nn.LayerNorm(24))
    model.add_module("head", torch.nn.Linear(24, 12, bias=False))
    hidden, other = fusedlab.optim.split_muon_params(model)
    assert [p.shape for p in hidden] == [torch.Size([24, 16])]
    assert {tuple(p.shape) for p in other} == {(12, 16), (24,), (12, 24)}
    twin = copy.deepcopy(model)
    t_hidden, t_other = fusedlab.optim.split_muon_params(twin)
    opt = fusedlab.optim.MuonWithAuxAdam([dict(params=hidden, use_muon=True, lr=0.05),
                                          dict(params=other, use_muon=False, lr=1e-2, weight_decay=0.1)])
    muon = fusedlab.optim.Muon(t_hidden, lr=0.05, momentum=0.95, weight_decay=0.0)
    adam = torch.optim.AdamW(t_other, lr=1e-2, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(3):
        x = torch.randint(0, 12, (4, 5), generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        # the twin gets the same gradients: two backward passes may differ in the last bits (the embedding's
        # accumulation order), and Adam's normalization turns a last-bit difference in a near-zero gradient
        # into a visible one
        for a, b in zip(model.parameters(), twin.parameters()):
            b.grad = a.grad.clone()
        opt.step()
        muon.step()
        adam.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(300)
def test_compiled_aux_adam_step_does_not_recompile_as_the_count_grows(gen):
    """The AdamW groups' step count is a tensor: a compiled step neither recompiles per step (as an int count
    would make it) nor drifts from eager, and a tensor lr works there too."""
    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    def make():
        return [torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(1))),
                torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(2)))]

    eager_params, compiled_params = make(), make()
    groups = lambda ps, lr: [dict(params=ps[:1], use_muon=True, ns_dtype=torch.float32),  # noqa: E731
                             dict(params=ps[1:], use_muon=False, lr=lr, weight_decay=0.1)]
    eager = fusedlab.optim.MuonWithAuxAdam(groups(eager_params, torch.tensor(1e-2)))
    compiled = fusedlab.optim.MuonWithAuxAdam(groups(compiled_params, torch.tensor(1e-2)))
    step = torch.compile(compiled.step, backend=backend)
    for _ in range(6):
        grads = [torch.randn(6, 4, generator=gen), torch.randn(5, generator=gen)]
        for a, b, g in zip(eager_params, compiled_params, grads):
            a.grad, b.grad = g.clone(), g.clone()
        eager.step()
        step()
    assert len(compiles) <= 2, len(compiles)
    assert compiled.state[compiled_params[1]]["step"].item() == 6
    for a, b in zip(eager_params, compiled_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_aux_adam_takes_a_state_saved_with_an_int_count(gen):
    """A state whose AdamW count is an int (as saved before it became a tensor) loads and steps on exactly as
    one with a tensor count."""
    ps = [torch.nn.Parameter(torch.randn(7, generator=gen)) for _ in range(2)]
    opts = [fusedlab.optim.MuonWithAuxAdam([dict(params=[p], use_muon=False, lr=1e-2)]) for p in ps]
    ps[1].data.copy_(ps[0].data)
    for _ in range(2):
        g = torch.randn(7, generator=gen)
        for p, opt in zip(ps, opts):
            p.grad = g.clone()
            opt.step()
    saved = opts[1].state_dict()
    saved["state"][0]["step"] = int(saved["state"][0]["step"].item())
    opts[1].load_state_dict(saved)
    g = torch.randn(7, generator=gen)
    for p, opt in zip(ps, opts):
        p.grad = g.clone()
        opt.step()
    assert torch.equal(ps[0], ps[1])
    assert opts[1].state[ps[1]]["step"].item() == 3


def test_muon_with_aux_adam_errors():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="use_muon"):
        fusedlab.optim.MuonWithAuxAdam([dict(params=[p])])
    opt = fusedlab.optim.MuonWithAuxAdam([dict(params=[p], use_muon=True)])
    opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(3))], use_muon=False))  # defaults filled
    assert opt.param_groups[-1]["lr"] == 3e-4
    with pytest.raises(ValueError, match="unknown keys"):
        fusedlab.optim.MuonWithAuxAdam([dict(params=[p], use_muon=True, betas=(0.9, 0.99))])
    with pytest.raises(ValueError, match="1-D parameter"):
        fusedlab.optim.MuonWithAuxAdam([dict(params=[torch.nn.Parameter(torch.zeros(3))], use_muon=True)])
    for bad, pattern in ((dict(lr=math.nan), "lr"), (dict(betas=(1.5, 0.9)), "betas"), (dict(eps=-1.0), "eps"),
                         (dict(weight_decay=math.inf), "weight_decay")):
        with pytest.raises(ValueError, match=pattern):
            opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(3))], use_muon=False, **bad))
    assert len(opt.param_groups) == 2  # the rejected groups are not kept
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    sparse = fusedlab.optim.MuonWithAuxAdam([dict(params=emb.parameters(), use_muon=False)])
    with pytest.raises(RuntimeError, match="sparse gradients"):
        sparse.step()


def test_split_muon_params_takes_whole_heads():
    model = torch.nn.Module()
    model.body = torch.nn.Linear(8, 8)
    model.head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    muon, adam = fusedlab.optim.split_muon_params(model)
    assert [id(p) for p in muon] == [id(model.body.weight)]
    assert {id(p) for p in model.head.parameters()} <= {id(p) for p in adam}


@pytest.mark.parametrize("kw", KWS)
def test_fused_cpu_step_equals_the_generic_path(gen, kw):
    """Contiguous float32 CPU batches take one C++ call (fusedlab::muon_step_); strided gradients take the
    op-by-op path. In float32 Newton-Schulz both compute the same update up to float32 rounding."""
    shapes = [(24, 40), (24, 40), (72, 16), (8, 4, 3, 3), (33, 33), (400, 410), (400, 410), (600, 390)]
    fused, generic = make_params(gen, shapes), None
    generic = copy.deepcopy(fused)
    grads = full_rank_grads(gen, 3, shapes)
    opts = [fusedlab.optim.Muon(ps, ns_dtype=torch.float32, **{"lr": 0.02, **kw}) for ps in (fused, generic)]
    for gs in grads:
        for p, q, g in zip(fused, generic, gs):
            p.grad = g.clone()
            q.grad = g.clone().transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
            assert not q.grad.is_contiguous()
        for opt in opts:
            opt.step()
    for a, b in zip(fused, generic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused, generic):
        torch.testing.assert_close(opts[0].state[a]["momentum_buffer"], opts[1].state[b]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_muon_step_workspace_is_only_scratch(gen, dtype):
    """The caller's workspace holds the iteration's buffers between steps: the same results as buffers made
    per call, for batches of different shapes that share it (it grows to the largest and is reused)."""
    coeffs = [3.4445, -4.775, 2.0315] * 5
    ws = torch.empty(0, dtype=torch.uint8)
    for shape, count in [((12, 20), 3), ((40, 8), 2), ((12, 20), 3), ((400, 390), 2)]:  # the last: row panels
        ps = [torch.randn(*shape, generator=gen) for _ in range(count)]
        gs = [torch.randn(*shape, generator=gen) for _ in range(count)]
        bufs = [torch.randn(*shape, generator=gen) for _ in range(count)]
        copies = [[t.clone() for t in ts] for ts in (ps, bufs)]
        torch.ops.fusedlab.muon_step_(ps, gs, bufs, 0.95, True, coeffs, 1.0, 1e-7, dtype, 0.02, 0.1, 0.02, ws)
        torch.ops.fusedlab.muon_step_(copies[0], gs, copies[1], 0.95, True, coeffs, 1.0, 1e-7, dtype, 0.02, 0.1, 0.02)
        for a, b in zip(ps + bufs, copies[0] + copies[1]):
            assert torch.equal(a, b)
        assert ws.numel() >= 2 * count * min(shape) * (max(shape) + min(shape)) * (2 if dtype == torch.bfloat16 else 4)
    with pytest.raises(RuntimeError, match="workspace must be a contiguous 1-D uint8 CPU tensor"):
        torch.ops.fusedlab.muon_step_(ps, gs, bufs, 0.95, True, coeffs, 1.0, 1e-7, dtype, 0.02, 0.1, 0.02,
                                      torch.empty(4, dtype=torch.float32))


def test_muon_step_op_checks(gen):
    ps = make_params(gen, [(6, 4), (6, 4)])
    gs = [torch.randn(6, 4, generator=gen) for _ in ps]
    bufs = [torch.zeros(6, 4) for _ in ps]
    coeffs = [3.4445, -4.775, 2.0315] * 2
    with torch.no_grad():
        torch.library.opcheck(torch.ops.fusedlab.muon_step_.default,
                              (ps, gs, bufs, 0.95, True, coeffs, 1.0, 1e-7, torch.float32, 0.02, 0.1, 0.02),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.fusedlab.muon_step_.default,
                              (ps, gs, bufs, 0.95, True, coeffs, 1.0, 1e-7, torch.float32, 0.02, 0.1, 0.02,
                               torch.empty(0, dtype=torch.uint8)), test_utils=("test_schema", "test_faketensor"))
        with pytest.raises(RuntimeError, match="contiguous float32 CPU tensors of one shape"):
            torch.ops.fusedlab.muon_step_(ps, [gs[0], gs[1].double()], bufs, 0.95, True, coeffs, 1.0, 1e-7,
                                          torch.float32, 0.02, 0.1, 0.02)
        with pytest.raises(RuntimeError, match="lists of one length"):
            torch.ops.fusedlab.muon_step_(ps, gs[:1], bufs, 0.95, True, coeffs, 1.0, 1e-7, torch.float32, 0.02, 0.1,
                                          0.02)


@pytest.mark.timeout(300)
def test_compiled_step_with_a_tensor_rate_follows_a_schedule_without_recompiling(gen):
    """A tensor lr changed every step (a schedule) neither recompiles the compiled step nor drifts from eager."""
    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    params = make_params(gen)
    twin = copy.deepcopy(params)
    grads = full_rank_grads(gen, 5)
    lr_eager, lr_compiled = torch.tensor(0.02), torch.tensor(0.02)
    eager = fusedlab.optim.Muon(params, lr=lr_eager, ns_dtype=torch.float32)
    compiled = fusedlab.optim.Muon(twin, lr=lr_compiled, ns_dtype=torch.float32)
    step = torch.compile(compiled.step, backend=backend)
    for i, gs in enumerate(grads):
        lr_eager.fill_(0.02 / (i + 1))
        lr_compiled.fill_(0.02 / (i + 1))
        for p, q, g in zip(params, twin, gs):
            p.grad, q.grad = g.clone(), g.clone()
        eager.step()
        step()
    assert len(compiles) <= 2, len(compiles)
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_step_matches_eager(gen):
    """torch.compile(opt.step) gives the parameters of the eager step (fp32 Newton-Schulz: same arithmetic)."""
    torch._dynamo.reset()
    params = make_params(gen)
    twin = copy.deepcopy(params)
    grads = full_rank_grads(gen, 3)
    eager = fusedlab.optim.Muon(params, lr=0.02, ns_dtype=torch.float32)
    compiled = fusedlab.optim.Muon(twin, lr=0.02, ns_dtype=torch.float32)
    step = torch.compile(compiled.step)
    for gs in grads:
        for p, q, g in zip(params, twin, gs):
            p.grad, q.grad = g.clone(), g.clone()
        eager.step()
        step()
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
