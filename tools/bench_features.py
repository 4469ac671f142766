"""Benchmark (not a test) of frozen-backbone feature extraction on the shared HC18 images, in images/s: end to end
(decode + resize + model, no cache; `ultradino_lab.features.extract_features`) and for the model alone (one real
batch repeated), for a smoke-size backbone (the `smoke` preset's ViT: tiny, 2 blocks, 4 registers, patch 16) and a
ViT-S/16 with 4 registers, both at random init (throughput does not depend on the weights).

    python tools/bench_features.py                          # 64 images -> outputs/bench/features.json
    python tools/bench_features.py --limit 256 --batch-size 64 --device cuda --precision bf16

Prints one line per backbone and size; writes JSON atomically. Nothing is asserted.
"""
import argparse, json, os, platform
from datetime import datetime, timezone
from pathlib import Path
import torch
from ultradino_lab.adapters import manifest_from_shared
from ultradino_lab.backbones import load_backbone
from ultradino_lab.core import atomic_write_text
from ultradino_lab.features import bench_feature_extraction
from ultradino_lab.settings import load_settings

BACKBONES = {   # name -> (spec, overrides, evaluation sizes)
    'smoke': ('random-init:vit_tiny_patch16_224', dict(depth=2, num_register_tokens=4, img_size=64), (64, 224)),
    'vits16': ('random-init:vit_small_patch16_224', dict(num_register_tokens=4), (224,)),
}

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--limit', type=int, default=64, help='number of HC18 images (first rows of the shared manifest)')
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--device', default=None, help="default: the lab settings' device")
    ap.add_argument('--precision', default=None, help="default: the lab settings' precision (auto: bf16 where supported)")
    ap.add_argument('--workers', type=int, default=None, help="loader workers (default: the lab's num_workers)")
    ap.add_argument('--only', choices=sorted(BACKBONES), action='append', help='run only this backbone (repeatable)')
    ap.add_argument('--out', type=Path, default=None, help='JSON output (default: <outputs_dir>/bench/features.json)')
    a = ap.parse_args(argv)
    settings = load_settings()
    df = manifest_from_shared('hc18').head(a.limit).reset_index(drop=True)
    rows = []
    for name in a.only or BACKBONES:
        spec, kw, sizes = BACKBONES[name]
        bb = load_backbone(spec, name=name, **kw)
        for size in sizes:
            rows.append(bench_feature_extraction(bb, df, img_size=size, batch_size=a.batch_size, device=a.device,
                                                 precision=a.precision, num_workers=a.workers))
    result = dict(benchmark='feature_extraction', created_utc=datetime.now(timezone.utc).isoformat(timespec='seconds'),
                  machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                               torch=torch.__version__, torch_threads=torch.get_num_threads(),
                               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
                  data=dict(dataset='hc18', n_images=len(df)), results=rows)
    out = a.out or settings.outputs_dir/'bench'/'features.json'
    atomic_write_text(out, json.dumps(result, indent=2) + '\n')
    print(f'-> {out}')
    return result

if __name__ == '__main__':
    main()
