#!/usr/bin/env python
"""Data-plane benchmark (not a test): throughput and memory, measured side by side in one run.

1. Throughput on the synthetic benchmark (training episodes of the ID sources, VWVS, with the
   training augmentation): the same episode list is produced by
   * ``naive``: one process opens and decodes every image of the episode from an image-folder
     copy of the shards (one file per image, PIL open + the same transform), no prefetch;
   * ``local``: :class:`EpisodeLoader` in-process (offset reads from the shards);
   * ``remote cold`` / ``remote warm``: the same over ``http://127.0.0.1`` (a local HTTP server
     serving the root): cold = empty node-local shard cache (each shard is fetched whole on first
     use, prefetch on), warm = the second pass over the filled cache;
   * ``ray xN``: :class:`EpisodeLoader` with N Ray episode actors and bounded prefetch.
   Episodes/s and images/s, and each one's ratio to ``naive``.
   Each pipeline runs twice: with a consumer that does nothing (raw throughput) and with a
   consumer that spends ``--step-ms`` per episode off the CPU (``sleep``, like a GPU training
   step): prefetching actors overlap that time, an in-process loader cannot.
2. The demo setting (``configs/demo/smat.yaml``: 32 px, its episode protocol, training
   augmentation): episodes/s of one in-process loader, local and over HTTP (cold, warm), against
   the tasks/s one trainer process consumes (the demo's SMAT model, single-process trainer,
   episodes already in memory), and their ratio.
3. Memory: peak RSS of a process building episodes from a flat source with C classes and
   with 10 C classes (same images per class), and the ratio.

    PYTHONPATH=. python tools/bench_data.py                      # builds the benchmark in a temp dir
    PYTHONPATH=. python tools/bench_data.py --root data/synth --episodes 40 --image-size 128
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smat_dist.data.builder import EpisodeBuilder  # noqa: E402
from smat_dist.data.config import DataConfig  # noqa: E402
from smat_dist.data.convert import export_folder  # noqa: E402
from smat_dist.data.sampler import PURPOSE_AUGMENT, episode_rng  # noqa: E402
from smat_dist.data.spec import flat_spec  # noqa: E402
from smat_dist.data.synth import ID_SOURCES, build_synth  # noqa: E402
from smat_dist.data.transforms import EpisodeTransform, to_tensor  # noqa: E402
from smat_dist.data.writer import ClassEntry, InputSource, WriteOptions, build_source  # noqa: E402


def naive_episodes(cfg: DataConfig, folders: dict, indices, seed: int):
    """Decode every image of each episode from the image-folder copy, in this process."""
    from PIL import Image

    planner = EpisodeBuilder(cfg, "train", seed)
    tf = EpisodeTransform(cfg.image_size, cfg.transform, train=True)
    paths = {}  # key -> file, listed once (a naive loader still knows its file list)
    for source, root in folders.items():
        for p in root.glob("*/*.*"):
            if p.name != "dataset_spec.json":
                paths[p.name.split(".")[0]] = p
    for g in indices:
        spec = planner.plan(g)
        items = spec.support + spec.query
        params = tf.params(episode_rng(spec.seed, spec.stream, g, PURPOSE_AUGMENT), len(items))
        out = []
        for p, (key, lab) in enumerate(items):
            with Image.open(paths[key]) as im:
                out.append(tf.apply(im.convert("RGB"), params[p]))
        x = to_tensor(np.stack(out), cfg.transform.mean, cfg.transform.std)
        yield len(items), x


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


@contextmanager
def http_server(directory: Path):
    """The root served on a free loopback port (what object storage is to a cluster node)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def loader_rate(cfg: DataConfig, idx, pause: float = 0.0):
    """(seconds, images, stats) of one in-process loader over the episodes ``idx``."""
    from smat_dist.data.loader import EpisodeLoader

    with EpisodeLoader(cfg, "train", seed=0, use_ray=False) as L:
        t0 = time.perf_counter()
        n = 0
        for e in L.iterate(idx):
            n += len(e.support_y) + len(e.query_y)
            if pause:
                time.sleep(pause)
        return time.perf_counter() - t0, n, L.stats()


def demo_setting(root: Path, episodes: int, steps: int) -> None:
    import torch

    from smat_dist.config import RunConfig, load_config
    from smat_dist.data.loader import EpisodeLoader
    from smat_dist.smat import SMAT
    from smat_dist.train.launch import Trainer

    cfg = load_config(RunConfig, [REPO / "configs" / "demo" / "smat.yaml"],
                      [f"data.root={root}", "model.backbone.checkpoint=null"])
    data, B = cfg.data, cfg.train.tasks_per_step
    idx = list(range(episodes))
    print(f"\n== demo setting (configs/demo/smat.yaml): {episodes} training episodes, {data.image_size} px, "
          f"ways <= {data.episode.max_ways_upper_bound}, support <= {data.episode.max_support_set_size}, "
          f"training augmentation, one process each ==")
    rows = [("local loader (shards, 1 process)",) + loader_rate(data, idx)]
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as cache, http_server(root) as url:
        remote = dataclasses.replace(data, root=url, cache_dir=cache)
        rows.append(("remote loader, HTTP loopback, cold cache",) + loader_rate(remote, idx))
        rows.append(("remote loader, HTTP loopback, warm cache",) + loader_rate(remote, idx))
    torch.set_num_threads(1)
    with EpisodeLoader(data, "train", seed=0, use_ray=False) as L:
        eps = list(L.iterate(range(steps * B)))
    torch.manual_seed(0)
    trainer = Trainer(SMAT(cfg.model), cfg.train)
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(eps[s * B:(s + 1) * B])
        times.append(time.perf_counter() - t0)
    consume = B / statistics.median(times[1:])
    print(f"{'pipeline':<44} {'episodes/s':>10} {'images/s':>9} {'MiB fetched':>11} {'x trainer':>9}")
    for name, t, n, st in rows:
        print(f"{name:<44} {episodes / t:>10.2f} {n / t:>9.0f} {st.get('cache_bytes_downloaded', 0) / 2**20:>11.1f} "
              f"{episodes / t / consume:>8.1f}x")
    print(f"{'trainer consumes (SMAT demo model, 1 process)':<44} {consume:>10.2f}   (median of {steps - 1} "
          f"meta-steps of {B} tasks, 1 torch thread)")


def timed(fn):
    t0 = time.perf_counter()
    n_img = fn()
    return time.perf_counter() - t0, n_img


class FlatNoise(InputSource):
    """C classes x k tiny PNGs (cheap to make): for the memory-vs-classes measurement."""

    fmt = "bench"

    def __init__(self, name: str, classes: int, per_class: int):
        self.name, self.classes, self.per_class = name, classes, per_class

    def entries(self):
        return [ClassEntry(c, f"c{c}", "train") for c in range(self.classes)]

    def spec(self):
        return flat_spec(self.name, {"train": self.classes}, {c: self.per_class for c in range(self.classes)},
                         {c: f"c{c}" for c in range(self.classes)})

    def read_class(self, entry):
        from PIL import Image

        rng = np.random.default_rng(entry.class_id)
        base = rng.integers(0, 256, 3)
        for i in range(self.per_class):
            arr = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
            yield buf.getvalue(), {"ref": str(i)}

    def origin(self):
        return {"format": "bench", "classes": self.classes, "per_class": self.per_class}


RSS_CHILD = r"""
import json, sys
def hwm():  # peak RSS of this process image (ru_maxrss would include the parent's, across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from smat_dist.data.builder import EpisodeBuilder
from smat_dist.data.config import DataConfig
root, source, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
before = hwm()
b = EpisodeBuilder(DataConfig(root=root, image_size=size), "train", 0, [source])
imgs = 0
for g in range(n):
    imgs += len(b.build(g).support_y)
st = b.stats()
print(json.dumps({"rss_kb": hwm(), "import_rss_kb": before, "open_files": st["open_files"], "images": imgs}))
"""


def peak_rss(root: Path, source: str, episodes: int, size: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", RSS_CHILD, str(root), source, str(episodes), str(size)],
                       capture_output=True, text=True, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="existing synthetic benchmark (default: build one in a temp dir)")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--actors", default="1,2", help="actor counts to run")
    ap.add_argument("--step-ms", type=float, default=200.0, help="simulated off-CPU training step per episode")
    ap.add_argument("--classes", type=int, default=100, help="C for the memory test (and 10 C)")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--demo-episodes", type=int, default=40, help="episodes for the demo-setting section (0: skip)")
    ap.add_argument("--demo-steps", type=int, default=6, help="trainer meta-steps timed in the demo section")
    a = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    work = Path(tmp.name)
    root = Path(a.root) if a.root else work / "synth"
    if not a.root:
        t, _ = timed(lambda: build_synth(str(root), opts=WriteOptions(shard_bytes=4 << 20, tier="native",
                                                                      workers=a.workers, progress=False)))
        print(f"built synthetic benchmark in {t:.1f}s ({a.workers} workers) -> {root}")
    folders = {s: export_folder(root, s, work / "folders" / s) for s in ID_SOURCES}
    cfg = DataConfig(root=str(root), image_size=a.image_size, max_in_flight=4)
    idx = list(range(a.episodes))
    print(f"\n== throughput: {a.episodes} training episodes of {', '.join(ID_SOURCES)}, {a.image_size} px, "
          f"training augmentation, {os.cpu_count()} CPU cores ==")
    rows = []
    step = a.step_ms / 1000.0

    def consume(episodes, pause):
        n = 0
        for e in episodes:
            n += e if isinstance(e, int) else len(e.support_y) + len(e.query_y)
            if pause:
                time.sleep(pause)
        return n

    def naive(pause):
        return consume((n for n, _ in naive_episodes(cfg, folders, idx, 0)), pause)

    def local(pause):
        from smat_dist.data.loader import EpisodeLoader

        with EpisodeLoader(cfg, "train", seed=0, use_ray=False) as L:
            return consume(L.iterate(idx), pause)

    for name, fn in (("naive (image folder, 1 process)", naive), ("local loader (shards, 1 process)", local)):
        rows.append((name,) + timed(lambda: fn(0.0)) + timed(lambda: fn(step))[:1])
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as cache, http_server(root) as url:
        remote = dataclasses.replace(cfg, root=url, cache_dir=cache)
        cold = loader_rate(remote, idx)
        warm = loader_rate(remote, idx)
        cold_dir = tempfile.mkdtemp(prefix="bench_cache_", dir=work)  # a cold cache for the paced pass
        cold_step = loader_rate(dataclasses.replace(remote, cache_dir=cold_dir), idx, step)
        warm_step = loader_rate(remote, idx, step)
    rows.append(("remote loader, HTTP, cold cache", cold[0], cold[1], cold_step[0]))
    rows.append(("remote loader, HTTP, warm cache", warm[0], warm[1], warm_step[0]))
    actors = [int(x) for x in a.actors.split(",") if x]
    if actors:
        import ray

        from smat_dist.data.loader import EpisodeLoader

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        for n in actors:
            with EpisodeLoader(cfg, "train", seed=0, num_actors=n) as warm:  # actor start-up is not throughput
                next(iter(warm.iterate([0])))
                t_raw, n_img = timed(lambda: consume(warm.iterate(idx), 0.0))
                t_step, _ = timed(lambda: consume(warm.iterate(idx), step))
                rows.append((f"ray loader, {n} actor{'s' if n > 1 else ''} (max_in_flight 4)", t_raw, n_img, t_step))
        ray.shutdown()
    base, base_step = rows[0][1], rows[0][3]
    print(f"{'pipeline':<40} {'episodes/s':>10} {'images/s':>10} {'speed-up':>9} | "
          f"{'with ' + str(int(a.step_ms)) + ' ms step: eps/s':>28} {'speed-up':>9}")
    for name, t, n, ts in rows:
        print(f"{name:<40} {a.episodes / t:>10.2f} {n / t:>10.0f} {base / t:>8.2f}x | "
              f"{a.episodes / ts:>28.2f} {base_step / ts:>8.2f}x")

    if a.demo_episodes:
        demo_setting(root, a.demo_episodes, a.demo_steps)

    print(f"\n== memory: peak RSS of a process building {a.episodes} episodes, flat source, "
          f"{a.per_class} images/class ==")
    mem = work / "mem"
    res = {}
    for c in (a.classes, 10 * a.classes):
        build_source(FlatNoise(f"flat{c}", c, a.per_class), mem, WriteOptions(workers=a.workers, progress=False,
                                                                           tier="native", shard_bytes=64 << 20))
        res[c] = peak_rss(mem, f"flat{c}", a.episodes, a.image_size)
    print(f"{'classes':>8} {'images':>8} {'peak RSS MiB':>13} {'after imports':>14} {'open files':>11}")
    for c, r in res.items():
        print(f"{c:>8} {c * a.per_class:>8} {r['rss_kb'] / 1024:>13.1f} {r['import_rss_kb'] / 1024:>14.1f} {r['open_files']:>11}")
    small, big = res[a.classes], res[10 * a.classes]
    print(f"RSS ratio (10x classes / 1x): {big['rss_kb'] / small['rss_kb']:.2f}   "
          f"(data-plane part above imports: {(big['rss_kb'] - big['import_rss_kb']) / 1024:.1f} vs "
          f"{(small['rss_kb'] - small['import_rss_kb']) / 1024:.1f} MiB)")
    print(f"benchmark peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
