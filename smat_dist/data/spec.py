"""Meta-Dataset ``dataset_spec.json`` in and out (flat, BiLevel and Hierarchical).

The sampler only needs a :class:`SourceSpec`: which classes each split holds, how many images
each class has, and (when present) the alphabets or the class DAG. The JSON layout follows MD's
``DatasetSpecification.to_dict`` family so Meta-Dataset's own specs load
unchanged and the specs we write can be diffed against them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

from smat_dist.fsutil import read_json

SPLITS = ("train", "valid", "test")
MD_SPLIT = {"train": "TRAIN", "valid": "VALID", "test": "TEST"}
FLAT, BILEVEL, HIERARCHICAL = "flat", "bilevel", "hierarchical"
_CLASS_TAG = {
    FLAT: "DatasetSpecification",
    BILEVEL: "BiLevelDatasetSpecification",
    HIERARCHICAL: "HierarchicalDatasetSpecification",
}
_TAG_KIND = {v: k for k, v in _CLASS_TAG.items()}


class SpecError(ValueError):
    """A dataset spec that cannot be used; the message names the file."""


@dataclass
class GraphNode:
    """One WordNet-style node of a split's sub-graph (MD's exported synset)."""

    wn_id: str
    words: str
    children_ids: List[str] = field(default_factory=list)
    parents_ids: List[str] = field(default_factory=list)


@dataclass
class SourceSpec:
    """What the sampler knows about one source. Class ids are absolute and split-contiguous."""

    name: str
    kind: str  # flat | bilevel | hierarchical
    images_per_class: Dict[int, int]
    class_names: Dict[int, str]
    split_classes: Dict[str, List[int]]  # sorted absolute class ids per split
    # bilevel: per split, the class ids of each superclass (in superclass-id order)
    superclasses: Dict[str, List[List[int]]] = field(default_factory=dict)
    superclass_names: Dict[int, str] = field(default_factory=dict)
    superclass_ids: Dict[str, List[int]] = field(default_factory=dict)
    # hierarchical: per split, its sub-graph; class_names map class id -> leaf wn_id
    graph: Dict[str, List[GraphNode]] = field(default_factory=dict)

    def classes(self, split: str) -> List[int]:
        return list(self.split_classes.get(split, []))

    def splits(self) -> List[str]:
        return [s for s in SPLITS if self.split_classes.get(s)]

    def split_of(self, class_id: int) -> str:
        for s, ids in self.split_classes.items():
            if ids and ids[0] <= class_id <= ids[-1] and class_id in set(ids):
                return s
        raise KeyError(f"{self.name}: class {class_id} is in no split")


# ---------------------------------------------------------------- builders


def flat_spec(name: str, split_counts: Mapping[str, int], images_per_class: Mapping[int, int],
              class_names: Mapping[int, str]) -> SourceSpec:
    """Classes 0..T-1 train, then valid, then test (MD's contiguous numbering)."""
    split_classes: Dict[str, List[int]] = {}
    start = 0
    for s in SPLITS:
        n = int(split_counts.get(s, 0))
        split_classes[s] = list(range(start, start + n))
        start += n
    _check_counts(name, split_classes, images_per_class)
    return SourceSpec(name, FLAT, {int(k): int(v) for k, v in images_per_class.items()},
                      {int(k): str(v) for k, v in class_names.items()}, split_classes)


def bilevel_spec(name: str, superclasses_per_split: Mapping[str, int],
                 classes_per_superclass: Sequence[int], superclass_names: Sequence[str],
                 images_per_class: Mapping[int, int], class_names: Mapping[int, str]) -> SourceSpec:
    """Superclasses numbered split by split; classes numbered superclass by superclass."""
    split_classes: Dict[str, List[int]] = {s: [] for s in SPLITS}
    supers: Dict[str, List[List[int]]] = {s: [] for s in SPLITS}
    super_ids: Dict[str, List[int]] = {s: [] for s in SPLITS}
    sc, cid = 0, 0
    for s in SPLITS:
        for _ in range(int(superclasses_per_split.get(s, 0))):
            n = int(classes_per_superclass[sc])
            ids = list(range(cid, cid + n))
            supers[s].append(ids)
            super_ids[s].append(sc)
            split_classes[s].extend(ids)
            sc += 1
            cid += n
    if sc != len(classes_per_superclass):
        raise SpecError(f"{name}: {len(classes_per_superclass)} superclasses but splits hold {sc}")
    _check_counts(name, split_classes, images_per_class)
    return SourceSpec(name, BILEVEL, {int(k): int(v) for k, v in images_per_class.items()},
                      {int(k): str(v) for k, v in class_names.items()}, split_classes,
                      superclasses=supers, superclass_names={i: str(n) for i, n in enumerate(superclass_names)},
                      superclass_ids=super_ids)


def hierarchical_spec(name: str, graph: Mapping[str, List[GraphNode]],
                      images_per_class: Mapping[int, int], class_names: Mapping[int, str]) -> SourceSpec:
    """``class_names`` maps class id -> leaf wn_id; each split's leaves are its classes."""
    by_wnid = {v: int(k) for k, v in class_names.items()}
    split_classes: Dict[str, List[int]] = {}
    for s in SPLITS:
        nodes = graph.get(s, [])
        leaves = [n.wn_id for n in nodes if not n.children_ids]
        missing = [w for w in leaves if w not in by_wnid]
        if missing:
            raise SpecError(f"{name}: leaves {missing[:5]} of split {s} have no class id")
        split_classes[s] = sorted(by_wnid[w] for w in leaves)
    _check_counts(name, split_classes, images_per_class)
    return SourceSpec(name, HIERARCHICAL, {int(k): int(v) for k, v in images_per_class.items()},
                      {int(k): str(v) for k, v in class_names.items()}, split_classes,
                      graph={s: list(graph.get(s, [])) for s in SPLITS})


def _check_counts(name: str, split_classes: Mapping[str, List[int]], ipc: Mapping[int, int]) -> None:
    all_ids = sorted(i for ids in split_classes.values() for i in ids)
    if all_ids != list(range(len(all_ids))):
        raise SpecError(f"{name}: class ids must be 0..C-1 without gaps or overlap across splits")
    missing = [i for i in all_ids if int(i) not in {int(k) for k in ipc}]
    if missing:
        raise SpecError(f"{name}: no image count for classes {missing[:5]}")


# ---------------------------------------------------------------- JSON (MD layout)


def spec_to_json(spec: SourceSpec, path: str = ".", file_pattern: str = "{}.tfrecords") -> dict:
    """MD ``to_dict`` layout with ``__class__`` tag; keys are strings, splits upper-case."""
    out: dict = {"__class__": _CLASS_TAG[spec.kind], "name": spec.name}
    names = {str(k): v for k, v in sorted(spec.class_names.items())}
    if spec.kind == FLAT:
        out["classes_per_split"] = {MD_SPLIT[s]: len(spec.split_classes.get(s, [])) for s in SPLITS}
        out["images_per_class"] = {str(k): int(v) for k, v in sorted(spec.images_per_class.items())}
        out["class_names"] = names
    elif spec.kind == BILEVEL:
        out["superclasses_per_split"] = {MD_SPLIT[s]: len(spec.superclasses.get(s, [])) for s in SPLITS}
        cps: Dict[str, int] = {}
        for s in SPLITS:
            for sc, ids in zip(spec.superclass_ids.get(s, []), spec.superclasses.get(s, [])):
                cps[str(sc)] = len(ids)
        out["classes_per_superclass"] = cps
        out["images_per_class"] = {str(k): int(v) for k, v in sorted(spec.images_per_class.items())}
        out["superclass_names"] = {str(k): v for k, v in sorted(spec.superclass_names.items())}
        out["class_names"] = names
    else:
        out["split_subgraphs"] = {
            MD_SPLIT[s]: [
                {"wn_id": n.wn_id, "words": n.words, "children_ids": list(n.children_ids),
                 "parents_ids": list(n.parents_ids)}
                for n in spec.graph.get(s, [])
            ]
            for s in SPLITS
        }
        ipc: Dict[str, Dict[str, int]] = {}
        wn = {int(k): v for k, v in spec.class_names.items()}
        for s in SPLITS:
            counts = {wn[c]: int(spec.images_per_class[c]) for c in spec.split_classes.get(s, [])}
            for node, leaves in spanning_leaves(spec.graph.get(s, [])).items():
                if node not in counts:
                    counts[node] = sum(counts[lf] for lf in leaves)
            ipc[MD_SPLIT[s]] = counts
        out["images_per_class"] = ipc
        out["class_names"] = names
    out["path"] = path
    out["file_pattern"] = file_pattern
    return out


def spec_from_json(d: dict, origin: str = "<dict>") -> SourceSpec:
    tag = d.get("__class__")
    kind = _TAG_KIND.get(tag)
    if kind is None:
        raise SpecError(f"{origin}: unknown __class__ {tag!r} (expected one of {sorted(_TAG_KIND)})")
    name = str(d.get("name", ""))
    try:
        names = {int(k): str(v) for k, v in d["class_names"].items()}
        if kind == FLAT:
            cps = {s: int(d["classes_per_split"].get(MD_SPLIT[s], 0)) for s in SPLITS}
            ipc = {int(k): int(v) for k, v in d["images_per_class"].items()}
            return flat_spec(name, cps, ipc, names)
        if kind == BILEVEL:
            sps = {s: int(d["superclasses_per_split"].get(MD_SPLIT[s], 0)) for s in SPLITS}
            cps_raw = {int(k): int(v) for k, v in d["classes_per_superclass"].items()}
            n_sc = len(cps_raw)
            snames_raw = {int(k): str(v) for k, v in d.get("superclass_names", {}).items()}
            ipc = {int(k): int(v) for k, v in d["images_per_class"].items()}
            return bilevel_spec(name, sps, [cps_raw[i] for i in range(n_sc)],
                                [snames_raw.get(i, str(i)) for i in range(n_sc)], ipc, names)
        graph = {
            s: [GraphNode(str(n["wn_id"]), str(n.get("words", "")), [str(c) for c in n.get("children_ids", [])],
                          [str(p) for p in n.get("parents_ids", [])])
                for n in d["split_subgraphs"].get(MD_SPLIT[s], [])]
            for s in SPLITS
        }
        wn_by_id = names
        ipc = {}
        for s in SPLITS:
            counts = d["images_per_class"].get(MD_SPLIT[s], {})
            for cid, wn in wn_by_id.items():
                if wn in counts and not _is_internal(graph[s], wn):
                    ipc[cid] = int(counts[wn])
        return hierarchical_spec(name, graph, ipc, names)
    except SpecError as exc:
        raise SpecError(f"{origin}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{origin}: malformed {tag}: {exc!r}") from exc


def _is_internal(nodes: List[GraphNode], wn: str) -> bool:
    for n in nodes:
        if n.wn_id == wn:
            return bool(n.children_ids)
    return False


def load_spec(path: str | Path) -> SourceSpec:
    return spec_from_json(read_json(path, SpecError, "dataset spec"), str(Path(path)))


def save_spec(spec: SourceSpec, path: str | Path, file_pattern: str = "{}.tfrecords", rel_path: str = ".") -> None:
    Path(path).write_text(json.dumps(spec_to_json(spec, rel_path, file_pattern), indent=1, sort_keys=False) + "\n")


def with_counts(spec: SourceSpec, counts: Mapping[int, int]) -> SourceSpec:
    """The same spec with measured image counts (what we write next to the shards)."""
    ipc = dict(spec.images_per_class)
    ipc.update({int(k): int(v) for k, v in counts.items()})
    return SourceSpec(spec.name, spec.kind, ipc, dict(spec.class_names), spec.split_classes,
                      spec.superclasses, spec.superclass_names, spec.superclass_ids, spec.graph)


# ---------------------------------------------------------------- DAG helpers


def spanning_leaves(nodes: List[GraphNode]) -> Dict[str, List[str]]:
    """wn_id -> sorted leaf wn_ids it spans, within one split's sub-graph (leaves span themselves)."""
    children = {n.wn_id: [c for c in n.children_ids] for n in nodes}
    memo: Dict[str, List[str]] = {}

    def leaves(w: str, stack: tuple = ()) -> List[str]:
        if w in memo:
            return memo[w]
        if w in stack:
            raise SpecError(f"cycle in class graph through {w}")
        kids = [c for c in children.get(w, []) if c in children]
        if not kids:
            out = [w]
        else:
            acc = set()
            for c in kids:
                acc.update(leaves(c, stack + (w,)))
            out = sorted(acc)
        memo[w] = out
        return out

    for n in nodes:
        leaves(n.wn_id)
    return memo


__all__ = [
    "SPLITS", "FLAT", "BILEVEL", "HIERARCHICAL", "GraphNode", "SourceSpec", "SpecError",
    "flat_spec", "bilevel_spec", "hierarchical_spec", "spec_to_json", "spec_from_json",
    "load_spec", "save_spec", "with_counts", "spanning_leaves",
]
