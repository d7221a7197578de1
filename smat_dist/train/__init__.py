"""Meta-training: one recipe (:mod:`smat_dist.train.recipe`) behind three launchers.

* ``smat-train`` — Ray Train workers (:mod:`smat_dist.train.ray_launcher`);
* ``torchrun --nproc-per-node N -m smat_dist.train`` — torchrun ranks (:mod:`smat_dist.train.launch`);
* ``python -m smat_dist.train`` / :class:`~smat_dist.train.launch.Trainer` — one process.

Ray and torchrun ranks wrap the SMAT module in a DeepSpeed engine; the single process uses plain torch.
"""
