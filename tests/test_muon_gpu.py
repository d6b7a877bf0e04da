"""fusedlab.optim.Muon on a CUDA device: parity with torch.optim.Muon, CUDA graph capture, torch.compile.

Skipped without a GPU (marker `gpu`)."""
import copy

import pytest
import torch

import fusedlab

pytestmark = pytest.mark.gpu

DEV = "cuda"
SHAPES = [(256, 128), (128, 384), (256, 128), (192, 192), (64, 32, 3, 3)]  # a conv weight too


def make_params(gen):
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(DEV)) for s in SHAPES]


def grads(gen, steps):
    return [[torch.randn(s, generator=gen).to(DEV) for s in SHAPES] for _ in range(steps)]


def set_grads(params, gs):
    for p, g in zip(params, gs):
        p.grad = g.clone()


@pytest.mark.timeout(300)
def test_one_step_matches_torch_muon(gen):
    """Both orthogonalize in bf16: one step agrees with torch's update to bf16 rounding (3%, as on the CPU)."""
    ref = make_params(gen)[:4]  # torch.optim.Muon takes 2-D parameters only
    ours = copy.deepcopy(ref)
    start = [p.detach().clone() for p in ref]
    gs = [g[:4] for g in grads(gen, 1)]
    for cls, params, kw in ((torch.optim.Muon, ref, {}), (fusedlab.optim.Muon, ours, dict(ns_dtype=torch.bfloat16))):
        opt = cls(params, lr=0.02, **kw)
        set_grads(params, gs[0])
        opt.step()
    for a, b, s in zip(ref, ours, start):
        assert ((a - b).norm() / (a - s).norm()).item() < 0.03


@pytest.mark.timeout(300)
def test_cuda_graph_capture_replays_the_eager_steps(gen):
    params = make_params(gen)
    twin = copy.deepcopy(params)
    stream = grads(gen, 5)
    eager = fusedlab.optim.Muon(params, lr=0.02, ns_dtype=torch.float32)
    graphed = fusedlab.optim.Muon(twin, lr=0.02, ns_dtype=torch.float32)
    for p in twin:
        p.grad = torch.zeros_like(p)
    # warm up on a side stream (creates the momentum buffers and compiles kernels), then capture one step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        set_grads(params, stream[0])
        eager.step()
        for p, g in zip(twin, stream[0]):
            p.grad.copy_(g)
        graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for gs in stream[1:]:
        set_grads(params, gs)
        eager.step()
        for p, g in zip(twin, gs):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_compiled_step_matches_eager(gen):
    torch._dynamo.reset()
    params = make_params(gen)
    twin = copy.deepcopy(params)
    eager = fusedlab.optim.Muon(params, lr=0.02, ns_dtype=torch.float32)
    compiled = fusedlab.optim.Muon(twin, lr=0.02, ns_dtype=torch.float32)
    step = torch.compile(compiled.step)
    for gs in grads(gen, 3):
        set_grads(params, gs)
        set_grads(twin, gs)
        eager.step()
        step()
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_compiled_aux_adam_step_on_cuda_params(gen):
    """MuonWithAuxAdam compiled with Inductor over CUDA parameters: the AdamW count is a CPU float32 tensor
    (as torch.optim.AdamW's), which the compiled step mixes with CUDA tensors; it must match eager and not
    recompile as the count grows."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def make():
        g = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.randn(64, 32, generator=g).to(DEV)),
                torch.nn.Parameter(torch.randn(32, generator=g).to(DEV))]

    eager_params, compiled_params = make(), make()
    groups = lambda ps: [dict(params=ps[:1], use_muon=True, ns_dtype=torch.float32),  # noqa: E731
                         dict(params=ps[1:], use_muon=False, lr=1e-2, weight_decay=0.1)]
    eager = fusedlab.optim.MuonWithAuxAdam(groups(eager_params))
    compiled = fusedlab.optim.MuonWithAuxAdam(groups(compiled_params))
    step = torch.compile(compiled.step, backend=counter)
    for _ in range(6):
        gs = [torch.randn(64, 32, generator=gen).to(DEV), torch.randn(32, generator=gen).to(DEV)]
        for a, b, g in zip(eager_params, compiled_params, gs):
            a.grad, b.grad = g.clone(), g.clone()
        eager.step()
        step()
    assert counter.frame_count <= 2, counter.frame_count
    assert compiled.state[compiled_params[1]]["step"].item() == 6
    for a, b in zip(eager_params, compiled_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
