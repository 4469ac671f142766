"""Authoring aid: turn a jupytext 'percent' script (`# %%` code cells, `# %% [markdown]` cells) into a clean
notebook under nbs/. The notebook is the source of truth afterwards; this only saves typing JSON.

    python tools/py2nb.py draft.py nbs/03_imageio.ipynb
"""
import sys, jupytext, nbformat

def py2nb(src, dst):
    nb = jupytext.read(src, fmt='py:percent')
    nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    for c in nb.cells:
        c.metadata = {}
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    nbformat.write(nb, dst)

if __name__ == '__main__':
    if len(sys.argv) != 3: sys.exit(__doc__)
    py2nb(sys.argv[1], sys.argv[2])
