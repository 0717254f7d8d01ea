"""A check shared by the GPU tests of the decode step's Triton kernels: launched with PDL right
after a GEMV that writes their input (as in a decode step, where that GEMV lets its dependents
launch early), a kernel must still read that input only once it is written (its gdc_wait)."""

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
