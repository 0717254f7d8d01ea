"""The analytic engine paired with SimGpu: each call hands the model's FLOPs and bytes
(models.spec) to the simulated GPU, which advances its virtual clock."""

from __future__ import annotations

from phasewatt.gpu.sim import SimGpu, Workload


class SimEngine:
    name = "sim"

    def __init__(self, *, spec, gpu: SimGpu, batch: int, prompt_len: int, decode_tokens: int):
        if not isinstance(gpu, SimGpu):
            raise TypeError("the sim engine runs only on the simulated GPU (device: sim)")
        self.spec, self.gpu = spec, gpu
        self.batch, self.prompt_len, self.decode_tokens = batch, prompt_len, decode_tokens
        self._efficiency = gpu.spec.values["decode_bandwidth_efficiency"]
        prefill = spec.prefill_cost(batch, prompt_len)
        # Prefill kernels are large GEMMs that stream at the copy bandwidth.
        self._prefill = Workload(prefill.flops, prefill.hbm_bytes, prefill.kernels, 1.0)
        self._decode = []
        for i in range(decode_tokens):
            cost = spec.decode_step_cost(batch, prompt_len + i + 1)
            self._decode.append(Workload(cost.flops, cost.hbm_bytes, cost.kernels, self._efficiency))

    def setup(self) -> dict:
        return {"build_s": 0.0, "capture_s": 0.0}

    def prefill(self) -> int:
        self.gpu.execute(self._prefill)
        return self.batch * self.prompt_len

    def decode(self, n_steps: int) -> int:
        for step in range(n_steps):
            self.gpu.execute(self._decode[step % len(self._decode)])
        return self.batch * n_steps

    def synchronize(self) -> None:
        return None

    def describe(self) -> dict:
        return {"engine": "sim", "decode_bandwidth_efficiency": self._efficiency}

    def close(self) -> None:
        return None
