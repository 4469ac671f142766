"""Run `nbdev-export` and fail if it changed the library (notebooks and `ultradino_lab/` out of sync),
then fail if any notebook under nbs/ is committed with outputs or execution counts (run `nbdev-clean`)."""
import hashlib, json, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]

def snapshot():
    "Hash of every file under the library folder (content + name), so any change by the export shows."
    h = hashlib.sha256()
    for p in sorted((root/'ultradino_lab').rglob('*.py')):
        h.update(str(p.relative_to(root)).encode()); h.update(p.read_bytes())
    return h.hexdigest(), sorted(str(p.relative_to(root)) for p in (root/'ultradino_lab').rglob('*.py'))

before, files_before = snapshot()
subprocess.run(['nbdev-export'], cwd=root, check=True)
after, files_after = snapshot()
if before != after:
    changed = subprocess.run(['git', 'status', '--porcelain', '--', 'ultradino_lab'], cwd=root,
                             capture_output=True, text=True).stdout
    sys.exit('nbdev-export changed the library: notebooks in nbs/ and ultradino_lab/ were out of sync.\n'
             f'{changed}Edit the notebooks (never ultradino_lab/*.py), run `nbdev-export` and commit both.')

dirty = []
for p in sorted((root/'nbs').rglob('*.ipynb')):
    if '.ipynb_checkpoints' in p.parts: continue
    nb = json.loads(p.read_text())
    if any(c.get('outputs') or c.get('execution_count') for c in nb.get('cells', [])): dirty.append(str(p.relative_to(root)))
if dirty:
    sys.exit('Notebooks hold outputs or execution counts (run `nbdev-clean` and commit):\n  ' + '\n  '.join(dirty))
print(f'check-sync: library in sync with {len(list((root/"nbs").rglob("*.ipynb")))} notebooks; notebooks clean.')
