"""smat-dist: distributed meta-training of SMAT (Sparse MeTa-Tuning) on Ray Train + DeepSpeed."""

import os as _os

# The environment every process of ours runs with (Ray workers get it through their runtime env,
# smat_dist.ray_session.worker_env, benchmarks' children through tools/bench_step.py). It is read once,
# when torch loads, so it is set here, before any submodule imports torch; an explicit user setting wins.
PROCESS_ENV = {
    # OpenMP threads that spin while they wait turn every parallel region into a ~10x slowdown when
    # the cores are shared (measured on the 2-core CI box: a ViT fwd+bwd took 2.7 s with 2 spinning
    # threads, 0.26 s with passive waiting).
    "OMP_WAIT_POLICY": "PASSIVE",
    # (Not THP_MEM_ALLOC_ENABLE=1: torch's large CPU blocks on transparent huge pages made a ViT-S step
    # ~20 % slower on the CI box, docs/performance.md#huge-pages.)
}
for _key, _value in PROCESS_ENV.items():
    _os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
