"""``smat-data``: convert, synthesise, verify, list episodes, show one, upload.

    smat-data convert --format {tfrecord,h5,folder} SRC OUT --source NAME [--splits train=0.7,valid=0.15,test=0.15]
                      [--pack 1024 --pack-side 28]   (packed blocks of tiny grey images, e.g. QuickDraw)
    smat-data synth OUT [--seed 0] [--scale 1.0]
    smat-data verify ROOT [--source S] [--quick] [--set remote.stall_timeout_s=30]
    smat-data episodes ROOT --source S --split test -n 600 --seed 0 > episodes.jsonl
    smat-data show ROOT --source S --split test --index 0 -o episode.png   (or --episodes FILE --line K)
    smat-data info ROOT
    smat-data stage ROOT LOCAL [--source S]     (copy to node-local disk; set data.local_root=LOCAL)
    smat-data export ROOT --source S DEST       (image-folder copy of a converted source)
    smat-data upload OUT URL [--source S]       (a local root to object storage, manifests last)
    smat-data index OUT                         (rewrite OUT/sources.json, the list URL readers use)

ROOT is a local directory or a URL (``http(s)://``, ``s3://``, ``gs://``, ``pipe:CMD ...{shard}...``);
OUT (what converters write) is a local directory. Episode settings can be overridden with
``--set episode.num_ways=5 --set image_size=64`` (any :class:`~smat_dist.data.config.DataConfig`
key, e.g. ``--set cache_dir=/local/nvme/shards``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from smat_dist.config import ConfigError, load_config
from smat_dist.data.builder import EpisodeBuilder, load_episode_list
from smat_dist.data.config import DataConfig
from smat_dist.data.convert import ConvertError, convert, export_folder
from smat_dist.data.location import DataRoot
from smat_dist.data.sampler import SamplerError
from smat_dist.data.spec import SpecError
from smat_dist.data.store import Catalog, DataError
from smat_dist.data.synth import ALL_SOURCES, build_synth
from smat_dist.data.transfer import stage, upload
from smat_dist.data.verify import verify_root
from smat_dist.fsutil import check_writable_dir
from smat_dist.data.writer import WriteOptions, write_sources_index


def _size(text: str) -> int:
    t = text.strip().upper()
    mult = 1
    for suf, m in (("GB", 1 << 30), ("G", 1 << 30), ("MB", 1 << 20), ("M", 1 << 20), ("KB", 1 << 10), ("K", 1 << 10)):
        if t.endswith(suf):
            t, mult = t[: -len(suf)], m
            break
    return int(float(t) * mult)


def _data_cfg(root: str, overrides: Sequence[str]):
    return load_config(DataConfig, [], [f"root={root}", *overrides])


def _root(root: str, overrides: Sequence[str]) -> DataRoot:
    """``root`` as a DataRoot under the ``--set`` settings (``remote.*``: deadlines, redirects, pipe:)."""
    cfg = _data_cfg(root, overrides)
    return DataRoot(cfg.root, cfg.remote)


def _write_opts(a):
    return WriteOptions(shard_bytes=_size(a.shard_size), workers=a.workers, tier=a.tier, max_side=a.max_side,
                        jpeg_quality=a.jpeg_quality, decode_check=a.decode_check, keep_work=a.keep_work,
                        force=a.force, progress=not a.quiet, pack=getattr(a, "pack", 0),
                        pack_side=getattr(a, "pack_side", 28))


def cmd_convert(a) -> int:
    m = convert(a.format, a.src, a.out, a.source, _write_opts(a), splits=a.splits, split_file=a.split_file)
    man = json.loads(Path(m).read_text())
    for split, sp in man["splits"].items():
        print(f"{a.source}/{split}: {len(sp['classes'])} classes, {sp['num_images']} images, {len(sp['shards'])} shards")
    if man.get("skipped_inputs"):
        print(f"{a.source}: {man['skipped_inputs']} unreadable inputs skipped (see warnings)")
    return 0


def cmd_synth(a) -> int:
    check_writable_dir(a.out, "smat-data synth OUT")
    sources = a.sources.split(",") if a.sources else list(ALL_SOURCES)
    opts = _write_opts(a)
    if a.shard_size == "512MB":
        opts.shard_bytes = 4 << 20  # small shards: several per split even at this scale
    opts.tier = "native"
    paths = build_synth(a.out, seed=a.seed, scale=a.scale, sources=sources, opts=opts)
    for p in paths:
        man = json.loads(Path(p).read_text())
        parts = ", ".join(f"{s} {len(v['classes'])}c/{v['num_images']}i" for s, v in man["splits"].items())
        print(f"{man['source']}: {parts}")
    return 0


def cmd_verify(a) -> int:
    res = verify_root(_root(a.out, a.set), [a.source] if a.source else None, deep=not a.quick)
    if not res:
        print(f"no source (*/manifest.json) under {a.out}", file=sys.stderr)
        return 2
    bad = 0
    for name, problems in res.items():
        if problems:
            bad += 1
            for p in problems:
                print(f"FAIL {name}: {p}", file=sys.stderr)
        else:
            print(f"ok   {name}")
    return 1 if bad else 0


def cmd_episodes(a) -> int:
    cfg = _data_cfg(a.out, a.set)
    b = EpisodeBuilder(cfg, a.split, a.seed, [a.source])
    out = open(a.output, "w") if a.output else sys.stdout
    try:
        for g in range(a.start, a.start + a.n):
            out.write(json.dumps(b.plan(g).to_json(), separators=(",", ":")) + "\n")
    finally:
        if a.output:
            out.close()
    return 0


def cmd_show(a) -> int:
    import numpy as np
    from PIL import Image, ImageDraw

    cfg = _data_cfg(a.out, a.set)
    if a.episodes:
        specs = load_episode_list(a.episodes)
        if not 0 <= a.line < len(specs):
            raise SystemExit(f"{a.episodes} has {len(specs)} episodes; --line {a.line} is out of range")
        spec = specs[a.line]
        b = EpisodeBuilder(cfg, spec.split, spec.seed, [spec.source])
    else:
        if not a.source:
            raise SystemExit("show: give --source (or --episodes FILE)")
        b = EpisodeBuilder(cfg, a.split, a.seed, [a.source])
        spec = b.plan(a.index)
    raw = b.materialise(spec, augment=a.augment)
    s = cfg.image_size
    rows = min(raw.support_y.max() + 1, a.max_rows)
    ncol_s, ncol_q = a.max_cols, a.max_cols
    pad, lab_w = 2, 54
    W = lab_w + (ncol_s + ncol_q) * (s + pad) + 3 * pad + 6
    H = 16 + rows * (s + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((2, 2), f"{spec.source}/{spec.split} episode {spec.index}: {spec.ways} ways  |  support  ||  query", fill=(0, 0, 0))
    for r in range(rows):
        y = 16 + r * (s + pad)
        d.text((2, y + s // 2 - 5), f"{r}:c{spec.classes[r]}", fill=(0, 0, 0))
        sup = raw.support[raw.support_y == r][:ncol_s]
        qry = raw.query[raw.query_y == r][:ncol_q]
        for i, im in enumerate(sup):
            canvas.paste(Image.fromarray(np.asarray(im)), (lab_w + i * (s + pad), y))
        x0 = lab_w + ncol_s * (s + pad) + 3 * pad + 6
        d.line([(x0 - 4, y), (x0 - 4, y + s)], fill=(200, 0, 0), width=2)
        for i, im in enumerate(qry):
            canvas.paste(Image.fromarray(np.asarray(im)), (x0 + i * (s + pad), y))
    canvas.save(a.output)
    print(f"wrote {a.output}: {spec.source}/{spec.split} episode {spec.index}, {spec.ways} ways, "
          f"{len(raw.support_y)} support, {len(raw.query_y)} query")
    return 0


def cmd_stage(a) -> int:
    for name in stage(_root(a.out, a.set), a.dest, [a.source] if a.source else None):
        print(f"staged {name} -> {Path(a.dest) / name}")
    return 0


def cmd_upload(a) -> int:
    for name, n in upload(a.out, _root(a.dest, a.set), [a.source] if a.source else None):
        print(f"uploaded {name}: {n} files -> {a.dest}")
    return 0


def cmd_index(a) -> int:
    path = write_sources_index(a.out)
    print(f"{path}: {', '.join(json.loads(path.read_text())['sources']) or '(no sources)'}")
    return 0


def cmd_info(a) -> int:
    cat = Catalog(_root(a.out, a.set))
    print(f"{'source':<14} {'spec':<13} {'split':<6} {'classes':>7} {'images':>8} {'shards':>6} {'MiB':>8}")
    for name in cat.sources():
        st = cat.store(name)
        for split, sp in st.manifest["splits"].items():
            mib = sum(sh["bytes"] for sh in sp["shards"]) / 2**20
            packed = f"  (packed {sp['packed']['images_per_block']}/block)" if sp.get("packed") else ""
            print(f"{name:<14} {st.spec.kind:<13} {split:<6} {len(sp['classes']):>7} {sp['num_images']:>8} "
                  f"{len(sp['shards']):>6} {mib:>8.1f}{packed}")
    return 0


def cmd_export(a) -> int:
    print(export_folder(a.out, a.source, a.dest))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smat-data", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def write_args(q):
        q.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (classes in parallel)")
        q.add_argument("--shard-size", default="512MB", help="target shard size (e.g. 512MB, 64M)")
        q.add_argument("--tier", choices=["s256", "native"], default="s256",
                       help="s256: shorter side > --max-side is resized + re-encoded; native: bytes copied")
        q.add_argument("--max-side", type=int, default=256)
        q.add_argument("--jpeg-quality", type=int, default=95)
        q.add_argument("--decode-check", action="store_true", help="fully decode every input image")
        q.add_argument("--keep-work", action="store_true", help="keep the .work fragments after success")
        q.add_argument("--force", action="store_true", help="rebuild even if a complete manifest exists")
        q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    q = sub.add_parser("convert", help="MD TFRecords / PMF h5 / image folders -> shards")
    q.add_argument("--format", required=True, choices=["tfrecord", "h5", "folder"])
    q.add_argument("src")
    q.add_argument("out")
    q.add_argument("--source", required=True, help="source name (letters, digits, _ and -)")
    q.add_argument("--splits", help="folder input: class fractions, e.g. train=0.7,valid=0.15,test=0.15 or test=1")
    q.add_argument("--split-file", help="folder input: JSON {train: [class names], valid: [...], test: [...]}")
    q.add_argument("--pack", type=int, default=0, metavar="B",
                   help="store B images of a class per tar sample as one uint8 .npy (tiny grey images of "
                        "--pack-side px, e.g. QuickDraw: --pack 1024); 0 = one sample per image")
    q.add_argument("--pack-side", type=int, default=28)
    write_args(q)
    q.set_defaults(fn=cmd_convert)

    q = sub.add_parser("synth", help="build the synthetic multi-domain benchmark")
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--scale", type=float, default=1.0, help="multiplies the number of classes")
    q.add_argument("--sources", help="comma-separated subset")
    write_args(q)
    q.set_defaults(fn=cmd_synth)

    def set_arg(q):
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="DataConfig override, e.g. remote.stall_timeout_s=30")

    q = sub.add_parser("verify", help="checksums, counts, index consistency")
    q.add_argument("out")
    q.add_argument("--source")
    q.add_argument("--quick", action="store_true", help="checksums and counts only (no tar walk)")
    set_arg(q)
    q.set_defaults(fn=cmd_verify)

    def ep_args(q, required_source=True):
        q.add_argument("out")
        q.add_argument("--source", required=required_source)
        q.add_argument("--split", default="test", choices=["train", "valid", "test"])
        q.add_argument("--seed", type=int, default=0)
        set_arg(q)

    q = sub.add_parser("episodes", help="frozen episode list (JSONL) on stdout")
    ep_args(q)
    q.add_argument("-n", type=int, default=600)
    q.add_argument("--start", type=int, default=0, help="first global episode index")
    q.add_argument("-o", "--output", help="write to this file instead of stdout")
    q.set_defaults(fn=cmd_episodes)

    q = sub.add_parser("show", help="PNG grid of one episode (rows: classes; support | query)")
    ep_args(q, required_source=False)
    q.add_argument("--index", type=int, default=0)
    q.add_argument("--episodes", help="JSONL episode list to take the episode from")
    q.add_argument("--line", type=int, default=0, help="0-based line of --episodes")
    q.add_argument("--augment", action="store_true", help="training augmentation instead of the eval transform")
    q.add_argument("--max-rows", type=int, default=20)
    q.add_argument("--max-cols", type=int, default=8)
    q.add_argument("-o", "--output", default="episode.png")
    q.set_defaults(fn=cmd_show)

    q = sub.add_parser("info", help="sources, splits, counts and sizes")
    q.add_argument("out")
    set_arg(q)
    q.set_defaults(fn=cmd_info)

    q = sub.add_parser("stage", help="copy converted sources (local or URL root) to node-local disk "
                                     "(checksummed, resumable)")
    q.add_argument("out")
    q.add_argument("dest")
    q.add_argument("--source")
    set_arg(q)
    q.set_defaults(fn=cmd_stage)

    q = sub.add_parser("upload", help="upload a local root to a URL (object storage), manifests and sources.json last")
    q.add_argument("out")
    q.add_argument("dest", help="http(s)://... (HTTP PUT), s3://..., gs://..., or 'pipe:CMD ...{shard}...' "
                                "(the command gets each file on stdin)")
    q.add_argument("--source")
    set_arg(q)
    q.set_defaults(fn=cmd_upload)

    q = sub.add_parser("index", help="rewrite OUT/sources.json (the source list URL readers use)")
    q.add_argument("out")
    q.set_defaults(fn=cmd_index)

    q = sub.add_parser("export", help="write a converted source as an image-folder tree")
    q.add_argument("out")
    q.add_argument("--source", required=True)
    q.add_argument("dest")
    q.set_defaults(fn=cmd_export)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        return int(a.fn(a) or 0)
    except (ConvertError, DataError, SpecError, SamplerError, ConfigError) as exc:
        print(f"smat-data {a.cmd}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as exc:  # an output path that is a file, read-only, a full disk...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"smat-data {a.cmd}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
