"""Checks shared by the GPU tests of the decode step's Triton kernels: launched with PDL right
after a GEMV that writes their input (as in a decode step, where that GEMV lets its dependents
launch early), a kernel must still read that input only once it is written (its gdc_wait);
and a model's fused attention, compiled and captured, follows the matmul path over steps."""

import torch

from phasewatt.models import gemv, pdl

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def pdl_chain_matches_eager(make_state, run, k: int, n: int, seeds: int = 3) -> None:
    """run(proj, state) -> out, for proj = GEMV(x, W) [1, n] and state a dict of tensors that run
    may mutate (make_state() gives fresh ones, the same each call). Replays of one captured
    graph of GEMV + run with PDL on, fed a new x each time, must give the bits of eager runs
    with PDL off: outputs and mutated state."""
    gen = torch.Generator("cuda").manual_seed(11)
    weight = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(torch.bfloat16)
    xs = [torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(seeds)]
    before = pdl.pdl_enabled()
    try:
        pdl.set_pdl(False)
        expected = []
        for x in xs:
            state = make_state()
            out = run(gemv.triton_gemv(x, weight)[0], state)
            expected.append((out.clone(), {name: t.clone() for name, t in state.items()}))
        pdl.set_pdl(True)
        assert pdl.pdl_active(torch.device("cuda"))
        run(gemv.triton_gemv(xs[0], weight)[0], make_state())  # compile the PDL variants outside the capture
        live_x, state = xs[0].clone(), make_state()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(gemv.triton_gemv(live_x, weight)[0], state)
        for x, (expected_out, expected_state) in zip(xs, expected):
            live_x.copy_(x)
            for name, fresh in make_state().items():
                state[name].copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, expected_out)
            for name, tensor in state.items():
                assert torch.equal(tensor, expected_state[name]), name
    finally:
        pdl.set_pdl(before)


def assert_fused_follows_matmul_in_a_graph(model_class, spec) -> None:
    """A tiny bf16 model, compiled and captured once, replayed at advancing positions, fed the
    same tokens: fused and matmul decode attention give close logits."""
    logits = {}
    for kind in ("matmul", "fused"):
        torch.manual_seed(0)
        model = model_class(spec, device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)
        model.set_decode_attention(kind)
        model.setup_caches(1, 200)
        prompt = torch.randint(0, 512, (1, 100), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        model.prefill(prompt)
        model.compile_decode()
        token = prompt[:, -1].clone()
        pos = torch.tensor([100], device="cuda")
        for _ in range(2):
            model.decode(token, pos)  # warm-up (compiles); rewrites position 100 only
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model.decode(token, pos)
        steps = []
        fed = torch.randint(0, 512, (40, 1), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
        for step in range(40):
            pos.fill_(100 + step)
            token.copy_(fed[step])
            graph.replay()
            steps.append(out.float().clone())
        logits[kind] = torch.stack(steps)
    diff = (logits["fused"] - logits["matmul"]).norm(dim=-1) / logits["matmul"].norm(dim=-1)
    assert float(diff.max()) < 2e-2
    assert float((logits["fused"].argmax(-1) == logits["matmul"].argmax(-1)).float().mean()) >= 0.9
