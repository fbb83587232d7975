"""torch.compile's check, run as a script (in the background: tests/conftest.py's `background` marker): the
compiled DiT blocks give the eager loss and gradients, and compile_problem says None where a compiler
exists. Exit 77: compile_problem found no way to build kernels here.

The blocks are traced as compile=true traces them (dynamo, then AOTAutograd's forward and backward
graphs) and run by the `aot_eager` backend, not turned into inductor's C++ kernels: the bug this
check exists for was in the trace (torch 2.11 gave NormRope's weights zero gradient; with that fix
undone, this check fails on x_embedder.weight), and building the block's 16 kernels cost about 30 s of
g++ on 2 cores, a tenth of the suite's CPU. Inductor's own build, C++ compiler included, is checked by
compile_problem's probe, which compiles and differentiates a small function (about 18 s: inductor
probes the CPU's vector instructions and precompiles its header first).

It runs in a process of its own: compiling leaves a process about 85 MB larger (inductor's modules and
caches), which pytest would carry through the rest of the suite, and it overlaps the tests that run
meanwhile instead of adding to the suite's wall-clock.
"""

import sys

import torch

from backbones.dit import DiT
from diffusion import build_process
from train.train import compile_problem

problem = compile_problem(torch.device("cpu"))
if problem is not None:
    print(problem)
    sys.exit(77)
torch.manual_seed(0)
model = DiT(in_dim=8, out_dim=8, hidden_size=32, depth=1, num_heads=2, num_classes=3)
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
pos = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
process = build_process("gaussian", {})
x0 = torch.randn(4, 16, 8)
cond = {"label": torch.tensor([0, 1, 2, 0]), "drop": torch.tensor([False, True, False, False])}


def fn(xt, t, c):
    return model(xt, pos, t, **c)


eager = process.loss(fn, x0, cond, generator=torch.Generator().manual_seed(1))
eager_grads = torch.autograd.grad(eager, list(model.parameters()))
model.compile_blocks(backend="aot_eager")
compiled = process.loss(fn, x0, cond, generator=torch.Generator().manual_seed(1))
torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
# and the same gradients (torch 2.11's trace of the hand-written QK-norm node gave zero for its weights)
compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
for (name, _), a, b in zip(model.named_parameters(), compiled_grads, eager_grads):
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)
