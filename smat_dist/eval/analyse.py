"""``smat-eval analyse``: the paper's Figure 5 from a checkpoint, plus training curves.

* ``nonzero_by_layer_type.png``: non-zero parameters of every expert's deterministic test mask
  z_m > 0, grouped by layer type (attention qkv / proj, MLP fc1 / fc2, norms, embeddings, ...);
* ``nonzero_by_depth.png``: the same by block depth (embeddings first, final norm last);
* ``mask_overlap.png``: Jaccard overlap |z_a>0 ∧ z_b>0| / |z_a>0 ∨ z_b>0| between experts;
* ``expert_selection.png`` (with ``--data``): mean α per source over frozen test episodes, rows
  ordered by a dendrogram of source similarity (``scipy.cluster.hierarchy``);
* ``training_curves.png``: losses, sparsity (train/test, τ), λ, temperature and expected density
  from the run's ``metrics.jsonl``.

Counts are in parameters (a structured gate group of k scalars counts k), as the sparsity constraint
counts them. Every number behind the figures goes to ``analysis.json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from smat_dist.data.store import Catalog
from smat_dist.eval.config import EvalConfig
from smat_dist.eval.episodes import frozen_list, writable_episodes_dir
from smat_dist.eval.models import describe_checkpoint, resolve_export
from smat_dist.eval.runner import _id_sources, _sources
from smat_dist.eval.worker import EpisodeEvaluator
from smat_dist.export import load_model
from smat_dist.plotting import pyplot, save
from smat_dist.record import read_rows

log = logging.getLogger(__name__)

TYPE_ORDER = ["patch embed", "tokens/pos", "norm", "attn qkv", "attn proj", "mlp fc1", "mlp fc2", "layer scale",
              "head", "other"]
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_type(name: str) -> str:
    """Layer type of a timm ViT parameter name."""
    if name.startswith("patch_embed."):
        return "patch embed"
    if name in ("cls_token", "pos_embed", "reg_token", "dist_token"):
        return "tokens/pos"
    if ".attn.qkv." in name or ".attn.q." in name or ".attn.k." in name or ".attn.v." in name:
        return "attn qkv"
    if ".attn.proj." in name:
        return "attn proj"
    if ".mlp.fc1." in name:
        return "mlp fc1"
    if ".mlp.fc2." in name:
        return "mlp fc2"
    if re.search(r"(^|\.)ls\d\.", name):
        return "layer scale"
    if "norm" in name:
        return "norm"
    if name.startswith("head"):
        return "head"
    return "other"


def layer_depth(name: str) -> str:
    """'embed', the block index as a string, or 'final' (norms/head after the last block)."""
    m = _BLOCK.search(name)
    if m:
        return m.group(1)
    if name.startswith(("patch_embed.", "cls_token", "pos_embed", "reg_token", "dist_token")):
        return "embed"
    return "final"


@torch.no_grad()
def nonzero_per_slot(model) -> Tuple[np.ndarray, List[str], np.ndarray]:
    """(M, slots) non-zero counts of the test masks, slot names, and slot sizes."""
    gates, layout = model.gates, model.layout
    z = gates.deterministic()
    counts = np.zeros((z.shape[0], len(model.space.slots)), dtype=np.int64)
    for j, s in enumerate(model.space.slots):
        if layout.group_index is None:
            zs = z[:, s.offset:s.offset + s.numel]
        else:
            zs = z.index_select(1, layout.group_index[s.offset:s.offset + s.numel])
        counts[:, j] = (zs > 0).sum(1).cpu().numpy()
    return counts, [s.name for s in model.space.slots], np.array([s.numel for s in model.space.slots])


@torch.no_grad()
def jaccard(model) -> np.ndarray:
    """(M, M) Jaccard overlap of the experts' non-zero test-gate sets, in parameters."""
    z = model.gates.deterministic() > 0  # (M, G)
    zf = z.to(torch.float64)
    sizes = model.layout.group_sizes
    w = zf if sizes is None else zf * sizes.to(zf)
    inter = (w @ zf.t()).cpu().numpy()
    count = np.diag(inter)
    union = count[:, None] + count[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / union, 1.0)
    return out


def group_counts(counts: np.ndarray, names: Sequence[str], sizes: np.ndarray, key) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """Sum the per-slot counts by ``key(name)``: (groups, (M, groups) non-zero, (groups,) sizes)."""
    groups: List[str] = []
    for n in names:
        g = key(n)
        if g not in groups:
            groups.append(g)
    nz = np.zeros((counts.shape[0], len(groups)), dtype=np.int64)
    tot = np.zeros(len(groups), dtype=np.int64)
    for j, n in enumerate(names):
        g = groups.index(key(n))
        nz[:, g] += counts[:, j]
        tot[g] += sizes[j]
    return groups, nz, tot


def _sort_groups(groups, nz, tot, order):
    idx = sorted(range(len(groups)), key=lambda i: order(groups[i]))
    return [groups[i] for i in idx], nz[:, idx], tot[idx]


@dataclass
class AnalysisResult:
    out: Path
    figures: Dict[str, Path] = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def _bars(ax, labels: List[str], values: np.ndarray, ylabel: str, title: str) -> None:
    M = values.shape[0]
    x = np.arange(len(labels))
    width = 0.8 / M
    cmap = pyplot().get_cmap("tab10" if M <= 10 else "tab20")
    for m in range(M):
        ax.bar(x + (m - (M - 1) / 2) * width, values[m], width, label=f"expert {m}", color=cmap(m % cmap.N))
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def plot_nonzero(groups, nz, tot, xlabel: str, path: Path, title: str) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(groups) + 4), 4.2))
    _bars(axes[0], groups, nz, "non-zero parameters", f"{title}: non-zero parameters")
    _bars(axes[1], groups, 100.0 * nz / np.maximum(tot, 1)[None, :], "non-zero (% of the group)", f"{title}: density")
    for ax in axes:
        ax.set_xlabel(xlabel)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save(fig, path)


def plot_overlap(J: np.ndarray, path: Path) -> Path:
    plt = pyplot()
    M = J.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * M, 0.6 + 0.6 * M))
    im = ax.imshow(J, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(M))
    ax.set_yticks(range(M))
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title("mask overlap (Jaccard of z > 0)")
    if M <= 16:
        for a in range(M):
            for b in range(M):
                ax.text(b, a, f"{J[a, b]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if J[a, b] < 0.6 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save(fig, path)


def plot_selection(sources: List[str], mean_alpha: np.ndarray, kinds: Dict[str, str], path: Path,
                   method: str, metric: str) -> Tuple[Path, List[str]]:
    """Dendrogram of sources by mean α (left) and the α heatmap in dendrogram order (right)."""
    plt = pyplot()
    from scipy.cluster.hierarchy import dendrogram, linkage

    n, M = mean_alpha.shape
    # Laid out in inches so the row labels (right of the heatmap) and the colour bar never overlap,
    # whatever M and the number of sources: dendrogram | heatmap | labels | colour bar.
    dend_w, cell_w, label_w, bar_w, gap = (1.3 if n >= 2 else 0.0), 0.5, 1.7, 0.2, 0.15
    heat_w, top, bottom = max(1.2, cell_w * M), 0.55, 0.5
    height = max(2.0, 0.4 * n) + top + bottom
    width = 0.2 + dend_w + gap + heat_w + label_w + bar_w + 0.6
    fig = plt.figure(figsize=(width, height))

    def box(x, w):  # inches -> figure fraction, same vertical extent for every panel
        return [x / width, bottom / height, w / width, (height - top - bottom) / height]

    order = list(range(n))
    if n >= 2:
        ax_d = fig.add_axes(box(0.2, dend_w))
        Z = linkage(mean_alpha, method=method, metric=metric)
        dn = dendrogram(Z, orientation="left", no_labels=True, ax=ax_d, color_threshold=None)
        order = list(dn["leaves"])[::-1]  # top-to-bottom, matching the heatmap's rows
        ax_d.set_xticks([])
        for sp in ax_d.spines.values():
            sp.set_visible(False)
        ax_d.set_xlabel("task similarity", fontsize=8)
    x_heat = 0.2 + dend_w + gap
    ax = fig.add_axes(box(x_heat, heat_w))
    im = ax.imshow(mean_alpha[order], aspect="auto", cmap="magma", vmin=0.0)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{sources[i]} ({kinds.get(sources[i], '?')})" for i in order], fontsize=8)
    ax.yaxis.tick_right()
    ax.set_xticks(range(M))
    ax.set_xlabel("expert")
    cax = fig.add_axes(box(x_heat + heat_w + label_w, bar_w))
    fig.colorbar(im, cax=cax)
    fig.suptitle("mean expert-selection weight α per source (rows in dendrogram order)", fontsize=9)
    save(fig, path)
    return path, [sources[i] for i in order]


def plot_curves(rows: List[dict], tau: Optional[float], path: Path) -> Optional[Path]:
    plt = pyplot()
    steps = np.array([r.get("step", i) for i, r in enumerate(rows)], dtype=float)

    def series(key):
        vals = [r.get(key) for r in rows]
        if all(v is None for v in vals):
            return None
        if any(isinstance(v, list) for v in vals):
            width = max(len(v) for v in vals if isinstance(v, list))
            return np.array([v if isinstance(v, list) and len(v) == width else [np.nan] * width for v in vals], float)
        return np.array([np.nan if v is None else float(v) for v in vals])

    panels = []
    losses = [(k, series(k)) for k in ("loss", "query_ce", "kd", "support_ce", "teacher_ce")]
    losses = [(k, s) for k, s in losses if s is not None]
    if losses:
        panels.append(("losses", losses))
    sp = [(k, series(k)) for k in ("sparsity", "sparsity_test")]
    sp = [(k, s) for k, s in sp if s is not None]
    if sp:
        panels.append(("sparsity", sp))
    lam = series("lambda")
    if lam is not None:
        panels.append(("λ (Lagrange multipliers)", [("lambda", lam)]))
    for key, title in (("expected_density", "expected density E_m"), ("temperature", "selection temperature")):
        s = series(key)
        if s is not None:
            panels.append((title, [(key, s)]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, items) in zip(axes[0], panels):
        for key, s in items:
            if s.ndim == 1:
                ax.plot(steps, s, label=key)
            else:
                style = "--" if key == "sparsity_test" else "-"
                for m in range(s.shape[1]):
                    label = (f"{key}[{m}]" if s.shape[1] <= 4 else f"{key} ({s.shape[1]} experts)") if m == 0 or s.shape[1] <= 4 else None
                    ax.plot(steps, s[:, m], style, lw=1, label=label)
        if title == "sparsity" and tau is not None:
            ax.axhline(tau, color="k", lw=1, ls=":", label="target τ")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def _depth_order(g: str) -> Tuple[int, int]:
    if g == "embed":
        return (0, 0)
    if g == "final":
        return (2, 0)
    return (1, int(g))


def source_alphas(export: Path, data: str, cfg: EvalConfig, out: Path) -> Tuple[List[str], Dict[str, np.ndarray], Dict[str, str]]:
    """α of the first ``analyse.episodes_per_source`` frozen test episodes of every source."""
    import dataclasses

    spec = describe_checkpoint(export)
    dcfg = dataclasses.replace(cfg.data, root=str(data), image_size=spec.img_size)
    cfg = dataclasses.replace(cfg, data=dcfg, device="cpu" if cfg.device == "auto" else cfg.device)
    catalog = Catalog.for_config(dcfg)
    sources = _sources(cfg, catalog)
    ids = set(_id_sources(cfg, spec, catalog))
    ep_dir = writable_episodes_dir(cfg.episodes_dir, dcfg.root, out / "episodes")
    ev = EpisodeEvaluator(spec, cfg, cfg.threads)
    alphas: Dict[str, np.ndarray] = {}
    try:
        for s in sources:
            fl = frozen_list(dcfg, s, cfg.split, cfg.analyse.episodes_per_source, cfg.seed, ep_dir)
            rows = []
            for sp in fl.specs:
                alpha = ev.task_alpha(sp, ev.reader.episode(sp))
                rows.append(alpha.cpu().numpy())
            alphas[s] = np.stack(rows)
    finally:
        ev.close()
    return sources, alphas, {s: ("ID" if s in ids else "OOD") for s in sources}


def alpha_specialisation(alphas: Dict[str, np.ndarray]) -> Dict[str, float]:
    """How much a task's α says about its source, from α (episodes, M) per source.

    * ``eta2``: the between-source share of α's variance, summed over experts (0: α carries no
      source information; 1: α is fixed by the source);
    * ``decode``: nearest-centroid source accuracy, centroids from the even-indexed episodes of each
      source scoring the odd-indexed ones and vice versa (chance = 1 / number of sources);
    * ``spread``: the largest difference between two sources' mean α of one expert;
    * ``entropy``: mean α entropy relative to uniform (1: every task mixes the experts equally).

    Why these four: a source-blind mixer can still have a large spread between source means when α is
    peaked (a low selection temperature amplifies noise), so spread alone does not show specialisation;
    η² and decoding set it against the episode-to-episode variation within a source.
    """
    sources = sorted(alphas)
    if len(sources) < 2 or any(len(alphas[s]) < 2 for s in sources):
        raise ValueError("alpha_specialisation needs at least 2 sources with at least 2 episodes each")
    rows = np.concatenate([np.asarray(alphas[s], dtype=np.float64) for s in sources])
    grand = rows.mean(0)
    means = {s: np.asarray(alphas[s], dtype=np.float64).mean(0) for s in sources}
    total = float(((rows - grand) ** 2).sum())
    between = float(sum(len(alphas[s]) * ((means[s] - grand) ** 2).sum() for s in sources))
    correct = count = 0
    for fit, score in ((0, 1), (1, 0)):
        centroids = np.stack([np.asarray(alphas[s], dtype=np.float64)[fit::2].mean(0) for s in sources])
        for k, s in enumerate(sources):
            held = np.asarray(alphas[s], dtype=np.float64)[score::2]
            dist = ((held[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
            correct += int((dist.argmin(1) == k).sum())
            count += len(held)
    stacked = np.stack([means[s] for s in sources])
    M = rows.shape[1]
    p = np.clip(rows, 1e-12, None)
    entropy = float((-(p * np.log(p)).sum(1)).mean() / math.log(M)) if M > 1 else 1.0
    return {"eta2": between / total if total > 0 else 0.0, "decode": correct / count,
            "chance": 1.0 / len(sources), "spread": float((stacked.max(0) - stacked.min(0)).max()),
            "entropy": entropy}


def analyse(run: str | Path, data: Optional[str] = None, out: Optional[str | Path] = None,
            cfg: Optional[EvalConfig] = None) -> AnalysisResult:
    """Write the figures (PNG) and ``analysis.json`` for a run directory or model file."""
    cfg = cfg or EvalConfig()
    export = resolve_export(run)
    run_dir = export.parent
    out_dir = Path(out) if out else run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    res = AnalysisResult(out=out_dir)
    model = load_model(export)
    res.data["method"] = model.cfg.method
    res.data["num_experts"] = model.num_experts

    if model.gates is not None:
        counts, names, sizes = nonzero_per_slot(model)
        g_t, nz_t, tot_t = _sort_groups(*group_counts(counts, names, sizes, layer_type),
                                        order=lambda g: TYPE_ORDER.index(g) if g in TYPE_ORDER else 99)
        g_d, nz_d, tot_d = _sort_groups(*group_counts(counts, names, sizes, layer_depth), order=_depth_order)
        res.figures["nonzero_by_layer_type"] = plot_nonzero(g_t, nz_t, tot_t, "layer type",
                                                            out_dir / "nonzero_by_layer_type.png", "by layer type")
        res.figures["nonzero_by_depth"] = plot_nonzero(g_d, nz_d, tot_d, "block (embed = patch/token embeddings)",
                                                       out_dir / "nonzero_by_depth.png", "by depth")
        J = jaccard(model)
        res.figures["mask_overlap"] = plot_overlap(J, out_dir / "mask_overlap.png")
        res.data.update(
            parameters=int(sizes.sum()),
            nonzero_per_expert=counts.sum(1).tolist(),
            test_sparsity=[float(v) for v in model.gates.test_sparsity().cpu()],
            by_layer_type={"groups": g_t, "nonzero": nz_t.tolist(), "size": tot_t.tolist()},
            by_depth={"groups": g_d, "nonzero": nz_d.tolist(), "size": tot_d.tolist()},
            jaccard=J.tolist(),
        )
    else:
        res.notes.append(f"method {model.cfg.method!r} has no expert masks (gates disabled): no mask figures")

    if data:
        if model.hypernet is None:
            res.notes.append(f"method {model.cfg.method!r} has no hypernetwork: α is uniform, no selection figure")
        else:
            sources, alphas, kinds = source_alphas(export, data, cfg, out_dir)
            mean = np.stack([alphas[s].mean(0) for s in sources])
            path, order = plot_selection(sources, mean, kinds, out_dir / "expert_selection.png",
                                         cfg.analyse.linkage, cfg.analyse.metric)
            res.figures["expert_selection"] = path
            res.data["alpha"] = {"sources": sources, "kind": kinds, "mean": mean.tolist(), "dendrogram_order": order,
                                 "episodes_per_source": cfg.analyse.episodes_per_source,
                                 "per_episode": {s: a.tolist() for s, a in alphas.items()}}
    else:
        res.notes.append("no --data: skipped the expert-selection / dendrogram figure")

    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = read_rows(metrics)
        tau = model.cfg.gates.target_sparsity if model.gates is not None else None
        p = plot_curves(rows, tau, out_dir / "training_curves.png") if rows else None
        if p is not None:
            res.figures["training_curves"] = p
            res.data["metrics_rows"] = len(rows)
        else:
            res.notes.append(f"{metrics}: no plottable keys")
    else:
        res.notes.append(f"no {metrics}: skipped the training curves")
    res.data["figures"] = {k: str(v) for k, v in res.figures.items()}
    res.data["notes"] = res.notes
    (out_dir / "analysis.json").write_text(json.dumps(res.data, indent=1))
    return res


__all__ = ["AnalysisResult", "alpha_specialisation", "analyse", "group_counts", "jaccard", "layer_depth", "layer_type", "nonzero_per_slot",
           "plot_curves"]
