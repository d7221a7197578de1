"""One evaluation worker: builds the model from its recipe, reads episodes, scores them.

The same :class:`EpisodeEvaluator` runs in this process (``actors=0``) or inside each Ray actor,
so results cannot depend on where an episode ran: an episode's accuracy is a function of its spec,
the model and the config only (augmentation and LoRA seeds come from the episode, not the worker).

Cost per episode in mode ``none``:

* SMAT (α depends on the task): θ_pre support features come from a :class:`FeatureTable`, then one
  no-grad forward of support+query under θ_i.
* Pre / PMF (θ the same for every task): no forward at all per episode. Features come from the
  table, which computes each image once. Tables work one class at a time over all of its images
  in row order. So a feature never depends on which episode, or which worker, needed it first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

import smat_dist
from smat_dist.data.builder import EpisodeSpec
from smat_dist.data.tario import parse_key
from smat_dist.data.transforms import to_tensor
from smat_dist.episode import Episode
from smat_dist.eval.config import EvalConfig
from smat_dist.eval.episodes import EpisodeReader
from smat_dist.eval.finetune import LoraWorkspace, episode_seed, finetune_full
from smat_dist.eval.models import ModelSpec, build_task_model
from smat_dist.smat.backbone import features
from smat_dist.smat.precision import backbone_autocast
from smat_dist.smat.protonet import cosine_logits, prototypes


@dataclass
class Job:
    """One episode and the (mode, lr) runs to score on it."""

    spec: EpisodeSpec
    runs: List[Tuple[str, float]]
    max_support_per_class: Optional[int] = None  # HPS truncates the support (the published code: 100)


@dataclass
class EpisodeResult:
    source: str
    split: str
    index: int
    ways: int
    support: int
    query: int
    accuracy: List[float]  # per run of the job, in [0, 1]
    alpha: Optional[List[float]] = None
    seconds: float = 0.0
    losses: Dict[str, List[float]] = field(default_factory=dict)  # first/last fine-tuning loss per run


def truncate_spec(spec: EpisodeSpec, per_class: int) -> EpisodeSpec:
    """Keep the first ``per_class`` support images of every class (the lr search's smaller support)."""
    seen: Dict[int, int] = {}
    support = []
    for key, lab in spec.support:
        if seen.get(lab, 0) < per_class:
            support.append((key, lab))
            seen[lab] = seen.get(lab, 0) + 1
    return spec if len(support) == len(spec.support) else replace(spec, support=support)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but this worker sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


class FeatureTable:
    """Per-image features under fixed weights, computed a whole class at a time (see module doc)."""

    def __init__(self, ev: "EpisodeEvaluator", weights: Optional[Dict[str, torch.Tensor]]):
        self.ev = ev
        self.weights = weights  # gated tensor name -> fixed θ (None = θ_pre)
        # (source, split) -> image key -> (class id, feature row)
        self._rows: Dict[Tuple[str, str], Dict[str, Tuple[int, torch.Tensor]]] = {}
        self._filled: set = set()  # (source, split, class id) whose images are in _rows
        self.images = 0

    def _fill(self, source: str, split: str, class_id: int, rows: Dict[str, Tuple[int, torch.Tensor]]) -> None:
        self._filled.add((source, split, class_id))
        keys, pix = self.ev.reader.class_images(source, split, class_id)
        if pix is None:
            return
        t = self.ev.cfg.data.transform
        feats = self.ev.features(self.weights, to_tensor(pix, t.mean, t.std).to(self.ev.device))
        for key, row in zip(keys, feats):
            rows[key] = (class_id, row)
        self.images += len(keys)

    def get(self, spec: EpisodeSpec, items: List[Tuple[str, int]]) -> Optional[torch.Tensor]:
        """(len(items), D) features, or None if an image is unreadable (take the pixel path)."""
        rows = self._rows.setdefault((spec.source, spec.split), {})
        try:
            for key, lab in items:
                if key not in rows:
                    class_id = parse_key(key)[2]
                    if (spec.source, spec.split, class_id) not in self._filled:
                        self._fill(spec.source, spec.split, class_id, rows)
        except (ValueError, KeyError):  # a malformed key or unknown class: the pixel path names it
            return None
        out = []
        for key, lab in items:
            hit = rows.get(key)
            if hit is None or hit[0] != spec.classes[lab]:
                return None  # unreadable image, or a label that disagrees: the pixel path decides
            out.append(hit[1])
        return torch.stack(out)


class EpisodeEvaluator:
    def __init__(self, spec: ModelSpec, cfg: EvalConfig, threads: Optional[int] = None):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        if threads is None and self.device.type == "cpu":
            # One thread per worker: the per-op work of small ViTs is too little to split, and on a
            # loaded 2-core box two threads measured 8x slower (3.6 vs 29 episodes/s, README).
            threads = 1
        if threads:
            torch.set_num_threads(int(threads))
        self.model = build_task_model(spec, self.device)
        self.reader = EpisodeReader(cfg.data, cfg.cache_mb)
        self._lora: Optional[LoraWorkspace] = None
        self._pre_table: Optional[FeatureTable] = None
        self._static_table: Optional[FeatureTable] = None
        self.episodes = 0
        self.forwards = 0  # images forwarded per episode path (not the tables)

    def autocast(self):
        """The backbone's autocast for the evaluation's ``precision`` (fp32 | bf16, on CPU too)."""
        return backbone_autocast(self.cfg.precision, self.device)

    def info(self) -> Dict[str, object]:
        return {"pid": os.getpid(), "device": str(self.device), "threads": torch.get_num_threads(),
                "package": smat_dist.__file__}

    @torch.no_grad()
    def features(self, weights, x: torch.Tensor) -> torch.Tensor:
        """No-grad features under ``weights`` (None = θ_pre) in chunks of ``batch_size`` images."""
        bs = self.cfg.batch_size
        with self.autocast():
            parts = [features(self.model.backbone, weights, x[i:i + bs]).float() for i in range(0, x.shape[0], bs)]
        return torch.cat(parts)

    @torch.no_grad()
    def protonet_logits(self, weights, ep: Episode) -> torch.Tensor:
        """ProtoNet under ``weights``: one no-grad forward of support+query (batched)."""
        ns = ep.support_x.shape[0]
        feats = self.features(weights, torch.cat([ep.support_x, ep.query_x]))
        self.forwards += feats.shape[0]
        return cosine_logits(feats[ns:], prototypes(feats[:ns], ep.support_y, ep.ways), self.model.scale)

    def pre_table(self) -> FeatureTable:
        if self._pre_table is None:
            self._pre_table = FeatureTable(self, None)
        return self._pre_table

    def static_table(self) -> FeatureTable:
        if self._static_table is None:
            weights = self.model.static_weights()
            self._static_table = self.pre_table() if weights is None else FeatureTable(self, weights)
        return self._static_table

    def lora(self) -> LoraWorkspace:
        if self._lora is None:
            self._lora = LoraWorkspace(self.model.backbone, self.cfg.finetune)
        return self._lora

    def task_alpha(self, spec: EpisodeSpec, ep: Episode) -> torch.Tensor:
        """α_i of a task (hypernetwork models) from θ_pre support features: table, else a forward."""
        feats = self.pre_table().get(spec, spec.support) if self.cfg.feature_cache else None
        if feats is None:
            feats = self.features(None, ep.support_x)
        return self.model.task_alpha(prototypes(feats, ep.support_y, ep.ways))  # fp32 whatever the precision

    def task_weights(self, spec: EpisodeSpec, ep: Episode):
        """(θ_i as gated tensor name -> tensor, α_i) of a task. A static model has one θ and no α;
        Pre's θ is θ_pre (None)."""
        if self.model.static:
            return self.model.static_weights(), None
        alpha = self.task_alpha(spec, ep)
        return self.model.weights_for(alpha), alpha

    def _no_finetuning(self, mode: str, lr: float) -> bool:
        return mode == "none" or lr == 0.0 or self.cfg.finetune.steps == 0  # θ_i left as it is

    def score(self, spec: EpisodeSpec, runs: List[Tuple[str, float]], keep_weights: bool = False):
        """Accuracies of ``runs`` on one episode; also α, the fine-tuning outputs, the episode sizes."""
        ys_q = torch.tensor([lab for _, lab in spec.query], dtype=torch.int64)
        sizes = (len(spec.support), len(spec.query))
        if self.model.static and self.cfg.feature_cache and all(self._no_finetuning(m, lr) for m, lr in runs):
            feats = self.static_table().get(spec, spec.support + spec.query)
            if feats is not None:  # no pixels and no forward: prototypes over cached features
                ys = torch.tensor([lab for _, lab in spec.support], dtype=torch.int64, device=feats.device)
                ns = sizes[0]
                logits = cosine_logits(feats[ns:], prototypes(feats[:ns], ys, spec.ways), self.model.scale)
                acc = float((logits.argmax(-1).cpu() == ys_q).float().mean())
                return [acc] * len(runs), None, {}, {}, sizes
        ep = self.reader.episode(spec).to(self.device)
        weights, alpha = self.task_weights(spec, ep)
        accs: List[float] = []
        outputs: Dict[int, object] = {}
        losses: Dict[str, List[float]] = {}
        plain_logits = None  # shared by every run that leaves θ_i as it is
        for i, (mode, lr) in enumerate(runs):
            if self._no_finetuning(mode, lr):
                if plain_logits is None:
                    plain_logits = self.protonet_logits(weights, ep)
                logits = plain_logits
            else:
                seed = episode_seed(self.cfg.seed, spec.source, spec.index, mode)
                dense = self.model.dense_weights(weights)
                if mode == "full":
                    out = finetune_full(self.model.backbone, dense, ep, lr, self.model.scale, self.cfg.finetune,
                                        seed, self.autocast, keep_weights)
                else:
                    out = self.lora().run(dense, ep, lr, self.model.scale, seed, self.autocast, keep_weights)
                logits = out.query_logits
                outputs[i] = out
                if out.losses:
                    losses[f"{mode}@{lr:g}"] = [out.losses[0], out.losses[-1]]
            accs.append(float((logits.argmax(-1) == ep.query_y).float().mean()))
        return accs, alpha, outputs, losses, sizes

    def run(self, jobs: List[Job]) -> List[EpisodeResult]:
        results = []
        for job in jobs:
            t0 = time.perf_counter()
            spec = truncate_spec(job.spec, job.max_support_per_class) if job.max_support_per_class else job.spec
            accs, alpha, _, losses, (ns, nq) = self.score(spec, job.runs)
            self.episodes += 1
            results.append(EpisodeResult(
                source=spec.source, split=spec.split, index=spec.index, ways=spec.ways, support=ns, query=nq,
                accuracy=accs, alpha=None if alpha is None else [float(a) for a in alpha.cpu()],
                seconds=time.perf_counter() - t0, losses=losses))
        return results

    def stats(self) -> Dict[str, float]:
        tables = sum(t.images for t in {id(t): t for t in (self._pre_table, self._static_table) if t}.values())
        return {"episodes": self.episodes, "episode_forward_images": self.forwards, "table_images": tables,
                **self.reader.stats()}

    def close(self) -> None:
        self.reader.close()


class EvalActor:
    """Ray actor body around :class:`EpisodeEvaluator`."""

    def __init__(self, spec: ModelSpec, cfg: EvalConfig, threads: Optional[int]):
        self.ev = EpisodeEvaluator(spec, cfg, threads)

    def info(self) -> Dict[str, object]:
        return self.ev.info()

    def run(self, jobs: List[Job]) -> List[EpisodeResult]:
        return self.ev.run(jobs)

    def stats(self) -> Dict[str, float]:
        return self.ev.stats()


__all__ = ["EpisodeEvaluator", "EpisodeResult", "EvalActor", "FeatureTable", "Job", "pick_device", "truncate_spec"]
