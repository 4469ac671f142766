"""Benchmark (not a test) of the data pipeline on the shared HC18 images: decoding + sector crop + a streamed
statistics pass (`ultradino_lab.data.compute_norm_stats`), in images/s, next to a yardstick measured in the same
run: plain `PIL.Image.open(p).convert('L')` + numpy sum / sum of squares per image.

    python tools/bench_data.py                      # all 1,086 images, 3 repeats -> outputs/bench/data_pipeline.json
    python tools/bench_data.py --limit 20 --repeats 1 --out /tmp/bench.json

Each pipeline makes full passes over the same files (read once beforehand, so the OS file cache is warm for
all); the median pass is reported. Writes JSON atomically and prints a small table.
"""
import argparse, json, os, platform, statistics, sys, time
from datetime import datetime, timezone
from pathlib import Path
import numpy as np, pandas as pd, PIL, scipy, torch
from PIL import Image
from ultradino_lab.core import atomic_write_text
from ultradino_lab.data import compute_norm_stats
from ultradino_lab.settings import load_settings
from ultradino_lab.adapters import manifest_from_shared

def hc18_manifest(limit=None):
    "The shared HC18 manifest (dev + unlabeled) in the lab's schema: dataset 'hc18', paths as they are."
    root = load_settings().dataset_root('hc18')
    df = manifest_from_shared('hc18', root)
    return (df.head(limit) if limit else df).reset_index(drop=True), root

def baseline(paths):
    "The yardstick: Pillow decode to 'L' and numpy float64 sums, one image at a time."
    s = ss = n = 0.0
    for p in paths:
        a = np.asarray(Image.open(p).convert('L'), dtype=np.float64) / 255.0
        s += a.sum(); ss += (a * a).sum(); n += a.size
    return dict(mean=s / n, std=float(np.sqrt(max(ss / n - (s / n) ** 2, 0.0))))

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--limit', type=int, default=None, help='use only the first N manifest rows')
    ap.add_argument('--repeats', type=int, default=3, help='timed passes per pipeline (median reported)')
    ap.add_argument('--workers', type=int, default=None, help="loader workers for the parallel row (default: the lab's num_workers)")
    ap.add_argument('--out', type=Path, default=None, help='JSON output (default: <outputs_dir>/bench/data_pipeline.json)')
    a = ap.parse_args(argv)
    settings = load_settings()
    df, root = hc18_manifest(a.limit)
    paths = [root/p for p in df.path]
    for p in paths: p.read_bytes()     # warm the file cache for every pipeline alike
    workers = settings.resolved_num_workers if a.workers is None else a.workers
    lab = lambda **kw: (lambda: compute_norm_stats(df, roots={'hc18': root}, progress=False, **kw))
    pipelines = {   # name -> (description, workers, callable)
        'baseline_pil_numpy': ("PIL open+convert('L'), numpy float64 sum/sumsq", 0, lambda: baseline(paths)),
        'lab_decode_stats': ('read_grey + streamed histogram stats', 0, lab(num_workers=0)),
        'lab_sector_stats': ('read_grey + sector crop + streamed histogram stats', 0, lab(num_workers=0, sector_crop=True)),
    }
    if workers > 0:
        pipelines['lab_sector_stats_workers'] = (f'as lab_sector_stats, {workers} loader worker(s)', workers,
                                                 lab(num_workers=workers, sector_crop=True))
    times, outs = {k: [] for k in pipelines}, {}
    for _ in range(max(1, a.repeats)):            # interleaved, so drift on a shared machine hits all alike
        for k, (_, _, fn) in pipelines.items():
            t0 = time.perf_counter(); outs[k] = fn(); times[k].append(time.perf_counter() - t0)
    n = len(df)
    rows = [dict(pipeline=k, description=d, num_workers=w, images_per_s=n / statistics.median(times[k]),
                 seconds=[round(t, 4) for t in times[k]]) for k, (d, w, _) in pipelines.items()]
    base = rows[0]['images_per_s']
    for r in rows: r['ratio_to_baseline'] = r['images_per_s'] / base
    ref = outs['lab_decode_stats']
    result = dict(
        benchmark='data_pipeline', created_utc=datetime.now(timezone.utc).isoformat(timespec='seconds'),
        machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                     torch=torch.__version__, numpy=np.__version__, PIL=PIL.__version__, scipy=scipy.__version__,
                     torch_threads=torch.get_num_threads()),
        data=dict(dataset='hc18', manifest=str(root/'manifest.csv'), n_images=n, n_pixels=ref['n_pixels']),
        repeats=max(1, a.repeats), yardstick='baseline_pil_numpy', results=rows,
        ratio=rows[[r['pipeline'] for r in rows].index('lab_sector_stats')]['ratio_to_baseline'],
        stats=dict(full_frame={k: ref[k] for k in ('mean', 'std')},
                   sector_crop={k: outs['lab_sector_stats'][k] for k in ('mean', 'std')},
                   baseline={k: outs['baseline_pil_numpy'][k] for k in ('mean', 'std')}),
    )
    result['stats']['baseline_matches'] = bool(abs(ref['mean'] - result['stats']['baseline']['mean']) < 1e-9
                                               and abs(ref['std'] - result['stats']['baseline']['std']) < 1e-9)
    out = a.out or settings.outputs_dir/'bench'/'data_pipeline.json'
    atomic_write_text(out, json.dumps(result, indent=2) + '\n')
    w = max(len(r['pipeline']) for r in rows)
    print(f"data pipeline on {n} HC18 images, median of {result['repeats']} pass(es), {os.cpu_count()} CPU(s)")
    print(f"{'pipeline':<{w}}  {'workers':>7}  {'images/s':>9}  {'x baseline':>10}")
    for r in rows: print(f"{r['pipeline']:<{w}}  {r['num_workers']:>7}  {r['images_per_s']:>9.0f}  {r['ratio_to_baseline']:>10.2f}")
    print(f'-> {out}')
    return result

if __name__ == '__main__':
    main()
