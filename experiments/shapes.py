r"""The offline `shapes` demo: capjax's default config, named.

Synthetic images of coloured shapes with generated captions; the `patches`
extractor needs no weights, so everything runs offline on a laptop CPU in a
few minutes. Data and features are made on first use.

  python -m capjax.train --workdir /tmp/capjax-demo \
    --config experiments/shapes.py
  python -m capjax.sample --workdir /tmp/capjax-demo \
    /tmp/capjax-demo/examples/*.png
  python -m capjax.evaluate --workdir /tmp/capjax-demo --split test
"""

from capjax.configs import default


def get_config():
  return default.get_config()
